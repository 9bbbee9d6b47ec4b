"""The exit status tells the truth: a run that trained nothing is not a success (issue 23, item 1).

Fast tests of the pieces: the coordinator's verdict (:func:`fedpriv.privacy.report_view.run_verdict`) from
what the report recorded, the commands' exit codes (:mod:`fedpriv.commands.outcome`), a report left
``running`` by a killed coordinator becoming ``stopped``, strict JSON, one console line per refusal or
failure (never a repr or a traceback), and Flower's repeated result lines kept off the console.
The end-to-end runs (``fedpriv simulate`` whose every region refuses, or one of whose shards is
corrupt) are in ``test_run_outcome_e2e.py``.
"""

from __future__ import annotations

import json
import logging
import math
import time

import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.app import Metadata, MessageType
from flwr.app.message.message import make_message

from fedpriv.commands.outcome import judge, settle_interrupted
from fedpriv.core import contract
from fedpriv.core.report_schema import load as load_report
from fedpriv.deploy.flwr_cli import RunOutcome
from fedpriv.privacy.report import RunReport
from fedpriv.privacy.report_view import run_verdict

HISTORY = [(1.1, 0.05, 20)]
REGIONS = ["us-east", "eu-west"]
DONE = RunOutcome(7, "finished:completed", "")


def _metrics(epsilon: float = 0.5) -> dict:
    return {"dp": 1, "num-examples": 400, "steps": 20, "noise-multiplier": 1.1, "sample-rate": 0.05,
            "max-grad-norm": 1.0, "max-epsilon": 0.0, "epsilon": epsilon}


def _report(tmp_path, rounds: dict[int, dict[str, str]]) -> RunReport:
    """``rounds``: round -> {region: "ok" | "refused" | "failed"}; the model updates when any region trained."""
    report = RunReport(tmp_path, {"num-server-rounds": len(rounds)}, "rdp", 1e-5, REGIONS)
    for rnd, outcome in rounds.items():
        for region, what in outcome.items():
            if what == "ok":
                report.record_training(region, rnd, _metrics(0.5 * rnd), HISTORY)
            elif what == "refused":
                report.record_enforcement(region, rnd, contract.POLICY, "delta: the run asks for δ = 0.5, above the region's δ = 1e-05")
            else:
                report.record_enforcement(region, rnd, "failed", "data file /srv/eu-west/regions/eu-west/train.jsonl is "
                                                                 "not fedpriv JSONL (Expecting value)")
        report.record_round(rnd, model_updated="ok" in outcome.values())
    return report


@pytest.mark.parametrize("rounds, status, fragments", [
    ({1: {"us-east": "ok", "eu-west": "ok"}, 2: {"us-east": "ok", "eu-west": "ok"}}, "completed", []),
    # a region lost in one round and back in the next: fault tolerance, not a failure of the run
    ({1: {"us-east": "ok", "eu-west": "failed"}, 2: {"us-east": "ok", "eu-west": "ok"}}, "completed", []),
    ({1: {"us-east": "refused", "eu-west": "refused"}}, "failed",
     ["no round updated the global model", "us-east: refused by region policy: delta"]),
    ({1: {"us-east": "failed", "eu-west": "failed"}, 2: {"us-east": "failed", "eu-west": "failed"}}, "failed",
     ["no round updated the global model", "eu-west: failed: data file <path> is not fedpriv JSONL"]),
    ({1: {"us-east": "ok", "eu-west": "failed"}, 2: {"us-east": "ok", "eu-west": "failed"}}, "completed with failures",
     ["eu-west refused or failed in every round", "not fedpriv JSONL"]),
    ({1: {"us-east": "ok", "eu-west": "ok"}, 2: {"us-east": "refused", "eu-west": "refused"},
      3: {"us-east": "ok", "eu-west": "ok"}}, "completed with failures", ["round(s) 2 left the global model unchanged"]),
    ({1: {"us-east": "ok", "eu-west": "ok"}, 2: {"us-east": "refused", "eu-west": "failed"}}, "failed",
     ["ended below min-train-regions: round 2"]),
])
def test_the_verdict_follows_what_the_rounds_did(tmp_path, rounds, status, fragments):
    report = _report(tmp_path, rounds)
    got, reason = run_verdict(report.to_dict())
    assert got == status, reason
    for fragment in fragments:
        assert fragment in reason, reason
    assert (reason == "") == (status == "completed") and "\n" not in reason


