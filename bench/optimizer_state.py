#!/usr/bin/env python
"""Local DP-Adam with a fresh optimizer every round vs its state kept between rounds (``local-optimizer-state``).

With a fresh optimizer each round, a round's first Adam steps are scaled by moments estimated from one or two
noisy gradients (the first step is ``lr * sign(g)``); kept moments scale them by the noise level the region has
seen (client/optimizer_state.py). This runs the same federated DP-Adam schedule both ways, side by side in one
process, on the default split: fedpriv's own round (:func:`finetune.dp_fl`: ``LocalTrainer``, σ for ε = 8 from
fedpriv's search, the coordinator's update rule), several runs per cell with fresh noise each (a cell's spread
is the noise between runs). Accuracy after the last round, on validation (the regions' local test posts) and on
the server's held-out posts.

Usage: ``python bench/optimizer_state.py`` (CPU: the head on pooled vectors and the top encoder layer; writes
bench/results/optimizer_state_cpu.md), ``--families all --device cuda`` on a GPU, ``--quick`` (tiny model, 256
posts, prints only).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_line, markdown_table, set_threads, write_result  # noqa: E402

MODES = ("reset", "keep")


def families(quick: bool) -> dict[str, tuple[dict, list[float]]]:
    """Name -> (settings, learning rates): local DP-Adam, B 1024, one local epoch a round, as the GPU preset."""
    base = {"local-optimizer": "adam", "momentum": 0.0, "weight-decay": 0.0, "local-epochs": 1.0,
            "batch-size": 1024, "physical-batch-size": 256}
    if quick:
        small = {**base, "batch-size": 64, "physical-batch-size": 64, "num-server-rounds": 3}
        return {"head": ({"trainable": "head", **small}, [1e-2]),
                "all": ({"trainable": "all", **small}, [1e-3])}
    fedavgm = {"server-optimizer": "fedavgm", "server-momentum": 0.5}
    return {"head": ({"trainable": "head", **base, "num-server-rounds": 10}, [1e-2, 3e-2]),
            "top-1": ({"trainable": "top-1", **base, **fedavgm, "physical-batch-size": 64, "num-server-rounds": 10},
                      [3e-3]),
            "all": ({"trainable": "all", **base, **fedavgm, "physical-batch-size": 512, "num-server-rounds": 25},
                    [1e-3])}


def cell(bench, settings: dict, runs: int) -> dict:
    from finetune import dp_fl, held_out
    from gpu_session import dp_base

    val, test, eps, secs = [], [], [], []
    for rep in range(runs):
        res = dp_fl(bench, {**dp_base("pld"), **settings}, "optimizer state", keep_values=True, rep=rep)
        held_out(bench, res)
        val.append(100 * res.val_acc[-1])
        test.append(100 * res.test_acc)
        eps.append(max(res.epsilon.values()))
        secs.append(res.seconds)
        bench.log(f"  {settings['trainable']} lr {settings['learning-rate']} {settings['local-optimizer-state']} "
                  f"run {rep}: val {val[-1]:.2f} held-out {test[-1]:.2f} eps {eps[-1]:.3f} ({secs[-1]:.0f}s)")
    return {"val": val, "test": test, "eps": max(eps), "seconds": statistics.mean(secs)}


def mean_sd(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--families", default="head,top-1", help="comma-separated: head, top-1, all")
    parser.add_argument("--runs", type=int, default=None, help="runs per cell (default 3 for head, 2 for top-1, 1 for all)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None,
                        help="default bench/results/optimizer_state_<device>.md (nothing for --quick)")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    import torch

    from finetune import Bench
    from gpu_assets import partition_splits

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    started = time.time()
    log = lambda m: print(f"[{time.time() - started:6.0f}s] {m}", file=sys.stderr, flush=True)  # noqa: E731
    splits, _ = partition_splits(limit=256 if args.quick else 0)
    bench = Bench(splits.regions, splits.train, splits.local_test, splits.server_test, device,
                  model_name="tiny" if args.quick else "minilm", log=log)
    rows = []
    table = families(args.quick)
    for name in args.families.split(","):
        if name not in table:
            print(f"--families: {name!r} is not one of {', '.join(table)}", file=sys.stderr)
            return 2
        settings, rates = table[name]
        runs = args.runs or (1 if args.quick else {"head": 3, "top-1": 2}.get(name, 1))
        for lr in rates:
            got = {m: cell(bench, {**settings, "learning-rate": lr, "local-optimizer-state": m}, runs) for m in MODES}
            diff = statistics.mean(got["keep"]["val"]) - statistics.mean(got["reset"]["val"])
            rows.append([name, f"{lr:g}", settings["num-server-rounds"], runs,
                         mean_sd(got["reset"]["val"]), mean_sd(got["keep"]["val"]), f"{diff:+.2f}",
                         mean_sd(got["reset"]["test"]), mean_sd(got["keep"]["test"]),
                         f"{got['keep']['eps']:.3f}", f"{got['reset']['seconds']:.0f} / {got['keep']['seconds']:.0f}",
                         device.type])
    body = "\n".join([
        "Generated by `python bench/optimizer_state.py`; do not edit by hand." if not args.quick else
        "`--quick`: tiny subset and model, NOT a result.", "",
        f"Machine: {machine_line([str(device)])}. Total {(time.time() - started) / 60:.0f} min.", "",
        "Federated local DP-Adam on the default split (3 regions), ε = 8 per region (PLD, δ = 1e-5), batch "
        "1024, one local epoch a round; the top encoder layer and the whole encoder with server momentum 0.5 "
        "(as the GPU preset). `reset`: a new Adam every round; `keep`: each region's Adam state kept between its "
        "rounds. Accuracy % after the last round (mean ± sd over fresh-noise runs).", "",
        markdown_table(["trainable", "Adam lr", "rounds", "runs", "validation: reset", "validation: keep",
                        "keep − reset", "held-out: reset", "held-out: keep", "ε (pld)", "s per run: reset / keep",
                        "device"], rows),
    ])
    out = args.out if args.out is not None else (None if args.quick else RESULTS / f"optimizer_state_{device.type}.md")
    write_result("optimizer_state", "Local optimizer state: reset every round vs kept", body, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
