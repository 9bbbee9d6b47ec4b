"""``fedpriv simulate``: run the app on Flower's simulation engine and print the report's location."""

from __future__ import annotations

import argparse

from fedpriv.commands.options import add_quiet, add_run_config, add_run_dir
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
        from fedpriv.simulations.runner import Simulation

        sim = Simulation(parse_overrides(args.run_config), preset=args.preset, run_dir=args.run_dir)
        result = sim.run(stream=not args.quiet)
        report = result.run_dir / MD_NAME
        if not result.outcome.succeeded:
            print(f"fedpriv simulate: run {result.outcome.run_id} ended with status {result.outcome.status} "
                  f"{result.outcome.details}; see {result.run_dir}/superlink.log", flush=True)
            return 1
        print(f"\nfedpriv: simulation finished in {result.wall_time_s:.0f}s. Privacy report: {report}", flush=True)
        if report.exists():
            print(report.read_text())
        return 0
