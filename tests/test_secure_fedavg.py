"""SecureFedAvg + the ClientApp's secagg handlers, in one process, without Flower processes.

A fake Grid hands every message (protobuf round trip included, and each region's
``context.state`` serialised between messages, as for a fresh process) to the real
``fedpriv.client.app.app``. Only local training is faked: each region's "trained" values
are the global values plus a fixed per-(region, round) update, so the expected
FedAvg result is known exactly.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import assert_epsilon_is_the_libraries, fixed_task_identity
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto, recorddict_from_proto, recorddict_to_proto
from flwr.serverapp import Grid

import fedpriv.client.region
from fedpriv.client import secure_aggregation as secagg
from fedpriv.client.app import app as client_app
from fedpriv.core.config import FedprivConfig, SecAggSettings, resolve_config
from fedpriv.core.errors import BudgetExhausted, ConfigError
from fedpriv.privacy.accountant import epsilon_of
from fedpriv.privacy.policy import PolicyRefusal, RegionPolicy
from fedpriv.privacy.report import RunReport
from fedpriv.privacy.schedule import choose_noise_multiplier, region_schedule
from fedpriv.privacy.secagg.identity import simulation_identity, write_simulation_identities
from fedpriv.privacy.secagg import SecAggProtocolError, SecAggServer, SecAggConfig
from fedpriv.server.secagg_workflow import SecAggWorkflow
from fedpriv.strategies.private_fedavg import PrivateFedAvg
from fedpriv.strategies.secure_fedavg import SecureFedAvg

SHAPES = {"a.weight": (12, 7), "a.bias": (12,), "b.weight": (3, 12)}
NODE_BASE = (1 << 63) + 12345  # Flower node ids are unsigned 64-bit; exercise the top half


@pytest.fixture(autouse=True)
def _task_identity():
    with fixed_task_identity():
        yield


def _run_config(tmp_path, n, **overrides):
    regions = ",".join(f"r{i}" for i in range(n))
    flat, _ = resolve_config({"regions": regions, "run-dir": str(tmp_path), "num-server-rounds": 3, "batch-size": 25,
                              "noise-multiplier": 1.1, **overrides})  # σ given: the regions skip the σ search
    write_simulation_identities(tmp_path, regions.split(","))  # what the simulation runner does
    return flat


def _update(region_index: int, rnd: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([region_index, rnd])
    return {k: rng.normal(0.0, 0.2, s).astype(np.float32) for k, s in SHAPES.items()}


def _examples(region_index: int) -> int:
    return 100 + 37 * region_index


_SIGMAS: dict[tuple, float] = {}


def _region_schedule(index: int, cfg: FedprivConfig):
    """The real DP schedule and σ of a region with ``_examples(index)`` posts under ``cfg`` (fedpriv.privacy.schedule)."""
    schedule = region_schedule(_examples(index), cfg)
    key = (schedule, cfg.target_epsilon, cfg.delta, cfg.accountant, cfg.noise_multiplier)
    if key not in _SIGMAS:  # the σ search takes a second; every message rebuilds the region
        _SIGMAS[key] = choose_noise_multiplier(schedule, cfg)
    return schedule, _SIGMAS[key]


class FakeRegion:
    """Stands in for RegionRuntime: 'training' adds a fixed update; some regions refuse. Its accounting is
    the real schedule's: σ for the run's target ε over the region's size, the ledger-style history after
    each round, and ε of that history at the region's δ (as RegionRuntime.train computes it)."""

    refuse: set[str] = set()

    def __init__(self, cfg, identity):
        self.cfg, self.identity = cfg, identity

    def train(self, global_values, server_round, **_):
        if self.identity.name in FakeRegion.refuse:
            raise BudgetExhausted("budget spent (test)")
        delta = _update(self.identity.index, server_round)
        values = {k: (v + delta[k]).astype(np.float32) for k, v in global_values.items()}
        schedule, sigma = _region_schedule(self.identity.index, self.cfg)
        history = schedule.history(sigma, after_round=server_round) if self.cfg.dp else []
        epsilon = epsilon_of(history, self.identity.policy.delta, self.cfg.accountant) if self.cfg.dp else math.inf
        result = SimpleNamespace(values=values, num_examples=_examples(self.identity.index), loss=0.5, accuracy=0.5,
                                 noise_multiplier=sigma if self.cfg.dp else 0.0, sample_rate=schedule.sample_rate,
                                 peak_memory_mb=10.0)
        return SimpleNamespace(result=result, epsilon=epsilon, lifetime_epsilon=epsilon, history=history,
                               steps=sum(h[2] for h in history))


