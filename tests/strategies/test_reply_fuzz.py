"""Malformed replies through every strategy's decoding boundary: 0 crashes, every one rejected with a reason.

The boundary is :func:`server.loop.check_reply` (what the round loop's ``sort_replies`` applies to each reply):
the common payload check of :mod:`strategies.replies`, then the strategy's own ``validate_reply``. For each
strategy a seeded generator sends 10 000 malformed replies (mutations of a valid reply: structure, arrays,
payload bytes, metrics, and the strategy's own semantics), and hypothesis explores the same mutations with
drawn parameters. A reply the validators tripped over ("reply could not be checked") counts as a failure too:
validators must reject, not raise. A round mixing valid and malformed replies must aggregate the valid ones.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, Metadata, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from privacy.histogram import HistogramQuery
from privacy.ledger import Ledger
from server.histogram import check_histogram_reply
from server.loop import check_reply, sort_replies
from strategies.budget_guard import LedgerGuard
from strategies.clients import ClientInfo
from strategies.dp_fedavg import CentralDpFedAvg
from strategies.dp_sgd import LocalDpSgd
from strategies.fedavg import make_fedavg
from strategies.feddm import make_feddm
from strategies.feddm_dp import FedDMDp
from strategies.label_dp import LabelDpConsensus

N_SEEDED = 10_000
NODE = 7
K = 10
RNG = np.random.default_rng(0)
REF = ArrayRecord(array_dict={
    "net.1.weight": Array(RNG.normal(size=(16, 64)).astype(np.float32)),
    "net.1.bias": Array(np.zeros(16, np.float32)),
    "net.3.weight": Array(RNG.normal(size=(K, 16)).astype(np.float32)),
    "net.3.bias": Array(np.zeros(K, np.float32)),
    "steps": Array(np.array(3, dtype=np.int64)),
})


@dataclass
class Case:
    """One strategy's boundary: its check, a valid reply, and the mutations only it rejects."""

    name: str
    check: Callable[..., str | None]
    valid: Callable[[], RecordDict]
    list_metrics: frozenset[str] = frozenset()
    weight_key: str = "num-examples"
    specific: tuple[Callable[[RecordDict, random.Random], RecordDict], ...] = ()
    strategy: object = None


def model_reply(metrics: dict) -> Callable[[], RecordDict]:
    arrays = ArrayRecord(array_dict={k: Array(v.numpy() + 0.5) if v.dtype == "float32" else v for k, v in REF.items()})
    return lambda: RecordDict({"arrays": arrays, "metrics": MetricRecord(dict(metrics))})  # records are never mutated


def feddm_reply(extra: dict) -> Callable[[], RecordDict]:
    images = Array(RNG.uniform(0, 1, size=(20, 1, 8, 8)).astype(np.float32))
    labels = Array(np.arange(20, dtype=np.int64) % K)
    metrics = {"num-examples": 20, "train-loss": 0.3, "feddm-loss-start": 0.9, "feddm-classes": K,
               "feddm-client-seconds": 1.5, **extra}
    record = ArrayRecord(array_dict={"images": images, "labels": labels})
    return lambda: RecordDict({"synthetic": record, "metrics": MetricRecord(dict(metrics))})


def histogram_reply() -> RecordDict:
    return RecordDict({"histogram": ArrayRecord(array_dict={"sum": Array(np.full(K, 0.5))}),
                       "metrics": MetricRecord({"num-users": 5})})


# -- mutations: each turns a valid reply into one every strategy must reject -----------------------------------
def _main(content: RecordDict) -> tuple[str, dict[str, Array], str, dict]:
    """The reply's (first) ArrayRecord and MetricRecord, as their keys and copies of their items."""
    akey = next(k for k, v in content.items() if isinstance(v, ArrayRecord))
    mkey = next(k for k, v in content.items() if isinstance(v, MetricRecord))
    return akey, dict(content[akey].items()), mkey, dict(content[mkey].items())


def records(arrays: dict[str, Array]) -> ArrayRecord:
    """An ArrayRecord holding these very Array objects (``ArrayRecord(array_dict=…)`` would copy them)."""
    out = ArrayRecord()
    for name, array in arrays.items():
        out[name] = array
    return out


