"""``fedpriv simulate``: run the app on Flower's simulation engine and print the report's location."""

from __future__ import annotations

import argparse

import sys

from fedpriv.commands.options import add_quiet, add_run_config, add_run_dir
from fedpriv.commands.outcome import judge, settle_interrupted
from fedpriv.commands.registry import command
from fedpriv.core.config import parse_overrides
from fedpriv.core.report_schema import MD_NAME


@command("simulate", "Run a local multi-region simulation of the fedpriv app and write its privacy report.")
class SimulateCommand:
    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        add_run_config(p, preset_default="default")
        add_run_dir(p, "run-dir of the run config, else runs/sim-<time>")
        add_quiet(p)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        """Exit status: the report's verdict (:mod:`fedpriv.commands.outcome`): 0 only for ``completed``."""
        from fedpriv.simulations.runner import Simulation

        sim = Simulation(parse_overrides(args.run_config), preset=args.preset, run_dir=args.run_dir)
        try:
            result = sim.run(stream=not args.quiet)
        except KeyboardInterrupt as exc:  # every process of the run is gone: the report must not say "running"
            settle_interrupted(sim.run_dir, f"fedpriv simulate was interrupted ({getattr(exc, 'signal_name', 'SIGINT')})")
            raise
        report = result.run_dir / MD_NAME
        verdict = judge(result.run_dir, result.outcome)
        if verdict.exit_code == 0:
            print(f"\nfedpriv: simulation finished in {result.wall_time_s:.0f}s. Privacy report: {report}", flush=True)
            if report.exists():
                print(report.read_text())
        else:
            print(f"\nfedpriv simulate: run {result.outcome.run_id} {verdict.line}", file=sys.stderr, flush=True)
            print(f"fedpriv simulate: privacy report {report if report.exists() else '(none)'}; "
                  f"logs {result.run_dir / 'superlink.log'}", flush=True)
        return verdict.exit_code
