"""The server optimizers' update rules (FedAvgM, FedAdam, FedYogi), numpy only.

Kept apart from the Flower wrapper (:mod:`fedpriv.strategies.server_optimizer`) so the rule
can be used where Flower is not installed -- a benchmark on a GPU machine, a unit
test -- and so the one formula lives in one place (as Flower keeps the maths its
strategies share in ``strategy_utils.py``). Post-processing of the regions' DP
releases: no privacy cost.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedpriv.core.config import SERVER_OPTIMIZERS


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
