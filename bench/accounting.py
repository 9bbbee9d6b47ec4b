#!/usr/bin/env python
"""What the coordinator's privacy report spends on ε each round (privacy/report.py), and what memoising saves.

Every round the report recomputes each region's ε by the cross-check accountant from the region's whole history
(the deciding ε comes from the region). With the default PLD accountant the check is Opacus' PRV, and 94 % of a
stock ``PRVAccountant.get_epsilon`` goes into sizing its domain by an RDP bound over Python series, recomputed
from scratch for every history. fedpriv's PRV (privacy/accountant.py) takes that bound from its memoised RDP curve;
ε is the same to the last digit (tests/test_accountants.py). This times, side by side in one process, a whole run
of the report's checks -- every region, every round, histories exactly as the regions build them (their real
sizes on the default split, σ from fedpriv's own search) -- with the stock accountant and with fedpriv's, memo
cleared first so the first round's full cost is counted.

Usage: ``python bench/accounting.py`` (writes bench/results/accounting_cpu.md, ~2 min on 2 cores);
``--quick`` (the first 3 rounds of each run, prints only); ``--out PATH``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, committed_preset, machine_line, markdown_table, set_threads, write_result  # noqa: E402

REGION_SIZES = {"us-east": 5881, "eu-west": 2885, "ap-south": 6121}  # training posts, default split (seed 42)
RUNS = {"default (CPU demo)": None, "gpu preset": "gpu"}


def region_histories(preset: str | None) -> tuple[dict[str, list[tuple[float, float, int]]], object]:
    """Each region's history after the run's last round, as its ledger holds it: one entry per round."""
    from fedpriv.core.config import resolve_config
    from fedpriv.privacy.schedule import choose_noise_multiplier, region_schedule

    _, cfg = resolve_config(preset=committed_preset(preset) if preset else None)
    histories = {}
    for region, n in REGION_SIZES.items():
        schedule = region_schedule(n, cfg)
        sigma = choose_noise_multiplier(schedule, cfg)
        histories[region] = [(sigma, schedule.sample_rate, schedule.steps_per_round)] * cfg.num_server_rounds
    return histories, cfg


def stock_prv(history, delta: float) -> float:
    """Opacus' own accountant over the compacted history (what fedpriv's PRV computed before memoising)."""
    from opacus.accountants import PRVAccountant

    from fedpriv.privacy.accountant import compact

    accountant = PRVAccountant()
    accountant.history = compact(history)
    return max(0.0, float(accountant.get_epsilon(delta=delta)))


def time_checks(histories, delta: float, rounds: int, epsilon) -> tuple[float, float, float]:
    """Seconds for every region's check after every round; the first round's share; the last round's ε (max)."""
    start = time.perf_counter()
    first = 0.0
    last = 0.0
    for r in range(1, rounds + 1):
        last = max(epsilon(history[:r], delta) for history in histories.values())
        if r == 1:
            first = time.perf_counter() - start
    return time.perf_counter() - start, first, last


def fedpriv_prv(history, delta: float) -> float:
    from fedpriv.privacy.accountant import epsilon_of

    return epsilon_of(history, delta, "prv")


def clear_memos() -> None:
    from fedpriv.privacy import accountant

    accountant._epsilon.cache_clear()
    accountant._rdp_per_step.cache_clear()


def measure(quick: bool) -> list[list[str]]:
    rows = []
    for label, preset in RUNS.items():
        histories, cfg = region_histories(preset)
        rounds = 3 if quick else cfg.num_server_rounds
        clear_memos()
        ours, ours_first, eps_ours = time_checks(histories, cfg.delta, rounds, fedpriv_prv)
        stock, stock_first, eps_stock = time_checks(histories, cfg.delta, rounds, stock_prv)
        assert eps_ours == eps_stock, (eps_ours, eps_stock)
        rows.append([label, f"{len(histories)} × {rounds}", f"{eps_ours:.4f}", f"{stock:.2f}", f"{ours:.2f}",
                     f"{stock / rounds:.3f}", f"{(ours - ours_first) / max(rounds - 1, 1):.3f}",
                     f"{stock / ours:.1f}x"])
        print(" | ".join(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the first 3 rounds of each run; print only")
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/accounting_cpu.md")
    args = parser.parse_args(argv)
    set_threads(2)
    warnings.filterwarnings("ignore", message="Optimal order is the")
    headers = ["run", "regions × rounds", "last ε (PRV, max region)", "stock Opacus PRV, s", "fedpriv PRV, s",
               "stock s / round", "fedpriv s / later round", "speed-up"]
    rows = measure(args.quick)
    body = (f"{machine_line()}\n\nThe privacy report's cross-check ε for every region after every round (PRV, "
            "δ from the config, histories as the regions' ledgers hold them). Same ε from both, checked here.\n\n"
            + markdown_table(headers, rows))
    write_result("accounting_cpu", "Cross-check ε per round: stock Opacus PRV vs fedpriv's memoised domain",
                 body, args.out or (None if args.quick else RESULTS / "accounting_cpu.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