def _rebuild(content: RecordDict, arrays: dict[str, Array] | None = None, metrics: dict | None = None) -> RecordDict:
    akey, old_arrays, mkey, old_metrics = _main(content)
    return RecordDict({akey: records(old_arrays if arrays is None else arrays),
                       mkey: MetricRecord(old_metrics if metrics is None else metrics)})


def _pick(arrays: dict[str, Array], r: random.Random, float_only: bool = False) -> str:
    names = [n for n, a in arrays.items() if not float_only or a.dtype.startswith("float")]
    return r.choice(sorted(names))


def m_empty(c: RecordDict, r: random.Random) -> RecordDict:
    return RecordDict() if r.random() < 0.5 else RecordDict({"config": ConfigRecord({"x": 1})})


def m_no_arrays(c: RecordDict, r: random.Random) -> RecordDict:
    _, _, mkey, metrics = _main(c)
    return RecordDict({mkey: MetricRecord(metrics)})


def m_no_metrics(c: RecordDict, r: random.Random) -> RecordDict:
    akey, arrays, _, _ = _main(c)
    return RecordDict({akey: records(arrays)})


def m_extra_record(c: RecordDict, r: random.Random) -> RecordDict:
    akey, arrays, mkey, metrics = _main(c)
    out = RecordDict({akey: records(arrays), mkey: MetricRecord(metrics)})
    if r.random() < 0.5:
        out[f"extra-{r.randrange(99)}"] = records(dict(arrays))
    else:
        out[f"extra-{r.randrange(99)}"] = MetricRecord(dict(metrics))
    return out


def m_drop_array(c: RecordDict, r: random.Random) -> RecordDict:
    _, arrays, _, _ = _main(c)
    arrays.pop(_pick(arrays, r))
    return _rebuild(c, arrays)


def m_extra_array(c: RecordDict, r: random.Random) -> RecordDict:
    _, arrays, _, _ = _main(c)
    arrays[f"injected-{r.randrange(10**6)}"] = Array(np.zeros(r.randrange(1, 5), np.float32))
    return _rebuild(c, arrays)


def m_shape(c: RecordDict, r: random.Random) -> RecordDict:
    _, arrays, _, _ = _main(c)
    name = _pick(arrays, r)
    values = arrays[name].numpy()
    new_shape = (*values.shape, 1) if r.random() < 0.4 or values.size < 2 else (values.size - r.randrange(1, 2),)
    arrays[name] = Array(np.resize(values, new_shape).astype(values.dtype))
    return _rebuild(c, arrays)


def m_dtype(c: RecordDict, r: random.Random) -> RecordDict:
    _, arrays, _, _ = _main(c)
    name = _pick(arrays, r)
    values = arrays[name].numpy()
    choices = [t for t in (np.float64, np.float16, np.int32, np.uint8, np.float32, np.int64) if t != values.dtype]
    arrays[name] = Array(values.astype(r.choice(choices)))
    return _rebuild(c, arrays)


def m_non_finite(c: RecordDict, r: random.Random) -> RecordDict:
    _, arrays, _, _ = _main(c)
    name = _pick(arrays, r, float_only=True)
    values = arrays[name].numpy().copy()
    values.flat[r.randrange(values.size)] = r.choice([math.nan, math.inf, -math.inf])
    arrays[name] = Array(values)
    return _rebuild(c, arrays)


def m_bytes(c: RecordDict, r: random.Random) -> RecordDict:
    """Payload bytes that do not decode to what the metadata declares (random, truncated, padded, npz, other)."""
    _, arrays, _, _ = _main(c)
    name = _pick(arrays, r)
    old = arrays[name]
    how = r.randrange(6)
    if how == 0:
        data = r.randbytes(len(old.data))
    elif how == 1:
        data = old.data[: r.randrange(len(old.data))]
    elif how == 2:
        data = old.data + bytes(r.randrange(1, 64))
    elif how == 3:
        buf = io.BytesIO()
        np.savez(buf, a=old.numpy())
        data = buf.getvalue()
    elif how == 4:  # a valid .npy of another shape: the metadata lies about the payload
        data = Array(np.zeros(r.randrange(1, 4), dtype=np.dtype(old.dtype))).data
    else:  # a valid .npy of the same size but another dtype of the same width
        other = {"float32": np.int32, "int64": np.float64, "float64": np.int64}.get(old.dtype, np.uint8)
        data = Array(old.numpy().view(other) if np.dtype(other).itemsize == np.dtype(old.dtype).itemsize
                     else np.zeros(1, other)).data
    arrays[name] = Array(dtype=old.dtype, shape=tuple(old.shape), stype=old.stype, data=data)
    return _rebuild(c, arrays)


