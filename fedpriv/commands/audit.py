"""``fedpriv audit``: a membership-inference attack on a run's final model, on posts and on whole authors, added to its report.

The attack is :mod:`fedpriv.privacy.audit`; reading the run (model, shards) and writing the
report is :mod:`fedpriv.server.audit_run`. This module only parses arguments and prints.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedpriv.commands.registry import command
from fedpriv.core.report_schema import MD_NAME


@command("audit", "Run a loss-threshold membership-inference attack on a run's final model, on posts and on whole "
                  "authors, and add it to the report.")
class AuditCommand:
    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory written by `fedpriv simulate` or `fedpriv run`")
        p.add_argument("--max-examples", type=int, default=1000, metavar="N",
                       help="members sampled across the regions' training data, and as many held-out non-members "
                            "(default: %(default)s)")
        p.add_argument("--max-authors", type=int, default=1000, metavar="N",
                       help="member authors (all of each one's posts) sampled for the author-level attack, and as "
                            "many held-out authors; multi-post authors first (default: %(default)s)")
        p.add_argument("--seed", type=int, default=None, help="sampling seed (default: the run's seed)")
        p.add_argument("--data-dir", type=Path, default=None, metavar="DIR",
                       help="shard root holding regions/<region>/train.jsonl and server/test.jsonl "
                            "(default: the run's data-dir)")
        p.add_argument("--json", action="store_true", help="print the audit as JSON instead of a table")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from fedpriv.commands.report import load_run
        from fedpriv.privacy.audit import format_audit
        from fedpriv.server.audit_run import audit_run, save_audit

        report = load_run(args.run_dir)
        audit = audit_run(args.run_dir, max_examples=args.max_examples, seed=args.seed, data_dir=args.data_dir,
                          report=report, max_authors=args.max_authors)
        path = save_audit(args.run_dir, audit)
        if args.json:
            print(json.dumps(audit, indent=2))
        else:
            print(format_audit(audit))
            print(f"\nadded to {path} (key \"audit\") and {args.run_dir / MD_NAME}")
        return 0
