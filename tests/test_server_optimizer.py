"""The server optimizer (strategies/server_optimizer.py).

Its update equals the closed-form formula (FedAvgM, FedAdam, FedYogi) over several
rounds, with the expected values computed here from sums over the pseudo-gradients,
not from the optimizer's recurrences; plain FedAvg with η = 1 is the inner strategy
bit for bit; a round the inner strategy leaves unchanged does not step it; and a
resumed run continues with the same moments.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, Metadata, RecordDict
from flwr.app.message.message import make_message

from fedpriv.core.config import resolve_config
from fedpriv.core.errors import ConfigError, FedprivError
from fedpriv.privacy.report import RunReport
from fedpriv.server.checkpoints import load_server_optimizer_state, save_server_optimizer_state, server_optimizer_path
from fedpriv.server.coordinator import Coordinator
from fedpriv.server.resume import checkpoint_rounds
from fedpriv.strategies.private_fedavg import PrivateFedAvg
from fedpriv.strategies.server_optimizer import ServerOptimizer, ServerOptimizerStrategy

SHAPES = {"encoder.w": (3, 4), "head.b": (2,)}


def _deltas(rounds: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{k: rng.normal(0, 0.1, s) for k, s in SHAPES.items()} for _ in range(rounds)]


def _start(dtype=np.float64) -> OrderedDict[str, np.ndarray]:
    rng = np.random.default_rng(99)
    return OrderedDict((k, rng.normal(0, 1, s).astype(dtype)) for k, s in SHAPES.items())


def _drive(opt: ServerOptimizer, x0, deltas):
    """Feed the optimizer aggregated_t = x_t + Δ_t, round after round; returns x_1..x_T."""
    xs, x = [], x0
    for d in deltas:
        x = opt.step(x, {k: (x[k] + d[k]).astype(x[k].dtype) for k in x})
        xs.append(x)
    return xs


def test_fedavgm_update_is_its_closed_form_over_rounds():
    lr, mu, deltas = 0.7, 0.9, _deltas(5)
    x0 = _start()
    xs = _drive(ServerOptimizer("fedavgm", learning_rate=lr, momentum=mu), x0, deltas)
    expected = {k: v.copy() for k, v in x0.items()}
    for t in range(len(deltas)):
        for k in SHAPES:  # m_t = sum_s mu^(t-s) Δ_s ; x_{t+1} = x_t + lr m_t
            m_t = sum(mu ** (t - s) * deltas[s][k] for s in range(t + 1))
            expected[k] = expected[k] + lr * m_t
            np.testing.assert_allclose(xs[t][k], expected[k], rtol=1e-12, atol=1e-12)
    # momentum really accumulates: the last step is not lr * Δ_T alone
    assert not np.allclose(xs[-1]["head.b"] - xs[-2]["head.b"], lr * deltas[-1]["head.b"])


def test_fedadam_update_is_its_closed_form_over_rounds():
    lr, b1, b2, tau, deltas = 0.05, 0.9, 0.99, 1e-3, _deltas(6, seed=1)
    x0 = _start()
    xs = _drive(ServerOptimizer("fedadam", learning_rate=lr, momentum=b1, beta2=b2, tau=tau), x0, deltas)
    expected = {k: v.copy() for k, v in x0.items()}
    for t in range(len(deltas)):
        n = t + 1
        for k in SHAPES:
            m = (1 - b1) * sum(b1 ** (t - s) * deltas[s][k] for s in range(n))
            v = (1 - b2) * sum(b2 ** (t - s) * deltas[s][k] ** 2 for s in range(n))
            eta_t = lr * np.sqrt(1 - b2 ** n) / (1 - b1 ** n)
            expected[k] = expected[k] + eta_t * m / (np.sqrt(v) + tau)
            np.testing.assert_allclose(xs[t][k], expected[k], rtol=1e-10, atol=1e-12)


def test_fedadam_first_steps_by_hand():
    """One coordinate, Δ = 0.5 then -0.2, η = 0.1: numbers worked out on paper."""
    opt = ServerOptimizer("fedadam", learning_rate=0.1, momentum=0.9, beta2=0.99, tau=1e-3)
    x1 = opt.step({"w": np.array([1.0])}, {"w": np.array([1.5])})["w"][0]
    assert x1 == pytest.approx(1.0 + 0.1 * 0.05 / (0.05 + 1e-3), rel=1e-12)  # m = 0.05, √v = 0.05, η_1 = η
    x2 = opt.step({"w": np.array([x1])}, {"w": np.array([x1 - 0.2])})["w"][0]
    m, v = 0.025, 0.002875
    eta2 = 0.1 * np.sqrt(1 - 0.99 ** 2) / (1 - 0.9 ** 2)
    assert x2 == pytest.approx(x1 + eta2 * m / (np.sqrt(v) + 1e-3), rel=1e-12)


def test_dp_fedsgd_with_fedadam_is_torch_adam_on_the_regions_mean_gradient():
    """README's claim for ``local-steps = 1``: each region takes one SGD step of lr 1 (x - g_r), FedAvg weights the
    results by examples, and FedAdam on that aggregate moves the model exactly as ``torch.optim.Adam`` moves it
    when fed the example-weighted mean gradient. τ is added to √v before the bias correction (Reddi et al.), torch
    adds eps after it, so they agree to τ's size; gradients here are DP-sized (~1e-3)."""
    import torch

    lr, b1, b2, tau = 1e-3, 0.9, 0.999, 1e-12
    sizes = np.array([5881.0, 2885.0, 6121.0])
    rng = np.random.default_rng(7)
    x0 = _start()
    opt = ServerOptimizer("fedadam", learning_rate=lr, momentum=b1, beta2=b2, tau=tau)
    params = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in x0.items()}
    adam = torch.optim.Adam(params.values(), lr=lr, betas=(b1, b2), eps=tau)
    x = x0
    for _ in range(5):
        grads = [{k: rng.normal(0, 1e-3, s) for k, s in SHAPES.items()} for _ in sizes]
        local = [{k: x[k] - g[k] for k in x} for g in grads]  # one SGD step of lr 1 in each region
        aggregated = {k: sum(n * u[k] for n, u in zip(sizes, local)) / sizes.sum() for k in x}  # FedAvg
        x = opt.step(x, aggregated)
        for k, p in params.items():
            p.grad = torch.tensor(sum(n * g[k] for n, g in zip(sizes, grads)) / sizes.sum())
        adam.step()
        for k, p in params.items():
            np.testing.assert_allclose(x[k], p.detach().numpy(), rtol=1e-7, atol=1e-12)


