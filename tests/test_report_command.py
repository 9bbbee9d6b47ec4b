"""``fedpriv report``: Markdown, self-contained HTML and PNG plots from privacy_report.json; one-line errors."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path


from fedpriv.cli import main
from fedpriv.privacy.report_markdown import render_markdown

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]


def make_report(run_id: str, eps: float = 2.0, accuracy: float = 0.7, audit: bool = False) -> dict:
    regions = {
        name: {"epsilon_by_round": [eps * 0.6, eps], "steps_by_round": [10, 20], "rounds_participated": [1, 2],
               "history": [[1.1, 0.05, 20]], "noise_multiplier": 1.1, "sample_rate": 0.05, "max_grad_norm": 1.0,
               "num_examples": 500, "target_epsilon": 8.0, "max_epsilon": 10.0, "lifetime_epsilon": eps,
               "enforcement": [], "local_accuracy_by_round": [], "peak_memory_mb": 300.0, "epsilon": eps,
               "budget_left": 10.0 - eps}
        for name in ("us-east", "eu-west")
    }
    data = {
        "schema_version": 1, "run_id": run_id, "created": "2026-01-01T00:00:00Z", "status": "completed",
        "accountant": "rdp", "delta": 1e-5, "unit_of_privacy": "one record (post) of one region",
        "secure_aggregation": {"enabled": True}, "config": {"model": "tiny", "dp": True}, "regions": regions,
        "rounds": [{"round": 0, "accuracy": 0.5, "loss": 0.69}, {"round": 1, "accuracy": accuracy - 0.05, "loss": 0.6},
                   {"round": 2, "accuracy": accuracy, "loss": 0.55}],
        "partition": {"us-east": {"train": 500, "test": 50, "positive_fraction": 0.5, "domains": {"tweets": 500}}},
        "run_info": {"model": "tiny", "device": "cpu"},
    }
    if audit:
        data["audit"] = {"auc": 0.512, "tpr_at_1pct_fpr": 0.012, "tpr_at_10pct_fpr": 0.11, "advantage": 0.04,
                         "members": 200, "non_members": 200, "epsilon": eps, "delta": 1e-5,
                         "tpr_bound_at_1pct_fpr": 0.0739, "tpr_bound_at_10pct_fpr": 0.739, "bound_check": "consistent"}
    return data


def make_run(path: Path, **kwargs) -> Path:
    path.mkdir(parents=True)
    (path / "privacy_report.json").write_text(json.dumps(make_report(path.name, **kwargs), indent=2))
    return path


class Page(HTMLParser):
    VOID = {"meta", "img", "br", "hr", "link", "input", "col", "source", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.imgs: list[str] = []
        self.external: list[str] = []
        self.text: list[str] = []
        self.doctype = False

    def handle_decl(self, decl):
        self.doctype = decl.lower() == "doctype html"

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        for key in ("src", "href"):
            if a.get(key) and not a[key].startswith(("data:", "#")):
                self.external.append(a[key])
        if tag in ("script", "link", "iframe"):
            self.external.append(tag)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
            return
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def check_html(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    assert page.doctype, "missing <!DOCTYPE html>"
    assert page.errors == [] and page.stack == [], (page.errors, page.stack)  # well nested, all closed
    assert page.external == []  # self-contained
    assert page.imgs
    for src in page.imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1], validate=True).startswith(PNG_MAGIC)
    return page


def check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 2000, path


def test_single_run_writes_markdown_html_and_plots(tmp_path, capsys):
    run = make_run(tmp_path / "run-a", audit=True)
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    for name in ("privacy_report.md", "privacy_report.html", "epsilon.png", "accuracy.png"):
        assert (run / name).exists() and f"wrote {run / name}" in out
    data = json.loads((run / "privacy_report.json").read_text())
    assert (run / "privacy_report.md").read_text() == render_markdown(data)
    page = check_html(run / "privacy_report.html")
    text = " ".join(page.text)
    assert "run-a" in text and "us-east" in text and "Membership-inference audit" in text
    assert len(page.imgs) == 2  # ε and accuracy, embedded
    check_png(run / "epsilon.png")
    check_png(run / "accuracy.png")
    assert not (run / "accuracy_vs_epsilon.png").exists() and not (run / "comparison.html").exists()


def test_several_runs_into_out_dir(tmp_path, capsys):
    runs = [make_run(tmp_path / "a" / "run", eps=1.0, accuracy=0.62), make_run(tmp_path / "b" / "run", eps=4.0)]
    out = tmp_path / "out"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    # with --out nothing is written into the run directories
    for run in runs:
        assert sorted(p.name for p in run.iterdir()) == ["privacy_report.json"]
    # same-named run dirs get distinct subdirectories
    assert sorted(p.name for p in out.iterdir()) == ["accuracy_vs_epsilon.png", "comparison.html", "run", "run-2"]
    for sub in ("run", "run-2"):
        check_html(out / sub / "privacy_report.html")
        check_png(out / sub / "epsilon.png")
        check_png(out / sub / "accuracy.png")
        assert (out / sub / "privacy_report.md").read_text().startswith("# fedpriv privacy-budget report")
    check_png(out / "accuracy_vs_epsilon.png")
    page = check_html(out / "comparison.html")
    assert "Runs compared" in " ".join(page.text)
    assert len(page.imgs) == 1 + 2 * 2
    assert f"wrote {out / 'comparison.html'}" in capsys.readouterr().out


def test_several_runs_comparison_goes_to_first_run_dir(tmp_path):
    first, second = make_run(tmp_path / "r1"), make_run(tmp_path / "r2", eps=5.0)
    assert main(["report", str(first), str(second)]) == 0
    check_png(first / "accuracy_vs_epsilon.png")
    check_html(first / "comparison.html")
    for run in (first, second):
        check_html(run / "privacy_report.html")
        check_png(run / "epsilon.png")
    assert not (second / "comparison.html").exists()


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    cases: dict[str, tuple[Path, str]] = {}

    def run_with(name: str, content: str | bytes) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "privacy_report.json").write_bytes(content.encode() if isinstance(content, str) else content)
        return d

    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    wrong_schema = make_report("x")
    wrong_schema["schema_version"] = 2
    no_regions = make_report("x")
    del no_regions["regions"]
    regions_list = make_report("x")
    regions_list["regions"] = []
    bad_round = make_report("x")
    bad_round["rounds"].append({"accuracy": 0.5})
    bad_enforcement = make_report("x")
    bad_enforcement["regions"]["us-east"]["enforcement"] = [{"round": 2}]  # no action/reason
    cases["missing"] = (tmp_path / "nope", "does not exist")
    cases["file"] = (tmp_path / "file.txt", "is not a directory")
    cases["no json"] = (tmp_path / "empty", "is not a run directory")
    cases["bad json"] = (run_with("badjson", '{"schema_version": 1,'), "is not valid JSON")
    cases["binary"] = (run_with("binary", b"\xff\xfe\x00garbage"), "not UTF-8")
    cases["not an object"] = (run_with("list", "[1, 2]"), "expected an object")
    cases["schema"] = (run_with("schema", json.dumps(wrong_schema)), "schema_version 2, expected 1")
    cases["no schema"] = (run_with("noschema", "{}"), "schema_version None, expected 1")
    cases["missing key"] = (run_with("nokey", json.dumps(no_regions)), "lacks key 'regions'")
    cases["wrong type"] = (run_with("wrongtype", json.dumps(regions_list)), "'regions' is a list")
    cases["bad round"] = (run_with("badround", json.dumps(bad_round)), "integer 'round'")
    cases["render"] = (run_with("render", json.dumps(bad_enforcement)), "cannot render")
    return cases


def test_bad_inputs_are_one_line_errors_and_nothing_is_written(tmp_path, capsys):
    good = make_run(tmp_path / "good")
    for name, (path, expected) in _bad_inputs(tmp_path).items():
        assert main(["report", str(good), str(path)]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("fedpriv report: error: "), (name, err)
        assert expected in err, (name, err)
        assert "Traceback" not in err
        if name != "render":  # inputs are all checked before anything is written
            assert sorted(p.name for p in good.iterdir()) == ["privacy_report.json"], name


def test_out_must_be_a_directory(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    (tmp_path / "out").write_text("")
    assert main(["report", str(run), "--out", str(tmp_path / "out")]) == 2
    assert "is a file" in capsys.readouterr().err


def _fedpriv() -> list[str]:
    script = Path(sys.executable).parent / "fedpriv"
    if script.exists():
        return [str(script)]
    found = shutil.which("fedpriv")
    return [found] if found else [sys.executable, "-m", "fedpriv"]


def test_cli_error_in_a_subprocess(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([*_fedpriv(), "report", "/nonexistent"], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("fedpriv report: error: /nonexistent does not exist")
    assert proc.stdout == ""