def test_a_run_that_ended_early_is_failed_even_after_good_rounds(tmp_path):
    report = _report(tmp_path, {1: {"us-east": "ok", "eu-west": "ok"}})
    status, reason = run_verdict(report.to_dict(), aborted="only 0 region(s) connected after 60s; min-train-regions = 1")
    assert status == "failed" and reason.startswith("ended after round 1: only 0 region(s) connected")


@pytest.mark.parametrize("rounds, code", [
    ({1: {"us-east": "ok", "eu-west": "ok"}}, 0),
    ({1: {"us-east": "refused", "eu-west": "refused"}}, 1),
    ({1: {"us-east": "ok", "eu-west": "failed"}}, 3),
])
def test_the_commands_exit_with_the_reports_verdict(tmp_path, rounds, code):
    """Flower says finished:completed for all three: only the report tells them apart."""
    report = _report(tmp_path, rounds)
    report.status, report.status_reason = run_verdict(report.to_dict())
    report.write()
    verdict = judge(tmp_path, DONE)
    assert verdict.exit_code == code and verdict.status == report.status
    assert verdict.line == (report.status if code == 0 else f"{report.status}: {report.status_reason}")


def test_a_report_left_running_by_a_killed_coordinator_says_stopped(tmp_path):
    report = _report(tmp_path, {1: {"us-east": "ok", "eu-west": "ok"}})
    report.write()  # status "running": the coordinator was killed before it could write its end
    settle_interrupted(tmp_path, "fedpriv simulate was interrupted (SIGINT)")
    data = load_report(tmp_path)
    assert data["status"] == "stopped" and data["status_reason"] == "fedpriv simulate was interrupted (SIGINT)"
    assert "Status: **stopped**" in (tmp_path / "privacy_report.md").read_text()
    settle_interrupted(tmp_path, "again")  # a final status is never overwritten
    assert load_report(tmp_path)["status_reason"] == "fedpriv simulate was interrupted (SIGINT)"


def test_a_run_flower_stopped_with_its_report_still_running_exits_non_zero(tmp_path):
    _report(tmp_path, {1: {"us-east": "ok", "eu-west": "ok"}}).write()
    verdict = judge(tmp_path, RunOutcome(7, "finished:stopped", "stopped by user"))
    assert verdict.exit_code == 1 and verdict.status == "stopped" and "finished:stopped" in verdict.reason
    assert judge(tmp_path / "nothing", DONE).exit_code == 1


def test_report_json_is_strict_json_without_infinity_or_nan(tmp_path):
    """target-epsilon = inf used to reach the report as `Infinity`, which strict JSON parsers reject."""
    report = RunReport(tmp_path, {"target-epsilon": math.inf, "x": [math.nan, 1.0]}, "rdp", 1e-5, REGIONS)
    report.record_training("us-east", 1, _metrics(), HISTORY)
    report.regions["us-east"].target_epsilon = math.inf
    report.run_info["loss"] = float("nan")

    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    data = json.loads((report.write()).read_text(), parse_constant=refuse)
    assert data["config"]["target-epsilon"] is None and data["config"]["x"] == [None, 1.0]
    assert data["regions"]["us-east"]["target_epsilon"] is None and data["run_info"]["loss"] is None


# -- the console: one line per refusal or failure -----------------------------------------------------------


def _train_msg(dst: int) -> Message:
    md = Metadata(run_id=7, message_id=f"m{dst}", src_node_id=0, dst_node_id=dst, reply_to_message_id="",
                  group_id="1", created_at=time.time(), ttl=3600, message_type=MessageType.TRAIN)
    return make_message(metadata=md, content=RecordDict())


