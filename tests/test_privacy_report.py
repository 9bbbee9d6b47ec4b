"""The privacy report says what happened: no fake ε for DP-off runs, no "only the sum" for rounds in the clear."""

from __future__ import annotations

import json
import math

import pytest

from fedpriv.core.report_schema import load as load_report
from fedpriv.privacy.report import RunReport
from fedpriv.privacy.report_markdown import render_markdown
from fedpriv.privacy.report_view import max_region_epsilon, region_epsilon_series
from fedpriv.server.resume import restore_report

HISTORY = [(1.1, 0.05, 20)]


def _metrics(dp: bool, epsilon: float = 1.25, **extra) -> dict:
    m = {"dp": int(dp), "num-examples": 400, "steps": 20, "noise-multiplier": 1.1 if dp else 0.0,
         "sample-rate": 0.05, "max-grad-norm": 1.0, "max-epsilon": 0.0, **extra}
    if dp:
        m.update({"epsilon": epsilon, "lifetime-epsilon": epsilon})
    return m


def _strict_json(path) -> dict:
    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name} in the report")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_dp_off_region_is_recorded_as_not_private_not_as_a_negative_epsilon(tmp_path):
    report = RunReport(tmp_path, {"dp": False}, "rdp", 1e-5, ["us-east", "eu-west"])
    for rnd in (1, 2):
        report.record_training("us-east", rnd, _metrics(False), [])
        report.record_training("eu-west", rnd, _metrics(True, epsilon=0.5 * rnd), HISTORY)
    report.record_round(1, accuracy=0.7)
    report.record_round(2, accuracy=0.8)
    data = _strict_json(report.write())

    off, on = data["regions"]["us-east"], data["regions"]["eu-west"]
    assert off["dp"] is False and off["epsilon"] is None and off["epsilon_by_round"] == [None, None]
    assert off["budget_left"] is None and off["lifetime_epsilon"] is None
    assert on["dp"] is True and on["epsilon_by_round"] == [0.5, 1.0] and on["epsilon"] == 1.0

    md = (tmp_path / "privacy_report.md").read_text()
    assert "-1.000" not in md
    assert "No differential privacy for us-east" in md
    assert "| us-east | 400 | 0.000 | 0.0500 | 1.000 | 20 | ∞ (DP off) |" in md
    assert "| 2 | ∞ | 1.000 |" in md
    assert max_region_epsilon(data) == math.inf
    assert region_epsilon_series(off) == ([], [])  # the plots use display_regions(): see the next assertion
    from fedpriv.privacy.report_view import display_regions

    assert display_regions(data)["us-east"]["epsilon_by_round"] == [math.inf, math.inf]


def test_reports_from_older_clients_that_sent_minus_one_are_read_as_dp_off(tmp_path):
    report = RunReport(tmp_path, {}, "rdp", 1e-5, ["us-east"])
    legacy = {k: v for k, v in _metrics(True).items() if k != "dp"}
    legacy.update({"epsilon": -1.0, "lifetime-epsilon": -1.0})
    report.record_training("us-east", 1, legacy, [])
    region = _strict_json(report.write())["regions"]["us-east"]
    assert region["dp"] is False and region["epsilon"] is None


def test_resume_keeps_a_dp_off_region_dp_off(tmp_path):
    first = RunReport(tmp_path, {}, "rdp", 1e-5, ["us-east"])
    first.record_training("us-east", 1, _metrics(False), [])
    first.record_round(1, accuracy=0.6)
    first.write()
    resumed = RunReport(tmp_path / "again", {}, "rdp", 1e-5, ["us-east"])
    restore_report(resumed, load_report(tmp_path), upto_round=1)
    region = _strict_json(resumed.write())["regions"]["us-east"]
    assert region["dp"] is False and region["epsilon_by_round"] == [None]


