"""HTML privacy report and PNG plots, from hand-built report dicts (no training)."""

from __future__ import annotations

import base64
import math
from html.parser import HTMLParser

import pytest

from fedpriv.privacy import plots
from fedpriv.privacy.html_report import render_html, tpr_bound

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_report(run_id="run-1", eps_scale=1.0, accuracy=(0.66, 0.71, 0.74)) -> dict:
    return {
        "schema_version": 1,
        "run_id": run_id,
        "created": "2025-01-01T12:00:00+00:00",
        "status": "completed",
        "accountant": "rdp",
        "delta": 1e-5,
        "unit_of_privacy": "one record (post) of one region",
        "secure_aggregation": {"enabled": True, "threshold": 2, "quant_bits": 20, "rounds": [
            {"round": r, "mode": "secure", "participants": ["ap-south", "eu-west", "us-east"], "aborted": False}
            for r in (1, 2, 3)], "rounds_plain": [], "rounds_aborted": []},
        "config": {"num-server-rounds": 3, "target-epsilon": 8.0, "batch-size": 256, "regions": "us-east,eu-west,ap-south"},
        "regions": {
            "us-east": {"epsilon_by_round": [1.2 * eps_scale, 1.9 * eps_scale, 2.4 * eps_scale],
                        "steps_by_round": [20, 40, 60], "rounds_participated": [1, 2, 3],
                        "noise_multiplier": 1.1, "sample_rate": 0.02, "max_grad_norm": 1.0, "num_examples": 5000,
                        "target_epsilon": 8.0, "max_epsilon": 10.0, "epsilon": 2.4 * eps_scale,
                        "lifetime_epsilon": 3.1 * eps_scale, "history": [[1.1, 0.02, 60]],
                        "budget_left": 10.0 - 2.4 * eps_scale, "enforcement": []},
            "eu-west": {"epsilon_by_round": [1.5 * eps_scale, 2.2 * eps_scale],
                        "steps_by_round": [18, 36], "rounds_participated": [1, 2],
                        "noise_multiplier": 1.0, "sample_rate": 0.03, "max_grad_norm": 1.0, "num_examples": 4000,
                        "target_epsilon": 8.0, "max_epsilon": 2.5, "epsilon": 2.2 * eps_scale, "budget_left": 0.3,
                        "enforcement": [{"round": 3, "action": "refused",
                                         "reason": "Refused: round 3 would raise ε from 2.2 to 2.7 <above> the budget."}]},
            "ap-south": {"epsilon_by_round": [1.0, 1.6, 2.0], "steps_by_round": [10, 20, 30],
                         "rounds_participated": [1, 2, 3], "noise_multiplier": 1.2, "sample_rate": 0.05,
                         "max_grad_norm": 1.0, "num_examples": 3000, "target_epsilon": 8.0,
                         "max_epsilon": None, "budget_left": None, "epsilon": 2.0, "some_future_key": {"x": 1}},
        },
        "rounds": [
            {"round": i + 1, "accuracy": a, "loss": 0.6 - 0.05 * i,
             "regions_trained": ["us-east", "ap-south"] + (["eu-west"] if i < 2 else []),
             "regions_refused": [] if i < 2 else ["eu-west"], "regions_failed": []}
            for i, a in enumerate(accuracy)
        ],
        "partition": {"us-east": {"train": 5000, "test": 500, "positive_fraction": 0.6, "domains": {"tweets": 1200}},
                      "eu-west": {"train": 4000, "test": 400, "positive_fraction": 0.4, "domains": {"reviews": 900}}},
        "run_info": {"wall_time_s": 300.0, "peak_memory_mb": 2100, "device": "cpu", "model": "minilm",
                     "trainable_params": 1800000},
        "audit": {"auc": 0.51, "tpr_at_1pct_fpr": 0.01, "tpr_at_10pct_fpr": 0.1, "members": 1000, "non_members": 1000},
        "unknown_top_level": [1, 2, 3],
    }


class Collector(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.text: list[str] = []
        self.imgs: list[dict] = []
        self.tags: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(a)
        for key in ("src", "href"):
            v = a.get(key)
            if v and not (v.startswith("data:") or v.startswith("#")):
                self.external.append(v)
        if tag in ("script", "link"):
            self.external.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def parse(path) -> Collector:
    c = Collector()
    c.feed(path.read_text(encoding="utf-8"))
    c.close()
    return c


def _png_of_data_uri(uri: str) -> bytes:
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix)
    return base64.b64decode(uri[len(prefix):], validate=True)


