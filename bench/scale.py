#!/usr/bin/env python
"""How a simulation scales with the number of regions: wall time and memory of the whole process tree.

Real Flower simulations (:class:`fedpriv.simulations.runner.Simulation`: a private
SuperLink, the ServerApp, Ray and its ClientApp actors) with the ``tiny`` preset
(a small random BERT, DP-SGD on), N = 10, 50, 100 regions named ``r000``...,
2 rounds, at most 64 training posts per region, batch 16, ``num-threads = 1`` (so
Ray runs 2 ClientApp actors at once on 2 cores), secure aggregation off and on.

Each simulation runs in a fresh subprocess; this process polls that subprocess
and *all* its descendants (SuperLink, ServerApp, flwr-simulation, Ray GCS/raylet/
dashboard, Ray workers) every 0.5 s with psutil and reports the peak summed RSS
(an upper bound: pages shared between processes, e.g. torch's libraries, count
once per process), the peak summed PSS (shared pages split between the processes
that map them: the honest total) and the lowest memory available on the machine
(other users included). Wall time is ``Simulation.run``'s (SuperLink start to run
end). ``round-timeout`` is raised to 3600 s so a slow round is measured, not cut.

Usage: ``python bench/scale.py`` (writes bench/results/scale.md; about an hour on 2
shared cores) or ``python bench/scale.py --quick`` (one simulation: N = 2, 1 round,
secure aggregation off; prints only -- a real simulation's start-up, SuperLink +
Ray + ServerApp, takes about a minute on an idle 2-core machine, several on a
loaded one). ``--sizes 10,50`` and ``--secagg off`` narrow a run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (RESULTS, ROOT, TreeMemorySampler, fmt_mib, fmt_ratio, fmt_s, machine_line,  # noqa: E402
                     markdown_table, worker_main, write_result)

MAX_EXAMPLES = 64
BATCH = 16


def overrides(n: int, rounds: int, secagg: bool, run_dir: str) -> dict:
    return {"regions": ",".join(f"r{i:03d}" for i in range(n)), "num-server-rounds": rounds,
            "max-examples-per-region": MAX_EXAMPLES, "batch-size": BATCH, "physical-batch-size": BATCH,
            "num-threads": 1, "secure-aggregation": secagg, "fraction-evaluate": 0.0, "round-timeout": 3600.0,
            "run-dir": run_dir}


def worker(spec: dict) -> dict:
    """Run one simulation in this (fresh) process; summarise its outcome from the run report."""
    from fedpriv.simulations.runner import Simulation

    sim = Simulation(overrides(spec["n"], spec["rounds"], spec["secagg"], spec["run_dir"]), preset="tiny",
                     run_dir=Path(spec["run_dir"]))
    t0 = time.time()
    result = sim.run(stream=False)
    out = {"status": result.outcome.status, "details": result.outcome.details[-500:] if result.outcome.details else "",
           "wall_s": result.wall_time_s, "total_s": time.time() - t0}
    from fedpriv.core.report_schema import JSON_NAME, load as load_report

    if (Path(spec["run_dir"]) / JSON_NAME).exists():
        data = load_report(Path(spec["run_dir"]))
        rounds = [r for r in data.get("rounds", []) if r.get("round", 0) > 0]
        out["trained_per_round"] = [len(r.get("regions_trained", [])) for r in rounds]
        out["failed_per_round"] = [len(r.get("regions_failed", [])) + len(r.get("regions_refused", [])) for r in rounds]
        out["accuracy"] = rounds[-1].get("accuracy") if rounds else None
        info = data.get("run_info", {})
        out["coordinator_peak_mb"] = info.get("coordinator_peak_memory_mb")
        out["region_peak_mb"] = info.get("region_peak_memory_mb")
        out["server_wall_s"] = info.get("wall_time_s")
        failures = [e for reg in data.get("regions", {}).values() for e in reg.get("enforcement", [])] \
            if isinstance(data.get("regions"), dict) else []
        out["first_failure"] = str(failures[0])[:300] if failures else ""
    return out


def measure(spec: dict, timeout: float) -> dict:
    """Run ``worker(spec)`` in a subprocess while sampling its whole process tree."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    log = Path(spec["run_dir"]) / "bench-worker.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=fh, text=True, cwd=ROOT)
        with TreeMemorySampler(proc.pid, interval=0.5) as sampler:
            try:
                stdout, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, _ = proc.communicate()
                return {"error": f"timed out after {timeout:.0f}s", "mem": sampler.result}
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = log.read_text(errors="replace").strip().splitlines()[-4:]
        return {"error": f"exit {proc.returncode}: " + " / ".join(tail)[-500:], "mem": sampler.result}
    out = json.loads(lines[-1])
    out["mem"] = sampler.result
    return out


