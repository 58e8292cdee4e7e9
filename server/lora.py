"""Server side of federated LoRA: pretrain the base on the public split, publish it, evaluate base + adapters.

Before round 1 the server trains the configured network on its public split (:attr:`ServerSetup.public_data`:
``lora-public-fraction`` of the training examples of classes 0 .. ``lora-public-classes``−1, which no client
holds) and writes it to ``<run dir>/base/model.npz``. Clients read that file (or their own copy, node config
``lora-base-path``) and check its SHA-256, which travels in the round's config record with the path — the
base never travels in a Flower message. The global arrays of the round loop, the checkpoints and every message
hold the adapters only. ``--resume`` reuses the saved base.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from server.config import RunConfig
from server.setup import TestData

logger = logging.getLogger("fedpriv")

# In-process memo of pretrained bases: (model, data digest, pretraining settings) → state. Runs in one process
# that share the public split and settings (benchmarks comparing optimizers) pretrain once.
_PRETRAINED: dict[tuple[Any, ...], tuple[dict[str, Any], float, float]] = {}


@dataclass
class LoraBase:
    """The frozen base of a federated LoRA run: where it lies, its hash, its weights, and facts for the summary."""

    path: Path
    sha256: str
    state: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)

    def config_entries(self) -> dict[str, str]:
        """What the round's config record adds for the clients: the base file and its SHA-256."""
        return {"lora-base-path": str(self.path.resolve()), "lora-base-sha256": self.sha256}


def _digest(public: TestData) -> str:
    h = hashlib.sha256()
    h.update(public.x.tobytes())
    h.update(public.y.tobytes())
    return h.hexdigest()


def prepare_base(cfg: RunConfig, public: TestData | None, test: TestData, run_dir: Path, resume: bool) -> LoraBase:
    """Pretrain (or, when resuming, reload) the base model and describe it.

    Raises
    ------
    ValueError
        No public split was given, or a resumed run's base file is missing.
    """
    from models import evaluate
    from models.lora import adapter_count, build_lora_model, file_sha256, load_base, pretrain_base, save_base

    path = Path(run_dir) / "base" / "model.npz"
    info_path = path.with_name("info.json")
    if resume and path.is_file() and info_path.is_file():
        info = json.loads(info_path.read_text())
        sha = file_sha256(path)
        if info.get("base_sha256", sha) != sha:
            raise ValueError(f"lora-rank: the base model {path} changed since the run started (SHA-256 "
                             f"{sha[:16]}…, recorded {str(info['base_sha256'])[:16]}…); cannot resume")
        state = load_base(path, sha)
        logger.info("federated LoRA: reusing the base model of %s", path)
        return LoraBase(path, sha, state, info)
    if resume:
        raise ValueError(f"lora-rank: cannot resume a federated LoRA run without its base model ({path})")
    if public is None or len(public.y) == 0:
        raise ValueError("lora-rank: federated LoRA needs the server's public split to pretrain the base model")
    key = (cfg.model, _digest(public), public.num_classes, cfg.lora_pretrain_epochs, cfg.lora_pretrain_lr,
           cfg.server_batch_size, cfg.weight_decay, cfg.seed)
    if key not in _PRETRAINED:
        t0 = time.perf_counter()
        state, loss = pretrain_base(cfg.model, public.x, public.y, public.num_classes,
                                    epochs=cfg.lora_pretrain_epochs, lr=cfg.lora_pretrain_lr,
                                    batch_size=cfg.server_batch_size, weight_decay=cfg.weight_decay, seed=cfg.seed)
        _PRETRAINED[key] = (state, loss, time.perf_counter() - t0)
    state, loss, seconds = _PRETRAINED[key]
    sha = save_base(state, path)
    model = build_lora_model(cfg.model, int(test.x.shape[-1]), test.num_classes, cfg.lora_rank, cfg.lora_alpha,
                             base_state=state)
    adapters = adapter_count(model)
    base_params = sum(v.numel() for v in state.values())
    _, base_acc = evaluate(model, test.x, test.y)
    public_classes = sorted(int(c) for c in set(public.y.tolist()))
    info = {
        "rank": cfg.lora_rank,
        "alpha": cfg.lora_alpha or float(cfg.lora_rank),
        "balance": cfg.lora_balance,
        "adapter_params": adapters,
        "base_params": base_params,
        "adapter_share": adapters / base_params,
        "adapter_payload_bytes": 4 * adapters,  # float32 data of one client's reply (plus record framing)
        "full_model_payload_bytes": 4 * base_params,
        "public_examples": len(public.y),
        "public_classes": public_classes,
        "pretrain_epochs": cfg.lora_pretrain_epochs,
        "pretrain_loss": loss,
        "pretrain_s": round(seconds, 3),
        "base_test_accuracy": base_acc,
        "base_sha256": sha,
    }
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    logger.info("federated LoRA: base %s pretrained on %d public examples (classes %s) in %.1fs, test accuracy "
                "%.4f; %d adapter parameters travel (%.1f%% of %d)", cfg.model, len(public.y), public_classes,
                seconds, base_acc, adapters, 100 * adapters / base_params, base_params)
    return LoraBase(path, sha, state, info)


def lora_model(cfg: RunConfig, base: LoraBase, test: TestData, seed: int | None = None) -> Any:
    """The base + LoRA adapters model of the run (``seed``: the seeded initial adapters)."""
    from models.lora import build_lora_model

    return build_lora_model(cfg.model, int(test.x.shape[-1]), test.num_classes, cfg.lora_rank, cfg.lora_alpha,
                            base_state=base.state, seed=seed)


def initial_adapters(cfg: RunConfig, base: LoraBase, test: TestData) -> ArrayRecord:
    """The seeded initial adapters (A Kaiming-uniform, B = 0: the adapted model starts as the base)."""
    from kernels.lora import lora_state_dict

    return ArrayRecord(lora_state_dict(lora_model(cfg, base, test, seed=cfg.seed)))


def balance_adapters(arrays: ArrayRecord) -> ArrayRecord:
    """Rescale every adapter pair of an aggregated model to equal Frobenius norms: (B, A) → (B·c, A/c) with
    c = √(‖A‖/‖B‖), so B·A — the model — is unchanged (up to float rounding); pairs with a zero factor are kept.

    Why: FedAvg averages A and B separately, which is not invariant to reparametrizing a pair, and LoRA-RITE (by
    design invariant to it) lets the factors' scales drift apart — B stays small, A grows — so that the average
    of the clients' factor products degrades; rebalancing the global adapters each round keeps the averaging well
    conditioned (measured in benchmarks/README.md). A deterministic function of the released model:
    post-processing, free under differential privacy.
    """
    out = {key: array.numpy() for key, array in arrays.items()}
    for key in list(out):
        if not key.endswith("lora_A.weight"):
            continue
        key_b = key[: -len("lora_A.weight")] + "lora_B.weight"
        if key_b not in out:
            continue
        a, b = out[key], out[key_b]
        norm_a, norm_b = float(np.linalg.norm(a)), float(np.linalg.norm(b))
        if norm_a > 0.0 and norm_b > 0.0 and np.isfinite(norm_a) and np.isfinite(norm_b):
            c = (norm_a / norm_b) ** 0.5
            out[key], out[key_b] = (a / c).astype(a.dtype), (b * c).astype(b.dtype)
    return ArrayRecord({key: Array(value) for key, value in out.items()})