def _secagg_report(tmp_path) -> dict:
    report = RunReport(tmp_path, {}, "rdp", 1e-5, ["us-east", "eu-west", "ap-south"])
    report.secure_aggregation = {
        "enabled": True, "protocol": "SecAgg", "threshold": "majority", "neighbours": "complete",
        "quant_bits": 22, "clip_range": 8.0, "stage_timeout_s": 300.0,
        "rounds": [
            {"round": 1, "mode": "secure", "participants": ["ap-south", "eu-west", "us-east"], "threshold": 2,
             "aborted": False, "survivors": ["ap-south", "eu-west", "us-east"], "dropped": [], "dropped_at": {},
             "error_bound": 3.1e-6, "seconds": 0.8},
            {"round": 2, "mode": "plain", "participants": ["eu-west"],
             "reason": "only 1 region trained; a sum of one update hides nothing"},
            {"round": 3, "mode": "secure", "participants": ["eu-west", "us-east"], "threshold": 2, "aborted": True,
             "reason": "only 1 of 2 regions survived", "dropped_at": {"us-east": "shares: no reply"}, "seconds": 5.0},
        ],
        "rounds_plain": [2], "rounds_aborted": [3],
    }
    for rnd in (1, 2, 3):
        report.record_training("eu-west", rnd, _metrics(True, epsilon=rnd / 2), HISTORY)
        report.record_round(rnd, accuracy=0.7)
    report.write()
    return load_report(tmp_path)


def test_markdown_does_not_claim_only_the_sum_for_rounds_that_fell_back_to_plain_fedavg(tmp_path):
    md = render_markdown(_secagg_report(tmp_path))
    assert "in round(s) 1 the coordinator learned only the **sum**" in md
    assert "In round(s) 2 only one region trained" in md and "the coordinator saw that region's update" in md
    assert "Round(s) 3 aborted" in md
    assert "| 2 | plain (in the clear) | eu-west |" in md
    assert "| 3 | aborted | eu-west, us-east | – | us-east (shares: no reply) |" in md
    assert "| 1 | – | 0.500 | – | secure | 0.700 |" in md


@pytest.mark.parametrize("enabled", [False, True])
def test_secure_aggregation_off_or_all_secure_is_stated_plainly(tmp_path, enabled):
    report = RunReport(tmp_path, {}, "rdp", 1e-5, ["us-east"])
    if enabled:
        report.secure_aggregation = {"enabled": True, "rounds": [
            {"round": 1, "mode": "secure", "participants": ["us-east", "eu-west"], "aborted": False}]}
    report.record_training("us-east", 1, _metrics(True), HISTORY)
    report.record_round(1, accuracy=0.7)
    report.write()
    md = (tmp_path / "privacy_report.md").read_text()
    if enabled:
        assert "only the **sum**" in md and "fell back" not in md and "aborted" not in md
    else:
        assert "Secure aggregation was **off**" in md and "only the **sum**" not in md


def test_html_page_names_the_rounds_the_coordinator_saw_in_the_clear(tmp_path):
    from fedpriv.privacy.html_report import render_html

    page = render_html(_secagg_report(tmp_path), tmp_path / "report.html").read_text()
    assert "in round(s) 1 the coordinator learned only the <i>sum</i>" in page
    assert "In round(s) 2 only one region trained" in page and "Round(s) 3 aborted" in page
    assert "in each round the coordinator" not in page


# -- one schema, one view: every reader and renderer agrees ---------------------------------------------------


def _legacy_run(tmp_path):
    """A report as older fedpriv wrote it for a DP-off region: no ``dp`` flag, ε = -1 as the sentinel."""
    report = RunReport(tmp_path, {}, "rdp", 1e-5, ["us-east", "eu-west"])
    for rnd in (1, 2):
        report.record_training("eu-west", rnd, _metrics(True, epsilon=0.5 * rnd), HISTORY)
        report.record_training("us-east", rnd, _metrics(False), [])
        report.record_round(rnd, accuracy=0.7)
    data = report.to_dict()
    legacy = data["regions"]["us-east"]
    del legacy["dp"]
    legacy.update(epsilon_by_round=[-1.0, -1.0], epsilon=-1.0, lifetime_epsilon=-1.0, budget_left=None)
    del data["released"]  # older reports had no "What left each region" rows
    (tmp_path / "privacy_report.json").write_text(json.dumps(data))
    return data


