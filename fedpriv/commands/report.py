"""``fedpriv report``: re-render a run's privacy report from its JSON."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedpriv.cli import command


@command("report", "Re-render privacy_report.md (and HTML/plots where available) from privacy_report.json.")
class ReportCommand:
    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from privacy.report import MD_NAME, load_report, render_markdown

        for run_dir in args.run_dirs:
            data = load_report(run_dir)
            (run_dir / MD_NAME).write_text(render_markdown(data))
            print(f"wrote {run_dir / MD_NAME}")
        return 0
