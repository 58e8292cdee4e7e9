"""Run configuration: one flat table of kebab-case keys, validated with every error collected.

The same keys are used by bundled experiments (TOML), ``fedpriv simulate --set key=value`` and Flower's
``[tool.flwr.app.config]`` / ``flwr run --run-config``. :class:`RunConfig` declares each key once, with its
type, default, allowed values and help; :func:`resolve_config` turns raw values into a ``RunConfig`` or
raises :class:`ConfigError` listing *all* problems, one line each (key, value given, what is expected).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

STRATEGIES = ("fedavg", "label-dp", "histogram", "feddm")
DATASETS = ("digits", "fashion-mnist", "words")
HISTOGRAM_METHODS = ("liu2020", "gaussian", "laplace")
MODELS = ("mlp", "cnn", "vit", "vit-laser")
PARTITIONS = ("iid", "dirichlet", "pathological")
OPTIMIZERS = ("sgd", "adam", "adamw", "lora-rite")
DP_MODES = ("none", "dpsgd", "dpfedavg", "feddm-dp")
ACCOUNTANTS = ("rdp", "pld")
GRAD_SAMPLE_MODES = ("layers", "vmap", "hooks")
BUDGET_SCOPES = ("run", "ledger")
LABEL_MECHANISMS = ("rr", "rr-prior")
RETRAIN_MODES = ("continue", "scratch")
LABEL_PRIORS = ("denoised", "softmax")
FEDDM_MODELS = ("mlp", "cnn")  # networks client.feddm splits into features + linear head


class ConfigError(Exception):
    """One or more configuration errors; ``errors`` holds one line per problem."""

    def __init__(self, errors: Iterable[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))

    def __reduce__(self) -> tuple[type[ConfigError], tuple[list[str]]]:  # pickles whole (e.g. from a worker process)
        return ConfigError, (self.errors,)


def _opt(default: Any, help: str, *, choices: tuple[str, ...] | None = None,
         lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> Any:
    """A config field with its validation metadata (bounds are inclusive unless *_open)."""
    meta = {"help": help, "choices": choices, "lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class RunConfig:
    """A fully resolved run configuration (attribute ``num_clients`` ↔ key ``num-clients``)."""

    experiment: str = _opt("digits-fedavg", "bundled experiment name (or TOML path) the other keys override")
    description: str = _opt("", "one-line description shown by `fedpriv experiments`")
    strategy: str = _opt("fedavg", "federated algorithm", choices=STRATEGIES)
    # data
    dataset: str = _opt("digits", "dataset", choices=DATASETS)
    data_dir: str = _opt("", "directory of the Fashion-MNIST IDX files (default: Debian's path)")
    test_fraction: float = _opt(0.2, "held-out test share of digits", lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    partition: str = _opt("iid", "how training data is split over clients", choices=PARTITIONS)
    dirichlet_alpha: float = _opt(0.5, "Dirichlet concentration of label proportions", lo=0.0, lo_open=True)
    classes_per_client: int = _opt(2, "classes per client for the pathological partition", lo=1)
    # federation
    num_clients: int = _opt(10, "number of clients (simulated SuperNodes)", lo=1)
    num_rounds: int = _opt(10, "federated rounds", lo=1)
    fraction_train: float = _opt(1.0, "share of clients sampled to train each round", lo=0.0, hi=1.0, lo_open=True)
    fraction_evaluate: float = _opt(0.0, "share of clients sampled for federated evaluation", lo=0.0, hi=1.0)
    round_timeout: float = _opt(600.0, "seconds to wait for client replies in a round", lo=0.0, lo_open=True)
    node_wait_timeout: float = _opt(120.0, "seconds to wait for num-clients nodes to connect", lo=0.0, lo_open=True)
    client_cpus: float = _opt(1.0, "CPU cores reserved per simulated client", lo=0.0, lo_open=True)
    min_available_clients: int = _opt(0, "connected nodes a round needs to start (0: num-clients); rounds sample "
                                      "from the connected ones, and wait node-wait-timeout for them", lo=0)
    # fault injection (testing and benchmarks): applied by the ClientApp to its training replies, seeded by seed
    fault_drop_rate: float = _opt(0.0, "share of training replies dropped (the client answers with an error)",
                                  lo=0.0, hi=1.0)
    fault_crash_rate: float = _opt(0.0, "share of training rounds in which the client process dies after training "
                                   "(no reply)", lo=0.0, hi=1.0)
    fault_malformed_rate: float = _opt(0.0, "share of training replies corrupted (non-finite, wrong shape or dtype, "
                                       "undecodable, bad counts ...)", lo=0.0, hi=1.0)
    fault_delay: float = _opt(0.0, "each training reply is delayed by U(0, fault-delay) seconds (past round-timeout: "
                              "a timeout)", lo=0.0)
    # model and local training
    model: str = _opt("mlp", "network", choices=MODELS)
    local_epochs: int = _opt(1, "local epochs per round", lo=1)
    batch_size: int = _opt(32, "local batch size", lo=1)
    lr: float = _opt(0.05, "local learning rate", lo=0.0, lo_open=True)
    momentum: float = _opt(0.9, "SGD momentum", lo=0.0, hi=1.0, hi_open=True)
    weight_decay: float = _opt(0.0, "weight decay", lo=0.0)
    optimizer: str = _opt("sgd", "local optimizer (lora-rite: LoRA-RITE over the adapter pairs, needs lora-rank > 0)",
                          choices=OPTIMIZERS)
    seed: int = _opt(0, "seed of partitions, initial model, client sampling and local shuffling")
    # federated LoRA (lora-rank > 0, strategy = "fedavg"): a base model pretrained by the server on a public split
    # is frozen everywhere; clients train and send only the LoRA adapters of its Linear layers
    lora_rank: int = _opt(0, "federated LoRA: adapter rank r (0: no LoRA, the whole model is federated)", lo=0)
    lora_alpha: float = _opt(0.0, "federated LoRA: the update B·A is scaled by lora-alpha / r (0: lora-alpha = r)",
                             lo=0.0)
    lora_balance: bool = _opt(True, "federated LoRA: after each aggregation rescale every adapter pair to equal norms "
                              "(B·c, A/c: B·A unchanged), so that averaging the factors stays well conditioned")
    lora_public_classes: int = _opt(5, "federated LoRA: the server's public split holds classes 0 .. K-1 only", lo=1)
    lora_public_fraction: float = _opt(0.5, "federated LoRA: share of each public class's training examples held "
                                       "by the server (the clients never get them)", lo=0.0, hi=1.0, lo_open=True)
    lora_pretrain_epochs: int = _opt(3, "federated LoRA: server epochs of the base model on the public split "
                                     "(AdamW, server-batch-size)", lo=1)
    lora_pretrain_lr: float = _opt(1e-3, "federated LoRA: AdamW learning rate of the base pretraining", lo=0.0,
                                   lo_open=True)
    # differential privacy
    dp: str = _opt("none", "privacy mechanism: client DP-SGD (Opacus), central DP-FedAvg, or DP FedDM (strategy "
                   "feddm)", choices=DP_MODES)
    target_epsilon: float = _opt(8.0, "ε each participant may reach over the planned rounds", lo=0.0, lo_open=True)
    target_delta: float = _opt(1e-5, "δ of the privacy guarantee", lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    clip_norm: float = _opt(1.0, "ℓ2 clipping norm (per example for dpsgd, per client update for dpfedavg, per "
                            "example feature vector for feddm-dp)",
                            lo=0.0, lo_open=True)
    noise_multiplier: float = _opt(0.0, "fixed noise multiplier; 0 calibrates it from target-epsilon", lo=0.0)
    accountant: str = _opt("rdp", "privacy accountant (dp-accounting)", choices=ACCOUNTANTS)
    grad_sample_mode: str = _opt("layers", "dpsgd per-example gradients: Opacus' layer samplers without the batch "
                                 "gradient, torch.func vmap, or Opacus' GradSampleModule", choices=GRAD_SAMPLE_MODES)
    ledger: str = _opt("", "privacy ledger file shared across runs (default <run dir>/ledger.sqlite)")
    budget_epsilon: float = _opt(0.0, "stop or leave out participants before ε would exceed this (0: no budget)",
                                 lo=0.0)
    budget_scope: str = _opt("ledger", "the budget counts this run, or every run of the ledger", choices=BUDGET_SCOPES)
    # label differential privacy (strategy = "label-dp")
    label_epsilon: float = _opt(1.0, "ε of the label mechanism; each label is privatized once", lo=0.0, lo_open=True)
    label_mechanism: str = _opt("rr", "randomized response, or RR with the global model as prior",
                                choices=LABEL_MECHANISMS)
    label_stages: int = _opt(2, "rr-prior: data parts privatized in turn (stage 1 by plain RR)", lo=1)
    consensus: bool = _opt(True, "label-dp: keep samples whose predicted label equals the noisy one, retrain")
    retrain: str = _opt("continue", "label-dp: retrain from the noisy-phase model or from the initial one",
                        choices=RETRAIN_MODES)
    retrain_rounds: int = _opt(3, "label-dp: rounds of retraining on the kept samples (within num-rounds)", lo=1)
    label_prior: str = _opt("denoised", "rr-prior: prior of stages >= 2, the global model's softmax with RR's "
                            "transition matrix inverted (estimates P(true label | x)) or the raw softmax "
                            "(P(RR label | x))", choices=LABEL_PRIORS)
    label_holdout: float = _opt(0.0, "label-dp: share of each client's stage-1 data held out of noisy-phase "
                                "training; its RR labels estimate each round's model accuracy (federated "
                                "evaluation), and the best-scoring model becomes rr-prior's prior and the "
                                "consensus judge (0: the latest model)", lo=0.0, hi=0.5)
    label_matched_steps: bool = _opt(True, "label-dp: every round each client takes the SGD steps of local-epochs "
                                     "passes over all its data, whatever subset it trains on (rr-prior's first "
                                     "stages, the kept set); false: local-epochs passes over the subset")
    # user-level DP histograms (strategy = "histogram", dataset = "words")
    histogram_method: str = _opt("liu2020", "user-level DP histogram mechanism (ε, δ: target-epsilon, target-delta)",
                                 choices=HISTOGRAM_METHODS)
    num_items: int = _opt(1000, "histogram: k, the number of items (top-k words)", lo=2)
    samples_per_user: int = _opt(64, "histogram: m, the samples each user holds", lo=1)
    users_per_client: int = _opt(1, "histogram: users per client (1: cross-device; more: cross-silo)", lo=1)
    # FedDM (strategy = "feddm"; dp = "feddm-dp" for its DP variant)
    feddm_images_per_class: int = _opt(10, "feddm: synthetic images per class a client learns and uploads", lo=1)
    feddm_iterations: int = _opt(60, "feddm: distribution-matching steps per round (each with a fresh perturbation)",
                                 lo=1)
    feddm_lr: float = _opt(0.01, "feddm: learning rate of the synthetic images", lo=0.0, lo_open=True)
    feddm_momentum: float = _opt(0.5, "feddm: SGD momentum of the synthetic images", lo=0.0, hi=1.0, hi_open=True)
    feddm_optimizer: str = _opt("adam", "feddm: optimizer of the synthetic images (the paper: sgd, lr 1)",
                                choices=("sgd", "adam"))
    feddm_rho: float = _opt(5.0, "feddm: ℓ2 norm of the random perturbation of the global weights", lo=0.0)
    feddm_real_batch: int = _opt(32, "feddm: real examples per class in each matching step (feddm-dp: all)", lo=1)
    feddm_max_images: int = _opt(1000, "feddm: largest synthetic set the server accepts from one client", lo=1)
    feddm_dp_releases: int = _opt(10, "feddm-dp: perturbations per round, each one Gaussian release of noised "
                                  "per-class sums (the counts add one more)", lo=1)
    server_epochs: int = _opt(30, "feddm: server epochs on the union of the synthetic sets each round", lo=1)
    server_lr: float = _opt(0.01, "feddm: server SGD learning rate", lo=0.0, lo_open=True)
    server_batch_size: int = _opt(64, "server-side training batch size (feddm's server epochs, the LoRA base "
                                  "pretraining)", lo=1)
    # outputs
    out: str = _opt("", "run directory (default runs/<experiment>-<UTC timestamp>)")

    def to_dict(self) -> dict[str, Any]:
        """The configuration as kebab-case keys (what ``config.toml`` and clients receive)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}


