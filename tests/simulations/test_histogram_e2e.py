"""User-level DP histograms over Flower: same error as the vectorized path; malformed reports rejected (slow)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from client.histogram import histogram_report
from privacy.histogram import HistogramEstimator
from privacy.ledger import Ledger
from simulations.apps import simulation_data_source
from simulations.experiments import resolve
from simulations.histogram_data import population_profile, word_distribution
from simulations.runner import simulate

pytestmark = pytest.mark.slow
SMALL = {"num-items": 200, "samples-per-user": 64, "num-clients": 6, "users-per-client": 400}


@pytest.mark.parametrize("method", ["liu2020", "gaussian"])
def test_flower_and_vectorized_paths_give_the_same_error(tmp_path, method: str) -> None:
    cfg = resolve("words-histogram", SMALL | {"histogram-method": method})
    summary = simulate(cfg, tmp_path)
    assert summary["stopped_reason"] == "completed" and summary["users"] == 2400
    _, p = word_distribution(200)
    # The same users, released by the vectorized path with 40 independent noise draws.
    profile = population_profile(cfg.to_dict())
    est = HistogramEstimator(method, 1.0, 1e-6, 200)
    errs = [np.abs(est.release(profile, np.random.default_rng(s)).distribution - p).sum() for s in range(40)]
    mean, sd = float(np.mean(errs)), float(np.std(errs))
    assert abs(summary["final"]["l1_error"] - mean) < 4 * sd + 1e-3
    estimate = json.loads((tmp_path / "histogram.json").read_text())
    assert estimate["items"][0] == "the" and sum(estimate["probability"]) == pytest.approx(1.0)
    with Ledger(tmp_path / "ledger.sqlite", create=False) as led:
        rows = led.releases()
        assert [(r.participant, r.unit, r.round, r.status) for r in rows] == [
            ("all", "user", i + 1, "released") for i in range(est.phases)]
        assert led.spent_epsilon("all", "user", 1e-6) <= 1.0


def tampering_client_app() -> ClientApp:
    """Node 0 reports a vector of the wrong length; node 1 reports values outside the clipping interval."""
    app = ClientApp()

    @app.query()
    def _query(msg: Message, context: Context) -> Message:
        cfg = dict(msg.content["config"])
        pid = int(context.node_config["partition-id"])
        content = histogram_report(msg.content, cfg, simulation_data_source(context, cfg))
        total = content["histogram"]["sum"].numpy()
        if pid == 0:
            total = total[:-1]
        elif pid == 1:
            total = total + 1e3
        content["histogram"] = ArrayRecord({"sum": Array(total)})
        return Message(content=content, reply_to=msg)

    return app


def test_malformed_reports_are_rejected_and_the_phase_goes_on(tmp_path) -> None:
    cfg = resolve("words-histogram", SMALL)
    summary = simulate(cfg, tmp_path, client_app=tampering_client_app())
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["clients"], r["rejected"], r["users"]) for r in rows] == [(4, 2, 1600)] * 2
    assert summary["stopped_reason"] == "completed" and summary["final"]["l1_error"] < 1.0
