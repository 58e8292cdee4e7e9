"""The client's model: built from the run config and the global arrays the server sent, and what goes back.

Without LoRA the arrays are the whole network. With federated LoRA (``lora-rank`` > 0) they are the adapters
only: the frozen base comes from the file the server pretrained (``lora-base-path``, or the node config's
``lora-base-path`` on a device that holds its own copy), checked against the SHA-256 the server sent
(``lora-base-sha256``), and the reply carries the adapters only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import ArrayRecord
from torch import nn

from client.data import ClientData


def lora_enabled(cfg: Mapping[str, Any]) -> bool:
    return int(cfg.get("lora-rank", 0) or 0) > 0


def client_model(arrays: ArrayRecord, cfg: Mapping[str, Any], data: ClientData) -> nn.Module:
    """The configured model holding the received ``arrays`` (for LoRA: the server's frozen base + the adapters)."""
    from models import build_model

    image_size, num_classes = int(data.x.shape[-1]), int(data.num_classes)
    if not lora_enabled(cfg):
        model = build_model(str(cfg["model"]), image_size=image_size, num_classes=num_classes)
        model.load_state_dict(arrays.to_torch_state_dict())
        return model
    from kernels.lora import load_lora_state_dict
    from models.lora import build_lora_model, load_base

    if not cfg.get("lora-base-path") or not cfg.get("lora-base-sha256"):
        raise ValueError("lora-base-path: a federated LoRA round must name the base model file and its SHA-256")
    base = load_base(str(cfg["lora-base-path"]), str(cfg["lora-base-sha256"]))
    model = build_lora_model(str(cfg["model"]), image_size, num_classes, int(cfg["lora-rank"]),
                             float(cfg.get("lora-alpha", 0.0)), base_state=base)
    load_lora_state_dict(model, arrays.to_torch_state_dict())
    return model


def reply_arrays(model: nn.Module, cfg: Mapping[str, Any]) -> ArrayRecord:
    """What travels back: the whole state, or for federated LoRA the adapter factors only."""
    if lora_enabled(cfg):
        from kernels.lora import lora_state_dict

        return ArrayRecord(lora_state_dict(model))
    return ArrayRecord({k: v.detach() for k, v in model.state_dict().items()})