KEYS: dict[str, Any] = {f.name.replace("_", "-"): f for f in fields(RunConfig)}


def describe_keys() -> list[tuple[str, str, Any, str]]:
    """(key, type name, default, help) for every key, for documentation and `--help`."""
    out = []
    for key, f in KEYS.items():
        typ = f.type if isinstance(f.type, str) else f.type.__name__
        default = f.default if f.default is not MISSING else None
        help_ = f.metadata["help"] + (f" ({' | '.join(f.metadata['choices'])})" if f.metadata["choices"] else "")
        out.append((key, typ, default, help_))
    return out


_TYPE_WORDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}


def _coerce(key: str, typ: str, value: Any) -> tuple[Any, str | None]:
    """Convert ``value`` (TOML-typed, or a string from the command line) to ``typ``."""
    expected = _TYPE_WORDS[typ]
    bad = f"{key}: expected {expected}, got {value!r}"
    if typ == "str":
        return (value, None) if isinstance(value, str) else (None, bad)
    if typ == "bool":
        if isinstance(value, bool):
            return value, None
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true", None
        return None, bad
    if isinstance(value, bool):
        return None, bad
    if typ == "int":
        if isinstance(value, int):
            return value, None
        if isinstance(value, float) and value.is_integer():
            return int(value), None
        if isinstance(value, str):
            try:
                return int(value), None
            except ValueError:
                return None, bad
        return None, bad
    # float
    if isinstance(value, (int, float)):
        out = float(value)
    elif isinstance(value, str):
        try:
            out = float(value)
        except ValueError:
            return None, bad
    else:
        return None, bad
    if not math.isfinite(out):
        return None, f"{key}: expected a finite number, got {value!r}"
    return out, None