def fit_line(xs, ys):
    """Least-squares y = a + b x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else float("nan")
    return my - b * mx, b


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if worker_main(argv, worker):
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 2; 1 round; secure aggregation off; print only")
    parser.add_argument("--sizes", default=None, help="comma-separated region counts (default 10,50,100)")
    parser.add_argument("--rounds", type=int, default=None, help="server rounds (default 2; quick 1)")
    parser.add_argument("--secagg", choices=("off", "on", "both"), default=None, help="default both; quick off")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per simulation")
    parser.add_argument("--keep", action="store_true", help="keep the run directories")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the Markdown here (default bench/results/scale.md; nothing for --quick)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in (args.sizes or ("2" if args.quick else "10,50,100")).split(",")]
    rounds = args.rounds or (1 if args.quick else 2)
    secagg = args.secagg or ("off" if args.quick else "both")
    modes = {"off": [False], "on": [True], "both": [False, True]}[secagg]
    out = args.out if args.out is not None else (None if args.quick else RESULTS / "scale.md")

    tmp = Path(tempfile.mkdtemp(prefix="fedpriv-bench-scale-"))
    started = time.time()
    results: dict[tuple[int, bool], dict] = {}
    skip_secagg = False
    for n in sizes:
        for sa in modes:
            if sa and skip_secagg:
                results[(n, sa)] = {"error": "skipped: secure aggregation failed at a smaller N"}
                continue
            spec = {"n": n, "rounds": rounds, "secagg": sa, "run_dir": str(tmp / f"n{n}-{'secagg' if sa else 'plain'}")}
            r = measure(spec, args.timeout)
            results[(n, sa)] = r
            ok = "error" not in r and r.get("status") == "finished:completed"
            if sa and not ok:
                skip_secagg = True
            m = r["mem"]
            print(f"N={n} secagg={sa}: {r.get('error') or r.get('status')} wall {r.get('wall_s', float('nan')):.0f}s "
                  f"peak RSS {m.peak_rss_mib:.0f} MiB PSS {m.peak_pss_mib:.0f} MiB procs {m.peak_processes} "
                  f"trained {r.get('trained_per_round')}", file=sys.stderr, flush=True)
    elapsed = time.time() - started

    rows = []
    for (n, sa), r in results.items():
        m = r.get("mem")
        base = results.get((sizes[0], sa))
        if "error" in r or r.get("status") != "finished:completed":
            why = r.get("error") or f"{r.get('status')}: {r.get('details', '')[-200:]}"
            rows.append((n, "on" if sa else "off", "failed", "-", "-", fmt_mib(m.peak_rss_mib) if m else "-",
                         fmt_mib(m.peak_pss_mib) if m else "-", m.peak_processes if m else "-", "-", why.replace("|", "/")))
            continue
        prev = [(pn, results[(pn, sa)]) for pn in sizes if pn < n and results.get((pn, sa), {}).get("wall_s")]
        per = ((r["wall_s"] - prev[-1][1]["wall_s"]) / ((n - prev[-1][0]) * rounds)) if prev else float("nan")
        growth = (fmt_ratio(r["wall_s"] / base["wall_s"]) if base and "wall_s" in base else "-")
        trained = "/".join(str(t) for t in r.get("trained_per_round", [])) + f" of {n}"
        rows.append((n, "on" if sa else "off", fmt_s(r["wall_s"]), growth, fmt_s(per), fmt_mib(m.peak_rss_mib),
                     fmt_mib(m.peak_pss_mib), m.peak_processes, fmt_mib(m.min_available_mib),
                     f"{trained}; acc {100 * r['accuracy']:.1f}%" if r.get("accuracy") is not None else trained))
    table = markdown_table(("regions N", "secure aggregation", "wall time", f"vs N={sizes[0]}",
                            "marginal time per region-round", "peak RSS (sum)", "peak PSS (sum)", "processes",
                            "min available", "regions trained per round"), rows)

    growth_lines = []
    for sa in modes:
        pts = [(n, results[(n, sa)]["wall_s"]) for n in sizes
               if "wall_s" in results.get((n, sa), {}) and results[(n, sa)].get("status") == "finished:completed"]
        if len(pts) >= 2:
            a, b = fit_line([p[0] for p in pts], [p[1] for p in pts])
            mem = [(n, results[(n, sa)]["mem"].peak_pss_mib) for n, _ in pts]
            ma, mb = fit_line([p[0] for p in mem], [p[1] for p in mem])
            growth_lines.append(
                f"- secure aggregation {'on' if sa else 'off'}: wall time ~ {a:.0f} s + {b:.2f} s x N "
                f"(least squares over N = {', '.join(str(p[0]) for p in pts)}; {b / rounds:.2f} s per region-round "
                f"on {os.cpu_count()} cores); peak PSS ~ {ma:.0f} MiB + {mb:.1f} MiB x N.")
    if all((n, True) in results and (n, False) in results for n in sizes):
        for n in sizes:
            on, off = results[(n, True)], results[(n, False)]
            if "wall_s" in on and "wall_s" in off and on.get("status") == off.get("status") == "finished:completed":
                growth_lines.append(f"- N = {n}: secure aggregation costs {fmt_ratio(on['wall_s'] / off['wall_s'])} "
                                    f"the wall time of plain FedAvg, {fmt_ratio(on['mem'].peak_pss_mib / off['mem'].peak_pss_mib)} "
                                    f"the memory.")
    names = []
    for (n, sa), r in results.items():
        m = r.get("mem")
        if m and m.names_at_peak:
            names.append(f"- N = {n}, secure aggregation {'on' if sa else 'off'}: "
                         + ", ".join(f"{k} x{v}" if v > 1 else k for k, v in sorted(m.names_at_peak.items())))
    failures = [f"- N = {n}, secure aggregation {'on' if sa else 'off'}: {r.get('error') or r.get('details') or r.get('first_failure')}"
                for (n, sa), r in results.items() if "error" in r or r.get("status") != "finished:completed"]

    body = "\n".join([
        "Generated by `python bench/scale.py`; do not edit by hand.",
        "",
        f"Machine: {machine_line()}. Total run time {elapsed / 60:.0f} min.",
        "",
        f"Real Flower simulations (private SuperLink, ServerApp, Ray with one ClientApp actor per CPU): preset `tiny` "
        f"(random 2-layer BERT, `trainable = all`, DP-SGD with sigma from the planner for epsilon = 8), {rounds} rounds, "
        f"regions `r000`..., `max-examples-per-region = {MAX_EXAMPLES}`, `batch-size = {BATCH}`, "
        f"`num-threads = 1` (Ray `client-resources-num-cpus = 1`: 2 actors in parallel), `fraction-evaluate = 0`, "
        f"central evaluation on 256 held-out posts after every round. Each simulation ran in a fresh process; its whole "
        f"process tree was polled every 0.5 s. RSS (sum) counts shared pages once per process (upper bound); PSS (sum) "
        f"splits them (the honest total). 'min available' = least memory the machine had free during the run "
        f"(other users of the machine included).",
        "",
        table,
        "",
        "## Growth with N",
        "",
        *growth_lines,
        "",
        "'marginal time per region-round' = extra wall time over the next smaller N, per added region and round.",
        "",
        "## Processes in the measured tree (at the peak-RSS sample)",
        "",
        *names,
        *(["", "## Failures", ""] + failures if failures else []),
    ])
    write_result("scale", "Simulation scale: regions vs wall time and memory", body, out)
    if not args.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"run directories kept under {tmp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
