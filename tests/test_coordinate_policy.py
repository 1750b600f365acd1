"""The decision policy: tau from the error bound and confidence, and accept/DFT decisions."""

from __future__ import annotations

import math

import pytest

from matcouple.coordinate.policy import ACCEPT, DFT, PolicyError, decide, default_tau
from matcouple.settings import get_settings


def test_default_tau_is_bound_over_two_sided_z():
    assert default_tau() == pytest.approx(0.12 / 1.6448536, rel=1e-6)
    assert default_tau() == pytest.approx(0.07295, abs=1e-5)
    assert default_tau(0.1, 0.95) == pytest.approx(0.1 / 1.959964, rel=1e-6)
    assert default_tau(confidence=0.6827) == pytest.approx(0.12, rel=1e-3)  # one sigma


@pytest.mark.parametrize("bound, conf", [(0, 0.9), (-0.1, 0.9), (float("nan"), 0.9),
                                         (0.12, 0.0), (0.12, 1.0), (0.12, 1.5)])
def test_bad_thresholds_are_refused(bound, conf):
    with pytest.raises(PolicyError):
        default_tau(bound, conf)


def test_decisions_and_reasons():
    tau = default_tau()
    d = decide(0.041, tau)
    assert d.action == ACCEPT and d.accepted and d.reason == "sigma 0.041 <= tau 0.073"
    assert decide(tau, tau).action == ACCEPT  # the boundary is accepted
    d = decide(0.2, tau)
    assert d.action == DFT and d.reason == "sigma 0.200 > tau 0.073" and d.tau == tau
    for missing in (None, float("nan"), math.inf, -0.01):
        d = decide(missing, tau)
        assert d.action == DFT and "no usable uncertainty" in d.reason
    with pytest.raises(PolicyError):
        decide(0.01, 0.0)


def test_match_probability_gate(monkeypatch):
    tau = default_tau()
    # default: no gate; sigma decides and p_match is kept on the decision
    d = decide(0.01, tau, p_match=0.3)
    assert d.action == ACCEPT and d.p_match == 0.3
    assert decide(0.01, tau, p_match=float("nan")).action == ACCEPT
    # a gate given by the caller
    d = decide(0.01, tau, p_match=0.3, p_match_min=0.5)
    assert d.action == DFT and d.p_match == 0.3 and "p_match 0.300 < 0.500" in d.reason
    assert decide(0.01, tau, p_match=0.9, p_match_min=0.5).action == ACCEPT
    assert decide(0.01, tau, p_match=0.3, p_match_min=0.2).action == ACCEPT
    assert decide(0.01, tau, p_match=float("nan"), p_match_min=0.5).action == DFT
    assert decide(0.5, tau, p_match=0.99, p_match_min=0.5).action == DFT  # sigma still decides
    assert decide(0.01, tau, p_match_min=0.5).action == ACCEPT  # not generated: no p_match
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(PolicyError, match="p_match"):
            decide(0.01, tau, p_match=0.3, p_match_min=bad)
    # ... or by the environment
    monkeypatch.setenv("MATCOUPLE_DESIGN_P_MATCH_MIN", "0.5")
    get_settings.cache_clear()
    try:
        assert decide(0.01, tau, p_match=0.3).action == DFT
        assert decide(0.01, tau, p_match=0.6).action == ACCEPT
    finally:
        monkeypatch.delenv("MATCOUPLE_DESIGN_P_MATCH_MIN")
        get_settings.cache_clear()


def test_a_new_ground_state_claim_goes_to_dft():
    tau = default_tau()
    # confident, but 0.07 below the lowest known value (default margin 0.05): DFT
    d = decide(0.01, tau, value=-0.19, lowest_known=-0.12)
    assert d.action == DFT and "below the lowest known -0.120" in d.reason
    # within the margin, above the known value, or nothing known: sigma decides
    assert decide(0.01, tau, value=-0.16, lowest_known=-0.12).action == ACCEPT
    assert decide(0.01, tau, value=-0.05, lowest_known=-0.12).action == ACCEPT
    assert decide(0.01, tau, value=-0.19, lowest_known=None).action == ACCEPT
    assert decide(0.01, tau, value=-0.19, lowest_known=float("nan")).action == ACCEPT
    # the margin can be set per call, and inf turns the rule off
    assert decide(0.01, tau, value=-0.19, lowest_known=-0.12,
                  below_known_margin=0.1).action == ACCEPT
    assert decide(0.01, tau, value=-0.19, lowest_known=-0.12,
                  below_known_margin=math.inf).action == ACCEPT
    # low confidence with the claim: DFT either way
    assert decide(0.5, tau, value=-0.19, lowest_known=-0.12).action == DFT


def test_accepted_accuracy_by_hand():
    from matcouple.coordinate.policy import accepted_accuracy

    errors = [0.01, -0.2, 0.05, 0.5, float("nan"), 0.13]
    sigmas = [0.02, 0.05, 0.06, 0.3, 0.01, 0.07]
    out = accepted_accuracy(errors, sigmas, tau=0.073, error_bound=0.12)
    # accepted rows (finite, sigma <= tau): 0.01, -0.2, 0.05, 0.13 -> 2 of 4 within 0.12
    assert out["n"] == 5 and out["accepted"] == 4
    assert out["accepted_fraction"] == pytest.approx(0.8)
    assert out["within_bound_of_accepted"] == pytest.approx(0.5)
    assert out["mae_of_accepted"] == pytest.approx((0.01 + 0.2 + 0.05 + 0.13) / 4)
    assert out["within_bound_of_all"] == pytest.approx(2 / 5)
    none = accepted_accuracy([0.3], [0.5], tau=0.073, error_bound=0.12)
    assert none["accepted"] == 0 and none["within_bound_of_accepted"] is None
    with pytest.raises(PolicyError):
        accepted_accuracy([0.1, 0.2], [0.1], tau=0.07)


def test_tau_keeping_promise_by_hand():
    from matcouple.coordinate.policy import tau_keeping_promise

    sigmas = [0.01, 0.02, 0.03, 0.04, 0.05, 0.06]
    errors = [0.0, 0.05, 0.3, 0.0, 0.0, 0.5]
    # within 0.12 among sigma <= tau: 1/1, 2/2, 2/3, 3/4, 4/5, 4/6
    assert tau_keeping_promise(errors, sigmas, 0.12, 0.8, min_accepted=1) == 0.05
    assert tau_keeping_promise(errors, sigmas, 0.12, 0.6, min_accepted=1) == 0.06
    assert tau_keeping_promise(errors, sigmas, 0.12, 0.85, min_accepted=1) == 0.02
    assert tau_keeping_promise(errors, sigmas, 0.12, 0.9, min_accepted=1) == 0.02
    assert tau_keeping_promise(errors, sigmas, 0.12, 0.9, min_accepted=3) is None
    # ties: a tau of 0.02 would take both rows of sigma 0.02 (one bad): 2/3 < 0.9
    assert tau_keeping_promise([0.0, 0.0, 0.5], [0.01, 0.02, 0.02], 0.12, 0.9,
                               min_accepted=1) == 0.01
