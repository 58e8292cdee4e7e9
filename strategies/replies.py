"""Validation of client replies at the boundary where they are decoded.

A malformed reply is rejected with a reason (logged and counted by the round loop); it never reaches
aggregation and never crashes a round.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, RecordDict

MAX_EXAMPLES = 10**9


def check_model_update(content: RecordDict, reference: ArrayRecord, weight_key: str = "num-examples") -> str | None:
    """Check a reply that carries a model update shaped like ``reference``.

    Returns
    -------
    str or None
        Why the reply is rejected, or None when it is well formed: exactly one ArrayRecord whose arrays
        match the reference's names, shapes and dtypes and are finite, and exactly one MetricRecord with a
        positive integer ``weight_key``.
    """
    if len(content.array_records) != 1:
        return f"expected exactly one ArrayRecord, got {len(content.array_records)}"
    if len(content.metric_records) != 1:
        return f"expected exactly one MetricRecord, got {len(content.metric_records)}"
    arrays = next(iter(content.array_records.values()))
    if set(arrays.keys()) != set(reference.keys()):
        missing = sorted(set(reference.keys()) - set(arrays.keys()))
        extra = sorted(set(arrays.keys()) - set(reference.keys()))
        return f"array names differ from the global model (missing {missing}, unexpected {extra})"
    for name, ref in reference.items():
        got = arrays[name]
        if tuple(got.shape) != tuple(ref.shape) or got.dtype != ref.dtype:
            return f"array {name!r}: expected {ref.dtype}{list(ref.shape)}, got {got.dtype}{list(got.shape)}"
        try:
            values = got.numpy()
        except Exception as exc:  # a payload that does not decode is malformed, whatever the reason
            return f"array {name!r} does not decode: {exc}"
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            return f"array {name!r} has non-finite values"
    metrics = next(iter(content.metric_records.values()))
    weight = metrics.get(weight_key)
    if not isinstance(weight, int) or isinstance(weight, bool) or not 0 < weight <= MAX_EXAMPLES:
        return f"metric {weight_key!r}: expected a positive integer, got {weight!r}"
    return None
