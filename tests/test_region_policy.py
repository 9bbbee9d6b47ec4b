"""The region policy file, the message contract's error format, and how the report shows both."""

from __future__ import annotations

import json

import pytest
from flwr.app import Error, Message, RecordDict

from fedpriv.core import contract
from fedpriv.core.errors import ConfigError
from fedpriv.privacy.ledger import PrivacyLedger, Release
from fedpriv.privacy.policy import (BUILTIN_SIMULATION_POLICY, PolicyRefusal, check_secagg_threshold, load_policy,
                            load_simulation_policy, policy_for_node)
from fedpriv.privacy.report import RunReport
from fedpriv.privacy.report_markdown import render_markdown

EXAMPLE = BUILTIN_SIMULATION_POLICY.parents[1] / "examples" / "region-policy.toml"


def test_the_example_policy_is_the_strict_default():
    policy = load_policy(EXAMPLE)
    assert policy.delta == 1e-5 and policy.max_lifetime_epsilon == 10.0 and policy.max_job_epsilon == 8.0
    assert policy.require_dp and policy.require_secure_aggregation and not policy.allow_plain_rounds
    assert policy.min_secagg_peers == 1
    assert not (policy.allow_deterministic_noise or policy.release_train_metrics or policy.release_local_evaluation
                or policy.release_lifetime_epsilon)


