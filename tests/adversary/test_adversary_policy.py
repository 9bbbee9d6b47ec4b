"""The coordinator as an attacker against a region's privacy policy (issue 9, findings 2, 3 and 5).

Each test chooses the run config or the messages the way a curious coordinator would and
checks, through the real ClientApp handlers, RegionRuntime and ledger, that the region
refuses before anything is trained or recorded -- or that what comes back is only the DP
release and its public facts. On the code before the region policy, every one of these
requests was obeyed.
"""

from __future__ import annotations

import json

import pytest
from opacus.accountants import RDPAccountant

from conftest import assert_epsilon_is_the_libraries
from adversary_support import DELTA, Region, global_arrays, refusal, run_config, shard_root, task_identity  # noqa: F401 (fixtures)
from fedpriv.core import contract
from fedpriv.privacy.report import RunReport
from fedpriv.privacy.report_markdown import render_markdown
from fedpriv.privacy.report_view import NOT_PRIVATE
from fedpriv.strategies.private_fedavg import PrivateFedAvg


def _region(shard_root, tmp_path, run=None, **policy) -> Region:
    return Region("us-east", shard_root, tmp_path / "region", run or run_config(shard_root, tmp_path / "run"), **policy)


# --------------------------------------------------------------------------- finding 2 and 5: refusals


