"""GPU-client building blocks that depend on torch only: LASER attention, LoRA adapters, LoRA-RITE.

* :func:`laser_attention` — LASER attention (SDPA composition everywhere, fused Triton kernel on CUDA);
* :class:`LoRALinear`, :func:`apply_lora`, :func:`lora_state_dict`, ... — Opacus-compatible LoRA adapters;
* :class:`LoRARITE` — the transformation-invariant LoRA optimizer; :func:`make_fused_adamw` — the AdamW baseline.

Nothing here imports Flower, Opacus or the other fedpriv packages; triton is imported lazily, for CUDA inputs only.
"""

from kernels.laser import laser_attention, laser_attention_reference, triton_route_supported
from kernels.lora import LoRALinear, apply_lora, load_lora_state_dict, lora_param_groups, lora_state_dict
from kernels.lora_rite import LoRARITE, make_fused_adamw

__all__ = [
    "LoRALinear",
    "LoRARITE",
    "apply_lora",
    "laser_attention",
    "laser_attention_reference",
    "load_lora_state_dict",
    "lora_param_groups",
    "lora_state_dict",
    "make_fused_adamw",
    "triton_route_supported",
]