def _range_error(key: str, value: float, meta: Mapping[str, Any]) -> str | None:
    lo, hi = meta["lo"], meta["hi"]
    too_low = lo is not None and (value <= lo if meta["lo_open"] else value < lo)
    too_high = hi is not None and (value >= hi if meta["hi_open"] else value > hi)
    if not (too_low or too_high):
        return None
    parts = []
    if lo is not None:
        parts.append(f"{'>' if meta['lo_open'] else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"{'<' if meta['hi_open'] else '<='} {hi:g}")
    return f"{key}: expected a value {' and '.join(parts)}, got {value!r}"


def resolve_config(
    *layers: Mapping[str, Any], extra_checks: Callable[[RunConfig], list[str]] | None = None
) -> RunConfig:
    """Merge raw layers (later wins) over the defaults and validate everything.

    Parameters
    ----------
    *layers : Mapping[str, Any]
        Raw key → value maps (experiment file, overrides ...). Keys are kebab-case.
    extra_checks : callable, optional
        Checks that need more than the values (e.g. dataset sizes, files on disk); returns error lines.

    Raises
    ------
    ConfigError
        With one line per problem: unknown keys (with a suggestion), wrong types, out-of-range values,
        and the cross-field and extra checks.
    """
    errors: list[str] = []
    values: dict[str, Any] = {}
    for layer in layers:
        for key, raw in layer.items():
            if key not in KEYS:
                hint = difflib.get_close_matches(key, KEYS, n=1)
                errors.append(f"unknown key {key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else
                              "; `fedpriv experiments --keys` lists the keys"))
                continue
            f = KEYS[key]
            typ = f.type if isinstance(f.type, str) else f.type.__name__
            value, err = _coerce(key, typ, raw)
            if err:
                errors.append(err)
                continue
            meta = f.metadata
            if meta["choices"] and value not in meta["choices"]:
                errors.append(f"{key}: expected one of {', '.join(meta['choices'])}, got {value!r}")
                continue
            if typ in ("int", "float") and (rng := _range_error(key, value, meta)):
                errors.append(rng)
                continue
            values[f.name] = value
    if errors:
        raise ConfigError(errors)
    cfg = RunConfig(**values)
    errors.extend(cross_checks(cfg))
    if extra_checks is not None:
        errors.extend(extra_checks(cfg))
    if errors:
        raise ConfigError(errors)
    return cfg


