"""Composition of DpEvents into ε(δ), and lossless (de)serialization of events for the ledger.

Accountants: dp-accounting's RDP accountant (Mironov 2017; Mironov, Talwar, Zhang 2019 for the sampled
Gaussian; conversion to (ε, δ) as implemented by dp-accounting) and its PLD accountant (Meiser & Mohammadi
2018; Doroshenko et al. 2022), both under add-or-remove-one adjacency.

Pure ε-DP events (randomized response — including the binary RR that stands for any ε-DP mechanism, see
:func:`privacy.mechanisms.pure_dp_event` — and Laplace) are also composed by basic composition
(Dwork & Roth 2014, Thm. 3.14): for a participant's events E = P ∪ R, with P
pure, ε(δ) ≤ Σ_{e∈P} ε_e + ε_R(δ), where ε_R is the accountant's figure for R. When the accountant supports
every event we also compute its figure for all of E and report the smaller of the two upper bounds.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import attr
import dp_accounting as dpa
from dp_accounting import pld, rdp

ACCOUNTANTS = ("rdp", "pld")


class _DropExcludedOrder(logging.Filter):
    """dp-accounting logs each RDP order it cannot evaluate and leaves it out of the minimum over orders; the
    bound from the remaining orders is still valid, so these lines carry no information for users."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Excluding this order" not in record.getMessage()


logging.getLogger("absl").addFilter(_DropExcludedOrder())
# Opacus' default orders, extended upwards so small-σ and few-step figures are tight too.
RDP_ORDERS: tuple[float, ...] = tuple(
    sorted({1 + x / 10.0 for x in range(1, 100)} | set(range(12, 64)) | {64, 80, 96, 128, 192, 256, 512, 1024})
)


def pure_epsilon(event: dpa.DpEvent) -> float | None:
    """ε of a pure ε-DP event (with counts folded in), or None if the event is not pure."""
    if isinstance(event, dpa.RandomizedResponseDpEvent):
        k, q = event.num_buckets, event.noise_parameter
        if q <= 0:
            return math.inf
        return math.log((1.0 - q + q / k) / (q / k))
    if isinstance(event, dpa.LaplaceDpEvent):
        return 1.0 / event.noise_multiplier
    if isinstance(event, dpa.NoOpDpEvent):
        return 0.0
    if isinstance(event, dpa.SelfComposedDpEvent):
        inner = pure_epsilon(event.event)
        return None if inner is None else inner * event.count
    if isinstance(event, dpa.ComposedDpEvent):
        parts = [pure_epsilon(e) for e in event.events]
        return None if any(p is None for p in parts) else float(sum(parts))  # type: ignore[arg-type]
    return None


