"""Plan a region's DP-SGD schedule: the noise multiplier for a target ε, and ε round by round.

The schedule is ``rounds`` federated rounds of ``steps_per_round`` DP-SGD steps, each
with Poisson sampling at rate ``sample_rate``. :func:`plan_schedule` picks the noise
multiplier with Opacus' ``get_noise_multiplier`` over the *whole* schedule (all
rounds × local steps, since ε composes across rounds), then reports the expected
cumulative ε after every round with a fresh Opacus accountant, and cross-checks each
value with an independent implementation — Google's ``dp_accounting`` PLD accountant
on ``PoissonSampledDpEvent(q, GaussianDpEvent(σ))`` — so an accounting bug or a
misconfigured accountant shows up as a disagreement.

Expect RDP to sit 10–25% *above* PLD in typical DP-SGD regimes: RDP is a valid but
looser upper bound (the conversion from Rényi DP to (ε, δ) loses a little). That gap
is conservative, not an error; PRV and PLD are both near-tight and should agree to
within about 1%. Any accountant reporting *less* ε than PLD by more than 5% is the
alarming case.

:func:`steps_per_round` and :func:`sample_rate_for` are the one definition of the
schedule for the rest of fedpriv, so ``fedpriv plan`` and a run report the same
trajectory.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from fractions import Fraction

from fedpriv.errors import ConfigError
from privacy.noise import noise_multiplier_for

__all__ = [
    "ACCOUNTANTS",
    "DISAGREEMENT_TOLERANCE",
    "Plan",
    "RoundPlan",
    "noise_multiplier_for",
    "pld_epsilons",
    "plan_schedule",
    "sample_rate_for",
    "steps_per_round",
]

ACCOUNTANTS = ("rdp", "prv")
DISAGREEMENT_TOLERANCE = 0.05
"""Relative difference between the accountant and the PLD cross-check that triggers a warning."""

PLD_DISCRETIZATION = 1e-3
"""``value_discretization_interval`` for the PLD cross-check: 10× faster than dp_accounting's
default 1e-4, and the ε it gives differs by < 1e-4 relative in fedpriv's regimes (checked)."""


@dataclass(frozen=True)
class RoundPlan:
    """Expected privacy after one round."""

    round: int
    steps: int
    """Cumulative DP-SGD steps after this round."""
    epsilon: float
    """Cumulative ε by the chosen accountant (Opacus)."""
    epsilon_pld: float | None
    """Cumulative ε by the independent PLD accountant (dp_accounting); None if not cross-checked."""

    @property
    def difference(self) -> float | None:
        """(ε − ε_PLD) / ε_PLD; positive when the accountant is more conservative than PLD."""
        if self.epsilon_pld is None or not self.epsilon_pld > 0 or math.isinf(self.epsilon):
            return None
        return (self.epsilon - self.epsilon_pld) / self.epsilon_pld


@dataclass(frozen=True)
class Plan:
    """A region's DP schedule and its expected ε trajectory."""

    target_epsilon: float
    delta: float
    rounds: int
    steps_per_round: int
    sample_rate: float
    accountant: str
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

    def history(self, after_round: int | None = None) -> list[tuple[float, float, int]]:
        """Opacus-style history after ``after_round`` rounds (default: all)."""
        n = self.rounds if after_round is None else after_round
        return [(self.noise_multiplier, self.sample_rate, n * self.steps_per_round)] if n > 0 else []

    def to_dict(self) -> dict:
        d = asdict(self)
        d["total_steps"] = self.total_steps
        d["final_epsilon"] = self.final_epsilon
        for r, row in zip(self.per_round, d["per_round"]):
            row["difference"] = r.difference
        return d


# -- schedule helpers -----------------------------------------------------------


def _exact(x: float) -> Fraction:
    """The decimal the user meant (0.1 → 1/10), so ceil() does not trip on float noise."""
    return Fraction(repr(float(x))) if isinstance(x, float) else Fraction(x)


def steps_per_round(num_examples: int, batch_size: int, local_epochs: float) -> int:
    """DP-SGD steps per round: ``ceil(local_epochs · num_examples / batch_size)``."""
    _check_int(num_examples, "num-examples", 1, "a number of training examples >= 1")
    _check_int(batch_size, "batch-size", 1, "an integer >= 1")
    _check(batch_size <= num_examples, "batch-size", batch_size, f"at most num-examples = {num_examples}")
    _check(_finite(local_epochs) and local_epochs > 0, "local-epochs", local_epochs, "a number of epochs > 0")
    return max(1, math.ceil(_exact(local_epochs) * num_examples / batch_size))


def sample_rate_for(num_examples: int, batch_size: int) -> float:
    """Poisson sampling rate ``batch_size / num_examples`` (expected logical batch = batch_size)."""
    _check_int(num_examples, "num-examples", 1, "a number of training examples >= 1")
    _check_int(batch_size, "batch-size", 1, "an integer >= 1")
    _check(batch_size <= num_examples, "batch-size", batch_size, f"at most num-examples = {num_examples}")
    return batch_size / num_examples


