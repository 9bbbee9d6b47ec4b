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

The arithmetic lives in :class:`ServerOptimizer` (numpy only, no Flower), so tests
and benchmarks can use it without a federation.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedpriv.config import SERVER_OPTIMIZERS


class ServerOptimizer:
    """The server's update rule for one global model, with its state (numpy only).

    With Δ_t = aggregated_t − x_t (the update the inner strategy proposes):

    * ``fedavg``:  x_{t+1} = x_t + η Δ_t  (η = 1: exactly ``aggregated_t``, bit for bit)
    * ``fedavgm``: m_t = μ m_{t−1} + Δ_t;  x_{t+1} = x_t + η m_t  (m_0 = 0; Hsu et al. 2019,
      the PyTorch SGD-momentum convention Flower's ``FedAvgM`` uses)
    * ``fedadam``: m_t = β1 m_{t−1} + (1−β1) Δ_t;  v_t = β2 v_{t−1} + (1−β2) Δ_t²;
      x_{t+1} = x_t + η_t m_t / (√v_t + τ)
    * ``fedyogi``: as ``fedadam`` but v_t = v_{t−1} − (1−β2) Δ_t² sign(v_{t−1} − Δ_t²)

    For the adaptive two, η_t = η √(1−β2^t) / (1−β1^t) is Adam's bias-corrected step
    (Kingma & Ba 2014, as in Flower's ``FedAdam``), with t = the number of steps this
    optimizer has taken -- not the round number, so rounds that changed nothing and
    resumed runs do not shift it. Moments start at 0 and are kept in the parameters'
    dtype; each step is computed in float64.

    Parameters
    ----------
    name : str (default: "fedavg")
        One of :data:`SERVER_OPTIMIZERS`.
    learning_rate : float (default: 1.0)
        Server learning rate η.
    momentum : float (default: 0.9)
        μ for ``fedavgm``; β1 for ``fedadam`` / ``fedyogi``. In [0, 1).
    beta2 : float (default: 0.99)
        Second-moment decay β2 (``fedadam`` / ``fedyogi``). In [0, 1).
    tau : float (default: 1e-3)
        Adaptivity τ (``fedadam`` / ``fedyogi``): larger is less adaptive. > 0.
    """

    def __init__(self, name: str = "fedavg", learning_rate: float = 1.0, momentum: float = 0.9,
                 beta2: float = 0.99, tau: float = 1e-3):
        if name not in SERVER_OPTIMIZERS:
            raise ValueError(f"server optimizer {name!r}: expected one of {', '.join(SERVER_OPTIMIZERS)}")
        self.name = name
        self.learning_rate = float(learning_rate)
        self.momentum = float(momentum)
        self.beta2 = float(beta2)
        self.tau = float(tau)
        self.steps = 0
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    @property
    def is_identity(self) -> bool:
        """True when a step returns the aggregated model unchanged (plain FedAvg)."""
        return self.name == "fedavg" and self.learning_rate == 1.0

    @property
    def stateful(self) -> bool:
        """True when it keeps moments across rounds (they must be checkpointed for ``--resume``)."""
        return self.name != "fedavg"

    def describe(self) -> dict[str, Any]:
        """The optimizer and the hyperparameters it uses, for the report's ``run_info``."""
        out: dict[str, Any] = {"name": self.name, "learning_rate": self.learning_rate}
        if self.name == "fedavgm":
            out["momentum"] = self.momentum
        elif self.name in ("fedadam", "fedyogi"):
            out.update(beta1=self.momentum, beta2=self.beta2, tau=self.tau)
        return out

    def step(self, current: Mapping[str, np.ndarray], aggregated: Mapping[str, np.ndarray]) -> "OrderedDict[str, np.ndarray]":
        """The next global model, from the round's start ``current`` and the inner strategy's ``aggregated``."""
        if set(current) != set(aggregated):
            raise ValueError("server optimizer: the aggregated model's parameters differ from the round's starting model's")
        if self.is_identity:
            self.steps += 1
            return OrderedDict(aggregated.items())
        for name, new in aggregated.items():  # all checked before any moment changes
            shape = np.shape(current[name])
            if np.shape(new) != shape or any(name in s and s[name].shape != shape for s in (self.m, self.v)):
                raise ValueError(f"server optimizer: parameter {name!r} has shape {np.shape(new)}, expected {shape} "
                                 "(the model's and the optimizer state's)")
        t = self.steps + 1
        out: OrderedDict[str, np.ndarray] = OrderedDict()
        for name, new in aggregated.items():
            x = np.asarray(current[name])
            delta = np.asarray(new, dtype=np.float64) - x.astype(np.float64)
            out[name] = (x.astype(np.float64) + self._direction(name, delta, t, x.dtype)).astype(x.dtype)
        self.steps = t
        return out

    def _direction(self, name: str, delta: np.ndarray, t: int, dtype: np.dtype) -> np.ndarray:
        lr = self.learning_rate
        if self.name == "fedavg":
            return lr * delta
        m_prev = self.m[name].astype(np.float64) if name in self.m else np.zeros_like(delta)
        if self.name == "fedavgm":
            m = self.momentum * m_prev + delta
            self.m[name] = m.astype(dtype)
            return lr * m
        v_prev = self.v[name].astype(np.float64) if name in self.v else np.zeros_like(delta)
        m = self.momentum * m_prev + (1.0 - self.momentum) * delta
        sq = delta * delta
        if self.name == "fedadam":
            v = self.beta2 * v_prev + (1.0 - self.beta2) * sq
        else:  # fedyogi
            v = v_prev - (1.0 - self.beta2) * sq * np.sign(v_prev - sq)
        self.m[name], self.v[name] = m.astype(dtype), v.astype(dtype)
        lr_t = lr * np.sqrt(1.0 - self.beta2 ** t) / (1.0 - self.momentum ** t)
        return lr_t * m / (np.sqrt(v) + self.tau)

    # -- persistence (checkpointed beside the model: server/checkpoints.py) -------
    def state_dict(self) -> dict[str, Any]:
        """Plain data: ``name``, ``steps`` and the moment arrays (``m/<param>``, ``v/<param>``)."""
        arrays = {f"m/{k}": v for k, v in self.m.items()}
        arrays.update({f"v/{k}": v for k, v in self.v.items()})
        return {"name": self.name, "steps": self.steps, "arrays": arrays}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"saved server optimizer state is for {state.get('name')!r}, this run uses {self.name!r}")
        self.steps = int(state["steps"])
        self.m, self.v = {}, {}
        for key, value in dict(state.get("arrays") or {}).items():
            kind, _, param = key.partition("/")
            if kind not in ("m", "v") or not param:
                raise ValueError(f"saved server optimizer state has an unexpected entry {key!r}")
            (self.m if kind == "m" else self.v)[param] = np.array(value)


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