def test_the_legacy_minus_one_sentinel_is_normalised_once_by_the_schema(tmp_path):
    from fedpriv.core.report_schema import load, normalise
    from fedpriv.privacy.html_report import render_html

    raw = _legacy_run(tmp_path)
    loaded = load(tmp_path)
    region = loaded["regions"]["us-east"]
    assert region["dp"] is False and region["epsilon"] is None and region["epsilon_by_round"] == [None, None]
    assert region["lifetime_epsilon"] is None
    assert normalise(loaded) == loaded  # idempotent
    assert raw["regions"]["us-east"]["epsilon"] == -1.0  # the caller's dict is not changed
    md = render_markdown(loaded)
    assert "-1.000" not in md and "No differential privacy for us-east" in md  # the old Markdown printed ε = -1.000
    assert "| us-east | 400 | 0.000 | 0.0500 | 1.000 | 20 | ∞ (DP off) |" in md
    assert "| 2 | ∞ | 1.000 |" in md
    assert "us-east: no DP guarantee: DP off (ε = ∞)" in md
    assert render_markdown(raw) == md  # renderers given the raw file see the same meanings
    page = render_html(loaded, tmp_path / "r.html").read_text()
    assert "No differential privacy for us-east." in page and "-1.0" not in page
    assert max_region_epsilon(raw) == max_region_epsilon(loaded) == math.inf


def test_markdown_and_html_take_dp_off_and_over_budget_from_the_same_view(tmp_path):
    """A DP-off region is labelled the same in both pages, and a DP region of the same run is not.

    The HTML page used to decide "DP off" from the coordinator's requested config (``dp = false``),
    so it said "DP was off in this run (ε = ∞ for every region)" while a region's own policy had
    kept DP on -- the Markdown, which reads each region's record, said otherwise.
    """
    from fedpriv.privacy.html_report import render_html
    from fedpriv.privacy.report_view import ReportView

    report = RunReport(tmp_path, {"dp": False}, "rdp", 1e-5, ["us-east", "eu-west"])
    report.record_training("us-east", 1, _metrics(False), [])
    report.record_training("eu-west", 1, _metrics(True, epsilon=3.0, **{"max-epsilon": 2.5}), HISTORY)
    report.record_round(1, accuracy=0.7)
    data = report.to_dict()
    view = ReportView(data)
    assert view.dp_off_regions == ["us-east"] and not view.all_dp_off
    assert [(name, cap) for name, _, cap in view.over_budget] == [("eu-west", 2.5)]

    md = render_markdown(view)
    page = render_html(view, tmp_path / "r.html").read_text()
    for text in (md, page):
        assert "No differential privacy for us-east" in text and "for us-east, eu-west" not in text
        assert "∞ (DP off)" in text
        assert "Over budget" in text and "eu-west (ε = 3.000" in text
    assert "ε = ∞ for every region" not in page
    assert md.count("∞ (DP off)") == 3  # this run, cross-check and lifetime columns of us-east only


# -- issue 23: skipped rounds, names, the unit of privacy, everything that left a region ---------------------


def _refusing_run(tmp_path, name: str = "sweep-eps1") -> dict:
    """us-east trains rounds 1-2 and refuses 3-4 (budget); eu-west trains all 4 with deterministic noise."""
    run_dir = tmp_path / name
    report = RunReport(run_dir, {"run-dir": str(run_dir), "job-id": "job-7", "insecure-deterministic-noise": True},
                       "rdp", 1e-5, ["us-east", "eu-west"])
    report.run_id = "13997850836775260851"
    for rnd in (1, 2, 3, 4):
        report.record_training("eu-west", rnd, _metrics(True, epsilon=0.3 * rnd, **{"deterministic-noise": 1}), HISTORY)
        if rnd <= 2:
            report.record_training("us-east", rnd, _metrics(True, epsilon=0.4 * rnd, **{"max-epsilon": 1.0}), HISTORY)
        else:
            report.record_enforcement("us-east", rnd, "refused to train",
                                      "max-lifetime-epsilon: the ledger at /srv/us-east/ledger.sqlite is at ε = 0.8")
        report.record_round(rnd, accuracy=0.6 + 0.05 * rnd, model_updated=True)
    report.write()
    return load_report(run_dir)


