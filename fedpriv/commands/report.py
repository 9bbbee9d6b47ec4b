"""``fedpriv report``: render run reports from ``privacy_report.json`` — Markdown, HTML and PNG plots.

For each RUN_DIR: ``privacy_report.md``, a self-contained ``privacy_report.html`` (CSS inline,
plots embedded) and ``epsilon.png`` / ``accuracy.png``. With several RUN_DIRs also a
``comparison.html`` (all runs on one page) and ``accuracy_vs_epsilon.png``, in ``--out`` or else
in the first RUN_DIR. With ``--out`` nothing is written into the run directories: one run's
files go straight into ``--out``, several runs' into ``--out/<run dir name>/``.

Every input is checked before anything is written; a bad one (missing directory, no report,
unreadable JSON, another schema_version) is a one-line error.
"""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path
from typing import Any, Callable

from fedpriv.commands.registry import command
from fedpriv.core import report_schema
from fedpriv.core.errors import FedprivError
from fedpriv.core.files import atomic_write_bytes, atomic_write_text
from fedpriv.core.report_schema import HTML_NAME, JSON_NAME, MD_NAME

EPSILON_PNG = "epsilon.png"
ACCURACY_PNG = "accuracy.png"
COMPARISON_HTML = "comparison.html"
ACC_VS_EPS_PNG = "accuracy_vs_epsilon.png"


@command("report", "Render privacy_report.json as Markdown, a self-contained HTML page and PNG plots.")
class ReportCommand:
    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR",
                       help="run directories written by `fedpriv simulate` or `fedpriv run`")
        p.add_argument("--out", type=Path, default=None, metavar="DIR",
                       help="write everything here instead of into the run directories; with several runs "
                            "each run's files go to DIR/<run dir name>/ (default: each run directory, and the "
                            "comparison into the first)")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        reports = [(run_dir, load_run(run_dir)) for run_dir in args.run_dirs]  # check all before writing any
        for path in render_reports(reports, args.out):
            print(f"wrote {path}")
        return 0


def load_run(run_dir: Path) -> dict[str, Any]:
    """``RUN_DIR/privacy_report.json``, checked well enough to render; every problem is a one-line error."""
    return report_schema.load(run_dir)


def render_reports(reports: list[tuple[Path, dict[str, Any]]], out: Path | None = None) -> list[Path]:
    """Write every output for ``reports`` (pairs of run dir and loaded report); returns the paths written."""
    from fedpriv.privacy import plots
    from fedpriv.privacy.html_report import render_html
    from fedpriv.privacy.report_markdown import render_markdown

    if out is not None and out.exists() and not out.is_dir():
        raise FedprivError(f"--out {out} is a file: expected a directory (it is created if missing)")
    targets = _targets([run_dir for run_dir, _ in reports], out)
    written: list[Path] = []
    for (run_dir, data), target in zip(reports, targets):
        what = f"{run_dir / JSON_NAME}"
        target.mkdir(parents=True, exist_ok=True)
        written.append(atomic_write_text(target / MD_NAME, _render(what, lambda: render_markdown(data))))
        written.append(_render(what, lambda: render_html([data], target / HTML_NAME)))
        written.append(_write_png(target / EPSILON_PNG, what, lambda buf: plots.plot_epsilon(data, buf)))
        written.append(_write_png(target / ACCURACY_PNG, what, lambda buf: plots.plot_accuracy(data, buf)))
    if len(reports) > 1:
        where = out if out is not None else reports[0][0]
        datas = [data for _, data in reports]
        what = ", ".join(str(run_dir) for run_dir, _ in reports)
        written.append(_render(what, lambda: render_html(datas, where / COMPARISON_HTML)))
        written.append(_write_png(where / ACC_VS_EPS_PNG, what, lambda buf: plots.plot_accuracy_vs_epsilon(datas, buf)))
    return written


def _targets(run_dirs: list[Path], out: Path | None) -> list[Path]:
    if out is None:
        return list(run_dirs)
    if len(run_dirs) == 1:
        return [out]
    names: list[str] = []
    for run_dir in run_dirs:
        base = Path(os.path.abspath(run_dir)).name or "run"
        name, n = base, 2
        while name in names:  # two run dirs with the same name (different parents)
            name, n = f"{base}-{n}", n + 1
        names.append(name)
    return [out / name for name in names]


def _render(what: str, fn: Callable[[], Any]) -> Any:
    """Run a renderer; a report whose fields have unexpected types is a user error, not a crash."""
    try:
        return fn()
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        detail = f"missing key {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
        raise FedprivError(f"cannot render {what}: {detail} (expected a schema_version 1 report)") from None


def _write_png(path: Path, what: str, plot: Callable[[io.BytesIO], None]) -> Path:
    buf = io.BytesIO()
    _render(what, lambda: plot(buf))
    return atomic_write_bytes(path, buf.getvalue())


__all__ = ["load_run", "render_reports"]
