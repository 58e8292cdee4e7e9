"""Accounting: fedpriv's ε equals dp-accounting computed independently, and agrees with Opacus' RDP."""

from __future__ import annotations

import math

import dp_accounting as dpa
import pytest
from dp_accounting import pld

from privacy.accounting import RDP_ORDERS, epsilon, event_from_json, event_to_json
from privacy.mechanisms import RandomizedResponse, RRWithPrior
from tests.oracles import dpa_rdp_epsilon

DELTA = 1e-5
SAMPLED = dpa.PoissonSampledDpEvent(0.01, dpa.GaussianDpEvent(1.1))


def dpa_rdp(*events: dpa.DpEvent) -> float:
    return dpa_rdp_epsilon(*events, delta=DELTA)


def test_single_gaussian() -> None:
    assert epsilon([dpa.GaussianDpEvent(1.3)], DELTA) == pytest.approx(dpa_rdp(dpa.GaussianDpEvent(1.3)), rel=1e-6)


def test_sampled_gaussian_over_rounds() -> None:
    rounds = [dpa.SelfComposedDpEvent(SAMPLED, 100)] * 10  # 10 ledger rows of 100 steps
    assert epsilon(rounds, DELTA) == pytest.approx(dpa_rdp(dpa.SelfComposedDpEvent(SAMPLED, 1000)), rel=1e-6)
    pld_acc = pld.PLDAccountant()
    pld_acc.compose(dpa.SelfComposedDpEvent(SAMPLED, 1000))
    assert epsilon(rounds, DELTA, "pld") == pytest.approx(pld_acc.get_epsilon(DELTA), rel=1e-6)


def test_randomized_response_is_charged_its_epsilon() -> None:
    event = RandomizedResponse(2.0, 10).dp_event()
    q, k = event.noise_parameter, event.num_buckets  # independently: the worst likelihood ratio of RR
    assert epsilon([event], DELTA) == pytest.approx(math.log((1 - q + q / k) / (q / k)), rel=1e-9) == 2.0
    assert epsilon([event] * 3, DELTA) == pytest.approx(6.0)  # basic composition, never optimistic
    assert epsilon([RRWithPrior(1.0, 10).dp_event()], DELTA) == pytest.approx(1.0)


def test_mixed_composition() -> None:
    rr = RandomizedResponse(1.0, 10).dp_event()
    gauss, lap = dpa.GaussianDpEvent(2.0), dpa.LaplaceDpEvent(4.0)  # Laplace b/Δ = 4: 0.25-DP
    mixed = [gauss, dpa.SelfComposedDpEvent(SAMPLED, 500), rr, lap]
    # Pure part (RR, Laplace) by basic composition, the rest by RDP; or RDP of everything it supports.
    expected = min(1.0 + 0.25 + dpa_rdp(gauss, dpa.SelfComposedDpEvent(SAMPLED, 500)),
                   1.0 + dpa_rdp(gauss, dpa.SelfComposedDpEvent(SAMPLED, 500), lap))
    assert epsilon(mixed, DELTA) == pytest.approx(expected, rel=1e-6)


def test_agrees_with_opacus_rdp() -> None:
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = list(RDP_ORDERS)
    for q, sigma, steps in [(0.01, 1.1, 1000), (0.05, 0.8, 200), (1.0, 5.0, 10)]:
        rdp_vec = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
        opacus_eps, _ = get_privacy_spent(orders=orders, rdp=rdp_vec, delta=DELTA)
        event = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps) if q < 1 \
            else dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(sigma), steps)
        assert epsilon([event], DELTA) == pytest.approx(opacus_eps, rel=0.02)  # conversions differ slightly


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="delta must be in"):
        epsilon([dpa.GaussianDpEvent(1.0)], 1.0)
    with pytest.raises(ValueError, match="accountant must be one of rdp, pld"):
        epsilon([dpa.GaussianDpEvent(1.0)], DELTA, "moments")
    assert epsilon([dpa.NonPrivateDpEvent()], DELTA) == math.inf


@pytest.mark.parametrize("event", [
    dpa.GaussianDpEvent(1.5), dpa.LaplaceDpEvent(0.7), RandomizedResponse(2.0, 10).dp_event(),
    dpa.SelfComposedDpEvent(SAMPLED, 7), dpa.ComposedDpEvent([SAMPLED, dpa.NoOpDpEvent()]),
    dpa.SampledWithoutReplacementDpEvent(100, 10, dpa.GaussianDpEvent(1.0)), dpa.NonPrivateDpEvent(),
])
def test_event_json_round_trip(event: dpa.DpEvent) -> None:
    assert event_from_json(event_to_json(event)) == event


def test_unknown_event_type_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown DpEvent type 'Bogus'"):
        event_from_json('{"type": "Bogus"}')