def m_metadata(c: RecordDict, r: random.Random) -> RecordDict:
    """Metadata that cannot be right: unknown serialization or dtype, a huge or negative declared shape."""
    _, arrays, _, _ = _main(c)
    name = _pick(arrays, r)
    old = arrays[name]
    how = r.randrange(4)
    if how == 0:
        arrays[name] = Array(dtype=old.dtype, shape=tuple(old.shape), stype=r.choice(["torch.Tensor", "", "pickle"]),
                             data=old.data)
    elif how == 1:
        arrays[name] = Array(dtype=r.choice(["float33", "object", "<U4", "complex64", "V8"]), shape=tuple(old.shape),
                             stype=old.stype, data=old.data)
    elif how == 2:
        arrays[name] = Array(dtype=old.dtype, shape=(2**40, r.randrange(1, 9)), stype=old.stype, data=old.data)
    else:
        arrays[name] = Array(dtype=old.dtype, shape=(-1, *old.shape), stype=old.stype, data=old.data)
    return _rebuild(c, arrays)


def m_weight(c: RecordDict, r: random.Random, key: str = "num-examples") -> RecordDict:
    _, _, _, metrics = _main(c)
    how = r.randrange(6)
    if how == 0:
        metrics.pop(key, None)
    else:
        huge = 10**12 if key != "num-users" else 0  # any count of users is possible; of examples, not
        metrics[key] = [0, -r.randrange(1, 10**6), 2.5, huge, [1, 2]][how - 1]
    return _rebuild(c, metrics=metrics)


def m_metric_value(c: RecordDict, r: random.Random) -> RecordDict:
    _, _, _, metrics = _main(c)
    key = r.choice([*sorted(k for k, v in metrics.items() if not isinstance(v, list)), f"x-{r.randrange(9)}"])
    metrics[key] = r.choice([math.nan, math.inf, -math.inf, [1.0, math.nan], [r.random()]])
    return _rebuild(c, metrics=metrics)


GENERIC = (m_empty, m_no_arrays, m_no_metrics, m_extra_record, m_drop_array, m_extra_array, m_shape, m_dtype,
           m_non_finite, m_bytes, m_metadata, m_metric_value)


def metric(**values: object) -> Callable[[RecordDict, random.Random], RecordDict]:
    """A mutation setting metrics to (one of) the given bad values."""
    def mutate(c: RecordDict, r: random.Random) -> RecordDict:
        _, _, _, metrics = _main(c)
        key = r.choice(sorted(values))
        choice = values[key]
        metrics[key] = r.choice(choice) if isinstance(choice, tuple) else choice
        return _rebuild(c, metrics=metrics)

    mutate.__name__ = "metric:" + ",".join(sorted(values))
    return mutate


def synthetic(c: RecordDict, r: random.Random) -> RecordDict:
    """FedDM: labels outside 0..K−1, pixels outside [0, 1], too many images, a count that does not match."""
    _, arrays, _, metrics = _main(c)
    images, labels = arrays["images"].numpy().copy(), arrays["labels"].numpy().copy()
    how = r.randrange(4)
    if how == 0:
        labels[r.randrange(len(labels))] = r.choice([-1, K, K + 7, 2**40])
    elif how == 1:
        images.flat[r.randrange(images.size)] = r.choice([-0.5, 1.5, 255.0])
    elif how == 2:
        n = 101 + r.randrange(50)
        images, labels = np.resize(images, (n, *images.shape[1:])), np.resize(labels, n)
        metrics["num-examples"] = n
    else:
        metrics["num-examples"] = len(labels) + r.choice([-1, 1, 5])
    return _rebuild(c, {"images": Array(images), "labels": Array(labels)}, metrics)