def test_fedyogi_steps_follow_its_second_moment_rule():
    opt = ServerOptimizer("fedyogi", learning_rate=0.1, momentum=0.9, beta2=0.99, tau=1e-3)
    adam = ServerOptimizer("fedadam", learning_rate=0.1, momentum=0.9, beta2=0.99, tau=1e-3)
    x1 = opt.step({"w": np.array([0.0])}, {"w": np.array([0.4])})["w"][0]
    assert x1 == adam.step({"w": np.array([0.0])}, {"w": np.array([0.4])})["w"][0]  # v_0 = 0: same first step
    x2 = opt.step({"w": np.array([x1])}, {"w": np.array([x1 + 0.1])})["w"][0]
    v1 = 0.01 * 0.16
    v2 = v1 - 0.01 * 0.01 * np.sign(v1 - 0.01)  # Yogi: v grows when Δ² > v (here 0.01 > 0.0016)
    m2 = 0.9 * 0.04 + 0.1 * 0.1
    eta2 = 0.1 * np.sqrt(1 - 0.99 ** 2) / (1 - 0.9 ** 2)
    assert x2 == pytest.approx(x1 + eta2 * m2 / (np.sqrt(v2) + 1e-3), rel=1e-12)
    assert opt.v["w"][0] == pytest.approx(v2) and v2 > 0.99 * v1 + 0.01 * 0.01  # not Adam's v


