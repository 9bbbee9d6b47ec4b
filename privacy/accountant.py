"""ε from a DP history, in the shape Opacus uses — computed once per mechanism.

A history is plain data, ``(noise_multiplier, sample_rate, steps)`` tuples as in
Opacus' accountants, so anyone can recompute ε from it; the ledger stores exactly
that. ε of round R is the composition of *all* releases so far. (Rebuilding a
fresh PrivacyEngine every round and reporting its ε — as Flower's Opacus example
does — reports the per-round ε and understates the real cost R-fold.)

Why memoise: Opacus' RDP accountant recomputes the Rényi divergence of the
subsampled Gaussian for every history entry on every call, and its fractional
orders are pure-Python series — seconds per call on a small CPU. RDP composes
linearly in the number of steps, so the per-step RDP curve of each (q, σ) is
computed once per process with Opacus' own ``compute_rdp`` and scaled by steps;
the result is identical to ``RDPAccountant.get_epsilon`` (tested).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Iterable

import numpy as np

Entry = tuple[float, float, int]


@functools.lru_cache(maxsize=512)
def _rdp_per_step(sample_rate: float, noise_multiplier: float) -> tuple[float, ...]:
    from opacus.accountants.analysis import rdp as rdp_analysis
    from opacus.accountants.rdp import RDPAccountant

    orders = RDPAccountant.DEFAULT_ALPHAS
    return tuple(rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=orders))


def epsilon_of(history: Iterable[Entry], delta: float, mechanism: str = "rdp") -> float:
    """ε at ``delta`` of a whole history (0 if empty, ∞ if any release had no noise)."""
    history = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]
    if not history:
        return 0.0
    if any(s == 0.0 for s, _, _ in history):
        return math.inf
    with warnings.catch_warnings():
        # Opacus warns when the best RDP order is at the edge of its grid; the bound stays valid.
        warnings.filterwarnings("ignore", message="Optimal order is the")
        if mechanism == "rdp":
            from opacus.accountants.analysis import rdp as rdp_analysis
            from opacus.accountants.rdp import RDPAccountant

            total = sum(np.asarray(_rdp_per_step(q, s)) * n for s, q, n in history)
            eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=total, delta=delta)
            return float(eps)
        from opacus.accountants import create_accountant

        accountant = create_accountant(mechanism)
        accountant.history = history
        return float(accountant.get_epsilon(delta=delta))
