"""Plan a region's DP-SGD schedule: the noise multiplier for a target ε, and ε round by round.

The schedule (Poisson rate q and steps per round) is :mod:`fedpriv.privacy.schedule`'s, the one a run
uses; σ comes from the same cached search the regions use (:mod:`fedpriv.privacy.noise`), over the
*whole* schedule (all rounds × local steps, since ε composes across rounds); and ε after each
round is :func:`fedpriv.privacy.accountant.epsilon_of` of the history the region's ledger will hold
after that round. So a plan is not an estimate of a run: it is the ε trajectory the run records
(``tests/adversary/test_plan_matches_run.py``).

Each value is cross-checked by the second accountant of :data:`fedpriv.privacy.accountant.CROSS_CHECK`
(PLD for RDP and PRV, PRV for PLD), so an accounting bug or a misconfigured accountant shows up
as a disagreement. Expect RDP to sit 10–25% *above* PLD in typical DP-SGD regimes: RDP is a valid
but looser upper bound. That gap is conservative, not an error; PRV and PLD are both near-tight
and agree to well within :data:`~fedpriv.privacy.accountant.CROSS_CHECK_TOLERANCE`. An accountant
reporting *less* ε than its check beyond the tolerance is the alarming case.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from fedpriv.core.errors import ConfigError
from fedpriv.privacy.accountant import ACCOUNTANTS, CROSS_CHECK_TOLERANCE, CheckedEpsilon, cross_check_accountant, epsilon_of
from fedpriv.privacy.noise import noise_multiplier_for
from fedpriv.privacy.schedule import Schedule, choose_noise_multiplier, region_schedule, sample_rate_for, steps_per_round

if TYPE_CHECKING:
    from fedpriv.core.config import FedprivConfig

__all__ = [
    "ACCOUNTANTS",
    "Plan",
    "RoundPlan",
    "noise_multiplier_for",
    "plan_region",
    "plan_schedule",
    "sample_rate_for",
    "steps_per_round",
]


@dataclass(frozen=True)
class RoundPlan:
    """Expected privacy after one round."""

    round: int
    steps: int
    """Cumulative DP-SGD steps after this round."""
    epsilon: float
    """Cumulative ε by the plan's accountant."""
    epsilon_check: float | None
    """Cumulative ε by the cross-check accountant; None if not cross-checked."""

    @property
    def difference(self) -> float | None:
        """(ε − ε_check) / ε_check; positive when the accountant is more conservative than its check."""
        if self.epsilon_check is None or not self.epsilon_check > 0 or math.isinf(self.epsilon):
            return None
        return (self.epsilon - self.epsilon_check) / self.epsilon_check


@dataclass(frozen=True)
class Plan:
    """A region's DP schedule and its expected ε trajectory."""

    target_epsilon: float
    delta: float
    rounds: int
    steps_per_round: int
    sample_rate: float
    accountant: str
    check_accountant: str | None
    noise_multiplier: float
    per_round: list[RoundPlan]
    warnings: list[str] = field(default_factory=list)

    @property
    def total_steps(self) -> int:
        return self.rounds * self.steps_per_round

    @property
    def final_epsilon(self) -> float:
        return self.per_round[-1].epsilon

    @property
    def epsilon_by_round(self) -> list[float]:
        return [r.epsilon for r in self.per_round]

    @property
    def schedule(self) -> Schedule:
        return Schedule(self.sample_rate, self.steps_per_round, self.total_steps)

    def history(self, after_round: int | None = None) -> list[tuple[float, float, int]]:
        """The history a region's ledger holds after ``after_round`` rounds (default: all), one entry per round."""
        return self.schedule.history(self.noise_multiplier, after_round)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["total_steps"] = self.total_steps
        d["final_epsilon"] = self.final_epsilon
        for r, row in zip(self.per_round, d["per_round"]):
            row["difference"] = r.difference
        return d