def test_render_single_report(tmp_path):
    out = render_html([make_report()], tmp_path / "report.html")
    page = parse(out)
    text = " ".join(page.text)
    for region in ("us-east", "eu-west", "ap-south"):
        assert region in text
    assert page.imgs and all(_png_of_data_uri(img["src"]).startswith(PNG_MAGIC) for img in page.imgs)
    assert page.external == []  # self-contained
    # the guarantee in plain words
    for phrase in ("record-level (ε, δ)-differential privacy", "one record (post) of one region", "RDP",
                   "coordinator learned only the", "What this does not protect", "plaintext", "Participation",
                   "Membership-inference audit"):
        assert phrase in text, phrase
    assert "1e-05" in text
    # user-supplied text is escaped, not interpreted
    assert "<above>" in text and "above" not in page.tags
    assert "Budget enforcement" in text and "refused" in text
    assert "Over budget" not in text
    assert "ε all runs (ledger)" in text and "3.100" in text  # the ledger's total across runs


def test_render_many_reports_and_tolerates_missing_keys(tmp_path):
    minimal = {"run_id": "bare", "regions": {"us-east": {}}, "rounds": [{"round": 1}], "audit": None,
               "secure_aggregation": {"enabled": False}, "status": "failed"}
    out = render_html([make_report("run-a"), make_report("run-b", 2.0, (0.6, 0.65, 0.69)), minimal],
                      tmp_path / "sub" / "all.html")
    page = parse(out)
    text = " ".join(page.text)
    assert "Runs compared" in text and "run-a" in text and "bare" in text
    assert "did not complete" in text and "was off" in text
    assert "Over budget" in text  # run-b's eu-west ends at ε = 4.4 > its max ε = 2.5
    assert len(page.imgs) == 1 + 2 * 3  # comparison + (ε, accuracy) per run
    for img in page.imgs:
        assert _png_of_data_uri(img["src"]).startswith(PNG_MAGIC)


def test_no_dp_run_is_flagged(tmp_path):
    report = make_report()
    report["config"]["dp"] = False
    for r in report["regions"].values():
        r["noise_multiplier"] = 0.0
        r["epsilon"] = math.inf
    text = " ".join(parse(render_html(report, tmp_path / "r.html")).text)
    assert "No differential privacy" in text


def test_render_needs_a_report(tmp_path):
    with pytest.raises(ValueError):
        render_html([], tmp_path / "x.html")


@pytest.mark.parametrize("plot, arg", [
    (plots.plot_epsilon, make_report()),
    (plots.plot_accuracy, make_report()),
    (plots.plot_accuracy_vs_epsilon, [make_report("a"), make_report("b", 2.0, (0.5, 0.6, 0.7))]),
    (plots.plot_epsilon, {"regions": {}}),  # nothing to show: still a valid PNG
    (plots.plot_accuracy, {}),
    (plots.plot_accuracy_vs_epsilon, [{"run_id": "x"}]),
])
def test_plots_write_valid_pngs(tmp_path, plot, arg):
    out = tmp_path / "nested" / "plot.png"
    plot(arg, out)
    data = out.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC)


def test_report_helpers():
    report = make_report()
    assert plots.max_region_epsilon(report) == pytest.approx(2.4)
    assert plots.final_accuracy(report) == pytest.approx(0.74)
    region = {"epsilon_by_round": [1.0, 2.0], "rounds_participated": [2, 5]}
    assert plots.region_epsilon_series(region) == ([2.0, 5.0], [1.0, 2.0])
    assert plots.region_epsilon_series({"epsilon_by_round": [1.0, 2.0]}) == ([1.0, 2.0], [1.0, 2.0])
    assert plots.region_budget({"max_epsilon": None, "target_epsilon": 8.0}) == (8.0, "target ε")
    # the (ε, δ) hypothesis-testing bound: TPR ≤ e^ε·FPR + δ
    assert tpr_bound(0.01, 0.0, 0.0) == pytest.approx(0.01)
    assert tpr_bound(0.01, 1.0, 1e-5) == pytest.approx(math.e * 0.01 + 1e-5)
    assert tpr_bound(0.5, math.inf, 0.0) == 1.0
