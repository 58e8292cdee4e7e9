"""Bundled experiments (``simulations/experiments/*.toml``) and configuration resolution with data checks.

An experiment file is a flat TOML table of config keys (see :class:`server.config.RunConfig`) plus a
``description``. Resolution order: defaults < experiment file < overrides (``--set`` or Flower run config).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from server.config import ConfigError, RunConfig, resolve_config
from simulations.datasets import (
    HOW_TO_GET_FASHION,
    IMAGE_SIZES,
    NUM_CLASSES,
    TRAIN_SIZES,
    digits_train_size,
    fashion_dir,
    missing_fashion_files,
)

EXPERIMENTS_DIR = Path(__file__).parent / "experiments"
DEFAULT_EXPERIMENT = "digits-fedavg"


def list_experiments() -> list[tuple[str, str]]:
    """(name, description) of every bundled experiment, sorted by name."""
    out = []
    for path in sorted(EXPERIMENTS_DIR.glob("*.toml"), key=lambda p: p.stem):  # by name: a-b before a-b-c
        with open(path, "rb") as f:
            out.append((path.stem, str(tomllib.load(f).get("description", ""))))
    return out


def load_experiment(name: str) -> dict[str, Any]:
    """Raw values of a bundled experiment (by name) or of a TOML file (by path)."""
    path = Path(name)
    if not (name.endswith(".toml") and path.is_file()):
        path = EXPERIMENTS_DIR / f"{name}.toml"
    if not path.is_file():
        names = ", ".join(n for n, _ in list_experiments())
        raise ConfigError(
            [f"experiment: unknown experiment {name!r}; expected one of {names} or a path to a .toml file"]
        )
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"experiment: {path} is not valid TOML: {exc}"]) from exc
    nested = [k for k, v in raw.items() if isinstance(v, dict)]
    if nested:
        raise ConfigError([f"experiment: {path} must be a flat table of keys, found tables {nested}"])
    raw["experiment"] = name
    return raw


def data_checks(cfg: RunConfig) -> list[str]:
    """Checks that need the data's facts: files present, enough samples for the clients, class counts."""
    errors = []
    if cfg.dataset == "fashion-mnist":
        missing = missing_fashion_files(cfg.data_dir)
        if missing:
            errors.append(f"data-dir: Fashion-MNIST not found in {fashion_dir(cfg.data_dir)} "
                          f"(missing {', '.join(missing)}); {HOW_TO_GET_FASHION}")
    if cfg.dataset == "words":
        return word_checks(cfg)
    n_train = digits_train_size(cfg.test_fraction) if cfg.dataset == "digits" else TRAIN_SIZES[cfg.dataset]
    if n_train is not None and cfg.num_clients > n_train:
        errors.append(f"num-clients: expected at most {n_train} (training samples of {cfg.dataset}), "
                      f"got {cfg.num_clients}")
    classes = NUM_CLASSES[cfg.dataset]
    if cfg.partition == "pathological" and cfg.classes_per_client > classes:
        errors.append(f"classes-per-client: expected at most {classes} (classes in {cfg.dataset}), "
                      f"got {cfg.classes_per_client}")
    if cfg.lora_rank > 0:
        errors.extend(lora_checks(cfg, classes))
    if cfg.strategy == "feddm" and cfg.feddm_max_images < cfg.feddm_images_per_class * classes:
        errors.append(f"feddm-max-images: expected at least feddm-images-per-class × classes = "
                      f"{cfg.feddm_images_per_class} × {classes} = {cfg.feddm_images_per_class * classes} (a client "
                      f"holding every class uploads that many), got {cfg.feddm_max_images}")
    return errors


def lora_checks(cfg: RunConfig, classes: int) -> list[str]:
    """Federated LoRA: public classes within the dataset's, some private data left, a rank every layer admits."""
    errors = []
    if cfg.lora_public_classes > classes:
        errors.append(f"lora-public-classes: expected at most {classes} (classes in {cfg.dataset}), got "
                      f"{cfg.lora_public_classes}")
    elif cfg.lora_public_classes == classes and cfg.lora_public_fraction == 1.0:
        errors.append(f"lora-public-fraction: with all {classes} classes public, expected a share below 1 (the "
                      f"clients need private data), got {cfg.lora_public_fraction}")
    from models.lora import lora_rank_limit

    limit, layer = lora_rank_limit(cfg.model, IMAGE_SIZES[cfg.dataset], classes)
    if cfg.lora_rank > limit:
        errors.append(f"lora-rank: expected at most {limit} (min(in, out) of the smallest Linear layer of model "
                      f"{cfg.model!r}, {layer}), got {cfg.lora_rank}")
    return errors


def word_checks(cfg: RunConfig) -> list[str]:
    """The words population: wordfreq installed and listing at least num-items words."""
    from simulations.histogram_data import word_distribution

    try:
        word_distribution(cfg.num_items)
    except (RuntimeError, ValueError) as exc:
        return [str(exc)]
    return []


def resolve(experiment: str | None = None, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Resolve an experiment plus overrides into a validated :class:`RunConfig` (raises ConfigError)."""
    overrides = dict(overrides or {})
    name = str(overrides.pop("experiment", None) or experiment or DEFAULT_EXPERIMENT)
    return resolve_config(load_experiment(name), overrides, extra_checks=data_checks)