def test_skipped_rounds_are_shown_as_skipped_not_as_spending(tmp_path, monkeypatch):
    """The ε plot drew refusals on the budget (cap) line, as if the region had spent up to its cap."""
    from fedpriv.privacy import plots

    data = _refusing_run(tmp_path)
    md = (tmp_path / "sweep-eps1" / "privacy_report.md").read_text()
    assert "| 3 | skipped | 0.900 |" in md and "| 4 | skipped | 1.200 |" in md, md

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, dest: figures.append(fig))
    plots.plot_epsilon(data, tmp_path / "eps.png")
    ax = figures[0].axes[0]
    marks = {c.get_label(): c.get_offsets().tolist() for c in ax.collections}
    assert marks["us-east skipped (no ε spent)"] == [[3.0, 0.8], [4.0, 0.8]]  # at the ε it stood at, not at 1.0
    assert not any(y == 1.0 for points in marks.values() for _, y in points)


def test_runs_are_labelled_by_name_not_by_flower_run_id(tmp_path, monkeypatch):
    from fedpriv.privacy import plots
    from fedpriv.privacy.html_report import render_html

    a, b = _refusing_run(tmp_path, "sweep-eps1"), _refusing_run(tmp_path, "sweep-eps8")
    labels = []
    monkeypatch.setattr(plots, "_label", lambda ax, text, *rest: labels.append(text))
    plots.plot_accuracy_vs_epsilon([a, b], tmp_path / "acc.png")
    assert labels == ["sweep-eps1", "sweep-eps8"]
    html = render_html([a, b], tmp_path / "cmp.html").read_text()
    assert '<a href="#run-0">sweep-eps1</a>' in html and '<a href="#run-1">sweep-eps8</a>' in html
    md = (tmp_path / "sweep-eps1" / "privacy_report.md").read_text()
    assert md.splitlines()[2].startswith("# fedpriv privacy-budget report — sweep-eps1") or \
        "# fedpriv privacy-budget report — sweep-eps1" in md


def test_markdown_states_the_unit_of_privacy_like_the_html(tmp_path):
    data = _refusing_run(tmp_path)
    md = (tmp_path / "sweep-eps1" / "privacy_report.md").read_text()
    assert f"The unit of privacy is **{data['unit_of_privacy']}**" in md


def test_deterministic_noise_and_error_texts_are_in_what_left_each_region(tmp_path):
    """Both left the regions but were missing from "What left each region"; error texts carried file paths."""
    data = _refusing_run(tmp_path)
    rows = {r["value"].split(" (")[0]: r for r in data["released"]}
    noise = rows["whether the region's DP noise was deterministic"]
    assert noise["regions"] == {"us-east": "off", "eu-west": "on: no DP guarantee"}
    errors = rows["the text of the region's refusals and errors"]
    assert errors["guarantee"].startswith("not private") and errors["regions"] == {"us-east": "round(s) 3, 4"}
    text = json.dumps(data) + (tmp_path / "sweep-eps1" / "privacy_report.md").read_text()
    assert "/srv/us-east" not in text and "the ledger at <path> is at ε = 0.8" in text
    md = (tmp_path / "sweep-eps1" / "privacy_report.md").read_text()
    assert "| the text of the region's refusals and errors" in md and "not private: a region's own error text" in md


def test_the_report_states_the_unit_the_regions_trained_at(tmp_path):
    """A region's reply names its unit; the report's guarantee says author-level only when every region trained so."""
    from fedpriv.privacy.report import RunReport
    from fedpriv.privacy.report_markdown import render_markdown

    metrics = {"epsilon": 1.0, "steps": 2, "noise-multiplier": 1.0, "sample-rate": 0.5, "max-grad-norm": 1.0,
               "num-examples": 10, "dp": 1, "delta": 1e-5}
    units = {"author": ("author", "author"), "mixed": ("author", "post"), "post": ("post", None)}
    for case, (first, second) in units.items():
        report = RunReport(tmp_path / case, {}, "pld", 1e-5, ["us-east", "eu-west"])
        report.record_training("us-east", 1, metrics, [(1.0, 0.5, 2)], first)
        report.record_training("eu-west", 1, metrics, [(1.0, 0.5, 2)], second)
        data = report.to_dict()
        md = render_markdown(data)
        if case == "author":
            assert data["unit_of_privacy"].startswith("one author") and "**author-level" in md
            assert "all the posts of any one person" in md
        elif case == "mixed":
            assert data["unit_of_privacy"].startswith("per region") and "us-east one author" in data["unit_of_privacy"]
        else:  # a region that does not say its unit trained per post
            assert data["unit_of_privacy"] == "one record (post) of one region" and "**record-level" in md
