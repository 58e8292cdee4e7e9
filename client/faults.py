"""Fault injection on the client side of the ClientApp, for testing and benchmarking fault tolerance.

The run configuration (which travels in every message's ``config`` record) sets the rates; each training
message draws its fault from a generator seeded by (``seed``, client, round), so a run's faults are
reproducible and the same under ``fedpriv simulate``, ``flwr run`` and a deployment:

* ``fault-drop-rate`` — the client drops out of the round: its ClientApp raises :class:`InjectedDrop`, and the
  server receives Flower's error reply (counted in ``failures``).
* ``fault-crash-rate`` — the client dies after training, before replying. On a SuperNode the ClientApp
  process exits (``os._exit``, no cleanup) and the server gets no reply from it. Flower's simulation engine
  does not replace a worker whose process died (every later message to it would fail), so a simulated
  client raises :class:`InjectedCrash` instead and the server receives an error reply — what the SuperLink
  reports for a node whose ClientApp failed.
* ``fault-malformed-rate`` — the reply is corrupted (one of :data:`CORRUPTIONS`: non-finite values, a wrong
  shape or dtype, bytes that do not decode, a payload that lies about its shape, a missing or negative example
  count, an extra or a missing array, a non-finite metric); the server must reject it (``rejected``).
* ``fault-delay`` — every training reply is delayed by U(0, ``fault-delay``) seconds; past the server's
  ``round-timeout`` that is a timeout.

The three rates are shares of the same replies (at most one of drop, crash, malformed per message).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

CORRUPTIONS = ("non-finite", "shape", "dtype", "undecodable", "lying-shape", "missing-count", "negative-count",
               "extra-array", "missing-array", "non-finite-metric")
CRASH_EXIT_CODE = 86
_SALT = 0xFA17


class InjectedDrop(RuntimeError):
    """Raised by a client that was told to drop out of the round (fault injection)."""


class InjectedCrash(RuntimeError):
    """Raised by a simulated client that was told to crash (a real process exit would kill the engine's worker)."""


@dataclass(frozen=True)
class Fault:
    """What happens to one training reply."""

    kind: str  # "none" | "drop" | "crash" | "malformed"
    delay: float  # seconds before the reply leaves
    corruption: str  # which corruption, when kind == "malformed"
    seed: int  # for the corruption's random bytes


def faults_enabled(cfg: Mapping[str, Any]) -> bool:
    """Whether the run configures any fault (cheap: called for every training message)."""
    return any(float(cfg.get(k, 0.0) or 0.0) > 0 for k in
               ("fault-drop-rate", "fault-crash-rate", "fault-malformed-rate", "fault-delay"))


def plan_fault(cfg: Mapping[str, Any], client: int, server_round: int) -> Fault:
    """The fault of ``client``'s training reply in ``server_round`` (deterministic given the run's seed)."""
    drop = float(cfg.get("fault-drop-rate", 0.0))
    crash = float(cfg.get("fault-crash-rate", 0.0))
    bad = float(cfg.get("fault-malformed-rate", 0.0))
    rng = np.random.default_rng([int(cfg.get("seed", 0)) & 0xFFFFFFFF, int(client) & 0xFFFFFFFFFFFFFFFF,
                                 int(server_round), _SALT])
    u, v = rng.random(), rng.random()
    which = int(rng.integers(len(CORRUPTIONS)))
    kind = "drop" if u < drop else "crash" if u < drop + crash else "malformed" if u < drop + crash + bad else "none"
    return Fault(kind, v * float(cfg.get("fault-delay", 0.0)), CORRUPTIONS[which], int(rng.integers(2**31)))


def before_training(fault: Fault, client: int, server_round: int) -> None:
    """Drop out now if that is the fault."""
    if fault.kind == "drop":
        raise InjectedDrop(f"injected fault: client {client} drops out of round {server_round}")


def after_training(fault: Fault, content: RecordDict, simulated: bool) -> RecordDict:
    """Apply the fault to a finished reply: die, corrupt it, and/or delay it."""
    if fault.kind == "crash":
        if simulated:
            raise InjectedCrash("injected fault: the client crashed after training")
        os._exit(CRASH_EXIT_CODE)  # the process dies as a crashed device would: no cleanup, no reply
    if fault.kind == "malformed":
        content = corrupt(content, fault.corruption, fault.seed)
    if fault.delay > 0:
        time.sleep(fault.delay)
    return content


def _first_array(record: ArrayRecord, float_only: bool = False) -> str | None:
    for name, array in record.items():
        if not float_only or np.dtype(array.dtype).kind == "f":
            return name
    return None


def corrupt(content: RecordDict, how: str, seed: int = 0) -> RecordDict:
    """A copy of ``content`` broken in the way ``how`` names (one of :data:`CORRUPTIONS`).

    Works on any reply with an ArrayRecord and a MetricRecord (model updates, synthetic sets); the server's
    reply checks must reject every result.
    """
    if how not in CORRUPTIONS:
        raise ValueError(f"corruption must be one of {', '.join(CORRUPTIONS)}, got {how!r}")
    rng = np.random.default_rng(seed)
    arrays_key = next(iter(content.array_records), None)
    metrics_key = next(iter(content.metric_records), None)
    arrays = dict(content.array_records[arrays_key].items()) if arrays_key is not None else {}
    metrics = dict(content.metric_records[metrics_key].items()) if metrics_key is not None else {}
    name = _first_array(content.array_records[arrays_key]) if arrays_key is not None else None
    fname = _first_array(content.array_records[arrays_key], float_only=True) if arrays_key is not None else None
    if name is None and how not in ("missing-count", "negative-count", "non-finite-metric"):
        how = "missing-count"
    if how == "non-finite" and fname is None:
        how = "dtype"
    if how == "non-finite":
        values = arrays[str(fname)].numpy().copy()
        values.flat[int(rng.integers(values.size))] = rng.choice([math.nan, math.inf, -math.inf])
        arrays[str(fname)] = Array(values)
    elif how == "shape":
        values = arrays[str(name)].numpy().reshape(-1)
        arrays[str(name)] = Array(np.ascontiguousarray(values[:-1] if values.size else np.zeros(1, values.dtype)))
    elif how == "dtype":
        values = arrays[str(name)].numpy()
        arrays[str(name)] = Array(values.astype(np.float64 if values.dtype != np.float64 else np.float32))
    elif how == "undecodable":
        old = arrays[str(name)]
        noise = rng.integers(0, 256, size=len(old.data), dtype=np.uint8).tobytes()
        arrays[str(name)] = Array(dtype=old.dtype, shape=tuple(old.shape), stype=old.stype, data=noise)
    elif how == "lying-shape":
        old = arrays[str(name)]
        arrays[str(name)] = Array(dtype=old.dtype, shape=tuple(old.shape), stype=old.stype,
                                  data=Array(np.zeros(1, dtype=np.dtype(old.dtype))).data)
    elif how == "missing-count":
        metrics.pop("num-examples", None)
        metrics.pop("unit-weight", None)
    elif how == "negative-count":
        metrics["num-examples"] = -1
        if "unit-weight" in metrics:
            metrics["unit-weight"] = -1
    elif how == "extra-array":
        arrays["injected"] = Array(np.zeros(3, dtype=np.float32))
    elif how == "missing-array":
        arrays.pop(str(name))
    elif how == "non-finite-metric":
        metrics["train-loss"] = math.nan
    out = RecordDict()
    for key, record in content.items():  # keep other records (configs) as they were
        if key == arrays_key:
            out[key] = ArrayRecord(array_dict=arrays)
        elif key == metrics_key:
            out[key] = MetricRecord(metrics)
        else:
            out[key] = record
    return out
