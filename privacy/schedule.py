"""A region's DP-SGD schedule: the one definition the run, the planner, ``fedpriv plan`` and the report share.

Opacus decides how a run samples. ``PrivacyEngine.make_private`` swaps the region's loader
(``DataLoader(batch_size=B)`` over N examples, ``len == ceil(N/B)``) for a ``DPDataLoader``
that Poisson-samples every example with probability ``1 / len(loader)`` and attaches an
accountant hook that records that same rate at every optimizer step. So the run's schedule is

- sample rate  q = 1 / ceil(N/B)  (expected logical batch N / ceil(N/B) <= B), and
- steps per round = ceil(E · ceil(N/B)): E epochs of that loader (E may be fractional), or exactly
  S when the run config sets ``local-steps = S`` (S = 1 is DP-FedSGD: one noisy step per round),

and the whole run is ``rounds × steps per round`` steps at q. The planner once used q = B/N
and ceil(E·N/B) instead, so ``fedpriv plan`` predicted ε for a schedule no run used; now every
caller asks this module. ``tests/adversary/test_plan_matches_run.py`` holds the two together by
running real Opacus training and comparing the plan with the recorded ε round by round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

from fedpriv.core.errors import ConfigError, DataError

if TYPE_CHECKING:
    from fedpriv.core.config import FedprivConfig

__all__ = [
    "Schedule",
    "batches_per_epoch",
    "choose_noise_multiplier",
    "region_schedule",
    "sample_rate_for",
    "schedule_for",
    "steps_per_round",
]


@dataclass(frozen=True)
class Schedule:
    """A region's DP schedule for one job; the noise multiplier is fixed for the whole job."""

    sample_rate: float
    """Poisson rate q = 1 / ceil(N/B), the rate Opacus samples and accounts with."""
    steps_per_round: int
    """Logical DP-SGD steps per round: ceil(E · ceil(N/B)), or ``local-steps`` when set."""
    total_steps: int
    """Steps over all planned rounds (σ is chosen so these spend at most the target ε)."""

    @property
    def rounds(self) -> int:
        return self.total_steps // self.steps_per_round

    def history(self, noise_multiplier: float, after_round: int | None = None) -> list[tuple[float, float, int]]:
        """The Opacus-style history after ``after_round`` rounds (default: all), one entry per round as the
        region's ledger records it."""
        n = self.rounds if after_round is None else int(after_round)
        return [(float(noise_multiplier), self.sample_rate, self.steps_per_round)] * n


def _exact(x: float) -> Fraction:
    """The decimal the user meant (0.1 → 1/10), so ceil() does not trip on float noise (0.3 · 10 → 4)."""
    return Fraction(repr(float(x))) if isinstance(x, float) else Fraction(x)


def _check(ok: bool, key: str, value: object, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r}: expected {expected}")


def _check_sizes(num_examples: int, batch_size: int) -> None:
    _check(isinstance(num_examples, int) and not isinstance(num_examples, bool) and num_examples >= 1,
           "num-examples", num_examples, "a number of training examples >= 1")
    _check(isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1,
           "batch-size", batch_size, "an integer >= 1")
    _check(batch_size <= num_examples, "batch-size", batch_size, f"at most num-examples = {num_examples}")


def batches_per_epoch(num_examples: int, batch_size: int) -> int:
    """``len(DataLoader(N examples, batch_size=B))`` = ceil(N/B): what Opacus derives q from."""
    _check_sizes(num_examples, batch_size)
    return -(-num_examples // batch_size)


def sample_rate_for(num_examples: int, batch_size: int) -> float:
    """Poisson rate q = 1 / ceil(N/B), exactly Opacus' ``1 / len(data_loader)``."""
    return 1.0 / batches_per_epoch(num_examples, batch_size)


def steps_per_round(num_examples: int, batch_size: int, local_epochs: float, local_steps: int = 0) -> int:
    """Logical DP-SGD steps per round: ``local_steps`` when > 0 (the same count in every region, whatever its
    size), else ceil(local_epochs · ceil(N/B)), at least 1."""
    batches = batches_per_epoch(num_examples, batch_size)
    _check(isinstance(local_steps, int) and not isinstance(local_steps, bool) and local_steps >= 0, "local-steps",
           local_steps, "0 (steps from local-epochs) or a number of DP-SGD steps per round >= 1")
    if local_steps:
        return local_steps
    ok = not isinstance(local_epochs, bool) and isinstance(local_epochs, (int, float)) and math.isfinite(local_epochs)
    _check(ok and local_epochs > 0, "local-epochs", local_epochs, "a number of epochs > 0")
    return max(1, math.ceil(_exact(local_epochs) * batches))


def schedule_for(num_examples: int, batch_size: int, local_epochs: float, rounds: int, local_steps: int = 0) -> Schedule:
    """The schedule of ``rounds`` rounds of ``local_epochs`` epochs (or ``local_steps`` steps) over N examples at
    logical batch B."""
    _check(isinstance(rounds, int) and not isinstance(rounds, bool) and rounds >= 1, "rounds", rounds,
           "an integer >= 1")
    steps = steps_per_round(num_examples, batch_size, local_epochs, local_steps)
    return Schedule(sample_rate=sample_rate_for(num_examples, batch_size), steps_per_round=steps,
                    total_steps=steps * rounds)


def region_schedule(num_examples: int, cfg: "FedprivConfig") -> Schedule:
    """The schedule a region with ``num_examples`` training examples runs under the run config ``cfg``."""
    if num_examples < cfg.batch_size:
        raise DataError(
            f"region has {num_examples} training examples, fewer than batch-size = {cfg.batch_size}: "
            f"expected batch-size <= {num_examples} (lower batch-size or give the region more data)"
        )
    return schedule_for(num_examples, cfg.batch_size, cfg.local_epochs, cfg.num_server_rounds, cfg.local_steps)


def choose_noise_multiplier(schedule: Schedule, cfg: "FedprivConfig") -> float:
    """Given σ if set, else the σ that spends ``target-epsilon`` over the whole planned schedule under the
    configured accountant (cached: ``privacy/noise.py``)."""
    if cfg.noise_multiplier > 0:
        return cfg.noise_multiplier
    from fedpriv.privacy.noise import noise_multiplier_for

    return noise_multiplier_for(cfg.target_epsilon, cfg.delta, schedule.total_steps, schedule.sample_rate,
                                cfg.accountant)