def _error(dst: int, reason: str, code: int) -> Message:
    md = Metadata(run_id=7, message_id=f"r{dst}", src_node_id=dst, dst_node_id=0, reply_to_message_id=f"m{dst}",
                  group_id="1", created_at=time.time(), ttl=3600, message_type=MessageType.TRAIN)
    return make_message(metadata=md, content=None, error=Error(code=code, reason=reason))


def test_every_refusal_and_failure_is_one_console_line_with_rule_and_reason(tmp_path, caplog):
    from fedpriv.server.faults import WatchedGrid
    from fedpriv.strategies.private_fedavg import PrivateFedAvg

    class Grid:  # us-east refuses by policy; eu-west's bundle gate raised (Flower's repr-like reason)
        def get_nodes(self):
            return []

        def send_and_receive(self, messages, *, timeout=None):
            return [_error(11, contract.error_reason("us-east", "delta: the run asks for δ = 0.5, above the region's "
                                                     "δ = 1e-05", contract.POLICY), contract.REFUSED),
                    _error(12, "<class 'fedpriv.core.errors.FedprivError'>:<'app bundle /srv/eu/.flwr/app.fab is not "
                               "signed by a publisher this region trusts'>", 0)]

    grid = WatchedGrid(Grid(), REGIONS, lookup={11: "us-east", 12: "eu-west"}.get)
    report = RunReport(tmp_path, {}, "rdp", 1e-5, REGIONS)
    strategy = PrivateFedAvg(report, min_train_regions=1, connect_timeout=1.0)
    replies = grid.send_and_receive([_train_msg(11), _train_msg(12)])
    with caplog.at_level(logging.WARNING, logger="flwr"):
        with pytest.raises(Exception):  # every region refused or failed: the strategy ends the run
            strategy.aggregate_train(1, replies)
    lines = [r.getMessage() for r in caplog.records if "round 1: region" in r.getMessage()]
    assert lines == [
        "round 1: region us-east refused to train: refused by region policy: delta: the run asks for δ = 0.5, above "
        "the region's δ = 1e-05",
        "round 1: region eu-west failed: FedprivError: app bundle <path> is not signed by a publisher this region "
        "trusts",
    ], lines
    assert not any("<class" in r.getMessage() or "Traceback" in r.getMessage() for r in caplog.records)
    eu = report.to_dict()["regions"]["eu-west"]["enforcement"]
    assert eu == [{"round": 1, "action": "failed", "reason": "FedprivError: app bundle <path> is not signed by a "
                                                             "publisher this region trusts"}]


def test_flower_results_are_not_printed_twice(caplog):
    """Flower's Strategy.start repeats each round's centralized evaluation and dumps a "Final results:" block."""
    from flwr.common.logger import log

    from fedpriv.server.console import quiet_flower_results

    with caplog.at_level(logging.INFO, logger="flwr"), quiet_flower_results():
        log(logging.INFO, "round %d: global model on %d held-out posts: accuracy %.4f, loss %.4f", 1, 180, 0.9, 0.3)
        log(logging.INFO, "Initial global evaluation results: %s", {"accuracy": 0.5})
        log(logging.INFO, "Global evaluation")
        log(logging.INFO, "\t└──> MetricRecord: %s", {"accuracy": 0.9})
        log(logging.INFO, "Strategy execution finished in %.2fs", 3.0)
        log(logging.INFO, "")
        log(logging.INFO, "Final results:")
        log(logging.INFO, "")
        for line in ("Global Arrays:", "\tArrayRecord (0.07 MB)", "", "Aggregated ServerApp-side Evaluate Metrics:"):
            log(logging.INFO, "\t%s", line)
        log(logging.INFO, "")
        log(logging.WARNING, "run %s: %s", "failed", "no round updated the global model")
    shown = [r.getMessage() for r in caplog.records]
    assert shown == ["round 1: global model on 180 held-out posts: accuracy 0.9000, loss 0.3000",
                     "Strategy execution finished in 3.00s", "", "run failed: no round updated the global model"]