def histogram_sum(c: RecordDict, r: random.Random) -> RecordDict:
    values = np.full(K + r.choice([0, 0, -1, 1]), 0.5)
    if len(values) == K:
        values[r.randrange(K)] = r.choice([-1.0, 6.0, 1e9])
    return _rebuild(c, {"sum": Array(values)})


def cases(tmp_dir) -> list[Case]:
    feddm_kwargs = {"model": "mlp", "input_shape": (1, 8, 8), "num_classes": K, "max_images": 100,
                    "server_epochs": 1, "server_lr": 0.01, "server_batch_size": 8}
    fit = {"train-loss": 0.4, "num-examples": 100, "unit-weight": 1}
    dpsgd_metrics = {"train-loss": 0.4, "num-examples": 100, "dp-steps": 12, "dp-client-epsilon": 2.5}

    def dpsgd() -> LocalDpSgd:
        return LocalDpSgd(make_fedavg(2), target_epsilon=8.0, target_delta=1e-5, num_rounds=3, clip_norm=1.0,
                          batch_size=16, local_epochs=1, noise_multiplier=1.0)

    label = LabelDpConsensus(make_fedavg(2), epsilon=1.0, num_classes=K, mechanism="rr", stages=1, num_rounds=3,
                             retrain_rounds=1, consensus=True, retrain="continue", initial_arrays=REF)
    label.info[NODE] = ClientInfo("0", 100)
    feddm_dp = FedDMDp(make_feddm(2, 1.0, 0.0, **feddm_kwargs), target_epsilon=8.0, target_delta=1e-5, num_rounds=2,
                       releases=3, clip_norm=1.0, noise_multiplier=1.0)
    ledger = Ledger(tmp_dir / "ledger.sqlite")
    guard = LedgerGuard(dpsgd(), ledger, "fuzz")
    dpfedavg = CentralDpFedAvg(make_fedavg(2, weighted_by_key="unit-weight"), noise_multiplier=1.0, clip_norm=1.0,
                               num_sampled_clients=2)
    feddm = make_feddm(2, 1.0, 0.0, **feddm_kwargs)
    label_metrics = {"train-loss": 0.4, "num-examples": 90, "data-size": 100, "labelled-size": 100,
                     "label-counts": [9] * K, "noisy-correct": 80}
    return [
        Case("fedavg", make_fedavg(2).validate_reply, model_reply(fit), strategy=make_fedavg(2)),
        Case("dpsgd", dpsgd().validate_reply, model_reply(dpsgd_metrics),
             specific=(metric(**{"dp-steps": (-1, 2.5), "dp-client-epsilon": (-0.5,)}),), strategy=dpsgd()),
        Case("ledger-guard(dpsgd)", guard.validate_reply, model_reply(dpsgd_metrics),
             specific=(metric(**{"dp-steps": (-3,), "dp-client-epsilon": (-1.0,)}),)),
        Case("dpfedavg", dpfedavg.validate_reply, model_reply(fit), weight_key="unit-weight",
             specific=(metric(**{"unit-weight": (2, 100, 10**6)}),), strategy=dpfedavg),
        Case("label-dp", label.validate_reply, model_reply(label_metrics), frozenset({"label-counts"}),
             specific=(metric(**{"label-counts": ([9] * (K - 1), [9] * (K + 1), [10] * K, [-1] + [10] * (K - 1)),
                                 "data-size": (99, 101, 0), "labelled-size": (101, -1), "noisy-correct": (101, -2),
                                 "kept-correct": (5,)}),), strategy=label),
        Case("feddm", feddm.validate_reply, feddm_reply({}), specific=(synthetic,), strategy=feddm),
        Case("feddm-dp", feddm_dp.validate_reply, feddm_reply({"feddm-dp-releases": 4}),
             specific=(synthetic, metric(**{"feddm-dp-releases": (3, 5, 0)})), strategy=feddm_dp),
        Case("histogram", check_histogram_reply(HistogramQuery("frequency", K)), histogram_reply,
             weight_key="num-users", specific=(histogram_sum,)),
    ]


@pytest.fixture(scope="module")
def all_cases(tmp_path_factory) -> list[Case]:
    return cases(tmp_path_factory.mktemp("fuzz"))


def mutations(case: Case) -> list[Callable[[RecordDict, random.Random], RecordDict]]:
    out: list[Callable[[RecordDict, random.Random], RecordDict]] = list(GENERIC)
    out.append(lambda c, r: m_weight(c, r, case.weight_key))
    out.extend(case.specific)
    return out