def privacy_mode(cfg: RunConfig) -> str | None:
    """What makes the run private ("dpsgd", "dpfedavg", "feddm-dp", "label-dp", "histogram"), or None."""
    if cfg.strategy in ("label-dp", "histogram"):
        return cfg.strategy
    return None if cfg.dp == "none" else cfg.dp


def cross_checks(cfg: RunConfig) -> list[str]:
    """Errors that involve more than one key."""
    errors = []
    if cfg.strategy == "label-dp":
        if cfg.dp != "none":
            errors.append(f"dp: label-dp privatizes labels only and cannot be combined with dp={cfg.dp!r}; "
                          "expected 'none'")
        noisy = cfg.num_rounds - cfg.retrain_rounds if cfg.consensus else cfg.num_rounds
        stages = cfg.label_stages if cfg.label_mechanism == "rr-prior" else 1
        if cfg.consensus and noisy < 1:
            errors.append(f"retrain-rounds: expected fewer than num-rounds={cfg.num_rounds} (the noisy phase needs a "
                          f"round), got {cfg.retrain_rounds}")
        elif noisy < stages:
            errors.append(f"label-stages: expected at most {noisy} (rounds of the noisy phase), got {stages}")
    if privacy_mode(cfg) is not None and cfg.fraction_evaluate > 0:
        errors.append(f"fraction-evaluate: federated evaluation reports metrics computed on the clients' private "
                      f"data, which no privacy mechanism of this run covers; expected 0 with strategy="
                      f"{cfg.strategy!r}, dp={cfg.dp!r}, got {cfg.fraction_evaluate:g}")
    if (cfg.strategy == "histogram") != (cfg.dataset == "words"):
        errors.append(f"dataset: the histogram strategy runs on dataset 'words' and only there, got strategy="
                      f"{cfg.strategy!r} with dataset={cfg.dataset!r}")
    if cfg.strategy == "feddm" and cfg.dp not in ("none", "feddm-dp"):
        errors.append(f"dp: feddm uploads synthetic sets, not model updates; expected 'none' or 'feddm-dp', "
                      f"got {cfg.dp!r}")
    if cfg.strategy == "feddm" and cfg.model not in FEDDM_MODELS:
        errors.append(f"model: feddm matches the penultimate features of {' or '.join(FEDDM_MODELS)}; expected one of "
                      f"{', '.join(FEDDM_MODELS)}, got {cfg.model!r}")
    if cfg.dp == "feddm-dp" and cfg.strategy != "feddm":
        errors.append(f"dp: feddm-dp privatizes FedDM's matching statistics; expected strategy 'feddm', "
                      f"got strategy={cfg.strategy!r}")
    if cfg.strategy == "histogram" and cfg.dp != "none":
        errors.append(f"dp: the histogram strategy adds its own noise; expected 'none', got {cfg.dp!r}")
    if cfg.min_available_clients > cfg.num_clients:
        errors.append(f"min-available-clients: expected at most num-clients={cfg.num_clients}, got "
                      f"{cfg.min_available_clients}")
    if cfg.optimizer == "lora-rite" and cfg.lora_rank == 0:
        errors.append("optimizer: lora-rite optimizes LoRA adapter pairs; expected lora-rank > 0 with it, got "
                      "lora-rank=0")
    if cfg.lora_rank > 0 and (cfg.strategy != "fedavg" or cfg.dp not in ("none", "dpsgd", "dpfedavg")):
        errors.append(f"lora-rank: federated LoRA runs with strategy 'fedavg' and dp none, dpsgd or dpfedavg; "
                      f"expected lora-rank=0 with strategy={cfg.strategy!r}, dp={cfg.dp!r}, got {cfg.lora_rank}")
    fault_total = cfg.fault_drop_rate + cfg.fault_crash_rate + cfg.fault_malformed_rate
    if fault_total > 1.0:
        errors.append(f"fault-drop-rate: drop, crash and malformed rates are shares of the same replies and must "
                      f"add up to at most 1, got {fault_total:g}")
    return errors