def test_released_local_evaluation_is_listed_as_not_private_in_the_report(tmp_path):
    """The strategy recorded local accuracy but not its label: the report's "What left each region" missed it."""
    from fedpriv.privacy.html_report import render_html
    from fedpriv.strategies.private_fedavg import PrivateFedAvg

    report = RunReport(tmp_path, {}, "rdp", 1e-5, REGIONS)
    report.record_training("us-east", 1, _metrics(), HISTORY)
    report.record_training("eu-west", 1, _metrics(), HISTORY)
    strategy = PrivateFedAvg(report, min_train_regions=1, connect_timeout=1.0)
    md = Metadata(run_id=7, message_id="e1", src_node_id=11, dst_node_id=0, reply_to_message_id="m",
                  group_id="1", created_at=time.time(), ttl=3600, message_type=MessageType.EVALUATE)
    reply = make_message(metadata=md, content=RecordDict({
        contract.METRICS: MetricRecord({contract.NUM_EXAMPLES: 50, contract.EVAL_LOSS: 0.4, contract.EVAL_ACCURACY: 0.8}),
        contract.REGION: ConfigRecord({"name": "us-east"})}))
    strategy.aggregate_evaluate(1, [reply])
    data = load_report(report.write().parent)
    assert data["regions"]["us-east"]["not_private"] == ["eval-accuracy", "eval-loss"]
    assert data["regions"]["eu-west"]["not_private"] == []
    rows = [r for r in data["released"] if "local test split" in r["value"]]
    assert len(rows) == 1 and rows[0]["guarantee"].startswith("not private") and list(rows[0]["regions"]) == ["us-east"]
    md_text = (tmp_path / "privacy_report.md").read_text()
    assert "local test split | not private, allowed by policy | us-east: release-local-evaluation |" in md_text
    html = render_html([data], tmp_path / "r.html").read_text()
    assert "local test split" in html and "not private" in html


def test_a_refused_bundle_is_one_line_in_the_regions_log_not_a_traceback():
    """Flower logs whatever a ClientApp task raised with exc_info (13 lines per round for a refused bundle); the
    region's gate already printed its one `fedpriv: REFUSED app bundle: ...` line, so that record is dropped."""
    import sys

    from fedpriv.core.errors import FedprivError
    from fedpriv.deploy.trusted_exec import _no_traceback_for_refusals

    def record(exc: BaseException) -> logging.LogRecord:
        try:
            raise exc
        except BaseException:
            return logging.LogRecord("flwr", logging.ERROR, __file__, 1, "%s raised an exception", ("ClientApp",),
                                     sys.exc_info())

    assert _no_traceback_for_refusals(record(FedprivError("app bundle x is not signed by a trusted publisher"))) is False
    assert _no_traceback_for_refusals(record(ValueError("a real bug"))) is True  # other errors keep their traceback
    assert _no_traceback_for_refusals(logging.LogRecord("flwr", logging.INFO, __file__, 1, "hello", (), None)) is True


def test_a_deployed_region_logs_each_refusal_as_one_line(capsys):
    """The region's own log (its SuperNode's) keeps one line per refusal or failure; a simulation's console already
    has the coordinator's line for it, so a simulated region prints nothing."""
    from types import SimpleNamespace

    from fedpriv.client.app import _error
    from fedpriv.privacy.policy import PolicyRefusal

    refusal = PolicyRefusal("delta", "the run asks for δ = 0.5, above the region's δ = 1e-05")
    reply = _error(_train_msg(11), "us-east", refusal, SimpleNamespace(node_config={"region": "us-east"}))
    assert reply.error.code == contract.REFUSED
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"fedpriv: region us-east refused train: {contract.POLICY}: {refusal}"], lines
    _error(_train_msg(11), "us-east", refusal, SimpleNamespace(node_config={"partition-id": 0}))
    assert capsys.readouterr().out == ""