def test_float32_parameters_stay_float32_and_close_to_the_float64_formula():
    deltas = _deltas(4, seed=2)
    x32 = _drive(ServerOptimizer("fedadam", learning_rate=0.01), _start(np.float32), deltas)
    x64 = _drive(ServerOptimizer("fedadam", learning_rate=0.01), _start(np.float64), deltas)
    for k in SHAPES:
        assert x32[-1][k].dtype == np.float32
        np.testing.assert_allclose(x32[-1][k], x64[-1][k], rtol=1e-5, atol=1e-6)


def test_fedavg_with_a_server_learning_rate_scales_the_update():
    x0, d = _start(), _deltas(1)[0]
    x1 = ServerOptimizer("fedavg", learning_rate=0.5).step(x0, {k: x0[k] + d[k] for k in x0})
    for k in SHAPES:
        np.testing.assert_allclose(x1[k], x0[k] + 0.5 * d[k], rtol=1e-12)


def test_a_model_that_does_not_fit_the_state_is_refused_before_anything_changes():
    opt = ServerOptimizer("fedavgm", momentum=0.5)
    x0 = _start()
    _drive(opt, x0, _deltas(1))
    saved = {k: v.copy() for k, v in opt.m.items()}
    bad = {"encoder.w": np.zeros((3, 4)), "head.b": np.zeros(3)}
    with pytest.raises(ValueError, match="'head.b' has shape"):
        opt.step({"encoder.w": np.ones((3, 4)), "head.b": np.ones(3)}, bad)
    assert opt.steps == 1 and all(np.array_equal(opt.m[k], saved[k]) for k in SHAPES)


# ---------------------------------------------------------------------------
# The wrapper around the real PrivateFedAvg
# ---------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Flower stamps outgoing messages with the ServerApp's run id; outside a run, set one."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 7), ("_node_id", 0), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)


class _Grid:
    def get_node_ids(self):
        return [11, 12]


def _record(values) -> ArrayRecord:
    return ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in values.items()))


def _reply(node: int, region: str, values, n: int) -> Message:
    md = Metadata(run_id=1, message_id=f"r{node}", src_node_id=node, dst_node_id=0, reply_to_message_id=f"m{node}",
                  group_id="1", created_at=time.time(), ttl=3600, message_type="train")
    metrics = MetricRecord({"num-examples": n, "dp": 1, "epsilon": 1.0, "steps": 3, "noise-multiplier": 1.1,
                            "sample-rate": 0.1, "max-grad-norm": 1.0, "delta": 1e-5})
    content = RecordDict({"arrays": _record(values), "metrics": metrics,
                          "region": ConfigRecord({"name": region, "history": [1.1, 0.1, 3.0]})})
    return make_message(metadata=md, content=content)


def _inner(tmp_path, min_train_regions: int = 2) -> PrivateFedAvg:
    report = RunReport(tmp_path, {}, "rdp", 1e-5, ["us-east", "eu-west"])
    return PrivateFedAvg(report, min_train_regions=min_train_regions, connect_timeout=5.0, fraction_evaluate=0.0)


def _round(strategy, rnd: int, x, updates, weights=(30, 10)):
    """One round through configure_train/aggregate_train; the regions reply x + their update."""
    list(strategy.configure_train(rnd, _record(x), ConfigRecord(), _Grid()))
    replies = [_reply(11 + i, name, {k: (x[k] + u[k]).astype(np.float32) for k in x}, w)
               for i, (name, u, w) in enumerate(zip(("us-east", "eu-west"), updates, weights))]
    return strategy.aggregate_train(rnd, replies)


