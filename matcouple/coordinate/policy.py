"""The decision policy: accept an AI prediction or spend a DFT calculation on it.

The threshold tau is derived the way the paper does: a prediction is good enough when the
true value lies within an acceptable error bound (0.12 eV/atom) with a given confidence
(90%). With a calibrated Gaussian sigma that holds while z * sigma <= bound, where z is the
two-sided quantile of the confidence level (1.645 for 90%), so tau = bound / z.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from matcouple.errors import MatcoupleError
from matcouple.settings import get_settings

ACCEPT = "accept"
DFT = "dft"


class PolicyError(MatcoupleError, ValueError):
    """A threshold of the decision policy is out of range."""


def default_tau(error_bound: float | None = None, confidence: float | None = None) -> float:
    """Largest calibrated sigma (eV/atom) whose central `confidence` interval stays within
    +-error_bound (defaults from settings: 0.12 eV/atom, 0.90 -> 0.12/1.645)."""
    settings = get_settings()
    bound = settings.design_error_bound if error_bound is None else float(error_bound)
    level = settings.design_confidence if confidence is None else float(confidence)
    if not (math.isfinite(bound) and bound > 0):
        raise PolicyError(f"error bound must be a positive number of eV/atom, got {bound}")
    if not (0 < level < 1):
        raise PolicyError(f"confidence must lie strictly between 0 and 1, got {level}")
    z = NormalDist().inv_cdf(0.5 + level / 2)
    return bound / z


@dataclass(frozen=True)
class Decision:
    """What to do with one prediction, and why (the reason is stored with the result)."""

    action: str            # "accept" (AI result used) or "dft" (append a DFT relaxation)
    reason: str            # human-readable, e.g. "sigma 0.041 <= tau 0.073"
    sigma: float | None
    tau: float
    p_match: float | None = None

    @property
    def accepted(self) -> bool:
        return self.action == ACCEPT


def _usable(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def decide(sigma: float | None, tau: float, p_match: float | None = None,
           p_match_min: float | None = None, *, value: float | None = None,
           lowest_known: float | None = None,
           below_known_margin: float | None = None) -> Decision:
    """Accept when sigma <= tau; otherwise DFT. With a p_match gate (``p_match_min`` > 0,
    default ``Settings.design_p_match_min``, 0 = no gate) a generated structure also needs
    p_match >= p_match_min; p_match is kept on the decision either way.

    A predicted formation energy ``value`` more than ``below_known_margin`` (default
    ``Settings.design_below_known_margin``) below ``lowest_known``, the lowest computed
    value of the composition, is a new-ground-state claim: DFT whatever sigma.

    A missing or NaN sigma, or a NaN p_match under a gate, means the model cannot vouch
    for the prediction, so the answer is DFT with a reason that says so.
    """
    if not (_usable(tau) and tau > 0):
        raise PolicyError(f"tau must be a positive number of eV/atom, got {tau}")
    sigma = None if sigma is None else float(sigma)
    p_match = None if p_match is None else float(p_match)
    if not _usable(sigma) or sigma < 0:
        return Decision(DFT, f"no usable uncertainty (sigma={sigma}): DFT", sigma, tau,
                        p_match)
    threshold = get_settings().design_p_match_min if p_match_min is None else p_match_min
    if not (math.isfinite(threshold) and 0 <= threshold <= 1):
        raise PolicyError(f"p_match threshold must lie in [0, 1] (0 = no gate), got {threshold}")
    if p_match is not None and threshold > 0:
        if not _usable(p_match):
            return Decision(DFT, f"no usable match probability (p_match={p_match}): DFT",
                            sigma, tau, p_match)
        if p_match < threshold:
            return Decision(DFT, f"p_match {p_match:.3f} < {threshold:.3f}: structure not "
                            "trusted", sigma, tau, p_match)
    margin = get_settings().design_below_known_margin if below_known_margin is None \
        else float(below_known_margin)
    if _usable(value) and _usable(lowest_known) and value < lowest_known - margin:
        return Decision(DFT, f"predicted {value:.3f}, more than {margin:.3f} below the lowest "
                        f"known {lowest_known:.3f}: a new ground state is checked with DFT",
                        sigma, tau, p_match)
    if sigma <= tau:
        return Decision(ACCEPT, f"sigma {sigma:.3f} <= tau {tau:.3f}", sigma, tau, p_match)
    return Decision(DFT, f"sigma {sigma:.3f} > tau {tau:.3f}", sigma, tau, p_match)


def _finite_pairs(errors, sigmas) -> tuple[np.ndarray, np.ndarray]:
    """Errors and sigmas as arrays of one length, rows with a non-finite value dropped."""
    err, sig = np.asarray(errors, dtype=float), np.asarray(sigmas, dtype=float)
    if err.shape != sig.shape:
        raise PolicyError(f"{err.size} errors but {sig.size} sigmas")
    keep = np.isfinite(err) & np.isfinite(sig)
    return err[keep], sig[keep]


def accepted_accuracy(errors, sigmas, tau: float | None = None,
                      error_bound: float | None = None) -> dict[str, float | int | None]:
    """What the policy promises, checked on labelled data: of the predictions it would
    accept (sigma <= tau), the share whose |error| is within the error bound.

    ``errors`` are prediction - reference and ``sigmas`` the calibrated sigmas (eV/atom);
    rows with a non-finite error or sigma are left out. With no accepted row the shares
    are None (nothing was promised)."""
    tau = default_tau() if tau is None else float(tau)
    bound = get_settings().design_error_bound if error_bound is None else float(error_bound)
    err, sig = _finite_pairs(errors, sigmas)
    accepted = sig <= tau
    n_acc = int(accepted.sum())
    within = np.abs(err[accepted]) <= bound
    return {"tau": tau, "error_bound": bound, "n": int(err.size), "accepted": n_acc,
            "accepted_fraction": (n_acc / err.size) if err.size else None,
            "within_bound_of_accepted": float(within.mean()) if n_acc else None,
            "mae_of_accepted": float(np.abs(err[accepted]).mean()) if n_acc else None,
            "within_bound_of_all": float((np.abs(err) <= bound).mean()) if err.size
            else None}


def tau_keeping_promise(errors, sigmas, error_bound: float | None = None,
                        confidence: float | None = None, min_accepted: int = 30
                        ) -> float | None:
    """The largest tau at which, on labelled data, at least ``confidence`` of the accepted
    predictions are within ``error_bound``: an empirical alternative to bound / z for a
    surrogate whose sigma ranks its errors weakly. None when no tau accepting at least
    ``min_accepted`` rows keeps the promise."""
    s = get_settings()
    bound = s.design_error_bound if error_bound is None else float(error_bound)
    level = s.design_confidence if confidence is None else float(confidence)
    err, sig = _finite_pairs(errors, sigmas)
    order = np.argsort(sig, kind="stable")
    sig_sorted = sig[order]
    hits = np.cumsum(np.abs(err[order]) <= bound)
    counts = np.arange(1, len(order) + 1)
    # a tau must take all rows of equal sigma together: look at the last of each run
    last = np.r_[sig_sorted[1:] != sig_sorted[:-1], True] if len(order) else np.zeros(0, bool)
    ok = last & (counts >= min_accepted) & (hits >= level * counts)
    return float(sig_sorted[ok].max()) if ok.any() else None