class FakeGrid(Grid):
    """Delivers messages synchronously to the real ClientApp; ``silent`` nodes never reply.

    ``silent`` maps ``(message_type, group_id)`` to node ids; group id "" is a train message
    (FedAvg sets none), the secagg stages carry the round number.
    """

    def __init__(self, run_config, n):
        self.contexts = {NODE_BASE + 977 * i: Context(run_id=7, node_id=NODE_BASE + 977 * i,
                                                      node_config={"partition-id": i}, state=RecordDict(),
                                                      run_config=dict(run_config)) for i in range(n)}
        self.silent: dict[tuple[str, str], set[int]] = {}
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self._outbox: dict[str, Message] = {}

    def node(self, i: int) -> int:
        return NODE_BASE + 977 * i

    def set_run(self, run):
        pass

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = mid = uuid.uuid4().hex
            ids.append(mid)
            wire = message_from_proto(message_to_proto(msg))  # what a real transport does to it
            self.sent.append(wire)
            dst = msg.metadata.dst_node_id
            if dst in self.silent.get((msg.metadata.message_type, msg.metadata.group_id), set()):
                continue
            ctx = self.contexts[dst]
            # A fresh process per message: the state survives only as its serialised form.
            ctx.state = recorddict_from_proto(recorddict_to_proto(ctx.state))
            reply = client_app(wire, ctx)
            reply = message_from_proto(message_to_proto(reply))
            self.replies.append(reply)
            self._outbox[mid] = reply
        return ids

    def pull_messages(self, message_ids):
        return [self._outbox.pop(m) for m in list(message_ids) if m in self._outbox]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


@pytest.fixture
def fake_training(monkeypatch):
    monkeypatch.setattr(fedpriv.client.region, "RegionRuntime", FakeRegion)
    FakeRegion.refuse = set()
    yield
    FakeRegion.refuse = set()


def _initial() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {k: rng.normal(0.0, 1.0, s).astype(np.float32) for k, s in SHAPES.items()}


def _record(values) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in values.items()})


def _values(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def _strategy(cls, report, cfg: FedprivConfig, **kw):
    kwargs = dict(report=report, min_train_regions=cfg.min_train_regions, connect_timeout=5.0,
                  fraction_train=1.0, fraction_evaluate=0.0)
    if cls is SecureFedAvg:  # the coordinator composes the strategy with the workflow of its (validated) settings
        settings = dict(threshold=cfg.secagg_threshold, neighbours=cfg.secagg_neighbours, clip_range=cfg.secagg_clip_range,
                        quant_bits=cfg.secagg_quant_bits, timeout=2.0)
        settings.update({k: kw.pop(k) for k in list(kw) if k in settings})
        kwargs["workflow"] = SecAggWorkflow(SecAggSettings(**settings))
    kwargs.update(kw)
    return cls(**kwargs)


def _run(tmp_path, n, rounds, secure=True, grid_setup=None, **overrides):
    flat = _run_config(tmp_path, n, **overrides)
    cfg = FedprivConfig.from_run_config(flat)
    report = RunReport(tmp_path, flat, cfg.accountant, cfg.delta, list(cfg.regions))
    grid = FakeGrid(flat, n)
    if grid_setup:
        grid_setup(grid)
    strategy = _strategy(SecureFedAvg if secure else PrivateFedAvg, report, cfg)
    result = strategy.start(grid=grid, initial_arrays=_record(_initial()), num_rounds=rounds, timeout=5.0)
    final = _values(result.arrays) if len(result.arrays) else _initial()  # as the Coordinator does
    return final, report, grid


def _expected(rounds_survivors: list[list[int] | None]) -> dict[str, np.ndarray]:
    """Plain weighted FedAvg (float64) of the fake updates; None = round left the model unchanged."""
    values = {k: v.astype(np.float64) for k, v in _initial().items()}
    for rnd, survivors in enumerate(rounds_survivors, start=1):
        if survivors is None:
            continue
        total = sum(_examples(i) for i in survivors)
        for k in values:
            values[k] = values[k] + sum(_examples(i) * _update(i, rnd)[k].astype(np.float64) for i in survivors) / total
    return values


def _max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)))) for k in SHAPES)


