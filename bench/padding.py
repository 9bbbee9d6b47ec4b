#!/usr/bin/env python
"""What cutting each Poisson batch into physical batches by post length saves (client/batching.py).

Opacus' ``BatchMemoryManager`` cuts a logical batch in the order it was drawn, and every physical batch is
padded to its longest post; fedpriv sorts the logical batch by length first (same sample, same clipped sum
and noise: tests/test_batching.py). This measures, side by side in one process, a region's real local DP
round (:class:`fedpriv.client.trainer.LocalTrainer`, us-east's posts from the default split, σ for ε = 8
not needed: a fixed σ = 1) with the batch cut in drawing order and cut by length, for the policies that run
encoder layers in a step, and the tokens each computes per real token (from the sampler's own batches).

Usage: ``python bench/padding.py`` (CPU: writes bench/results/padding_cpu.md, ~6 min on 2 cores with the
prefix features), ``--device cuda`` on a GPU (bench/gpu_session.py section h calls :func:`measure_rows`),
``--quick`` (tiny model, 256 posts, prints only).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_line, markdown_table, set_threads, write_result  # noqa: E402

FAMILIES = {"top-1": ("top-1", 0), "top-1 LoRA r=8": ("top-1", 8), "all": ("all", 0)}


def padded_per_real_token(lengths: list[int], batch: int, physical: int, sort: bool, draws: int = 50,
                          seed: int = 0) -> float:
    """Tokens a step computes per real token: Poisson batches at rate batch / n, cut as BatchMemoryManager cuts."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths_np = np.asarray(lengths)
    padded = real = 0
    for _ in range(draws):
        drawn = lengths_np[rng.random(len(lengths_np)) < batch / len(lengths_np)]
        if sort:
            drawn = np.sort(drawn)
        for chunk in np.array_split(drawn, max(1, -(-len(drawn) // physical))):
            padded += int(chunk.max()) * len(chunk) if len(chunk) else 0
            real += int(chunk.sum())
    return padded / max(real, 1)


def _round_seconds(bench, policy: str, rank: int, physical: int, sort: bool, steps: int, region: str,
                   batch: int, mode: str) -> float:
    import fedpriv.client.trainer as trainer_mod
    from finetune import make_config
    from fedpriv.client.trainer import LocalTrainer
    from fedpriv.task.model import set_trainable_values

    pd = bench.data(policy, rank)
    real = trainer_mod.sort_batches_by_length
    trainer_mod.sort_batches_by_length = real if sort else (lambda loader, lengths: loader)
    try:
        cfg = make_config({"trainable": policy, "lora-rank": rank, "batch-size": batch, "physical-batch-size": physical,
                           "local-steps": steps, "local-optimizer": "adam", "learning-rate": 1e-3,
                           "grad-sample-mode": mode, "dp": True, "noise-multiplier": 1.0})
        set_trainable_values(pd.split.model, pd.initial)
        trainer = LocalTrainer(pd.split, pd.train[region], cfg, bench.device)
        trainer.train([], 1.0, seed=0, label=region)  # warm-up: allocator, kernels, the first pass's caches
        set_trainable_values(pd.split.model, pd.initial)
        t0 = time.perf_counter()
        trainer.train([], 1.0, seed=1, label=region)  # values come back to the host: the device has finished
        return (time.perf_counter() - t0) / steps
    finally:
        trainer_mod.sort_batches_by_length = real


def measure_rows(bench, families: list[str], physicals: list[int], *, steps: int = 2, batch: int = 1024,
                 mode: str = "bk", log=print) -> list[dict]:
    """One row per (family, physical batch): seconds per logical step in drawing order and sorted, and padding."""
    region = bench.regions[0]
    rows = []
    for fam in families:
        policy, rank = FAMILIES[fam]
        lengths = [f.shape[0] for f in bench.data(policy, rank).train[region].features]
        for physical in physicals:
            row = {"family": fam, "physical": physical, "batch": batch, "mode": mode, "region": region,
                   "device": str(bench.device)}
            for sort in (False, True):
                key = "sorted" if sort else "drawn"
                row[f"{key}_s"] = _round_seconds(bench, policy, rank, physical, sort, steps, region, batch, mode)
                row[f"{key}_pad"] = padded_per_real_token(lengths, batch, physical, sort)
            log(f"  {fam} physical {physical}: {row['drawn_s']:.3f} -> {row['sorted_s']:.3f} s per step")
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    return markdown_table(
        ["trainable", "clipping", "logical / physical batch", "tokens per real token: drawing order / sorted",
         "s per step: drawing order", "s per step: sorted", "speed-up", "device"],
        [[r["family"], r["mode"], f"{r['batch']} / {r['physical']}", f"{r['drawn_pad']:.2f} / {r['sorted_pad']:.2f}",
          f"{r['drawn_s']:.3f}", f"{r['sorted_s']:.3f}", f"**{r['drawn_s'] / r['sorted_s']:.2f}x**", r["device"]]
         for r in rows])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--quick", action="store_true", help="tiny model, 256 posts per split, prints only")
    parser.add_argument("--families", default="top-1,top-1 LoRA r=8,all",
                        help=f"comma-separated, of {', '.join(FAMILIES)} (default: all of them)")
    parser.add_argument("--physical-batches", default="64,256")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/padding_<device>.md")
    args = parser.parse_args(argv)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        parser.error(f"--families {unknown[0]!r}: expected some of {', '.join(FAMILIES)}")
    set_threads(args.threads)  # before torch: passive OpenMP waiting (bench/_common.py)
    import torch

    from finetune import Bench
    from gpu_assets import partition_splits

    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and device.type != "cuda":
        parser.error("--device cuda: no CUDA device here")
    torch.set_float32_matmul_precision("high")
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    splits, _ = partition_splits(limit=256 if args.quick else 0)
    bench = Bench(splits.regions, splits.train, splits.local_test, splits.server_test, device,
                  model_name="tiny" if args.quick else "minilm", log=log)
    batch = 64 if args.quick else 1024
    physicals = [int(p) for p in args.physical_batches.split(",")] if not args.quick else [16]
    t0 = time.time()
    rows = measure_rows(bench, families, physicals, steps=args.steps, batch=batch, log=log)
    body = "\n".join([
        "Generated by `python bench/padding.py`; do not edit by hand.", "",
        machine_line([f"total {time.time() - t0:.0f} s"]), "",
        f"One region's local DP round ({rows[0]['region'] if rows else '-'}, the default split's posts: 25 tokens on "
        "average, at most 64) through `LocalTrainer`, Adam, σ = 1, a warm-up round first; seconds per logical step "
        "of the timed round. *Drawing order*: Opacus' BatchMemoryManager cuts the Poisson batch as drawn; "
        "*sorted*: fedpriv's client/batching.py sorts it by length first (the same release: tests/test_batching.py). "
        "Tokens per real token: what each way pads, from 50 Poisson draws of the same posts.", "",
        table(rows)])
    out = None if args.quick else (args.out or RESULTS / f"padding_{device.type}.md")
    write_result("padding", "Length-sorted physical batches: less padding, the same release", body, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