def plan_schedule(
    target_epsilon: float,
    delta: float,
    rounds: int,
    steps_per_round: int,
    sample_rate: float,
    accountant: str = "rdp",
    *,
    cross_check: bool = True,
    epsilon_tolerance: float = 0.01,
    num_examples: int | None = None,
    noise_multiplier: float | None = None,
) -> Plan:
    """Choose σ for ``target_epsilon`` at ``delta`` over ``rounds × steps_per_round`` steps at ``sample_rate``.

    Returns the plan with the cumulative ε after each round and, if ``cross_check``, the cross-check
    accountant's ε per round plus warnings where the two disagree. ``noise_multiplier``, if given, is used
    instead of the search (as ``noise-multiplier`` in a run config). ``num_examples``, if given, only enables
    a warning when δ ≥ 1/num_examples. Raises :class:`~fedpriv.core.errors.ConfigError` on invalid input.
    """
    if noise_multiplier is None:
        _check(_finite(target_epsilon) and target_epsilon > 0, "target-epsilon", target_epsilon,
               "a privacy budget epsilon > 0")
    else:
        _check(_finite(noise_multiplier) and noise_multiplier > 0, "noise-multiplier", noise_multiplier, "a value > 0")
    _check(_finite(delta) and 0 < delta < 1, "delta", delta, "a probability in (0, 1), typically < 1/num-examples")
    _check_int(rounds, "rounds", 1, "an integer >= 1")
    _check_int(steps_per_round, "local-steps", 1, "an integer >= 1 (DP-SGD steps per round)")
    _check(_finite(sample_rate) and 0 < sample_rate <= 1, "sample-rate", sample_rate, "a probability in (0, 1]")
    _check(accountant in ACCOUNTANTS, "accountant", accountant, f"one of {', '.join(ACCOUNTANTS)}")

    schedule = Schedule(float(sample_rate), int(steps_per_round), int(rounds) * int(steps_per_round))
    sigma = float(noise_multiplier) if noise_multiplier is not None else noise_multiplier_for(
        target_epsilon, delta, schedule.total_steps, schedule.sample_rate, accountant, epsilon_tolerance)
    check = cross_check_accountant(accountant) if cross_check else None
    per_round = []
    for r in range(1, rounds + 1):
        history = schedule.history(sigma, r)
        per_round.append(RoundPlan(r, r * schedule.steps_per_round, epsilon_of(history, delta, accountant),
                                   epsilon_of(history, delta, check) if check else None))
    return Plan(
        target_epsilon=float(target_epsilon), delta=float(delta), rounds=int(rounds),
        steps_per_round=schedule.steps_per_round, sample_rate=schedule.sample_rate, accountant=accountant,
        check_accountant=check, noise_multiplier=sigma, per_round=per_round,
        warnings=_warnings(per_round, accountant, check, delta, num_examples),
    )


def plan_region(num_examples: int, cfg: "FedprivConfig", *, cross_check: bool = True) -> Plan:
    """The plan of a region with ``num_examples`` training examples under run config ``cfg``: the schedule, σ
    and accountant the region's runtime uses (:func:`fedpriv.privacy.schedule.region_schedule`,
    :func:`fedpriv.privacy.schedule.choose_noise_multiplier`), so this is the trajectory its ledger will record."""
    schedule = region_schedule(num_examples, cfg)
    return plan_schedule(cfg.target_epsilon, cfg.delta, schedule.rounds,
                         schedule.steps_per_round, schedule.sample_rate, cfg.accountant, cross_check=cross_check,
                         num_examples=num_examples, noise_multiplier=choose_noise_multiplier(schedule, cfg))


def _warnings(per_round: list[RoundPlan], accountant: str, check: str | None, delta: float,
              num_examples: int | None) -> list[str]:
    notes: list[str] = []
    label, check_label = accountant.upper(), (check or "").upper()
    checked = [(p, CheckedEpsilon(accountant, p.epsilon, check, p.epsilon_check)) for p in per_round
               if check and p.epsilon_check is not None]
    bad = [(p, c) for p, c in checked if c.disagrees]
    if bad:
        worst, _ = max(bad, key=lambda pc: abs(pc[1].difference or 0.0))
        below = worst.difference < 0
        notes.append(
            f"{label} and the {check_label} cross-check disagree by more than {CROSS_CHECK_TOLERANCE:.0%} "
            f"(up to {worst.difference:+.1%}, round {worst.round}: {worst.epsilon:.3f} vs {worst.epsilon_check:.3f})"
            + ("; the accountant reports the smaller ε, in the unsafe direction: treat the larger value as the "
               "guarantee." if below else "; the accountant is the larger, so the guarantee holds, but one of them "
               "is off: check the accountants.")
        )
    elif accountant == "rdp":
        over = [p for p, c in checked if (c.difference or 0.0) > CROSS_CHECK_TOLERANCE]
        if over:
            worst = max(over, key=lambda p: p.difference)
            notes.append(
                f"{label} is above the {check_label} cross-check by more than {CROSS_CHECK_TOLERANCE:.0%} "
                f"(up to +{worst.difference:.1%}, round {worst.round}: {worst.epsilon:.3f} vs {worst.epsilon_check:.3f}): "
                "RDP is the looser, more conservative bound, so the guarantee holds; accountant = pld or prv "
                "reaches the same ε with less noise."
            )
    if num_examples is not None and delta >= 1.0 / num_examples:
        notes.append(
            f"delta = {delta:g} is not below 1/num-examples = {1.0 / num_examples:.3g}: with that probability the "
            "guarantee may fail outright for some record; choose delta well below 1/num-examples."
        )
    return notes


# -- validation -------------------------------------------------------------------


def _finite(x) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _check(ok: bool, key: str, value, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r}: expected {expected}")


def _check_int(value, key: str, minimum: int, expected: str) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    _check(ok, key, value, expected)
