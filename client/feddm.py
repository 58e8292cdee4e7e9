"""Client side of FedDM: learn a small synthetic set whose feature distribution matches the local data's around
the received global model (Xiong et al., "FedDM: Iterative Distribution Matching for Communication-Efficient
Federated Learning", CVPR 2023; see :mod:`strategies.feddm` for the equations).

Non-private (``client-task = "feddm"``)
---------------------------------------
For every class c present locally the client keeps m_c = min(feddm-images-per-class, n_c) synthetic images,
initialized from distinct real images of class c. Each of ``feddm-iterations`` steps

1. draws a fresh perturbation of the global weights, w = w_g + δ with δ = ρ · g / ‖g‖₂, g ~ N(0, I) over *all*
   parameters jointly (a uniformly random direction, total ℓ2 norm exactly ρ = ``feddm-rho``; the reference
   reproductions draw the same direction and additionally cap the scale at 1 per coordinate, which only matters
   for models with fewer than ρ² parameters);
2. draws ``feddm-real-batch`` real examples of every present class (with replacement), runs *one* forward of
   all classes' real batches (no gradient) and *one* forward of all synthetic images, and computes per class
   the mean of φ_w(x) = [penultimate features, logits] (a (P, D) matrix; the per-class means are an
   ``index_add`` over class ids, never a Python loop over classes or examples);
3. takes a step of ``feddm-optimizer`` (the paper's SGD with ``feddm-momentum``, or Adam) with learning rate
   ``feddm-lr`` on the synthetic images of L = Σ_c ‖mean_real_c − mean_syn_c‖² and projects them back to the
   pixel range [0, 1].

Differentially private (``client-task = "feddm-dp"``, added by :class:`strategies.feddm.FedDMDp`)
---------------------------------------------------------------------------------------------------
Privacy unit: one example. The client draws T = ``feddm-dp-releases`` perturbations w_1..w_T and, for each, makes
**one** Gaussian release from all its real data: the per-class sums of the clipped feature vectors,
S_t[c] = Σ_{i: y_i = c} clip_C(φ_{w_t}(x_i)) with clip_C(v) = v · min(1, C / ‖v‖) and C = ``clip-norm``, plus
N(0, σ²C²) in every coordinate. Adding or removing one example changes exactly one row of S_t by at most C in ℓ2,
so this is the Gaussian mechanism with noise multiplier σ (full batch, no sampling). The per-class counts are
released once per round the same way (sensitivity 1, std σ). That is T + 1 Gaussian releases per round, which
the server plans, calibrates (σ from target ε over rounds × (T + 1)) and records in the ledger before the
message leaves. Everything after the releases is post-processing: a class is synthesized only if its noisy
count is ≥ 3σ (an absent class passes with probability 0.13 %); the synthetic images start from uniform noise
(independent of the data) and are optimized for ``feddm-iterations`` steps against the noisy targets
S̃_t[c] / ñ_c, cycling through the T stored perturbations, with the synthetic features clipped the same way.
No exact statistic of the real data is reported (metrics are computed against the noisy targets).

Randomness: in simulation it is seeded from the run seed, partition and round (reproducible runs); a deployed
node passes ``None`` and draws the DP noise from the OS entropy pool, because a seed the server could guess
would let it subtract the noise.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from client.data import ClientData
from strategies.feddm import SYNTHETIC_KEY  # the reply's ArrayRecord: images (M, C, S, S) float32, labels (M,) int64

DP_COUNT_THRESHOLD = 3.0  # a class is synthesized when its noisy count is >= this many count-noise stds
FEATURE_CHUNK = 2048  # real examples per forward when computing full-data statistics


# ---------------------------------------------------------------------------------------------------------
# the model as an embedding + a linear head
# ---------------------------------------------------------------------------------------------------------
def split_model(model: Any) -> tuple[Any, Any]:
    """(body, head) with ``head(body(x)) == model(x)``: body gives the penultimate features, head the logits.

    Supports the networks of :mod:`models.nets` (``mlp``, ``cnn``).
    """
    from torch import nn

    from models.nets import CNN, MLP

    if isinstance(model, MLP):
        return model.net[:-1], model.net[-1]
    if isinstance(model, CNN):
        return nn.Sequential(model.features, *model.head[:-1]), model.head[-1]
    raise ValueError(f"FedDM needs a model split into features and a linear head (mlp, cnn), got "
                     f"{type(model).__name__}")


def features(body: Any, head: Any, x: Any) -> Any:
    """φ(x) = [penultimate features, logits], shape (N, D + K) for images ``x`` (N, C, S, S)."""
    import torch

    emb = body(x)  # (N, D)
    return torch.cat([emb, head(emb)], dim=1)  # (N, D + K)


def clip_rows(f: Any, clip: float) -> Any:
    """Scale every row of ``f`` (N, D) to ℓ2 norm at most ``clip``."""
    norms = f.norm(dim=1, keepdim=True)  # (N, 1)
    return f * (clip / norms.clamp_min(1e-12)).clamp(max=1.0)


def group_means(f: Any, groups: Any, sizes: Any) -> Any:
    """Mean of the rows of ``f`` (N, D) per group id in ``groups`` (N,), divided by ``sizes`` (G,): (G, D)."""
    import torch

    sums = torch.zeros(len(sizes), f.shape[1], dtype=f.dtype).index_add_(0, groups, f)  # (G, D)
    return sums / sizes[:, None].to(f.dtype)


class Perturbation:
    """Random perturbations w = w_g + ρ·g/‖g‖ (g ~ N(0, I) over all parameters) applied in place to ``model``."""

    def __init__(self, model: Any, rho: float) -> None:
        self.params = [p for p in model.parameters()]
        for p in self.params:
            p.requires_grad_(False)
        self.base = [p.detach().clone() for p in self.params]
        self.rho = float(rho)

    def apply(self, generator: Any) -> float:
        """Set the model to a fresh perturbation drawn from ``generator``; return ‖δ‖₂ (= ρ)."""
        import torch

        noise = [torch.randn(p.shape, generator=generator) for p in self.params]
        norm = float(torch.sqrt(sum((g * g).sum() for g in noise)))
        scale = self.rho / max(norm, 1e-12)
        with torch.no_grad():
            for p, w, g in zip(self.params, self.base, noise, strict=True):
                p.copy_(w + scale * g)
        return scale * norm

    def reset(self) -> None:
        """Back to the unperturbed global weights."""
        import torch

        with torch.no_grad():
            for p, w in zip(self.params, self.base, strict=True):
                p.copy_(w)


# ---------------------------------------------------------------------------------------------------------
# the synthetic set
# ---------------------------------------------------------------------------------------------------------
@dataclass
class SyntheticSet:
    """Synthetic images and their classes.

    ``images`` (M, C, S, S) float32 tensor; ``labels`` (M,) int64 class ids; ``groups`` (M,) index of each image's
    class in ``classes`` (P,); ``sizes`` (P,) images per class.
    """

    images: Any
    labels: Any
    groups: Any
    classes: Any
    sizes: Any


def _layout(classes: np.ndarray, per_class: np.ndarray) -> tuple[Any, Any, Any, Any]:
    import torch

    groups = np.repeat(np.arange(len(classes)), per_class)  # (M,)
    return (torch.from_numpy(classes[groups].astype(np.int64)), torch.from_numpy(groups.astype(np.int64)),
            torch.from_numpy(classes.astype(np.int64)), torch.from_numpy(per_class.astype(np.int64)))


def init_from_real(x: np.ndarray, y: np.ndarray, images_per_class: int, rng: np.random.Generator) -> SyntheticSet:
    """min(images_per_class, n_c) distinct real images of every present class c."""
    import torch

    order = np.lexsort((rng.random(len(y)), y))  # by class, random within class
    ys = y[order]
    classes, starts, counts = np.unique(ys, return_index=True, return_counts=True)
    per_class = np.minimum(counts, images_per_class)
    rank = np.arange(len(ys)) - np.repeat(starts, counts)  # position within its class
    take = order[rank < np.repeat(per_class, counts)]  # (M,), grouped by class in class order
    labels, groups, cls, sizes = _layout(classes, per_class)
    return SyntheticSet(torch.from_numpy(x[take].copy()), labels, groups, cls, sizes)


def init_from_noise(shape: tuple[int, ...], classes: np.ndarray, images_per_class: int,
                    generator: Any) -> SyntheticSet:
    """``images_per_class`` images of uniform noise in [0, 1] for each class in ``classes`` (data-independent)."""
    import torch

    per_class = np.full(len(classes), images_per_class)
    labels, groups, cls, sizes = _layout(np.asarray(classes), per_class)
    images = torch.rand((len(labels), *shape), generator=generator)
    return SyntheticSet(images, labels, groups, cls, sizes)


Targets = Callable[[int], Any]  # iteration -> (P, D) per-class target means, with the model set accordingly


def synthesize(
    model: Any, syn: SyntheticSet, targets: Targets, *, iterations: int, lr: float, momentum: float = 0.5,
    optimizer: str = "sgd", clip: float | None = None,
) -> list[float]:
    """Optimize ``syn.images`` in place; return the matching loss of every iteration.

    ``targets(it)`` sets the model's (perturbed) weights for iteration ``it`` and returns the per-class target
    means (P, D) in the order of ``syn.classes``. ``optimizer`` is ``sgd`` (with ``momentum``; the paper's) or
    ``adam`` (invariant to the scale of the features, which grows by orders of magnitude as the global model
    trains). With ``clip`` the synthetic features are clipped like the real ones were (the DP variant).
    """
    import torch

    body, head = split_model(model)
    images = syn.images.clone().requires_grad_(True)
    if optimizer == "sgd":
        opt: Any = torch.optim.SGD([images], lr=lr, momentum=momentum)
    elif optimizer == "adam":
        opt = torch.optim.Adam([images], lr=lr)
    else:
        raise ValueError(f"feddm-optimizer must be one of sgd, adam, got {optimizer!r}")
    losses = []
    for it in range(iterations):
        target = targets(it)  # (P, D)
        f = features(body, head, images)  # (M, D)
        if clip is not None:
            f = clip_rows(f, clip)
        loss = ((target - group_means(f, syn.groups, syn.sizes)) ** 2).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            images.clamp_(0.0, 1.0)
        losses.append(float(loss.detach()))
    syn.images = images.detach()
    return losses


def real_batch_targets(
    model: Any, perturb: Perturbation, x: np.ndarray, y: np.ndarray, classes: Any, batch: int, generator: Any
) -> Targets:
    """Non-private targets: each iteration a fresh perturbation and ``batch`` real examples per class.

    One no-grad forward of all classes' real batches (P·batch examples) per iteration.
    """
    import torch

    body, head = split_model(model)
    order = np.argsort(y, kind="stable")
    xs = torch.from_numpy(x[order])  # real images sorted by class
    counts = np.bincount(y, minlength=int(classes.max()) + 1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    start = torch.from_numpy(starts[classes.numpy()])  # (P,)
    count = torch.from_numpy(counts[classes.numpy()])  # (P,)
    p = len(classes)

    def targets(_it: int) -> Any:
        perturb.apply(generator)
        idx = start[:, None] + (torch.rand(p, batch, generator=generator) * count[:, None]).long()  # (P, B)
        with torch.no_grad():
            f = features(body, head, xs[idx.reshape(-1)])  # (P·B, D)
        return f.reshape(p, batch, -1).mean(dim=1)  # (P, D)

    return targets


def class_sums(model: Any, x: np.ndarray, y: np.ndarray, num_classes: int, clip: float | None) -> np.ndarray:
    """Per-class sums of (clipped) feature vectors over all of ``x``: (K, D) float64, in chunks, no gradient."""
    import torch

    body, head = split_model(model)
    sums = None
    with torch.no_grad():
        for s in range(0, len(y), FEATURE_CHUNK):
            f = features(body, head, torch.from_numpy(x[s : s + FEATURE_CHUNK])).double()  # (n, D)
            if clip is not None:
                f = clip_rows(f, clip)
            if sums is None:
                sums = torch.zeros(num_classes, f.shape[1], dtype=torch.float64)
            sums.index_add_(0, torch.from_numpy(y[s : s + FEATURE_CHUNK]).long(), f)
    assert sums is not None
    return sums.numpy()


@dataclass
class NoisyStatistics:
    """What the DP client releases: noisy per-class counts (K,) and, per perturbation, noisy clipped sums (K, D)."""

    counts: np.ndarray  # (K,)
    sums: list[np.ndarray]  # T × (K, D)
    perturbation_seeds: list[int]  # the perturbation of release t is drawn from a generator seeded with this


def noisy_statistics(
    model: Any, perturb: Perturbation, x: np.ndarray, y: np.ndarray, num_classes: int, *, releases: int,
    clip: float, noise_multiplier: float, rng: np.random.Generator, perturbation_seed: int,
) -> NoisyStatistics:
    """The T + 1 Gaussian releases of one DP round (see the module docstring); the only place real data is read."""
    import torch

    from privacy.mechanisms import GaussianMechanism

    counts = GaussianMechanism(noise_multiplier, 1.0).apply(np.bincount(y, minlength=num_classes), rng)
    sums_mech = GaussianMechanism(noise_multiplier, clip)
    seeds = [perturbation_seed + t for t in range(releases)]
    sums = []
    for s in seeds:
        perturb.apply(torch.Generator().manual_seed(s))
        sums.append(sums_mech.apply(class_sums(model, x, y, num_classes, clip), rng))
    perturb.reset()
    return NoisyStatistics(counts, sums, seeds)


def noisy_targets(perturb: Perturbation, stats: NoisyStatistics, classes: np.ndarray) -> Targets:
    """DP targets: iteration ``it`` uses release ``it mod T`` — its perturbation and S̃_t[c] / ñ_c."""
    import torch

    denom = np.maximum(stats.counts[classes], 1.0)[:, None]  # (P, 1)
    means = [torch.from_numpy((s[classes] / denom).astype(np.float32)) for s in stats.sums]  # T × (P, D)

    def targets(it: int) -> Any:
        t = it % len(means)
        perturb.apply(torch.Generator().manual_seed(stats.perturbation_seeds[t]))
        return means[t]

    return targets


# ---------------------------------------------------------------------------------------------------------
# client tasks
# ---------------------------------------------------------------------------------------------------------
def _model(arrays: ArrayRecord, cfg: Mapping[str, Any], data: ClientData) -> Any:
    from models import build_model, set_torch_threads

    set_torch_threads(int(float(cfg.get("client-cpus", 1.0))))
    model = build_model(str(cfg["model"]), image_size=data.x.shape[-1], num_classes=data.num_classes)
    model.load_state_dict(arrays.to_torch_state_dict())
    return model.eval()


def _optim(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {"iterations": int(cfg["feddm-iterations"]), "lr": float(cfg["feddm-lr"]),
            "momentum": float(cfg["feddm-momentum"]), "optimizer": str(cfg["feddm-optimizer"])}


def _reply(syn: SyntheticSet, losses: list[float], started: float, extra: dict[str, Any]) -> RecordDict:
    window = max(1, len(losses) // 10)
    arrays = ArrayRecord(array_dict={
        "images": Array(np.ascontiguousarray(syn.images.numpy(), dtype=np.float32)),
        "labels": Array(np.ascontiguousarray(syn.labels.numpy(), dtype=np.int64)),
    })
    metrics = MetricRecord({
        "num-examples": len(syn.labels),
        "train-loss": float(np.mean(losses[-window:])) if losses else 0.0,
        "feddm-loss-start": float(np.mean(losses[:window])) if losses else 0.0,
        "feddm-classes": len(syn.classes),
        "feddm-client-seconds": time.perf_counter() - started,
        **extra,
    })
    return RecordDict({SYNTHETIC_KEY: arrays, "metrics": metrics})


def feddm_fit(arrays: ArrayRecord, cfg: Mapping[str, Any], data: ClientData, seed: int) -> RecordDict:
    """One non-private FedDM round: synthesize from real-initialized images; reply the synthetic set."""
    import torch

    started = time.perf_counter()
    model = _model(arrays, cfg, data)
    gen = torch.Generator().manual_seed(seed)
    syn = init_from_real(data.x, data.y, int(cfg["feddm-images-per-class"]), np.random.default_rng(seed))
    perturb = Perturbation(model, float(cfg["feddm-rho"]))
    targets = real_batch_targets(model, perturb, data.x, data.y, syn.classes, int(cfg["feddm-real-batch"]), gen)
    losses = synthesize(model, syn, targets, **_optim(cfg))
    return _reply(syn, losses, started, {})


def feddm_dp_fit(
    arrays: ArrayRecord, cfg: Mapping[str, Any], data: ClientData, seed: int, noise_seed: int | None
) -> RecordDict:
    """One DP FedDM round: T + 1 Gaussian releases of per-class statistics, then synthesis from noise against them.

    ``noise_seed`` seeds the DP noise (simulation); None draws it from OS entropy (deployed nodes).
    """
    import torch

    started = time.perf_counter()
    sigma, clip = float(cfg["feddm-noise-multiplier"]), float(cfg["clip-norm"])
    releases = int(cfg["feddm-dp-releases"])
    model = _model(arrays, cfg, data)
    rng = np.random.default_rng(None if noise_seed is None else [noise_seed, 1])
    perturb = Perturbation(model, float(cfg["feddm-rho"]))
    stats = noisy_statistics(model, perturb, data.x, data.y, data.num_classes, releases=releases, clip=clip,
                             noise_multiplier=sigma, rng=rng, perturbation_seed=seed)
    # Post-processing of the releases only from here on.
    classes = np.flatnonzero(stats.counts >= DP_COUNT_THRESHOLD * sigma)
    extra = {"feddm-dp-releases": releases + 1}
    if classes.size == 0:
        raise ValueError(f"feddm-dp: no class has a noisy count >= {DP_COUNT_THRESHOLD:g}σ = "
                         f"{DP_COUNT_THRESHOLD * sigma:.1f}; the data set is too small for this noise")
    gen = torch.Generator().manual_seed(seed)
    syn = init_from_noise(tuple(data.x.shape[1:]), classes, int(cfg["feddm-images-per-class"]), gen)
    losses = synthesize(model, syn, noisy_targets(perturb, stats, classes), clip=clip, **_optim(cfg))
    return _reply(syn, losses, started, extra)
