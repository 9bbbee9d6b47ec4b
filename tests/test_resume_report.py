"""A resumed run's report keeps every earlier round's record, secure-aggregation rows included (issue 23).

The resumed coordinator restores the report up to its resume round, then describes its secure-aggregation
workflow afresh; before, that description replaced the restored section, and round 1's secure-aggregation row was
lost from the resumed report. ``fedpriv.server.resume.continue_secure_aggregation`` is what the coordinator now
uses (server/coordinator.py): this run's settings, the earlier rounds' rows.
"""

from __future__ import annotations

from fedpriv.core import report_schema
from fedpriv.privacy.report import RunReport
from fedpriv.server.resume import continue_secure_aggregation, restore_report

REGIONS = ["us-east", "eu-west"]


def describe() -> dict:
    return {"enabled": True, "protocol": "SecAgg", "threshold": "majority", "neighbours": "complete", "quant_bits": 24,
            "clip_range": 8.0, "stage_timeout_s": 60.0, "rounds": [], "rounds_plain": [], "rounds_aborted": []}


def test_a_resumed_report_keeps_the_earlier_secure_aggregation_rows(tmp_path):
    first = RunReport(tmp_path, {"job-id": "job-1"}, "pld", 1e-5, REGIONS)
    first.secure_aggregation = describe()
    rows = [{"round": 1, "mode": "secagg", "survivors": REGIONS}, {"round": 2, "mode": "plain", "survivors": ["us-east"]},
            {"round": 3, "mode": "secagg", "aborted": True, "survivors": []}]
    first.secure_aggregation.update(rounds=rows, rounds_plain=[2], rounds_aborted=[3])
    for rnd in (1, 2, 3):
        first.record_round(rnd, secure_aggregation=rows[rnd - 1]["mode"])
    first.write()

    resumed = RunReport(tmp_path, {"job-id": "job-1"}, "pld", 1e-5, REGIONS)
    restore_report(resumed, report_schema.load(tmp_path), upto_round=2)  # round 3 is re-run
    section = continue_secure_aggregation(describe(), resumed.secure_aggregation)
    assert section["rounds"] == rows[:2] and section["rounds_plain"] == [2] and section["rounds_aborted"] == []
    assert section["protocol"] == "SecAgg" and section["enabled"]
    # a run that had no secure aggregation before starts its section empty
    assert continue_secure_aggregation(describe(), {"enabled": False})["rounds"] == []
