"""Validation of client replies at the boundary where they are decoded.

A malformed reply is rejected with a reason (logged and counted by the round loop); it never reaches
aggregation and never crashes a round. Three layers, applied in this order by the round loop
(:func:`server.loop.sort_replies`):

1. :func:`check_payload` — the same for every strategy: each array is a numpy payload whose bytes decode to
   exactly the dtype and shape it declares (no larger than :data:`MAX_ARRAY_BYTES`), floating arrays are
   finite, every metric is a finite number (lists only for the keys a strategy allows).
2. the strategy's ``validate_reply`` — what this strategy expects (shapes of the global model, example counts,
   label ranges, synthetic-set sizes ...), one method per strategy.
3. :func:`reply_schema` — the replies that are aggregated together must have the same record names, metric
   keys and list lengths (Flower's aggregation requires it and raises otherwise); a reply that differs from
   the round's majority is rejected.
"""

from __future__ import annotations

import io
import math
from collections.abc import Collection
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from numpy.lib import format as npy_format

MAX_EXAMPLES = 10**9
MAX_ARRAY_BYTES = 2**31  # 2 GiB: no array fedpriv exchanges comes close
NPY_HEADER_MAX = 2**16 + 64  # .npy v1/v2 header bound (magic + length field + header)
NUMPY_STYPE = "numpy.ndarray"


_VERIFIED = "_fedpriv_verified"  # on an Array that passed: (its data, dtype, shape, stype, offset, order)


def decode_array(array: Array, name: str) -> tuple[np.ndarray | None, str | None]:
    """Decode ``array`` if its bytes are exactly what its metadata declares: ``(values, None)`` or
    ``(None, why not)``.

    The declared dtype must be numeric, the declared size at most :data:`MAX_ARRAY_BYTES`, the ``.npy`` header
    must state the declared dtype and shape, the payload must hold exactly that many bytes after it (no more,
    no less), and floating values must be finite. Nothing is allocated before the header matched (the values are a
    read-only view of the payload). An array that passed is marked, so checking it again (the common check,
    then the strategy's) costs no second parse.
    """
    mark = array.__dict__.get(_VERIFIED)
    if mark is not None and mark[0] is array.data and mark[1:4] == (array.dtype, tuple(array.shape), array.stype):
        _, dtype_str, shape, _, offset, order = mark
        return np.frombuffer(array.data, np.dtype(dtype_str), offset=offset).reshape(shape, order=order), None
    if array.stype != NUMPY_STYPE:
        return None, f"array {name!r}: expected serialization {NUMPY_STYPE!r}, got {array.stype!r}"
    try:
        dtype = np.dtype(array.dtype)
    except (TypeError, ValueError):
        return None, f"array {name!r}: unknown dtype {array.dtype!r}"
    if dtype.hasobject or dtype.kind not in "biuf":
        return None, f"array {name!r}: expected a numeric dtype, got {array.dtype!r}"
    shape = tuple(array.shape)
    if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape):
        return None, f"array {name!r}: invalid shape {list(shape)}"
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > MAX_ARRAY_BYTES:
        return None, f"array {name!r}: declares {nbytes} bytes, more than the limit of {MAX_ARRAY_BYTES}"
    data = array.data
    if not nbytes <= len(data) <= nbytes + NPY_HEADER_MAX:
        return None, f"array {name!r}: {len(data)} payload bytes for a declared {dtype}{list(shape)}"
    try:  # the .npy header first: nothing is allocated for a payload that is not what it claims
        stream = io.BytesIO(data)
        version = npy_format.read_magic(stream)
        if version == (1, 0):
            head_shape, fortran, head_dtype = npy_format.read_array_header_1_0(stream)
        elif version == (2, 0):
            head_shape, fortran, head_dtype = npy_format.read_array_header_2_0(stream)
        else:
            return None, f"array {name!r}: unsupported .npy format version {version}"
    except Exception as exc:  # a payload that does not decode is malformed, whatever the reason
        return None, f"array {name!r} does not decode: {type(exc).__name__}: {exc}"
    if head_dtype != dtype or tuple(head_shape) != shape:
        return None, (f"array {name!r}: declares {dtype}{list(shape)} but its payload is "
                      f"{head_dtype}{list(head_shape)}")
    offset = stream.tell()
    if len(data) != offset + nbytes:
        return None, f"array {name!r}: {len(data) - offset} data bytes for {dtype}{list(shape)} ({nbytes} expected)"
    order = "F" if fortran else "C"
    values = np.frombuffer(data, dtype, offset=offset).reshape(shape, order=order)
    if dtype.kind == "f" and not np.isfinite(values).all():
        return None, f"array {name!r} has non-finite values"
    array.__dict__[_VERIFIED] = (data, array.dtype, shape, array.stype, offset, order)
    return values, None


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_payload(content: RecordDict, list_metrics: Collection[str] = ()) -> str | None:
    """The checks every reply must pass whatever the strategy (layer 1 above); the reason, or None."""
    for record_name, record in content.array_records.items():
        for name, array in record.items():
            _, reason = decode_array(array, name if len(content.array_records) == 1 else f"{record_name}/{name}")
            if reason is not None:
                return reason
    for record in content.metric_records.values():
        for key, value in record.items():
            if isinstance(value, list):
                if key not in list_metrics:
                    return f"metric {key!r}: expected a number, got a list of {len(value)}"
                if not all(_finite_number(v) for v in value):
                    return f"metric {key!r}: expected finite numbers, got {value!r}"
            elif not _finite_number(value):
                return f"metric {key!r}: expected a finite number, got {value!r}"
    return None


def reply_schema(content: RecordDict) -> tuple[Any, ...]:
    """What must agree between replies aggregated together: record names, array names, metric keys and the
    lengths of list metrics (layer 3 above)."""
    arrays = tuple(sorted((name, tuple(sorted(rec.keys()))) for name, rec in content.array_records.items()))
    metrics = tuple(sorted(
        (name, tuple(sorted((k, len(v) if isinstance(v, list) else -1) for k, v in rec.items())))
        for name, rec in content.metric_records.items()))
    return arrays, metrics


def describe_schema_difference(got: tuple[Any, ...], expected: tuple[Any, ...]) -> str:
    """A short reason for a reply whose :func:`reply_schema` differs from the round's."""
    got_arrays, got_metrics = got
    exp_arrays, exp_metrics = expected
    if got_arrays != exp_arrays:
        return f"records differ from the round's other replies (arrays {list(got_arrays)} vs {list(exp_arrays)})"
    got_keys = {k for _, items in got_metrics for k in items}
    exp_keys = {k for _, items in exp_metrics for k in items}
    if [n for n, _ in got_metrics] != [n for n, _ in exp_metrics]:
        return (f"metric records {[n for n, _ in got_metrics]} differ from the round's other replies' "
                f"{[n for n, _ in exp_metrics]}")
    return (f"metrics differ from the round's other replies (missing {sorted(k for k, _ in exp_keys - got_keys)}, "
            f"unexpected {sorted(k for k, _ in got_keys - exp_keys)})")


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
        _, reason = decode_array(got, name)
        if reason is not None:
            return reason
    metrics = next(iter(content.metric_records.values()))
    weight = metrics.get(weight_key)
    if not isinstance(weight, int) or isinstance(weight, bool) or not 0 < weight <= MAX_EXAMPLES:
        return f"metric {weight_key!r}: expected a positive integer, got {weight!r}"
    return None
