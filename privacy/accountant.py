"""A region's privacy accounting across rounds, in the shape Opacus uses.

The history is plain data — ``(noise_multiplier, sample_rate, steps)`` tuples, as
in Opacus' accountants — so anyone can recompute ε from it, it persists trivially
(in Flower's ``context.state`` between rounds, in the ledger across runs), and
the ε of round R is the composition of *all* rounds so far. (Rebuilding a fresh
PrivacyEngine every round and reporting its ε — as Flower's Opacus example does —
reports the per-round ε and understates the real cost R-fold.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flwr.app import ConfigRecord
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

Entry = tuple[float, float, int]


@dataclass
class RegionAccountant:
    """Owns one region's DP history within a run; ε always composes the whole history."""

    mechanism: str = "rdp"
    history: list[Entry] = field(default_factory=list)
    epsilon_by_round: list[float] = field(default_factory=list)
    steps_by_round: list[int] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)

    @property
    def total_steps(self) -> int:
        return sum(steps for _, _, steps in self.history)

    def epsilon(self, delta: float) -> float:
        return epsilon_of(self.history, delta, self.mechanism)

    def close_round(self, server_round: int, history: list[Entry], delta: float) -> float:
        """Adopt the history after a round's training and remember the cumulative ε."""
        self.history = [(float(s), float(q), int(n)) for s, q, n in history]
        eps = self.epsilon(delta)
        self.rounds.append(int(server_round))
        self.epsilon_by_round.append(eps)
        self.steps_by_round.append(self.total_steps)
        return eps

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({
            "mechanism": self.mechanism,
            "noise": [s for s, _, _ in self.history] or [0.0],
            "rate": [q for _, q, _ in self.history] or [0.0],
            "steps": [n for _, _, n in self.history] or [0],
            "n-entries": len(self.history),
            "epsilon-by-round": self.epsilon_by_round or [0.0],
            "steps-by-round": self.steps_by_round or [0],
            "rounds": self.rounds or [0],
            "n-rounds": len(self.rounds),
        })

    @classmethod
    def from_record(cls, record: ConfigRecord | None, mechanism: str) -> "RegionAccountant":
        if record is None:
            return cls(mechanism=mechanism)
        n, r = int(record["n-entries"]), int(record["n-rounds"])
        history = list(zip(record["noise"][:n], record["rate"][:n], record["steps"][:n]))
        return cls(
            mechanism=str(record["mechanism"]),
            history=[(float(s), float(q), int(k)) for s, q, k in history],
            epsilon_by_round=list(record["epsilon-by-round"][:r]),
            steps_by_round=list(record["steps-by-round"][:r]),
            rounds=list(record["rounds"][:r]),
        )


def epsilon_of(history: list[Entry], delta: float, mechanism: str = "rdp") -> float:
    """ε of a history under a fresh Opacus accountant (0 for an empty or noiseless-free history)."""
    if not history:
        return 0.0
    accountant = create_accountant(mechanism)
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(accountant.get_epsilon(delta=delta))


def noise_for_target(target_epsilon: float, delta: float, sample_rate: float, total_steps: int, mechanism: str = "rdp") -> float:
    """σ such that the *whole planned schedule* (all rounds x local steps) stays within ε."""
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=total_steps, accountant=mechanism))
