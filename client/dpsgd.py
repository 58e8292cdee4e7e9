"""Client-side DP-SGD with Opacus (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016, Alg. 1).

Each round the client trains the received model with per-example gradient clipping (``clip-norm``) and Gaussian
noise (the noise multiplier the server calibrated for this client), on Poisson-sampled batches as Opacus intends
(sampling rate q = 1 / ceil(n / batch-size)). The Opacus accountant's history is kept in the node's
``Context.state`` across rounds, so the client's own ε accumulates instead of restarting every round; it is
reported beside the update as a cross-check of the server's ledger (which is the record of account).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from client.data import ClientData

# Integer RDP orders: Opacus evaluates them in closed form (its fractional orders cost ~0.25 s per call); the
# cross-check is then a little looser than the ledger, never tighter.
CHECK_ORDERS = [*range(2, 64), 80, 96, 128, 192, 256]
HISTORY_KEY = "dpsgd-history"  # ConfigRecord in Context.state: flat [sigma, q, steps, sigma, q, steps, ...]


def batches_per_epoch(num_examples: int, batch_size: int) -> int:
    """Opacus' Poisson loader draws this many batches per epoch (q = 1 / this)."""
    return max(1, math.ceil(num_examples / batch_size))


def load_history(state: RecordDict) -> list[tuple[float, float, int]]:
    if HISTORY_KEY not in state.config_records:
        return []
    flat = list(state.config_records[HISTORY_KEY]["history"])
    return [(float(flat[i]), float(flat[i + 1]), int(flat[i + 2])) for i in range(0, len(flat), 3)]


def save_history(state: RecordDict, history: list[tuple[float, float, int]]) -> None:
    flat = [float(v) for entry in history for v in entry]
    state.config_records[HISTORY_KEY] = ConfigRecord({"history": flat})


def dpsgd_fit(
    arrays: ArrayRecord, cfg: Mapping[str, Any], data: ClientData, seed: int | None, state: RecordDict
) -> RecordDict:
    """Train with DP-SGD for ``local-epochs`` epochs; reply the update, metrics and the client's own ε.

    Opacus provides the Poisson ``DPDataLoader`` (sampling rate q = 1 / batches per epoch) and the RDP accountant
    whose history persists in the node state. The update is DP-SGD with flat per-example clipping to
    ``clip-norm``, Gaussian noise of std ``dp-noise-multiplier × clip-norm`` on the clipped sum and averaging by the
    expected batch size. ``grad-sample-mode`` picks the per-example gradient engine: ``layers`` (default) or
    ``vmap`` (:mod:`client.per_sample`, whose step reproduces ``DPOptimizer``'s arithmetic), or ``hooks`` —
    Opacus' own ``GradSampleModule`` + ``DPOptimizer``, the slower reference the others are tested against.

    ``seed`` seeds the Poisson sampling and the noise (reproducible simulations). ``None`` — a deployed node —
    draws both from OS entropy: a seed the server can know would let it subtract the noise. (torch's unseeded
    generators are *not* random: they start from a fixed default seed.)
    """
    import torch
    from opacus.accountants import RDPAccountant
    from opacus.data_loader import DPDataLoader
    from opacus.validators import ModuleValidator
    from torch.utils.data import DataLoader, TensorDataset

    from client.model import client_model, reply_arrays
    from client.per_sample import dp_sgd_step, per_example_gradients
    from models import TrainConfig, set_torch_threads
    from models.training import make_optimizer

    set_torch_threads(int(float(cfg.get("client-cpus", 1.0))))
    sigma = float(cfg["dp-noise-multiplier"])
    clip = float(cfg["clip-norm"])
    batch_size = int(cfg["batch-size"])
    epochs = int(cfg["local-epochs"])
    mode = str(cfg.get("grad-sample-mode", "layers"))
    sampler, noise = torch.Generator(), torch.Generator()
    for offset, gen in enumerate((sampler, noise)):
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(seed + offset)

    model = client_model(arrays, cfg, data)  # for federated LoRA: the frozen base + the received adapters
    ModuleValidator.validate(model, strict=True)  # no BatchNorm or other layers that mix examples
    tcfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=float(cfg["lr"]), momentum=float(cfg["momentum"]),
                       weight_decay=float(cfg["weight-decay"]), optimizer=str(cfg["optimizer"]))
    dataset = TensorDataset(torch.from_numpy(data.x), torch.from_numpy(data.y).long())
    loader = DPDataLoader.from_data_loader(DataLoader(dataset, batch_size=batch_size), generator=sampler)
    sample_rate = 1 / len(loader)
    expected_batch_size = int(len(dataset) * sample_rate)
    accountant = RDPAccountant()
    accountant.history = load_history(state)
    if mode == "hooks":
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        model = GradSampleModule(model, loss_reduction="mean")
        model.forbid_grad_accumulation()
        optimizer = DPOptimizer(make_optimizer(model, tcfg), noise_multiplier=sigma, max_grad_norm=clip,
                                expected_batch_size=expected_batch_size, loss_reduction="mean", generator=noise)
        optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
        loss_fn = torch.nn.CrossEntropyLoss()
    elif mode in ("layers", "vmap"):
        grads_of = per_example_gradients(model, torch.nn.CrossEntropyLoss(reduction="none"), mode)
        optimizer = make_optimizer(model, tcfg)
    else:
        raise ValueError(f"grad-sample-mode must be one of layers, vmap, hooks, got {mode!r}")

    model.train()
    total, count = 0.0, 0
    for _ in range(epochs):
        for xb, yb in loader:
            # An empty Poisson batch still takes a (noise-only) step: the mechanism is the same every step.
            if mode == "hooks":
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(xb), yb) if len(yb) else model(xb).sum() * 0.0
                loss.backward()
                optimizer.step()
                total += loss.item() * len(yb)
            else:
                grads = grads_of(xb, yb)
                dp_sgd_step(optimizer, grads, clip_norm=clip, noise_multiplier=sigma,
                            expected_batch_size=expected_batch_size, generator=noise)
                accountant.step(noise_multiplier=sigma, sample_rate=sample_rate)
                total += float(grads.losses.sum())
            count += len(yb)
    save_history(state, accountant.history)
    delta = float(cfg["target-delta"])
    metrics = MetricRecord({
        "train-loss": total / max(count, 1),
        "num-examples": len(data.y),
        "dp-steps": int(sum(steps for *_, steps in accountant.history)),
        "dp-client-epsilon": float(accountant.get_epsilon(delta, alphas=CHECK_ORDERS)),
    })
    plain = model._module if mode == "hooks" else model
    return RecordDict({"arrays": reply_arrays(plain, cfg), "metrics": metrics})
