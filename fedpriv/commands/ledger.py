"""``fedpriv ledger``: a region operator's look at, and deliberate reset of, the region's privacy ledger.

* ``show --ledger PATH``: checks the ledger as a region does before every round (format, integrity, hash
  chain, anchor) and prints its releases per job and ε over the whole ledger. It never creates a ledger.
* ``reset --ledger PATH --region NAME``: deletes the ledger, its SQLite side files and its anchor, after the
  operator types the region's name (``--yes`` for scripts). The only way to start a region's budget record
  again: a region never replaces a missing, empty or damaged ledger by itself.
"""

from __future__ import annotations

import argparse
import sys

from fedpriv.commands.registry import command
from fedpriv.core.errors import FedprivError


@command("ledger", "Show a region's privacy ledger, or reset it on purpose (with a confirmation).")
class LedgerCommand:
    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        sub = p.add_subparsers(dest="action", metavar="ACTION")
        sub.required = True
        show = sub.add_parser("show", help="check the ledger and list its releases and ε")
        show.add_argument("--ledger", required=True, metavar="PATH", help="the region's ledger file")
        show.add_argument("--delta", type=float, default=1e-5, help="δ at which to compute ε (default 1e-5: use "
                          "the region policy's delta)")
        show.add_argument("--accountant", choices=("rdp", "prv", "pld"), default="pld",
                          help="accountant for ε (default pld: use the region policy's accountant)")
        reset = sub.add_parser("reset", help="delete the ledger and its anchor: every recorded release is forgotten")
        reset.add_argument("--ledger", required=True, metavar="PATH", help="the region's ledger file")
        reset.add_argument("--region", required=True, metavar="NAME", help="the region the ledger belongs to "
                           "(typed again to confirm)")
        reset.add_argument("--yes", action="store_true", help="do not ask (scripts)")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        return _show(args) if args.action == "show" else _reset(args)


def _show(args: argparse.Namespace) -> int:
    from fedpriv.privacy.ledger import PrivacyLedger, anchor_path, epsilon_of_history

    if not 0.0 < args.delta < 1.0:
        raise FedprivError(f"--delta {args.delta!r}: expected a probability in (0, 1), the region policy's delta")
    with PrivacyLedger(args.ledger, create=False) as ledger:
        rows = ledger.releases()
        print(f"ledger {ledger.path}: {len(rows)} release(s), checked (format, integrity, hash chain, anchor "
              f"{anchor_path(ledger.path).name})")
        jobs: dict[str, list] = {}
        for row in rows:
            jobs.setdefault(row.job, []).append(row)
        for job, releases in jobs.items():
            rounds = ", ".join(str(r.round) for r in releases)
            eps = epsilon_of_history([r.history_entry for r in releases], args.delta, args.accountant)
            print(f"  job {job}: rounds {rounds}; ε = {eps:.4g}")
        total = epsilon_of_history([r.history_entry for r in rows], args.delta, args.accountant)
        print(f"ε over the whole ledger: {total:.4g} at δ = {args.delta:g} ({args.accountant.upper()} accountant)")
    return 0


def _reset(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fedpriv.privacy.ledger import anchor_path, reset_ledger

    path = Path(args.ledger)
    if not path.exists() and not anchor_path(path).exists():
        raise FedprivError(f"--ledger {path}: no ledger and no anchor there: nothing to reset")
    if not args.yes:
        if not sys.stdin.isatty():
            raise FedprivError("ledger reset asks for confirmation on a terminal: pass --yes to reset from a script")
        print(f"This deletes {path} and its anchor: region {args.region} forgets every release it recorded, and its "
              "caps count from zero again.")
        typed = input(f"Type the region's name ({args.region}) to confirm: ").strip()
        if typed != args.region:
            raise FedprivError(f"typed {typed!r}, not the region's name {args.region!r}: nothing was deleted")
    removed = reset_ledger(path)
    print(f"removed {', '.join(str(p) for p in removed) or 'nothing'}; region {args.region} starts a new ledger at "
          "its next round")
    return 0