ATTACKS = {
    # name: (run-config overrides the coordinator chooses, secure round flag, the policy rule that refuses)
    "delta inflation": ({"delta": 0.5}, 1, "delta"),
    "dp off": ({"dp": False}, 1, "require-dp"),
    "low noise": ({"noise-multiplier": 0.3}, 1, "max-job-epsilon"),
    "target above the ceiling": ({"noise-multiplier": 0.0, "target-epsilon": 60.0}, 1, "max-job-epsilon"),
    # σ stays the 1.0 the region accepts elsewhere; the coordinator multiplies the noisy steps instead
    "many local steps": ({"local-steps": 2000}, 1, "max-job-epsilon"),
    "secure aggregation off": ({"secure-aggregation": False}, None, "require-secure-aggregation"),
    "plain round in a secure run": ({}, None, "require-secure-aggregation"),
    "deterministic noise": ({}, 1, "allow-deterministic-noise"),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_request_the_policy_forbids_is_refused_before_training_and_recording(tmp_path, shard_root, train_calls,
                                                                               attack):
    overrides, secagg_round, rule = ATTACKS[attack]
    run = run_config(shard_root, tmp_path / "run", **overrides)
    if attack == "deterministic noise":  # the trainer's testing key (its typed field lands with its own change)
        run["insecure-deterministic-noise"] = True
    region = _region(shard_root, tmp_path, run)
    before = global_arrays(run)
    reply = region.train(before, secagg_round=secagg_round)
    err = refusal(reply)
    assert err.region == "us-east" and err.kind == contract.POLICY and err.text.startswith(rule + ":"), err
    assert train_calls == [] and region.releases() == []  # nothing trained, nothing recorded
    assert not any(k.startswith("fedpriv-secagg") for k in region.context.state)  # no update kept for masking
    # and the coordinator's report says so, in the contract's words
    report = RunReport(tmp_path / "report", run, "rdp", DELTA, ["us-east"])
    strategy = PrivateFedAvg(report, min_train_regions=1, connect_timeout=1.0)
    strategy._record_replies(1, [reply])
    assert report.regions["us-east"].enforcement == [{"round": 1, "action": contract.POLICY, "reason": err.text}]
    assert f"round 1: refused by region policy: {rule}:" in render_markdown(report.to_dict())


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_a_coordinator_asking_for_bf16_with_opacus_clipping_gets_a_one_line_error_and_nothing_trains(
        tmp_path, shard_root, train_calls, mode):
    """bf16 with Opacus' clipping lets one post move the sum past C (tests/adversary/test_clipping_bound.py); the
    region's own code refuses that run config from the coordinator before anything trains or is recorded."""
    run = run_config(shard_root, tmp_path / "run")
    run.update({"mixed-precision": "bf16", "grad-sample-mode": mode})  # the coordinator's choice, unvalidated
    region = _region(shard_root, tmp_path, run)
    reply = region.train(global_arrays(run_config(shard_root, tmp_path / "run")))
    assert reply.has_error() and reply.error.code == contract.FAILED, reply.error.reason if reply.has_error() else ""
    assert f"mixed-precision = 'bf16': expected 'off' with grad-sample-mode = '{mode}'" in reply.error.reason
    assert train_calls == [] and region.releases() == []


def test_a_smaller_delta_is_accepted_and_epsilon_is_still_the_regions(tmp_path, shard_root, train_calls):
    run = run_config(shard_root, tmp_path / "run", delta=1e-7)
    region = _region(shard_root, tmp_path, run)
    reply = region.train(global_arrays(run))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    metrics = reply.content[contract.METRICS]
    rows = region.releases()
    assert len(train_calls) == 1 and len(rows) == 1 and rows[0].delta == DELTA
    assert metrics[contract.DELTA] == DELTA
    # at the region's δ and with the region's accountant (policy default pld), whatever the run config asks (rdp)
    assert_epsilon_is_the_libraries(metrics[contract.EPSILON], [rows[0].history_entry], DELTA, "pld")


def test_rounds_beyond_the_job_ceiling_are_refused(tmp_path, shard_root, train_calls):
    run = run_config(shard_root, tmp_path / "run", **{"num-server-rounds": 1})
    region = _region(shard_root, tmp_path, run)
    arrays = global_arrays(run)
    one = region.train(arrays, server_round=1, secagg_round=1)
    eps_one = one.content[contract.METRICS][contract.EPSILON]
    # the policy's ceiling sits between one and two rounds; the coordinator asks for a second round anyway
    region.policy_path.write_text(region.policy_path.read_text().replace("max-job-epsilon = 20.0",
                                                                         f"max-job-epsilon = {eps_one * 1.2!r}"))
    err = refusal(region.train(arrays, server_round=2, secagg_round=2))
    assert err.text.startswith("max-job-epsilon:") and "round 2" in err.text
    assert len(train_calls) == 1 and len(region.releases()) == 1


def test_no_policy_no_training(tmp_path, shard_root, train_calls):
    region = _region(shard_root, tmp_path)
    del region.context.node_config["policy-path"]
    err = refusal(region.train(global_arrays(region.context.run_config)))
    assert err.text.startswith("policy-path:")
    assert train_calls == [] and region.releases() == []


def test_epsilon_is_never_negative(tmp_path, shard_root):
    """At a huge δ the RDP conversion goes below zero; the region and the report clamp it, and keep DP on."""
    run = run_config(shard_root, tmp_path / "run", delta=0.9, **{"noise-multiplier": 3.0})
    region = _region(shard_root, tmp_path, run, delta=0.9)
    raw = RDPAccountant()
    raw.history = [(3.0, 0.5, 2)]
    assert raw.get_epsilon(delta=0.9) < 0  # the attack's premise: an unclamped ε is negative here
    reply = region.train(global_arrays(run))
    metrics = dict(reply.content[contract.METRICS])
    assert metrics[contract.DP] == 1 and metrics[contract.EPSILON] == 0.0
    report = RunReport(tmp_path / "report", run, "rdp", 0.9, ["us-east"])
    PrivateFedAvg(report, min_train_regions=1, connect_timeout=1.0)._record_replies(1, [reply])
    data = report.to_dict()
    assert data["regions"]["us-east"]["dp"] is True and data["regions"]["us-east"]["epsilon"] == 0.0
    assert "DP off" not in render_markdown(data) and "-0." not in render_markdown(data)


# ------------------------------------------------------------------ finding 3: what leaves a region


def test_a_train_reply_carries_the_dp_release_and_public_facts_only(tmp_path, shard_root):
    run = run_config(shard_root, tmp_path / "run")
    region = _region(shard_root, tmp_path, run)
    reply = region.train(global_arrays(run))
    content = reply.content
    # Every key of the real reply, and nothing else.
    assert set(content.keys()) == {contract.METRICS, contract.REGION}  # the update stays here, to be masked
    metrics = dict(content[contract.METRICS])
    assert set(metrics) == set(contract.PUBLIC_TRAIN_METRICS)
    assert metrics[contract.NUM_EXAMPLES] == 64 and metrics[contract.DP] == 1 and metrics[contract.DELTA] == DELTA
    assert (metrics[contract.NOISE_MULTIPLIER], metrics[contract.SAMPLE_RATE], metrics[contract.STEPS]) == (1.0, 0.5, 2)
    assert_epsilon_is_the_libraries(metrics[contract.EPSILON], [(1.0, 0.5, 2)], DELTA, "pld")
    assert metrics[contract.DETERMINISTIC_NOISE] == 0
    region_record = dict(content[contract.REGION])
    assert set(region_record) == {"name", "history", "accountant", "privacy-unit"}
    assert list(region_record["history"]) == [1.0, 0.5, 2.0]  # the mechanism, public
    # A second job on the same data: the reply still says nothing about the first one.
    region.context.run_config = {**run, "job-id": "job-2"}
    second = region.train(global_arrays(run))
    assert contract.LIFETIME_EPSILON not in second.content[contract.METRICS]
    assert second.content[contract.METRICS][contract.EPSILON] == pytest.approx(metrics[contract.EPSILON], rel=1e-9)


def test_released_metrics_are_labelled_not_private(tmp_path, shard_root):
    run = run_config(shard_root, tmp_path / "run")
    region = _region(shard_root, tmp_path, run, **{"release-train-metrics": True, "release-lifetime-epsilon": True})
    reply = region.train(global_arrays(run))
    metrics = dict(reply.content[contract.METRICS])
    assert set(metrics) == set(contract.PUBLIC_TRAIN_METRICS) | set(contract.NOT_PRIVATE_TRAIN_METRICS)
    report = RunReport(tmp_path / "report", run, "rdp", DELTA, ["us-east"])
    PrivateFedAvg(report, min_train_regions=1, connect_timeout=1.0)._record_replies(1, [reply])
    report.write()
    data = json.loads((tmp_path / "report" / "privacy_report.json").read_text())
    not_private = [row for row in data["released"] if row["guarantee"] == NOT_PRIVATE]
    assert {row["regions"]["us-east"] for row in not_private} == {"release-train-metrics", "release-lifetime-epsilon"}
    md = (tmp_path / "report" / "privacy_report.md").read_text()
    assert "## What left each region" in md and "train loss / accuracy" in md and NOT_PRIVATE in md


def test_local_evaluation_is_refused_by_default_and_labelled_when_allowed(tmp_path, shard_root):
    from flwr.app import ConfigRecord, RecordDict

    run = run_config(shard_root, tmp_path / "run")
    content = RecordDict({contract.ARRAYS: global_arrays(run), contract.CONFIG: ConfigRecord({"server-round": 1})})
    err = refusal(_region(shard_root, tmp_path, run).send("evaluate", content))
    assert err.text.startswith("release-local-evaluation:")
    allowed = _region(shard_root, tmp_path / "b", run, **{"release-local-evaluation": True}).send("evaluate", content)
    assert not allowed.has_error() and 0.0 <= allowed.content[contract.METRICS][contract.EVAL_ACCURACY] <= 1.0


def test_a_second_release_of_a_round_is_refused_inside_the_write_transaction(tmp_path, shard_root, train_calls,
                                                                           monkeypatch):
    """Two processes train the same round: both pass the early read, only the first may record and release."""
    from fedpriv.privacy.ledger import PrivacyLedger

    run = run_config(shard_root, tmp_path / "run")
    region = _region(shard_root, tmp_path, run)
    arrays = global_arrays(run)
    assert not region.train(arrays).has_error()
    monkeypatch.setattr(PrivacyLedger, "release_of", lambda self, job, rnd: None)  # the other process read too early
    err = refusal(region.train(arrays))
    assert "already released" in err.text and len(train_calls) == 2 and len(region.releases()) == 1
