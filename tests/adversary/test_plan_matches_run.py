"""``fedpriv plan`` predicts exactly the ε a region then records, round by round (issue 9, finding 8).

The plan comes from the CLI (``fedpriv plan --json``), the run from the real region code:
:class:`fedpriv.client.region.RegionRuntime` trains the tiny model with Opacus DP-SGD and records every
release in its ledger. N = 80, B = 32 and 1.5 local epochs make the two old definitions differ:
the planner used q = B/N = 0.4 and ceil(1.5 · 80/32) = 4 steps, while Opacus samples at
1/ceil(80/32) = 1/3 and the run takes ceil(1.5 · 3) = 5 steps, so the old plan was wrong every round.
"""

from __future__ import annotations

import json
import random

import pytest

from fedpriv.client.region import RegionRuntime, identify_region
from fedpriv.cli import main
from fedpriv.core.config import resolve_config
from fedpriv.privacy.accountant import ACCOUNTANTS, CROSS_CHECK, compact
from fedpriv.privacy.ledger import PrivacyLedger
from fedpriv.task.data import Example
from adversary_support import write_policy
from fedpriv.task.model import get_trainable
from fedpriv.task.partition import PartitionSpec, partition_corpus, write_shards

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order", "ignore:Secure RNG", "ignore:Full backward hook")

N, BATCH, EPOCHS, ROUNDS, TARGET, DELTA = 80, 32, 1.5, 3, 8.0, 1e-5
WORDS = ["good", "bad", "great", "awful", "the", "movie", "food", "day", "really", "was", "it", "service"]


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory):
    rng = random.Random(0)
    corpus = [Example(id=f"e{i}", text=" ".join(rng.choice(WORDS) for _ in range(6)), label=i % 2,
                      domain=["tweets", "amazon", "movies", "nyt"][i % 4], rating=1.5 if i % 2 else -1.5)
              for i in range(300)]
    spec = PartitionSpec(regions=("us-east",), seed=0, dirichlet_alpha=100.0, domain_skew=0.0,
                         max_examples_per_region=N, max_server_examples=20)
    partition = partition_corpus(corpus, spec)
    assert len(partition.regions["us-east"].train) == N
    return write_shards(partition, tmp_path_factory.mktemp("shards"))


def planned(accountant: str, capsys, steps: list[str]) -> dict:
    assert main(["plan", "--target-epsilon", str(TARGET), "--delta", str(DELTA), "--rounds", str(ROUNDS), *steps,
                 "--batch-size", str(BATCH), "--num-examples", str(N), "--accountant", accountant, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def run_and_compare(plan: dict, accountant: str, shard_root, tmp_path, steps: dict) -> None:
    """Train the region round by round under the run config and hold every round to the plan."""
    cfg = resolve_config({"model": "tiny", "trainable": "all", "regions": "us-east", "num-server-rounds": ROUNDS,
                          "batch-size": BATCH, "physical-batch-size": 16, **steps,
                          "target-epsilon": TARGET, "delta": DELTA, "accountant": accountant, "num-threads": 1,
                          "data-dir": str(shard_root), "run-dir": str(tmp_path / "run")})[1]
    policy = write_policy(tmp_path / "policy.toml", delta=DELTA, **{"max-lifetime-epsilon": 100.0,
                                                                  "require-secure-aggregation": False,
                                                                  "accountant": accountant})  # the region's, = the plan's
    node = {"region": "us-east", "data-path": str(shard_root), "ledger-path": str(tmp_path / "ledger.sqlite"),
            "policy-path": str(policy)}
    runtime = RegionRuntime(cfg, identify_region(node, cfg))
    values = get_trainable(runtime.split.model)
    for rnd, expected in enumerate(plan["per_round"], start=1):
        outcome = runtime.train(values, rnd, job_id="job-1", attempt_id="a1")
        values = outcome.result.values
        assert outcome.result.noise_multiplier == plan["noise_multiplier"]
        assert outcome.epsilon == pytest.approx(expected["epsilon"], rel=1e-9, abs=1e-12)
        assert outcome.steps == expected["steps"]
        # what Opacus itself counted: the rate its Poisson sampler used and one step per logical batch
        assert compact(outcome.result.history) == [(plan["noise_multiplier"], plan["sample_rate"], expected["steps"])]
    with PrivacyLedger(tmp_path / "ledger.sqlite") as ledger:
        recorded = ledger.epsilon(DELTA, accountant)
    assert recorded == pytest.approx(plan["final_epsilon"], rel=1e-9)
    assert plan["final_epsilon"] <= TARGET


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_every_round_records_the_planned_epsilon(accountant, shard_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FEDPRIV_CACHE_DIR", str(tmp_path / "cache"))
    plan = planned(accountant, capsys, ["--local-epochs", str(EPOCHS)])
    assert (plan["sample_rate"], plan["steps_per_round"]) == (1 / 3, 5)
    run_and_compare(plan, accountant, shard_root, tmp_path, {"local-epochs": EPOCHS})
    assert plan["check_accountant"] == CROSS_CHECK[accountant] and plan["per_round"][-1]["epsilon_check"] > 0


def test_local_steps_run_takes_the_planned_steps(shard_root, tmp_path, monkeypatch, capsys):
    """``local-steps = 2`` (not the 5 steps 1.5 epochs would take): the region runs and accounts exactly 2 steps
    a round at its own rate 1/3, and records the ε ``fedpriv plan --local-steps 2`` predicts."""
    monkeypatch.setenv("FEDPRIV_CACHE_DIR", str(tmp_path / "cache"))
    plan = planned("pld", capsys, ["--local-steps", "2"])
    assert (plan["sample_rate"], plan["steps_per_round"]) == (1 / 3, 2)
    run_and_compare(plan, "pld", shard_root, tmp_path, {"local-epochs": EPOCHS, "local-steps": 2})