def _check_probability(name: str, value: object) -> float:
    """``value`` as a float in (0, 1), or a one-line ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    return float(value)


def _check_accountant(name: str) -> str:
    if name not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {name!r}")
    return name


def _accountant(name: str) -> dpa.PrivacyAccountant:
    _check_accountant(name)
    return rdp.RdpAccountant(orders=list(RDP_ORDERS)) if name == "rdp" else pld.PLDAccountant()


def _flatten(events: Sequence[dpa.DpEvent]) -> list[dpa.DpEvent]:
    out: list[dpa.DpEvent] = []
    for e in events:
        if isinstance(e, dpa.ComposedDpEvent):
            out.extend(_flatten(e.events))
        else:
            out.append(e)
    return out


def epsilon(events: Sequence[dpa.DpEvent], delta: float, accountant: str = "rdp") -> float:
    """Upper bound on ε at ``delta`` for the adaptive composition of ``events``.

    Raises
    ------
    ValueError
        For δ outside (0, 1), an unknown accountant, or an event neither pure nor supported by it.
    """
    delta = _check_probability("delta", delta)
    _check_accountant(accountant)
    # Identical events (one per round, typically) are grouped into SelfComposed ones: the same composition,
    # evaluated once per distinct event, and cached, since audits ask for many overlapping prefixes.
    counts = Counter(_flatten(events))
    grouped = tuple(sorted(((e, c) for e, c in counts.items()), key=lambda ec: repr(ec)))
    return _epsilon_grouped(grouped, delta, accountant)


@lru_cache(maxsize=4096)
def _epsilon_grouped(grouped: tuple[tuple[dpa.DpEvent, int], ...], delta: float, accountant: str) -> float:
    flat = [e if c == 1 else dpa.SelfComposedDpEvent(e, c) for e, c in grouped]
    if any(isinstance(e, dpa.NonPrivateDpEvent) for e, _ in grouped):
        return math.inf
    pure = [pure_epsilon(e) for e in flat]
    supported = [_accountant(accountant).supports(e) for e in flat]
    for e, p, ok in zip(flat, pure, supported, strict=True):
        if p is None and not ok:
            raise ValueError(f"the {accountant} accountant cannot compose {type(e).__name__}; "
                             "use accountant='pld' or record the mechanism as a supported DpEvent")

    def split_bound(by_basic: list[bool]) -> float:
        """Basic composition of the events marked True (all pure), the accountant for the others."""
        bound = float(sum(p for p, basic in zip(pure, by_basic, strict=True) if basic))  # type: ignore[misc]
        others = [e for e, basic in zip(flat, by_basic, strict=True) if not basic]
        if others:
            acc = _accountant(accountant)
            acc.compose(dpa.ComposedDpEvent(others))
            bound += acc.get_epsilon(delta)
        return bound

    # (a) every pure event by basic composition; (b) only those the accountant cannot take. Both are valid.
    candidates = {tuple(p is not None for p in pure), tuple(not ok for ok in supported)}
    return float(min(split_bound(list(c)) for c in candidates))


# ---- serialization ------------------------------------------------------------------------------------------
_EVENT_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        dpa.GaussianDpEvent, dpa.LaplaceDpEvent, dpa.RandomizedResponseDpEvent, dpa.PoissonSampledDpEvent,
        dpa.SampledWithReplacementDpEvent, dpa.SampledWithoutReplacementDpEvent, dpa.SelfComposedDpEvent,
        dpa.ComposedDpEvent, dpa.NoOpDpEvent, dpa.NonPrivateDpEvent, dpa.ZCDpEvent,
    )
}


def _to_obj(event: dpa.DpEvent) -> dict[str, Any]:
    name = type(event).__name__
    if name not in _EVENT_TYPES:
        raise ValueError(f"cannot serialize {name}; supported: {', '.join(sorted(_EVENT_TYPES))}")
    obj: dict[str, Any] = {"type": name}
    for f in attr.fields(type(event)):
        value = getattr(event, f.name)
        if isinstance(value, dpa.DpEvent):
            value = _to_obj(value)
        elif isinstance(value, (list, tuple)):
            value = [_to_obj(v) for v in value]
        obj[f.name] = value
    return obj


def _from_obj(obj: dict[str, Any]) -> dpa.DpEvent:
    name = obj.get("type")
    if name not in _EVENT_TYPES:
        raise ValueError(f"unknown DpEvent type {name!r}; supported: {', '.join(sorted(_EVENT_TYPES))}")
    kwargs = {}
    for key, value in obj.items():
        if key == "type":
            continue
        if isinstance(value, dict):
            value = _from_obj(value)
        elif isinstance(value, list):
            value = [_from_obj(v) for v in value]
        kwargs[key] = value
    return _EVENT_TYPES[name](**kwargs)


def event_to_json(event: dpa.DpEvent) -> str:
    """A JSON text that :func:`event_from_json` turns back into an equal event."""
    return json.dumps(_to_obj(event), sort_keys=True)


def event_from_json(text: str) -> dpa.DpEvent:
    """Inverse of :func:`event_to_json`."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not a serialized DpEvent: {exc}") from exc
    return _from_obj(obj)
