"""Choosing σ for a target ε: the slowest question fedpriv asks, so its answers are cached.

Opacus' ``get_noise_multiplier`` bisects σ and recomputes ε of the whole schedule at every
probe: 5-20 s per call on a small CPU. The planner, every simulated region, ``fedpriv plan``
and the benchmarks ask the same few questions over and over, and the answer depends only on
(accountant, target ε, δ, sample rate, steps, tolerance) and the Opacus version. So answers
are memoised in the process and persisted in one small JSON file
(``$FEDPRIV_CACHE_DIR`` or ``~/.cache/fedpriv``, ``noise_multipliers.json``).

Opacus' search covers its own accountants (``rdp``, ``prv``); for ``pld`` the same bisection runs
here over ``fedpriv.privacy.accountant.epsilon_of`` (dp_accounting's PLD): double σ from 10 until the schedule
spends less than the target, then halve the interval until ε is within the tolerance below the
target (σ starts at 20, as in Opacus), and return the upper end (the side that spends at most the target). About 15 PLD
evaluations, a second or two on a small CPU, and cached like the others.

A cached σ is never trusted blindly: before it is returned, one accountant evaluation checks
that the whole schedule at that σ spends at most the target ε. A stale, foreign or edited
cache entry can therefore only cost time (it is recomputed), never privacy.
"""

from __future__ import annotations

import functools
import json
import math
import os
import warnings
from pathlib import Path

from fedpriv.core.errors import ConfigError
from fedpriv.core.files import atomic_write_text

CACHE_NAME = "noise_multipliers.json"


def cache_dir() -> Path:
    """fedpriv's cache directory (``FEDPRIV_CACHE_DIR``, else ``$XDG_CACHE_HOME/fedpriv``)."""
    env = os.environ.get("FEDPRIV_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedpriv"


def noise_multiplier_for(
    target_epsilon: float,
    delta: float,
    total_steps: int,
    sample_rate: float,
    accountant: str = "rdp",
    epsilon_tolerance: float = 0.01,
) -> float:
    """σ such that ``total_steps`` Poisson-sampled steps at ``sample_rate`` spend at most ``target_epsilon``."""
    return _memoised(float(target_epsilon), float(delta), int(total_steps), float(sample_rate), str(accountant),
                     float(epsilon_tolerance))


@functools.lru_cache(maxsize=256)
def _memoised(target_epsilon: float, delta: float, total_steps: int, sample_rate: float, accountant: str,
              epsilon_tolerance: float) -> float:
    key = _key(target_epsilon, delta, total_steps, sample_rate, accountant, epsilon_tolerance)
    cached = _read_cache().get(key)
    if isinstance(cached, (int, float)) and _within_target(float(cached), target_epsilon, delta, total_steps,
                                                            sample_rate, accountant):
        return float(cached)
    sigma = _search(target_epsilon, delta, total_steps, sample_rate, accountant, epsilon_tolerance)
    _write_cache(key, sigma)
    return sigma


def _key(*parts: object) -> str:
    import opacus

    versions = [f"opacus={opacus.__version__}"]
    if "pld" in parts:  # the answer also depends on dp_accounting and the PLD discretisation
        import dp_accounting

        from fedpriv.privacy.accountant import PLD_DISCRETIZATION

        versions += [f"dp_accounting={getattr(dp_accounting, '__version__', '?')}", f"pld={PLD_DISCRETIZATION!r}"]
    return "|".join([*versions, *(repr(p) for p in parts)])


def _search(target_epsilon: float, delta: float, total_steps: int, sample_rate: float, accountant: str,
            epsilon_tolerance: float) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    try:
        if accountant == "pld":
            return _bisect(target_epsilon, delta, total_steps, sample_rate, accountant, epsilon_tolerance)
        with _quiet():
            return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                              steps=total_steps, accountant=accountant,
                                              epsilon_tolerance=epsilon_tolerance))
    except ValueError as exc:
        if "too low" in str(exc):
            raise ConfigError(
                f"target-epsilon = {target_epsilon!r}: too small to reach at delta = {delta!r} over {total_steps} "
                f"steps at sample rate {sample_rate:.4g} even with noise multiplier 1e6; expected a larger "
                "target-epsilon, fewer steps, or a smaller batch"
            ) from None
        raise


MAX_SIGMA = 1e6


def _bisect(target_epsilon: float, delta: float, total_steps: int, sample_rate: float, accountant: str,
            epsilon_tolerance: float) -> float:
    """Opacus' ``get_noise_multiplier`` algorithm over fedpriv's accountant: the smallest probed σ whose ε
    is at most the target and within ``epsilon_tolerance`` of it."""
    from fedpriv.privacy.accountant import epsilon_of

    def eps(sigma: float) -> float:
        return epsilon_of([(sigma, sample_rate, total_steps)], delta, accountant)

    sigma_low, sigma_high, eps_high = 0.0, 10.0, math.inf
    while eps_high > target_epsilon:
        sigma_high *= 2
        if sigma_high > MAX_SIGMA:
            raise ValueError("The privacy budget is too low.")
        eps_high = eps(sigma_high)
    for _ in range(100):  # the interval halves each time: 100 probes is far below float resolution
        if target_epsilon - eps_high <= epsilon_tolerance:
            break
        sigma = (sigma_low + sigma_high) / 2
        e = eps(sigma)
        if e < target_epsilon:
            sigma_high, eps_high = sigma, e
        else:
            sigma_low = sigma
    return sigma_high


def _within_target(sigma: float, target_epsilon: float, delta: float, total_steps: int, sample_rate: float,
                   accountant: str) -> bool:
    from fedpriv.privacy.accountant import epsilon_of

    if not (sigma > 0 and math.isfinite(sigma)):
        return False
    with _quiet():
        return epsilon_of([(sigma, sample_rate, total_steps)], delta, accountant) <= target_epsilon


def _read_cache() -> dict:
    try:
        data = json.loads((cache_dir() / CACHE_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(key: str, sigma: float) -> None:
    """Best effort (a read-only home must not stop training); atomic, so readers never see half a file."""
    path = cache_dir() / CACHE_NAME
    try:
        data = _read_cache()
        data[key] = sigma
        atomic_write_text(path, json.dumps(data, indent=0, sort_keys=True))
    except OSError:
        pass


class _quiet(warnings.catch_warnings):
    """Opacus warns when the best RDP order is at the edge of its grid (it is, for the very large σ the
    bisection probes); the bound stays valid, only looser."""

    def __enter__(self):
        result = super().__enter__()
        warnings.filterwarnings("ignore", message="Optimal order is the")
        return result