def test_fedavg_with_lr_1_is_the_inner_strategy_bit_for_bit(tmp_path):
    x = _start(np.float32)
    updates = [_deltas(1, seed=3)[0], _deltas(1, seed=4)[0]]
    plain, _ = _round(_inner(tmp_path / "a"), 1, x, updates)
    wrapped = ServerOptimizerStrategy(_inner(tmp_path / "b"), ServerOptimizer("fedavg", learning_rate=1.0))
    arrays, metrics = _round(wrapped, 1, x, updates)
    assert list(arrays.keys()) == list(plain.keys()) and metrics is not None
    for k in plain.keys():
        assert arrays[k].numpy().tobytes() == plain[k].numpy().tobytes()


def test_wrapper_steps_fedavgm_on_the_fedavg_of_the_updates(tmp_path):
    opt = ServerOptimizer("fedavgm", learning_rate=1.0, momentum=0.5)
    wrapped = ServerOptimizerStrategy(_inner(tmp_path), opt)
    x = {k: v.astype(np.float32) for k, v in _start().items()}
    m = {k: np.zeros(s) for k, s in SHAPES.items()}
    for rnd in (1, 2, 3):
        updates = _deltas(2, seed=10 + rnd)
        arrays, _ = _round(wrapped, rnd, x, updates)
        new = {k: a.numpy() for k, a in arrays.items()}
        for k in SHAPES:  # FedAvg weights 30:10, then momentum on the average update
            avg = (30 * (x[k] + updates[0][k]).astype(np.float32) + 10 * (x[k] + updates[1][k]).astype(np.float32)) / 40
            m[k] = 0.5 * m[k] + (avg - x[k])
            np.testing.assert_allclose(new[k], x[k] + m[k], rtol=1e-5, atol=1e-6)
        x = new
    assert opt.steps == 3
    # attributes of the inner strategy are reachable through the wrapper (the coordinator relies on it)
    assert wrapped.round_offset == 0 and wrapped.node_regions == {11: "us-east", 12: "eu-west"}


def test_a_round_that_changes_nothing_does_not_step_the_optimizer(tmp_path):
    opt = ServerOptimizer("fedadam", learning_rate=0.01)
    wrapped = ServerOptimizerStrategy(_inner(tmp_path), opt)
    x = {k: v.astype(np.float32) for k, v in _start().items()}
    arrays, _ = _round(wrapped, 1, x, _deltas(2, seed=5))
    before = {"steps": opt.steps, "m": {k: v.copy() for k, v in opt.m.items()}, "v": {k: v.copy() for k, v in opt.v.items()}}
    x = {k: a.numpy() for k, a in arrays.items()}
    # round 2: only one region answers, min-train-regions = 2 -> the inner strategy keeps the model
    list(wrapped.configure_train(2, _record(x), ConfigRecord(), _Grid()))
    lone = _reply(11, "us-east", {k: x[k] + 1.0 for k in x}, 30)
    assert wrapped.aggregate_train(2, [lone])[0] is None
    assert opt.steps == before["steps"] == 1
    for k in SHAPES:
        assert np.array_equal(opt.m[k], before["m"][k]) and np.array_equal(opt.v[k], before["v"][k])


# ---------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------


def test_resumed_optimizer_continues_with_the_same_moments(tmp_path):
    deltas, x0 = _deltas(4, seed=6), _start(np.float32)
    through = ServerOptimizer("fedadam", learning_rate=0.02)
    xs = _drive(through, x0, deltas[:2])
    save_server_optimizer_state(tmp_path, 2, through.state_dict())
    assert server_optimizer_path(tmp_path, 2).is_file()
    assert checkpoint_rounds(tmp_path) == []  # never mistaken for a model checkpoint by --resume
    after_crash = ServerOptimizer("fedadam", learning_rate=0.02)
    after_crash.load_state_dict(load_server_optimizer_state(tmp_path, 2))
    assert after_crash.steps == 2
    a = _drive(through, xs[-1], deltas[2:])
    b = _drive(after_crash, xs[-1], deltas[2:])
    for k in SHAPES:
        assert a[-1][k].tobytes() == b[-1][k].tobytes()
    fresh = _drive(ServerOptimizer("fedadam", learning_rate=0.02), xs[-1], deltas[2:])
    assert not np.allclose(fresh[-1]["encoder.w"], a[-1]["encoder.w"])  # the moments matter