# --------------------------------------------------------------------- exactness


@pytest.mark.parametrize("n", [3, 4, 5])
def test_secure_round_equals_plain_fedavg_within_the_error_bound(tmp_path, fake_training, n):
    secure, report, grid = _run(tmp_path / "secure", n, rounds=2)
    plain, _, _ = _run(tmp_path / "plain", n, rounds=2, secure=False, **{"secure-aggregation": False})
    rounds = report.secure_aggregation["rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and not any(r["aborted"] for r in rounds)
    bound = sum(r["error_bound"] for r in rounds)
    assert 0 < bound < 1e-4  # 22-bit quantisation over [-8, 8]: a few 1e-6 per round
    float32_slack = 1e-6  # the plaintext path averages in float32
    assert _max_diff(secure, plain) <= bound + float32_slack
    assert _max_diff(secure, _expected([list(range(n))] * 2)) <= bound + float32_slack
    assert _max_diff(secure, _initial()) > 0.05  # the model did move

    # No reply ever carried weights or an update in the clear.
    for reply in grid.replies:
        if reply.metadata.message_type == "train":
            assert not reply.content.array_records
        assert "update" not in reply.content
    masked = [r for r in grid.replies if r.metadata.message_type == secagg.MASKED_INPUT]
    assert len(masked) == 2 * n and all(r.content["masked"]["masked"].dtype == "uint32" for r in masked)
    # Bookkeeping is PrivateFedAvg's: every region's ε history is recorded, every round.
    # ε per round is the region's real schedule under an independent accountant, at the report's δ.
    cfg = FedprivConfig.from_run_config(_run_config(tmp_path / "secure", n))
    for index, (name, rec) in enumerate(sorted(report.regions.items())):
        schedule, sigma = _region_schedule(index, cfg)
        assert rec.rounds_participated == [1, 2], name
        assert 0 < rec.epsilon_by_round[0] < rec.epsilon_by_round[1] < cfg.target_epsilon, name
        assert rec.history == schedule.history(sigma, after_round=2) and sigma == 1.1, name
        if n == 3 or index == 0:  # every region once (an independent PLD takes seconds), each q its own
            assert_epsilon_is_the_libraries(rec.epsilon_by_round[1], rec.history, report.delta, cfg.accountant)
    assert report.secure_aggregation["enabled"] is True
    assert rounds[0]["survivors"] == sorted(f"r{i}" for i in range(n)) and rounds[0]["dropped"] == []
    assert rounds[0]["threshold"] == n // 2 + 1
    assert rounds[0]["total_weight"] == sum(_examples(i) for i in range(n))
    assert "clipped_coordinates" not in rounds[0]  # a fact about one region's update: it stays in the region
    assert [r["secure_aggregation"] for r in report.rounds] == ["secure", "secure"]
    # Every region's secagg state is gone once a round is done.
    for ctx in grid.contexts.values():
        assert not any(k.startswith("fedpriv-secagg") for k in ctx.state)


def test_stochastic_rounding_is_fresh_every_time_and_stays_within_the_error_bound(tmp_path, fake_training):
    # The rounding seed comes from OS entropy, not from the run seed: two runs with the same
    # config differ in the last bits, and both stay within the quantisation error bound.
    first, report, _ = _run(tmp_path / "a", 3, rounds=2)
    second, _, _ = _run(tmp_path / "b", 3, rounds=2)
    bound = sum(r["error_bound"] for r in report.secure_aggregation["rounds"])
    assert not all(np.array_equal(first[k], second[k]) for k in SHAPES)
    assert _max_diff(first, second) <= 2 * bound + 1e-6


# ---------------------------------------------------------------------- dropouts


@pytest.mark.parametrize("first_stage", [secagg.ADVERTISE, secagg.SHARE_KEYS, secagg.MASKED_INPUT])
def test_dropouts_after_training_and_before_unmask_give_the_survivors_sum(tmp_path, fake_training, first_stage):
    n = 5  # threshold: majority = 3

    def silence(grid):
        grid.silent[(first_stage, "1")] = {grid.node(1)}   # trained, then gone before sending a masked input
        grid.silent[(secagg.UNMASK, "1")] = {grid.node(3)}  # sent its masked input, gone before unmask

    values, report, _ = _run(tmp_path, n, rounds=1, grid_setup=silence)
    entry = report.secure_aggregation["rounds"][0]
    assert not entry["aborted"]
    # r3's masked input is in the sum; r1's update is not.
    assert entry["survivors"] == ["r0", "r2", "r3", "r4"]
    assert entry["dropped"] == ["r1"] and entry["dropped_at"]["r1"].startswith(first_stage.split("_", 1)[1])
    assert set(entry["unmask_unanswered"]) == {"r3"}
    assert _max_diff(values, _expected([[0, 2, 3, 4]])) <= entry["error_bound"] + 1e-6
    assert _max_diff(values, _expected([[0, 1, 2, 3, 4]])) > 1e-3  # r1's update really is left out
    assert report.rounds[0]["model_updated"] is True


def test_a_dropout_at_the_consistency_stage_stays_in_the_sum_and_is_not_asked_to_unmask(tmp_path, fake_training):
    n = 5  # threshold: majority = 3

    def silence(grid):
        grid.silent[(secagg.CONSISTENCY, "1")] = {grid.node(3)}  # masked input sent, gone before signing its view

    values, report, grid = _run(tmp_path, n, rounds=1, grid_setup=silence)
    entry = report.secure_aggregation["rounds"][0]
    assert not entry["aborted"] and entry["survivors"] == [f"r{i}" for i in range(n)]
    assert entry["unmask_unanswered"]["r3"].startswith("consistency:")
    assert _max_diff(values, _expected([list(range(n))])) <= entry["error_bound"] + 1e-6
    asked = {r.metadata.src_node_id for r in grid.replies if r.metadata.message_type == secagg.UNMASK}
    assert grid.node(3) not in asked and len(asked) == n - 1


def test_too_few_survivors_leave_the_model_unchanged_and_the_next_round_works(tmp_path, fake_training):
    n = 3  # threshold 2

    def silence(grid):
        grid.silent[(secagg.SHARE_KEYS, "1")] = {grid.node(0), grid.node(2)}

    values, report, _ = _run(tmp_path, n, rounds=2, grid_setup=silence)
    section = report.secure_aggregation
    first, second = section["rounds"]
    assert first["aborted"] and "threshold is 2" in first["reason"] and section["rounds_aborted"] == [1]
    assert set(first["dropped"]) == {"r0", "r2"}
    assert not second["aborted"] and second["survivors"] == ["r0", "r1", "r2"]
    assert report.rounds[0]["model_updated"] is False and report.rounds[1]["model_updated"] is True
    # Round 1 changed nothing; round 2 applied the full FedAvg of round-2 updates.
    assert _max_diff(values, _expected([None, [0, 1, 2]])) <= second["error_bound"] + 1e-6
    # ε was spent in round 1 all the same (the regions trained): the books say so.
    assert all(rec.rounds_participated == [1, 2] for rec in report.regions.values())


def test_explicit_threshold_above_the_trained_regions_aborts_without_messages(tmp_path, fake_training):
    FakeRegion.refuse = {"r2"}
    values, report, grid = _run(tmp_path, 3, rounds=1, **{"secagg-threshold": 3})
    entry = report.secure_aggregation["rounds"][0]
    assert entry["aborted"] and "secagg-threshold = 3" in entry["reason"]
    assert not any(m.metadata.message_type.startswith("query.") for m in grid.sent)
    assert _max_diff(values, _initial()) == 0.0


def test_a_single_trained_region_falls_back_to_plain_fedavg(tmp_path, fake_training):
    FakeRegion.refuse = {"r0"}
    values, report, grid = _run(tmp_path, 2, rounds=1)
    section = report.secure_aggregation
    assert section["rounds_plain"] == [1] and section["rounds"][0]["participants"] == ["r1"]
    assert [m.metadata.message_type for m in grid.sent] == ["train", "train", secagg.REVEAL]
    assert _max_diff(values, _expected([[1]])) <= 1e-6
    assert report.regions["r0"].enforcement[0]["action"] == "refused to train"


def test_sparse_secagg_plus_graph(tmp_path, fake_training):
    values, report, _ = _run(tmp_path, 5, rounds=1, **{"secagg-neighbours": 2})
    entry = report.secure_aggregation["rounds"][0]
    assert report.secure_aggregation["protocol"] == "SecAgg+" and entry["threshold"] == 2
    assert _max_diff(values, _expected([list(range(5))])) <= entry["error_bound"] + 1e-6


def test_clipping_stays_in_the_region_and_only_the_masked_vector_leaves(tmp_path, fake_training):
    values, report, grid = _run(tmp_path, 3, rounds=1, **{"secagg-clip-range": 0.05})
    entry = report.secure_aggregation["rounds"][0]
    assert "clipped_coordinates" not in entry and entry["coordinates"] == 3 * sum(int(np.prod(s)) for s in SHAPES.values())
    assert _max_diff(values, _expected([[0, 1, 2]])) > entry["error_bound"]  # clipping bit, visibly
    masked = [r for r in grid.replies if r.metadata.message_type == secagg.MASKED_INPUT]
    assert masked and all(set(r.content.keys()) == {"masked"} for r in masked)


# ------------------------------------------------------------------- client side


def _kept_state(round_id=4, num_examples=50):
    state = RecordDict()
    g = _initial()
    secagg.keep_update(state, round_id, "r0", g, {k: v + 0.1 for k, v in g.items()}, num_examples, rounding_seed=9)
    return state


def _setup(round_id=4, **kw):
    cfg = dict(num_clients=3, threshold=2, clip_range=8.0, quant_bits=22, max_weight=100) | kw
    return ConfigRecord(SecAggServer(SecAggConfig(**cfg), round_id=round_id).setup_message())


_POLICY = RegionPolicy(delta=1e-5, max_lifetime_epsilon=10.0, max_job_epsilon=10.0)


def _identity(tmp_path):
    write_simulation_identities(tmp_path, ["r0", "r1", "r2"])
    return simulation_identity(tmp_path, "r0")


def test_client_refuses_a_weaker_setup_than_its_run_config(tmp_path):
    me = _identity(tmp_path)

    def advertise(state, setup, expected):
        return secagg.advertise(state, 11, setup, expected, _POLICY, me, "job")

    expected = secagg.expected_setup(threshold=3, neighbours=0, clip_range=8.0, quant_bits=22)
    with pytest.raises(SecAggProtocolError, match="below secagg-threshold = 3"):
        advertise(_kept_state(), _setup(), expected)
    expected = secagg.expected_setup(threshold=0, neighbours=0, clip_range=8.0, quant_bits=22)
    with pytest.raises(SecAggProtocolError, match="clip_range"):
        advertise(_kept_state(), _setup(clip_range=1.0), expected)
    with pytest.raises(SecAggProtocolError, match="more than the declared max_weight"):
        advertise(_kept_state(num_examples=101), _setup(), expected)
    with pytest.raises(SecAggProtocolError, match="kept update is from round 4"):
        advertise(_kept_state(), _setup(round_id=5), expected)
    assert set(advertise(_kept_state(), _setup(), expected)) == {"c_pk", "s_pk", "seed_commitment", "region",
                                                                  "signature"}


def test_update_is_revealed_only_before_keys_were_advertised_and_only_if_the_policy_allows_it(tmp_path):
    allows = RegionPolicy(delta=1e-5, max_lifetime_epsilon=10.0, max_job_epsilon=10.0, allow_plain_rounds=True)
    state = _kept_state()
    secagg.advertise(state, 11, _setup(), {}, allows, _identity(tmp_path), "job")
    with pytest.raises(PolicyRefusal, match="joined a multi-party"):
        secagg.reveal(state, ConfigRecord({"round_id": 4}), allows)
    fresh = _kept_state()
    with pytest.raises(PolicyRefusal, match="allow-plain-rounds"):
        secagg.reveal(fresh, ConfigRecord({"round_id": 4}), replace(allows, allow_plain_rounds=False))
    update = secagg.reveal(fresh, ConfigRecord({"round_id": 4}), allows)["update"].numpy()
    np.testing.assert_allclose(update, 0.1, atol=1e-6)
    assert secagg.STATE_UPDATE not in fresh  # handed over once, then forgotten


def test_train_reply_without_secure_aggregation_carries_the_weights(tmp_path, fake_training):
    _, _, grid = _run(tmp_path, 2, rounds=1, secure=False, **{"secure-aggregation": False})
    train = [r for r in grid.replies if r.metadata.message_type == "train"]
    assert len(train) == 2 and all("arrays" in r.content for r in train)


def test_strategy_rejects_inconsistent_settings(tmp_path):
    flat = _run_config(tmp_path, 3)
    cfg = FedprivConfig.from_run_config(flat)
    report = RunReport(tmp_path, flat, cfg.accountant, cfg.delta, list(cfg.regions))
    with pytest.raises(ConfigError, match="secagg-threshold = 4"):
        _strategy(SecureFedAvg, report, cfg, threshold=4, neighbours=2)
    with pytest.raises(ConfigError, match="secagg-threshold = 1"):
        _strategy(SecureFedAvg, report, cfg, threshold=1)


def test_a_dp_off_run_reaches_the_report_as_not_private_through_the_real_wire(tmp_path, fake_training):
    """dp = false: the ClientApp sends no ε at all (not -1), and the report records null ε with dp: false."""
    _, report, grid = _run(tmp_path, 3, 2, secure=True, dp=False)
    metrics = [r.content["metrics"] for r in grid.replies if "metrics" in r.content and "dp" in r.content["metrics"]]
    assert metrics and all(m["dp"] == 0 and "epsilon" not in m for m in metrics)
    data = json.loads(report.write().read_text())  # the Coordinator writes after every round
    for region in data["regions"].values():
        assert region["dp"] is False and region["epsilon"] is None and region["epsilon_by_round"] == [None, None]
    assert "No differential privacy for r0, r1, r2" in (tmp_path / "privacy_report.md").read_text()


def test_local_evaluation_is_refused_by_default_and_recorded_once_per_region(tmp_path, fake_training):
    flat = _run_config(tmp_path, 2)
    cfg = FedprivConfig.from_run_config(flat)
    report = RunReport(tmp_path, flat, cfg.accountant, cfg.delta, list(cfg.regions))
    grid = FakeGrid(flat, 2)
    strategy = _strategy(SecureFedAvg, report, cfg, fraction_evaluate=1.0)
    strategy.start(grid=grid, initial_arrays=_record(_initial()), num_rounds=2, timeout=5.0)
    evaluations = [r for r in grid.replies if r.metadata.message_type == "evaluate"]
    assert len(evaluations) == 4 and all(r.has_error() for r in evaluations)
    for rec in report.regions.values():
        assert rec.local_accuracy_by_round == [] and rec.rounds_participated == [1, 2]
        assert [e["action"] for e in rec.enforcement] == ["refused by region policy"]
        assert rec.enforcement[0]["reason"].startswith("release-local-evaluation:")


def test_the_strategies_record_rounds_but_never_write_the_report(tmp_path, fake_training):
    """Only the coordinator persists the report: a round below min-train-regions and an aborted
    secure round are recorded in memory, and no file appears."""
    FakeRegion.refuse = {"r1", "r2"}
    _, report, _ = _run(tmp_path / "few", 3, rounds=1, **{"min-train-regions": 2})
    assert report.rounds[0]["model_updated"] is False
    FakeRegion.refuse = set()

    def silence(grid):
        grid.silent[(secagg.SHARE_KEYS, "1")] = {grid.node(0), grid.node(2)}

    _, report, _ = _run(tmp_path / "abort", 3, rounds=1, grid_setup=silence)
    assert report.secure_aggregation["rounds_aborted"] == [1]
    assert not list(tmp_path.rglob("privacy_report*"))
