"""A server-side optimizer around any strategy: FedAvgM, FedAdam, FedYogi.

The inner strategy (``PrivateFedAvg``, ``SecureFedAvg``, ...) turns a round's
replies into a new global model: the FedAvg of the regions' DP updates, or the
secure sum divided by the total weight. :class:`ServerOptimizerStrategy` treats
the difference to the round's starting model as a *pseudo-gradient*

    Δ_t = aggregated_t − x_t

and lets a server optimizer take the step instead of adopting ``aggregated_t``
as is (Hsu et al. 2019, arxiv.org/abs/1909.06335; Reddi et al. 2021, "Adaptive
Federated Optimization", arxiv.org/abs/2003.00295). It composes around any
strategy the way Flower's DP wrappers do (``DifferentialPrivacyServerSideFixedClipping``
wraps a strategy rather than subclassing each one).

**No privacy cost.** Each region's update is (ε, δ)-DP before it leaves the region
(DP-SGD noise, then masking); Δ_t, the moments and the new model are computed by
the coordinator from those releases alone, with no access to any region's data.
This is post-processing, which cannot weaken a DP guarantee: ε is unchanged.

The arithmetic lives in :class:`fedpriv.strategies.server_update_rules.ServerOptimizer`
(numpy only, no Flower), so tests and benchmarks can use it without a federation.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedpriv.strategies.server_update_rules import ServerOptimizer

__all__ = ["ServerOptimizer", "ServerOptimizerStrategy"]


class ServerOptimizerStrategy(Strategy):
    """Wraps any strategy; replaces its new global model with a server-optimizer step.

    The wrapped strategy does everything else (sampling, the privacy books, secure
    aggregation, evaluation); attributes it has and this wrapper has not are read
    from it (``report``, ``round_offset``, ``node_regions``, ``describe()``, ...).
    A round in which the inner strategy leaves the model unchanged (too few
    regions, an aborted secure round) does not step the optimizer: its moments
    and step count stay as they were. Post-processing of the regions' DP
    releases: no privacy cost (see the module docstring).

    Parameters
    ----------
    strategy : Strategy
        The strategy whose aggregate is treated as the proposal x_t + Δ_t.
    optimizer : ServerOptimizer
        The update rule and its state.
    """

    def __init__(self, strategy: Strategy, optimizer: ServerOptimizer):
        self.strategy = strategy
        self.optimizer = optimizer
        self.current_arrays: ArrayRecord | None = None

    def __getattr__(self, name: str) -> Any:  # only called for attributes this wrapper lacks
        if name in ("strategy", "optimizer", "current_arrays"):
            raise AttributeError(name)
        return getattr(self.strategy, name)

    def __repr__(self) -> str:
        return f"ServerOptimizerStrategy({self.optimizer.describe()}, {self.strategy!r})"

    def summary(self) -> None:
        log(INFO, "\t├──> Server optimizer: %s", self.optimizer.describe())
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.current_arrays = arrays
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        aggregated, metrics = self.strategy.aggregate_train(server_round, replies)
        if aggregated is None:  # the model is unchanged this round: no step, moments untouched
            return None, metrics
        if self.current_arrays is None:
            raise RuntimeError("ServerOptimizerStrategy.aggregate_train needs configure_train first (it keeps x_t)")
        if self.optimizer.is_identity:  # plain FedAvg: the inner strategy's arrays, untouched
            self.optimizer.steps += 1
            return aggregated, metrics
        current = OrderedDict((k, a.numpy()) for k, a in self.current_arrays.items())
        proposed = OrderedDict((k, a.numpy()) for k, a in aggregated.items())
        new = self.optimizer.step(current, proposed)
        return ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in new.items())), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)