def _resuming(tmp_path, name: str, start_round: int):
    opt = ServerOptimizer(name, momentum=0.5)
    return SimpleNamespace(run_dir=tmp_path, start_round=start_round, server_optimizer=opt,
                           cfg=SimpleNamespace(resume_from=str(tmp_path))), opt


def test_coordinator_restores_the_saved_moments_or_refuses(tmp_path):
    saved = ServerOptimizer("fedavgm", momentum=0.5)
    _drive(saved, _start(), _deltas(2, seed=7))
    save_server_optimizer_state(tmp_path, 2, saved.state_dict())
    coord, opt = _resuming(tmp_path, "fedavgm", 2)
    Coordinator._restore_server_optimizer(coord)
    assert opt.steps == 2 and all(np.array_equal(opt.m[k], saved.m[k]) for k in SHAPES)
    coord, _ = _resuming(tmp_path, "fedavgm", 1)  # no state for round 1: the moments would be lost
    with pytest.raises(FedprivError, match="no server-optimizer state saved for round 1"):
        Coordinator._restore_server_optimizer(coord)
    coord, _ = _resuming(tmp_path, "fedadam", 2)
    with pytest.raises(FedprivError, match="'fedavgm', this run uses 'fedadam'"):
        Coordinator._restore_server_optimizer(coord)
    coord, opt = _resuming(tmp_path, "fedavg", 1)  # stateless: nothing to restore
    Coordinator._restore_server_optimizer(coord)


@pytest.mark.parametrize("key,value", [("server-optimizer", "sgd"), ("server-learning-rate", 0.0),
                                       ("server-momentum", 1.0), ("server-beta2", -0.1), ("server-tau", 0.0)])
def test_bad_server_optimizer_config_is_one_line(key, value):
    with pytest.raises(ConfigError, match=f"^{key} = "):
        resolve_config({key: value})


# ---------------------------------------------------------------------------
# End to end (real Flower simulation, secure aggregation on)
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_simulation_steps_fedavgm_on_the_secure_aggregate_and_checkpoints_its_state(tmp_path):
    import json

    from conftest import TINY, write_corpus
    from fedpriv.server.checkpoints import latest_checkpoint
    from fedpriv.server.resume import load_checkpoint
    from fedpriv.simulations.runner import Simulation

    data = write_corpus(tmp_path / "data", 800)
    overrides = {**TINY, "data-dir": str(data), "secure-aggregation": True, "server-optimizer": "fedavgm",
                 "server-momentum": 0.5, "learning-rate": 0.5, "momentum": 0.0}
    result = Simulation(overrides, preset="tiny", run_dir=tmp_path / "run").run(stream=False)
    assert result.outcome.succeeded, result.outcome
    report = json.loads((result.run_dir / "privacy_report.json").read_text())
    assert report["run_info"]["server_optimizer"] == {"name": "fedavgm", "learning_rate": 1.0, "momentum": 0.5}
    assert report["secure_aggregation"]["rounds_aborted"] == [] and len(report["secure_aggregation"]["rounds"]) == 2
    x1, x2 = load_checkpoint(result.run_dir, 1), load_checkpoint(result.run_dir, 2)
    assert latest_checkpoint(result.run_dir)[0] == 2
    s1, s2 = load_server_optimizer_state(result.run_dir, 1), load_server_optimizer_state(result.run_dir, 2)
    assert (s1["name"], s1["steps"], s2["steps"]) == ("fedavgm", 1, 2)
    for k in x1:  # η = 1: each round moved the model by exactly the momentum buffer saved with it
        np.testing.assert_allclose(x2[k] - x1[k], s2["arrays"][f"m/{k}"], rtol=1e-4, atol=1e-6)
    # m_2 = 0.5 m_1 + Δ_2, so the step differs from the plain secure average Δ_2 whenever m_1 != 0
    assert any(np.abs(s1["arrays"][f"m/{k}"]).max() > 0 for k in x1)