def assert_rejected(case: Case, content: RecordDict, what: str) -> str:
    reason = check_reply(content, case.check, REF, NODE, case.list_metrics)
    assert reason is not None, f"{case.name}: a malformed reply ({what}) was accepted"
    assert not reason.startswith("reply could not be checked"), f"{case.name}: validator raised: {reason}"
    return reason


def test_valid_replies_pass_every_boundary(all_cases: list[Case]) -> None:
    for case in all_cases:
        assert check_reply(case.valid(), case.check, REF, NODE, case.list_metrics) is None, case.name


@pytest.mark.parametrize("index", range(8))
def test_ten_thousand_seeded_malformed_replies_per_strategy(all_cases: list[Case], index: int) -> None:
    case = all_cases[index]
    r = random.Random(1000 + index)
    ops = mutations(case)
    reasons: set[str] = set()
    for i in range(N_SEEDED):
        op = ops[i % len(ops)] if i < len(ops) else r.choice(ops)
        reasons.add(assert_rejected(case, op(case.valid(), r), getattr(op, "__name__", "mutation")))
    assert len(reasons) >= 15, sorted(reasons)  # many distinct, specific reasons, not one catch-all


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(index=st.integers(0, 7), which=st.integers(0, 10**6), seed=st.integers(0, 2**32 - 1))
def test_hypothesis_malformed_replies_are_rejected(all_cases: list[Case], index: int, which: int, seed: int) -> None:
    case = all_cases[index]
    ops = mutations(case)
    op = ops[which % len(ops)]
    assert_rejected(case, op(case.valid(), random.Random(seed)), getattr(op, "__name__", "mutation"))


def _message(content: RecordDict, node: int) -> Message:
    md = Metadata(run_id=0, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id=f"i{node}",
                  group_id="1", created_at=0.0, ttl=60.0, message_type=MessageType.TRAIN)
    return Message(content=content, metadata=md)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(index=st.sampled_from([0, 1, 3, 4, 5]), seed=st.integers(0, 2**32 - 1), bad=st.integers(1, 6))
def test_a_round_with_malformed_replies_aggregates_the_valid_ones(
    all_cases: list[Case], index: int, seed: int, bad: int
) -> None:
    case = all_cases[index]
    r = random.Random(seed)
    ops = mutations(case)
    replies = [_message(case.valid(), NODE), _message(case.valid(), NODE)]
    replies += [_message(r.choice(ops)(case.valid(), r), 100 + i) for i in range(bad)]
    r.shuffle(replies)
    check = case.check if case.name != "label-dp" else (lambda c, g, n: case.check(c, g, NODE))
    got = sort_replies(replies, 0, check, REF, "train", case.list_metrics, consistent=True)
    assert len(got.ok) == 2 and len(got.rejected) == bad
    if case.name == "dpfedavg":  # Flower's DP wrapper clips against the model its configure_train sent
        case.strategy.strategy.current_arrays = REF
    if case.name == "feddm":  # FedDM trains the model its configure_train sent on the synthetic sets
        from models import build_model

        case.strategy._global = ArrayRecord(build_model("mlp", image_size=8, num_classes=K).state_dict())
    arrays, _ = case.strategy.aggregate_train(1, got.ok)  # Flower's aggregation accepts what passed
    assert arrays is not None


def test_replies_that_disagree_on_metric_keys_are_not_aggregated_together() -> None:
    strategy = make_fedavg(3)
    good = model_reply({"train-loss": 0.4, "num-examples": 100, "unit-weight": 1})
    odd = model_reply({"train-loss": 0.4, "num-examples": 100, "unit-weight": 1, "extra": 1.0})
    replies = [_message(good(), 1), _message(odd(), 2), _message(good(), 3)]
    got = sort_replies(replies, 0, strategy.validate_reply, REF, "train", consistent=True)
    assert [m.metadata.src_node_id for m in got.ok] == [1, 3]
    assert got.rejected_reasons == ["metrics differ from the round's other replies (missing [], unexpected "
                                    "['extra'])"]
    assert strategy.aggregate_train(1, got.ok)[0] is not None