@pytest.mark.parametrize("body, words", [
    ("[policy]\ndelta = 1e-5\n", ["max-lifetime-epsilon is missing", "no 'no cap'"]),
    ("[policy]\nmax-lifetime-epsilon = 5.0\n", ["delta is missing"]),
    ("[policy]\ndelta = 1.5\nmax-lifetime-epsilon = 5.0\n", ["delta = 1.5", "(0, 1)"]),
    ("[policy]\ndelta = 1e-5\nmax-lifetime-epsilon = 0.0\n", ["max-lifetime-epsilon = 0.0", "> 0"]),
    ("[policy]\ndelta = 1e-5\nmax-lifetime-epsilon = 5.0\nmin-secagg-threshold = 0.4\n",
     ["min-secagg-threshold = 0.4", "[0.5, 1)"]),
    ("[policy]\ndelta = 1e-5\nmax-lifetime-epsilon = 5.0\nrequire-dp = 1\n", ["require-dp = 1", "true or false"]),
    ("[policy]\ndelta = 1e-5\nmax-lifetime-epsilon = 5.0\nmin-secagg-peers = 0\n", ["min-secagg-peers = 0", ">= 1"]),
    ("[policy]\ndelta = 1e-5\nmax-lifetime-epsilon = 5.0\nmin-secagg-peers = 1.5\n", ["min-secagg-peers = 1.5",
                                                                                        "whole number"]),
    ("[policy]\ndelta = 1e-5\nmax-lifetime-epsilon = 5.0\nmax-epsilon = 3.0\n", ["unknown key 'max-epsilon'"]),
    ("[policy]\ndelta = 1e-5\nmax-lifetime-epsilon = 5.0\n[regions.us-east]\ndelta = 1e-6\n", ["unexpected table"]),
    ("delta = 1e-5\n", ["unexpected table 'delta'"]),
    ("[policy\n", ["not valid TOML"]),
])
def test_a_bad_policy_is_one_line_naming_the_key(tmp_path, body, words):
    path = tmp_path / "policy.toml"
    path.write_text(body)
    with pytest.raises(ConfigError) as info:
        load_policy(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert all(w in message for w in words), message


def test_simulated_regions_get_their_own_tables_and_deployed_ones_need_a_file(tmp_path):
    path = tmp_path / "sim.toml"
    path.write_text("[policy]\ndelta = 1e-5\nmax-lifetime-epsilon = 5.0\n"
                    "[regions.eu-west]\nmax-lifetime-epsilon = 1.0\nallow-plain-rounds = true\n")
    us, eu = load_simulation_policy(path, "us-east"), load_simulation_policy(path, "eu-west")
    assert (us.max_lifetime_epsilon, us.allow_plain_rounds) == (5.0, False)
    assert (eu.max_lifetime_epsilon, eu.allow_plain_rounds) == (1.0, True)
    builtin = load_simulation_policy("", "us-east")
    assert builtin.delta == 1e-5 and builtin.max_lifetime_epsilon > 0
    assert policy_for_node({}, "us-east", "", sim_max_epsilon=2.0).max_lifetime_epsilon == 2.0
    with pytest.raises(PolicyRefusal, match="policy-path"):  # a deployment never falls back to the sim policy
        policy_for_node({"region": "us-east"}, "us-east", str(path), sim_max_epsilon=2.0)
    assert policy_for_node({"region": "us-east", "policy-path": str(EXAMPLE)}, "us-east", str(path),
                           sim_max_epsilon=2.0).max_lifetime_epsilon == 10.0


@pytest.mark.parametrize("holders, fraction, lowest", [(2, 0.5, 2), (3, 0.5, 2), (4, 0.5, 3), (5, 0.5, 3),
                                                       (100, 0.5, 51), (4, 0.75, 4), (9, 0.66, 6)])
def test_the_threshold_floor_never_allows_two_disjoint_groups(holders, fraction, lowest):
    policy = load_simulation_policy("", "x").__class__(delta=1e-5, max_lifetime_epsilon=1.0, max_job_epsilon=1.0,
                                                       min_secagg_threshold=fraction)
    assert policy.secagg_threshold_floor(holders) == lowest and 2 * lowest > holders
    check_secagg_threshold(policy, lowest, holders)
    with pytest.raises(PolicyRefusal, match="min-secagg-threshold"):
        check_secagg_threshold(policy, lowest - 1, holders)


def test_the_contract_has_one_error_format_and_one_parser():
    for kind in (contract.POLICY, contract.BUDGET):
        err = contract.parse_error(contract.error_reason("us-east", "delta: too big", kind), "node-1")
        assert (err.region, err.kind, err.text, err.refused) == ("us-east", kind, "delta: too big", True)
    failure = contract.parse_error(contract.error_reason("eu-west", "data dir unreadable"), "node-1")
    assert (failure.region, failure.kind, failure.refused) == ("eu-west", None, False)
    traceback = contract.parse_error("Traceback (most recent call last):\n ...\nValueError: boom", "node-7")
    assert (traceback.region, traceback.text) == ("node-7", "ValueError: boom")
    with pytest.raises(ValueError):
        contract.error_reason("us-east", "x", "made-up kind")


def test_deterministic_noise_puts_no_guarantee_on_the_first_line(tmp_path):
    report = RunReport(tmp_path, {}, "rdp", 1e-5, ["us-east"])
    metrics = {"dp": 1, "epsilon": 1.0, "num-examples": 64, "steps": 2, "noise-multiplier": 1.0, "sample-rate": 0.5,
               "max-grad-norm": 1.0, "delta": 1e-5, "max-epsilon": 10.0, "deterministic-noise": 1}
    report.record_training("us-east", 1, metrics, [(1.0, 0.5, 2)])
    md = render_markdown(report.to_dict())
    assert md.splitlines()[0].startswith("**THIS RUN GIVES NO DIFFERENTIAL-PRIVACY GUARANTEE: us-east")
    released = json.loads(json.dumps(report.to_dict()))["released"]
    assert released[0]["regions"]["us-east"].startswith("no DP guarantee: insecure-deterministic-noise")
    clean = RunReport(tmp_path / "b", {}, "rdp", 1e-5, ["us-east"])
    clean.record_training("us-east", 1, {**metrics, "deterministic-noise": 0}, [(1.0, 0.5, 2)])
    first = render_markdown(clean.to_dict()).splitlines()[0]
    assert first.startswith("# fedpriv privacy-budget report")
    from fedpriv.privacy.html_report import render_html

    html = render_html(report.to_dict(), tmp_path / "r.html").read_text()
    assert html.index("NO DIFFERENTIAL-PRIVACY GUARANTEE") < html.index("<h1>")


def test_two_processes_cannot_both_release_the_same_round(tmp_path):
    release = Release(run_id="job/a", round=1, steps=2, sample_rate=0.5, noise_multiplier=1.0, max_grad_norm=1.0,
                      delta=1e-5)
    with PrivacyLedger(tmp_path / "l.sqlite") as one, PrivacyLedger(tmp_path / "l.sqlite") as two:
        assert one.get("job/a", 1) is None and two.get("job/a", 1) is None  # both read "not yet released"
        assert one.reserve(release, 10.0, new_only=True).allowed
        second = two.reserve(release, 10.0, new_only=True)
        assert not second.allowed and "already released" in second.reason
        assert two.reserve(release, 10.0).allowed  # a plain retry (same release re-sent) still counts once
        assert len(one) == 1


@pytest.fixture
def task_identity(monkeypatch):
    """Flower messages need a task identity (a ClientApp or ServerApp process has one)."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 7), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("region", ["us-east", "eu_west-2", "node-18446744073709551615"])
@pytest.mark.parametrize("kind", [None, *contract.REFUSAL_KINDS])
def test_the_one_error_parser_round_trips_what_a_region_writes(region, kind):
    text = "a reason | with a bar\nand a second line"
    err = contract.parse_error(contract.error_reason(region, text, kind), "node-1")
    assert (err.region, err.kind, err.text) == (region, kind, text)
    reply = contract.error_reply(Message(RecordDict(), dst_node_id=5, message_type="train"), region, text, kind)
    read = contract.read_error(reply, "node-1")
    assert reply.error.code == (contract.REFUSED if kind else contract.FAILED)
    assert (read.region, read.kind, read.text, read.refused) == (region, kind, text, kind is not None)


@pytest.mark.parametrize("reason", ["", "no bar at all", "two words|privacy-budget: x", "|privacy-budget: x",
                                    "Traceback (most recent call last):\n  x|y\nKeyError: 'a|b'",
                                    "us-east\n|privacy-budget: x"])
def test_the_one_error_parser_rejects_malformed_reasons_as_failures_of_the_default_region(reason):
    err = contract.parse_error(reason, "node-7")
    assert err.region == "node-7" and not err.refused
    assert contract.split_reason(reason)[0] is None


@pytest.mark.usefixtures("task_identity")
def test_a_refusal_needs_the_refused_code_and_the_lost_codes_are_read():
    def reply(code, reason):
        return Message(Error(code=code, reason=reason), reply_to=Message(RecordDict(), dst_node_id=5, message_type="train"))

    budget = contract.error_reason("us-east", "spent", contract.BUDGET)
    assert contract.read_error(reply(contract.REFUSED, budget), "?").refused
    # A crashed or failing ClientApp whose text merely looks like a refusal is a failure, not a refusal.
    assert not contract.read_error(reply(contract.FAILED, budget), "?").refused
    assert not contract.read_error(reply(0, budget), "?").refused
    lost = contract.read_error(reply(contract.LOST, "us-east|no reply within round-timeout"), "?")
    assert lost.lost and not lost.refused and lost.region == "us-east"


@pytest.mark.usefixtures("task_identity")
def test_the_coordinators_grid_and_the_strategies_parse_with_the_same_rule():
    from fedpriv.server.faults import WatchedGrid

    class Grid:
        def push_messages(self, messages):
            for i, m in enumerate(messages):
                m.metadata.__dict__["_message_id"] = f"m{i}"
            self.sent = list(messages)
            return [m.metadata.message_id for m in messages]

        def pull_messages(self, ids):  # a head with a space is not a region: rewritten with the region's name
            return [Message(Error(code=9, reason="Flower error|boom"), reply_to=m) for m in self.sent]

    watched = WatchedGrid(Grid(), ["us-east"], lookup={5: "us-east"}.get)
    out = list(watched.send_and_receive([Message(RecordDict(), dst_node_id=5, message_type="train")], timeout=1))
    err = contract.read_error(out[0], "?")
    assert (err.region, err.text, out[0].error.code) == ("us-east", "Flower error|boom", 9)