# -- accounting -------------------------------------------------------------------


@contextmanager
def _quiet():
    with warnings.catch_warnings():
        # Opacus warns when the best RDP order is at the edge of its grid (it is, for the
        # very large σ probed by the noise search); the bound is valid, only looser.
        warnings.filterwarnings("ignore", message="Optimal order is the")
        yield


def _opacus_epsilon(history: list[tuple[float, float, int]], delta: float, accountant: str) -> float:
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    with _quiet():
        return float(acc.get_epsilon(delta=delta))


def pld_epsilons(
    noise_multiplier: float,
    sample_rate: float,
    steps_per_round: int,
    rounds: int,
    delta: float,
    value_discretization_interval: float = PLD_DISCRETIZATION,
) -> list[float]:
    """Cumulative ε after each round by Google's ``dp_accounting`` PLD accountant."""
    import dp_accounting
    from dp_accounting.pld import PLDAccountant

    acc = PLDAccountant(value_discretization_interval=value_discretization_interval)
    step = dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
    out = []
    for _ in range(rounds):
        acc.compose(dp_accounting.SelfComposedDpEvent(step, steps_per_round))
        out.append(float(acc.get_epsilon(delta)))
    return out


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
) -> Plan:
    """Choose σ for ``target_epsilon`` at ``delta`` over ``rounds × steps_per_round`` steps.

    Returns the plan with the expected cumulative ε after each round (fresh Opacus
    accountant) and, if ``cross_check``, the PLD ε per round plus warnings where the
    two differ by more than :data:`DISAGREEMENT_TOLERANCE`. ``num_examples``, if given,
    only enables a warning when δ ≥ 1/num_examples. Raises
    :class:`~fedpriv.errors.ConfigError` on invalid input.
    """
    _check(_finite(target_epsilon) and target_epsilon > 0, "target-epsilon", target_epsilon, "a privacy budget epsilon > 0")
    _check(_finite(delta) and 0 < delta < 1, "delta", delta, "a probability in (0, 1), typically < 1/num-examples")
    _check_int(rounds, "rounds", 1, "an integer >= 1")
    _check_int(steps_per_round, "local-steps", 1, "an integer >= 1 (DP-SGD steps per round)")
    _check(_finite(sample_rate) and 0 < sample_rate <= 1, "sample-rate", sample_rate, "a probability in (0, 1]")
    _check(accountant in ACCOUNTANTS, "accountant", accountant, f"one of {', '.join(ACCOUNTANTS)}")

    total = rounds * steps_per_round
    sigma = noise_multiplier_for(target_epsilon, delta, total, sample_rate, accountant, epsilon_tolerance)
    eps = [_opacus_epsilon([(sigma, sample_rate, r * steps_per_round)], delta, accountant) for r in range(1, rounds + 1)]
    pld = pld_epsilons(sigma, sample_rate, steps_per_round, rounds, delta) if cross_check else [None] * rounds
    per_round = [RoundPlan(r + 1, (r + 1) * steps_per_round, eps[r], pld[r]) for r in range(rounds)]

    notes: list[str] = []
    label = accountant.upper()
    over = [p for p in per_round if p.difference is not None and p.difference > DISAGREEMENT_TOLERANCE]
    under = [p for p in per_round if p.difference is not None and p.difference < -DISAGREEMENT_TOLERANCE]
    if under:
        worst = min(under, key=lambda p: p.difference)
        notes.append(
            f"{label} reports less ε than the independent PLD accountant by up to {-worst.difference:.1%} "
            f"(round {worst.round}: {worst.epsilon:.3f} vs {worst.epsilon_pld:.3f}); the accountants disagree by more "
            f"than {DISAGREEMENT_TOLERANCE:.0%} in the unsafe direction — treat the larger value as the guarantee."
        )
    if over:
        worst = max(over, key=lambda p: p.difference)
        hint = "; --accountant prv gives a tighter figure" if accountant == "rdp" else ""
        notes.append(
            f"{label} and the PLD cross-check differ by more than {DISAGREEMENT_TOLERANCE:.0%} "
            f"(up to +{worst.difference:.1%}, round {worst.round}: {worst.epsilon:.3f} vs {worst.epsilon_pld:.3f}); "
            f"{label} is the larger, i.e. the more conservative bound, so the guarantee holds{hint}."
        )
    if num_examples is not None and delta >= 1.0 / num_examples:
        notes.append(
            f"delta = {delta:g} is not below 1/num-examples = {1.0 / num_examples:.3g}: with that probability the "
            "guarantee may fail outright for some record; choose delta well below 1/num-examples."
        )
    return Plan(
        target_epsilon=float(target_epsilon),
        delta=float(delta),
        rounds=int(rounds),
        steps_per_round=int(steps_per_round),
        sample_rate=float(sample_rate),
        accountant=accountant,
        noise_multiplier=sigma,
        per_round=per_round,
        warnings=notes,
    )


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
