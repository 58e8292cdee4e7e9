"""FedDM's client: the model split, perturbations, distribution matching, the synthetic set, and the DP releases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from client.data import ClientData
from client.feddm import (
    Perturbation,
    class_sums,
    clip_rows,
    features,
    feddm_dp_fit,
    feddm_fit,
    group_means,
    init_from_noise,
    init_from_real,
    noisy_statistics,
    real_batch_targets,
    split_model,
    synthesize,
)
from models import TrainConfig, build_model, train
from simulations.datasets import load_digits
from strategies.feddm import check_synthetic_set

CFG = {"model": "mlp", "feddm-images-per-class": 5, "feddm-rho": 2.0, "feddm-real-batch": 16,
       "feddm-iterations": 40, "feddm-lr": 0.05, "feddm-momentum": 0.5, "feddm-optimizer": "adam", "client-cpus": 1}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as each simulated client uses (oversubscribed OpenMP threads are many times slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits() -> ClientData:
    ds = load_digits()
    return ClientData(ds.x_train[:400], ds.y_train[:400], 10, "0")


@pytest.fixture(scope="module")
def trained(digits: ClientData) -> torch.nn.Module:
    """A digits MLP after one epoch: features of a useful scale, as in later rounds."""
    model = build_model("mlp", 8, 10, seed=0)
    train(model, digits.x, digits.y, TrainConfig(epochs=1, batch_size=32, lr=0.05))
    return model.eval()


@pytest.mark.parametrize(("name", "size"), [("mlp", 8), ("cnn", 28)])
def test_split_model_reproduces_the_forward(name: str, size: int) -> None:
    model = build_model(name, size, 10, seed=0).eval()
    x = torch.rand(5, 1, size, size)
    body, head = split_model(model)
    f = features(body, head, x)  # (5, 128 + 10)
    assert f.shape == (5, 128 + 10)
    torch.testing.assert_close(f[:, 128:], model(x))
    torch.testing.assert_close(head(f[:, :128]), model(x))


def test_perturbation_has_norm_rho_is_fresh_and_resets() -> None:
    model = build_model("mlp", 8, 10, seed=0)
    base = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    pert = Perturbation(model, 3.0)
    gen = torch.Generator().manual_seed(0)
    deltas = []
    for _ in range(2):
        assert pert.apply(gen) == pytest.approx(3.0)
        deltas.append(torch.cat([p.detach().flatten() for p in model.parameters()]) - base)
        assert float(deltas[-1].norm()) == pytest.approx(3.0, rel=1e-4)
    assert float((deltas[0] - deltas[1]).norm()) > 1.0  # a fresh direction each time
    pert.reset()
    torch.testing.assert_close(torch.cat([p.detach().flatten() for p in model.parameters()]), base)


def test_clip_rows_and_group_means() -> None:
    f = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 2.0]])
    torch.testing.assert_close(clip_rows(f, 1.0), torch.tensor([[0.6, 0.8], [0.3, 0.4], [0.0, 1.0]]))
    means = group_means(f, torch.tensor([0, 0, 1]), torch.tensor([2, 1]))
    torch.testing.assert_close(means, torch.tensor([[1.65, 2.2], [0.0, 2.0]]))


def test_init_from_real_takes_distinct_real_images_per_class() -> None:
    x = np.arange(12, dtype=np.float32).reshape(12, 1, 1, 1)
    y = np.array([0, 0, 0, 0, 2, 2, 1, 1, 1, 1, 1, 1])
    syn = init_from_real(x, y, 3, np.random.default_rng(0))
    assert syn.classes.tolist() == [0, 1, 2] and syn.sizes.tolist() == [3, 3, 2]
    assert syn.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    values = syn.images.flatten().numpy().astype(int)
    assert len(set(values)) == 8 and all(y[v] == label for v, label in zip(values, syn.labels.tolist(), strict=True))


def fixed_matching_loss(model: torch.nn.Module, syn, x: np.ndarray, y: np.ndarray, seeds: range) -> float:
    """Σ_c ‖mean_real_c − mean_syn_c‖² with *all* real data, averaged over fixed perturbations."""
    body, head = split_model(model)
    pert = Perturbation(model, 2.0)
    classes = syn.classes.numpy()
    total = 0.0
    for s in seeds:
        pert.apply(torch.Generator().manual_seed(s))
        with torch.no_grad():
            real = class_sums(model, x, y, 10, None)[classes] / np.bincount(y, minlength=10)[classes, None]
            fake = group_means(features(body, head, syn.images), syn.groups, syn.sizes).double().numpy()
        total += float(((real - fake) ** 2).sum())
    pert.reset()
    return total / len(seeds)


def test_matching_loss_falls_during_synthesis(digits: ClientData, trained: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    syn = init_from_noise((1, 8, 8), np.unique(digits.y), 5, gen)
    before = fixed_matching_loss(trained, syn, digits.x, digits.y, range(100, 105))
    targets = real_batch_targets(trained, Perturbation(trained, 2.0), digits.x, digits.y, syn.classes, 32, gen)
    losses = synthesize(trained, syn, targets, iterations=150, lr=0.05, optimizer="adam")
    Perturbation(trained, 0.0).reset()
    after = fixed_matching_loss(trained, syn, digits.x, digits.y, range(100, 105))
    assert after < 0.25 * before, (before, after)
    assert np.mean(losses[-15:]) < 0.5 * np.mean(losses[:15])
    assert syn.images.min() >= 0.0 and syn.images.max() <= 1.0


def test_fit_replies_a_valid_synthetic_set(digits: ClientData, trained: torch.nn.Module) -> None:
    skewed = ClientData(digits.x[digits.y < 3], digits.y[digits.y < 3], 10, "0")  # three classes only
    content = feddm_fit(ArrayRecord(trained.state_dict()), CFG, skewed, seed=0)
    assert check_synthetic_set(content, (1, 8, 8), 10, max_images=100) is None
    images, labels = content["synthetic"]["images"].numpy(), content["synthetic"]["labels"].numpy()
    assert images.dtype == np.float32 and images.shape == (15, 1, 8, 8)
    assert labels.dtype == np.int64 and sorted(set(labels.tolist())) == [0, 1, 2]
    assert np.bincount(labels).tolist() == [5, 5, 5]
    assert np.isfinite(images).all() and images.min() >= 0.0 and images.max() <= 1.0
    metrics = content["metrics"]
    assert metrics["num-examples"] == 15 and metrics["feddm-classes"] == 3
    assert metrics["train-loss"] < metrics["feddm-loss-start"]  # matching improved during the round


def test_small_classes_get_at_most_their_size(digits: ClientData) -> None:
    keep = np.concatenate([np.flatnonzero(digits.y == 0)[:2], np.flatnonzero(digits.y == 1)[:30]])
    data = ClientData(digits.x[keep], digits.y[keep], 10, "0")
    content = feddm_fit(ArrayRecord(build_model("mlp", 8, 10, seed=0).state_dict()),
                        CFG | {"feddm-iterations": 3}, data, seed=0)
    assert np.bincount(content["synthetic"]["labels"].numpy()).tolist() == [2, 5]


# -- the DP variant ----------------------------------------------------------------------------------------------
def test_clipped_class_sums_change_by_at_most_c_per_example(digits: ClientData, trained: torch.nn.Module) -> None:
    full = class_sums(trained, digits.x, digits.y, 10, clip=0.5)
    for i in (0, 7, 123):
        keep = np.arange(len(digits.y)) != i
        without = class_sums(trained, digits.x[keep], digits.y[keep], 10, clip=0.5)
        diff = full - without
        assert np.linalg.norm(diff) <= 0.5 + 1e-9
        assert np.count_nonzero(np.abs(diff).sum(axis=1) > 1e-12) == 1  # one class row only


def test_dp_noise_std_equals_its_calibration(digits: ClientData, trained: torch.nn.Module) -> None:
    """The released sums minus the exact clipped sums are N(0, (σC)²) in every coordinate; counts N(0, σ²).

    5 releases × 10 classes × 138 coordinates = 6900 noise draws: the sample std is within 5 % of σC (about 6
    standard errors of the estimate; fixed seeds make the test deterministic). Counts: 400 × 10 draws, 7 %.
    """
    sigma, clip, releases = 3.0, 0.5, 5
    pert = Perturbation(trained, 2.0)
    stats = noisy_statistics(trained, pert, digits.x, digits.y, 10, releases=releases, clip=clip,
                             noise_multiplier=sigma, rng=np.random.default_rng(0), perturbation_seed=11)
    noise = []
    for t, s in enumerate(stats.perturbation_seeds):
        pert.apply(torch.Generator().manual_seed(s))
        noise.append(stats.sums[t] - class_sums(trained, digits.x, digits.y, 10, clip))
    pert.reset()
    noise = np.concatenate([n.ravel() for n in noise])
    assert noise.size == releases * 10 * 138
    assert abs(noise.mean()) < 4 * sigma * clip / np.sqrt(noise.size)
    assert noise.std() == pytest.approx(sigma * clip, rel=0.05)

    tiny = ClientData(digits.x[:20], digits.y[:20], 10, "0")
    rng, count_noise = np.random.default_rng(1), []
    for _ in range(400):
        s = noisy_statistics(trained, pert, tiny.x, tiny.y, 10, releases=1, clip=clip, noise_multiplier=sigma,
                             rng=rng, perturbation_seed=0)
        count_noise.append(s.counts - np.bincount(tiny.y, minlength=10))
    assert np.std(count_noise) == pytest.approx(sigma, rel=0.07)


def test_dp_fit_synthesizes_from_noise_against_the_releases(digits: ClientData, trained: torch.nn.Module) -> None:
    cfg = CFG | {"feddm-noise-multiplier": 0.5, "clip-norm": 1.0, "feddm-dp-releases": 4, "feddm-iterations": 30}
    content = feddm_dp_fit(ArrayRecord(trained.state_dict()), cfg, digits, seed=0, noise_seed=0)
    assert check_synthetic_set(content, (1, 8, 8), 10, max_images=100) is None
    labels = content["synthetic"]["labels"].numpy()
    assert sorted(set(labels.tolist())) == list(range(10))  # ~40 examples per class ≫ 3σ = 1.5
    assert content["metrics"]["feddm-dp-releases"] == 5
    # Seeded in simulation: the same seeds give the same release; None draws fresh OS entropy.
    again = feddm_dp_fit(ArrayRecord(trained.state_dict()), cfg | {"feddm-iterations": 30}, digits, 0, 0)
    np.testing.assert_array_equal(again["synthetic"]["images"].numpy(), content["synthetic"]["images"].numpy())
    fresh = feddm_dp_fit(ArrayRecord(trained.state_dict()), cfg, digits, 0, None)
    assert not np.array_equal(fresh["synthetic"]["images"].numpy(), content["synthetic"]["images"].numpy())


def test_dp_fit_fails_when_no_class_clears_the_noise(digits: ClientData, trained: torch.nn.Module) -> None:
    tiny = ClientData(digits.x[:5], digits.y[:5], 10, "0")
    cfg = CFG | {"feddm-noise-multiplier": 50.0, "clip-norm": 1.0, "feddm-dp-releases": 1}
    with pytest.raises(ValueError, match="no class has a noisy count"):
        feddm_dp_fit(ArrayRecord(trained.state_dict()), cfg, tiny, seed=0, noise_seed=3)
