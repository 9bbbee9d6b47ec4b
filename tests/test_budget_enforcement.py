"""Budget enforcement in a region's own process: the ledger decides, before training, whether a round may run.

Uses :class:`fedpriv.client.region.RegionRuntime` directly (no Flower) with the tiny model and a small
synthetic shard, in deployment mode: the node config names the region, its data and its cap.
"""

from __future__ import annotations

import math
import random

import pytest
from opacus.accountants import RDPAccountant

from fedpriv.client.region import RegionRuntime, identify_region
from fedpriv.client.trainer import choose_noise_multiplier, region_schedule
from fedpriv.core.config import resolve_config
from fedpriv.core.errors import BudgetExhausted
from fedpriv.privacy.policy import PolicyRefusal
from fedpriv.privacy.ledger import PrivacyLedger
from fedpriv.task.data import Example
from fedpriv.task.model import get_trainable
from fedpriv.task.partition import PartitionSpec, partition_corpus, write_shards

REGIONS = ("us-east", "eu-west")
DELTA = 1e-5
WORDS = ["good", "bad", "great", "awful", "the", "movie", "food", "day", "really", "was", "it", "service"]


def synthetic_corpus(n: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    domains = ["tweets", "amazon", "movies", "nyt"]
    return [Example(id=f"e{i}", text=" ".join(rng.choice(WORDS) for _ in range(6)), label=i % 2,
                    domain=domains[i % 4], rating=(1.5 if i % 2 else -1.5)) for i in range(n)]


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    spec = PartitionSpec(regions=REGIONS, seed=0, dirichlet_alpha=100.0, domain_skew=0.0,
                         max_examples_per_region=64, max_server_examples=32)
    partition = partition_corpus(synthetic_corpus(400), spec)
    assert all(len(s.train) == 64 for s in partition.regions.values())
    return write_shards(partition, root)


def make_config(tmp_path, shard_root, **overrides):
    """Tiny model, 64 examples, batch 32: 2 DP-SGD steps per round at q = 1/2, σ fixed at 1.0 (no planner search)."""
    base = {"noise-multiplier": 1.0, "model": "tiny", "trainable": "all", "regions": ",".join(REGIONS), "num-server-rounds": 3,
            "batch-size": 32, "physical-batch-size": 32, "local-epochs": 1.0, "target-epsilon": 3.0,
            "delta": DELTA, "accountant": "rdp", "num-threads": 1,
            "data-dir": str(shard_root), "run-dir": str(tmp_path / "run")}
    return resolve_config({**base, **overrides})[1]


def toml_value(value) -> str:
    return str(value).lower() if isinstance(value, bool) else repr(value)


def write_policy(path, cap: float, **rules) -> str:
    """A region policy file: lifetime cap ``cap``, δ = DELTA, a job ceiling that does not bind unless given."""
    keys = {"delta": DELTA, "max-lifetime-epsilon": cap, "max-job-epsilon": 1000.0, "require-secure-aggregation": False,
            "accountant": "rdp", **rules}  # the region's accountant decides; RDP here, checked against Opacus' own
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("[policy]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in keys.items()))
    return str(path)


def node(shard_root, tmp_path, cap: float | None = None, **rules):
    """A SuperNode's node config for us-east, with its own ledger under tmp_path and, given a cap, its policy."""
    config = {"region": "us-east", "data-path": str(shard_root), "ledger-path": str(tmp_path / "us-east.sqlite")}
    if cap is not None:
        config["policy-path"] = write_policy(tmp_path / "us-east-policy.toml", cap, **rules)
    return config


def round_entry(cfg) -> tuple[float, float, int]:
    """(σ, q, steps) of one round of us-east under ``cfg``: what the region will plan."""
    schedule = region_schedule(64, cfg)
    return (choose_noise_multiplier(schedule, cfg), schedule.sample_rate, schedule.steps_per_round)


def fresh_epsilon(history) -> float:
    acc = RDPAccountant()
    acc.history = list(history)
    return acc.get_epsilon(delta=DELTA)


def ledger_rows(path):
    with PrivacyLedger(path) as ledger:
        return ledger.releases()


def test_cap_below_one_round_never_trains(tmp_path, shard_root, train_calls):
    cfg = make_config(tmp_path, shard_root)
    one_round = fresh_epsilon([round_entry(cfg)])
    identity = identify_region(node(shard_root, tmp_path, cap=one_round / 2), cfg)
    assert identity.max_epsilon == pytest.approx(one_round / 2)
    runtime = RegionRuntime(cfg, identity)
    values = get_trainable(runtime.split.model)
    for attempt in ("a1", "a2"):  # a retry is refused just the same
        with pytest.raises(BudgetExhausted) as info:
            runtime.train(values, 1, job_id="job-1", attempt_id=attempt)
        assert "Refused" in str(info.value) and "above the budget" in str(info.value)
    assert train_calls == []  # refused before any local training
    assert ledger_rows(identity.ledger_path) == []
    # the model the region holds was never touched
    assert all((get_trainable(runtime.split.model)[k] == v).all() for k, v in values.items())


def test_region_near_its_cap_stops_exactly_before_exceeding_it(tmp_path, shard_root, train_calls):
    cfg = make_config(tmp_path, shard_root)
    entry = round_entry(cfg)
    eps = [fresh_epsilon([entry] * k) for k in (1, 2, 3)]
    assert eps[0] < eps[1] < eps[2]
    cap = eps[1] * (1 + 1e-9)  # round 2 lands on the cap; round 3 would go above it
    identity = identify_region(node(shard_root, tmp_path, cap=cap), cfg)
    runtime = RegionRuntime(cfg, identity)
    values = get_trainable(runtime.split.model)
    for rnd in (1, 2):
        outcome = runtime.train(values, rnd, job_id="job-1", attempt_id="a1")
        values = outcome.result.values
        assert outcome.epsilon == pytest.approx(eps[rnd - 1], rel=1e-9)
        assert outcome.lifetime_epsilon <= cap
    assert len(train_calls) == 2
    with pytest.raises(BudgetExhausted) as info:
        runtime.train(values, 3, job_id="job-1", attempt_id="a1")
    message = str(info.value)
    assert "round 3" in message and "above the budget" in message and "max-lifetime-epsilon" in message
    # the policy does not release the lifetime ε: the refusal names the rule, not the ε of the ledger
    assert f"{eps[2]:.4g}" not in message and "earlier release" not in message  # (the cap, public, is ε after round 2)
    assert len(train_calls) == 2  # round 3 never trained
    rows = ledger_rows(identity.ledger_path)
    assert [(r.run_id, r.attempt, r.round) for r in rows] == [("job-1", "a1", 1), ("job-1", "a1", 2)]
    with PrivacyLedger(identity.ledger_path) as ledger:
        assert ledger.epsilon(DELTA) <= cap
    # the budget is about the data, not the run: another job on the same data is refused too
    with pytest.raises(BudgetExhausted):
        RegionRuntime(cfg, identity).train(get_trainable(runtime.split.model), 1, job_id="job-2", attempt_id="b1")
    assert len(ledger_rows(identity.ledger_path)) == 2


def test_restarted_region_continues_its_history(tmp_path, shard_root):
    cfg = make_config(tmp_path, shard_root)
    identity = identify_region(node(shard_root, tmp_path, cap=50.0), cfg)
    first = RegionRuntime(cfg, identity)
    values = get_trainable(first.split.model)
    for rnd in (1, 2):
        values = first.train(values, rnd, job_id="job-1", attempt_id="a1").result.values
    del first
    restarted = RegionRuntime(cfg, identify_region(node(shard_root, tmp_path, cap=50.0), cfg))
    outcome = restarted.train(values, 3, job_id="job-1", attempt_id="a1")
    releases = [r.history_entry for r in ledger_rows(identity.ledger_path)]
    assert len(releases) == 3 and len(outcome.history) == 3
    assert outcome.epsilon == pytest.approx(fresh_epsilon(releases), rel=1e-9)
    assert outcome.lifetime_epsilon == pytest.approx(fresh_epsilon(releases), rel=1e-9)
    assert outcome.epsilon > fresh_epsilon(releases[:2])
    assert outcome.steps == sum(steps for _, _, steps in releases)


def test_policy_comes_only_from_node_config(tmp_path, shard_root, train_calls):
    """The behaviour change of the region policy: a deployed region without its own policy refuses to train
    (no silent "no cap"), and no run-config key -- sim-max-epsilon, sim-region-policy -- reaches it."""
    generous = tmp_path / "generous.toml"
    generous.write_text("[policy]\ndelta = 0.5\nmax-lifetime-epsilon = 1000.0\nrequire-dp = false\n")
    cfg = make_config(tmp_path, shard_root, **{"sim-max-epsilon": 1000.0, "sim-region-policy": str(generous)})
    one_round = fresh_epsilon([round_entry(cfg)])
    with pytest.raises(PolicyRefusal, match="policy-path"):
        identify_region(node(shard_root, tmp_path), cfg)
    capped = identify_region(node(shard_root, tmp_path / "other", cap=one_round / 2), cfg)
    assert capped.max_epsilon == pytest.approx(one_round / 2) and capped.policy.delta == DELTA
    runtime = RegionRuntime(cfg, capped)
    with pytest.raises(BudgetExhausted):
        runtime.train(get_trainable(runtime.split.model), 1, job_id="job-9", attempt_id="z")
    assert train_calls == [] and ledger_rows(capped.ledger_path) == []
    # in a simulation (no region in the node config) the simulation's own settings apply
    sim = make_config(tmp_path, shard_root, **{"sim-max-epsilon": 1e-3})
    simulated = identify_region({"partition-id": 0}, sim)
    assert simulated.name == "us-east" and simulated.max_epsilon == pytest.approx(1e-3)
    assert not math.isinf(simulated.max_epsilon)
    assert identify_region({"partition-id": 0}, cfg).policy.delta == 0.5  # sim-region-policy, simulation only


def test_the_caps_accountant_is_the_policys_never_the_run_configs(tmp_path, shard_root):
    """A deployed region checks with its policy's ``accountant`` (default pld) whatever the run asks; a simulated
    region whose policy names none takes the run's (the operator owns it); a bad name is one line."""
    from fedpriv.core.errors import ConfigError

    cfg = make_config(tmp_path, shard_root, accountant="prv")
    deployed = identify_region(node(shard_root, tmp_path, cap=50.0), cfg)
    assert deployed.policy.accountant == "rdp"  # write_policy names it
    bare = tmp_path / "bare.toml"
    bare.write_text(f"[policy]\ndelta = {DELTA!r}\nmax-lifetime-epsilon = 5.0\n")
    config = {"region": "us-east", "data-path": str(shard_root), "policy-path": str(bare)}
    assert identify_region(config, cfg).policy.accountant == "pld"
    assert identify_region({"partition-id": 0}, cfg).policy.accountant == "prv"
    bare.write_text(f"[policy]\ndelta = {DELTA!r}\nmax-lifetime-epsilon = 5.0\naccountant = \"gdp\"\n")
    with pytest.raises(ConfigError, match="accountant = 'gdp': expected one of rdp, prv, pld"):
        identify_region(config, cfg)
