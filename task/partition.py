"""Split the corpus across regions the way real regional data differs: non-IID.

Each region has a *home domain* (tweets, amazon, movies, nyt, round-robin) and a
label mix drawn from Dirichlet(alpha). An example of domain ``d`` and label ``y``
goes to region ``r`` with probability proportional to

    w_r(d) * p_r(y),   w_r(d) = (1 - domain_skew) / D + domain_skew * [d == home(r)]

so ``domain_skew = 0`` and a large ``alpha`` give IID regions, ``domain_skew = 1``
and a small ``alpha`` give strongly skewed ones. Everything is drawn from one
seeded generator: the same corpus, regions and parameters always give the same
shards. A server-side held-out set is split off first; no region ever trains on it.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from fedpriv.core.errors import DataError
from fedpriv.core.files import atomic_write_text
from fedpriv.task.data import DOMAINS, Example, author_key, jsonl_names_authors, read_jsonl, write_jsonl

if TYPE_CHECKING:
    from fedpriv.core.config import FedprivConfig

PARTITION_FILE = "partition.json"

# The shard layout `fedpriv prepare-data --out ROOT` writes (the one place that spells it):
#   ROOT/regions/<region>/train.jsonl, ROOT/regions/<region>/test.jsonl   one folder per region
#   ROOT/server/test.jsonl                                                the coordinator's held-out set
#   ROOT/partition.json                                                   spec + stats
REGIONS_DIR = "regions"
SERVER_DIR = "server"
TRAIN_FILE = "train.jsonl"
TEST_FILE = "test.jsonl"


@dataclass(frozen=True)
class PartitionSpec:
    """Everything that determines a partition (and so its cache key)."""

    regions: tuple[str, ...]
    seed: int = 42
    neutral_band: float = 0.5
    dirichlet_alpha: float = 1.0
    domain_skew: float = 0.6
    local_test_fraction: float = 0.1
    server_test_fraction: float = 0.15
    max_examples_per_region: int = 0
    max_server_examples: int = 0
    split_unit: str = "author"

    def fingerprint(self, corpus_size: int) -> str:
        blob = json.dumps({**self.__dict__, "regions": list(self.regions), "corpus": corpus_size}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class RegionShard:
    train: list[Example]
    test: list[Example]
    names_authors: bool = True  # the data has an author column (a null author: the post is its own author)


@dataclass
class Partition:
    spec: PartitionSpec
    regions: dict[str, RegionShard]
    server_test: list[Example]

    def stats(self) -> dict[str, dict]:
        """Per-region sizes, label balance and domain mix — these go into the privacy report."""
        out: dict[str, dict] = {}
        for name, shard in self.regions.items():
            labels = [e.label for e in shard.train]
            out[name] = {
                "train": len(shard.train),
                "test": len(shard.test),
                "positive_fraction": round(float(np.mean(labels)) if labels else 0.0, 4),
                "domains": dict(sorted(Counter(e.domain for e in shard.train).items())),
                "authors": author_stats(shard.train),
            }
        out["server"] = {"test": len(self.server_test),
                         "positive_fraction": round(float(np.mean([e.label for e in self.server_test])), 4)}
        return out


def author_stats(posts: Sequence[Example]) -> dict[str, float | int]:
    """How many people wrote ``posts`` and how many posts each: the unit of privacy's view of a shard.

    ``named`` counts authors the data names; the rest are posts that are their own author.
    """
    per_author = Counter(author_key(e) for e in posts)
    counts = list(per_author.values()) or [0]
    return {"count": len(per_author), "named": sum(1 for e in {author_key(e): e for e in posts}.values()
                                                   if e.author is not None),
            "posts_per_author_mean": round(float(np.mean(counts)), 3), "posts_per_author_max": int(max(counts))}


def partition_corpus(corpus: Sequence[Example], spec: PartitionSpec) -> Partition:
    """Deterministic, disjoint split of ``corpus`` into region shards and a server test set.

    With ``split_unit = "author"`` every author's posts land in one region and on one side of
    every split (region train/test, the coordinator's held-out set): a person's posts live in one
    region, and a held-out score is not flattered by sentences of a review the model trained on.
    ``"post"`` splits post by post (the split before authors were known; kept for comparison).
    """
    if not corpus:
        raise DataError("the corpus is empty: re-run `fedpriv prepare-data`")
    corpus = [e for e in corpus if abs(e.rating) >= spec.neutral_band]
    if not corpus:
        raise DataError(f"no posts left after dropping |rating| < neutral-band = {spec.neutral_band}")
    groups = group_posts(corpus, spec.split_unit)
    rng = np.random.default_rng(spec.seed)
    order = [groups[i] for i in rng.permutation(len(groups))]
    n_server = max(1, int(round(spec.server_test_fraction * len(corpus))))
    server, pool = _take_posts(order, n_server)

    assignment = _assign_regions(pool, spec, rng)
    regions: dict[str, RegionShard] = {}
    for r, name in enumerate(spec.regions):
        regions[name] = _split_local([pool[j] for j in np.flatnonzero(assignment == r)], spec, rng)
    server_test = _flat(server)
    if spec.max_server_examples:
        server_test = _flat(_within(server, spec.max_server_examples))
    return Partition(spec=spec, regions=regions, server_test=server_test)


def group_posts(corpus: Sequence[Example], unit: str) -> list[list[Example]]:
    """The corpus as groups that are never split: one per author (first-seen order), or one per post."""
    if unit == "post":
        return [[e] for e in corpus]
    if unit != "author":
        raise DataError(f"split-unit = {unit!r}: expected 'author' or 'post'")
    by_author: dict[str, list[Example]] = {}
    for e in corpus:
        by_author.setdefault(author_key(e), []).append(e)
    return list(by_author.values())


def _flat(groups: Sequence[list[Example]]) -> list[Example]:
    return [e for group in groups for e in group]


def _take_posts(groups: Sequence[list[Example]], n_posts: int) -> tuple[list[list[Example]], list[list[Example]]]:
    """The leading groups holding at least ``n_posts`` posts, and the rest."""
    taken = 0
    for i, group in enumerate(groups):
        if taken >= n_posts:
            return list(groups[:i]), list(groups[i:])
        taken += len(group)
    return list(groups), []


def _within(groups: Sequence[list[Example]], cap: int) -> list[list[Example]]:
    """Whole groups, in order, while they fit in ``cap`` posts (a cap never splits an author)."""
    kept, total = [], 0
    for group in groups:
        if total + len(group) <= cap:
            kept.append(group)
            total += len(group)
    return kept


def _assign_regions(pool: Sequence[list[Example]], spec: PartitionSpec, rng: np.random.Generator) -> np.ndarray:
    """A region per group: P(r) ∝ w_r(domain) · mean over the group's posts of p_r(label)."""
    domains = list(DOMAINS) + sorted({g[0].domain for g in pool} - set(DOMAINS))
    n_regions, n_domains = len(spec.regions), len(domains)
    home = np.arange(n_regions) % n_domains
    domain_w = np.full((n_regions, n_domains), (1.0 - spec.domain_skew) / n_domains)
    domain_w[np.arange(n_regions), home] += spec.domain_skew
    label_p = rng.dirichlet([spec.dirichlet_alpha] * 2, size=n_regions)  # (regions, 2)
    d_index = np.array([domains.index(g[0].domain) for g in pool])
    positive = np.array([np.mean([e.label for e in g]) for g in pool])
    label_w = label_p[:, 1:2] * positive[None, :] + label_p[:, 0:1] * (1.0 - positive[None, :])
    weights = domain_w[:, d_index] * label_w  # (regions, groups)
    weights = weights + 1e-12
    probs = weights / weights.sum(axis=0, keepdims=True)
    cumulative = np.cumsum(probs, axis=0)
    draws = rng.random(len(pool))
    return np.minimum((draws[None, :] > cumulative).sum(axis=0), n_regions - 1)


def _split_local(members: list[list[Example]], spec: PartitionSpec, rng: np.random.Generator) -> RegionShard:
    perm = rng.permutation(len(members))
    members = [members[i] for i in perm]
    n_test = int(round(spec.local_test_fraction * sum(len(g) for g in members)))
    test, train = _take_posts(members, n_test)
    if spec.max_examples_per_region:
        train = _within(train, spec.max_examples_per_region)
        test = _within(test, max(1, spec.max_examples_per_region // 4))
    return RegionShard(train=_flat(train), test=_flat(test))


def write_shards(partition: Partition, out_dir: Path) -> Path:
    """One directory per region (a region's process is given only its own) plus the server's."""
    for name, shard in partition.regions.items():
        write_jsonl(region_shard_dir(out_dir, name) / TRAIN_FILE, shard.train)
        write_jsonl(region_shard_dir(out_dir, name) / TEST_FILE, shard.test)
    write_jsonl(server_test_path(out_dir), partition.server_test)
    meta = {"spec": {**partition.spec.__dict__, "regions": list(partition.spec.regions)},
            "stats": partition.stats()}
    atomic_write_text(partition_meta_path(out_dir), json.dumps(meta, indent=2))
    return out_dir


def region_shard_dir(data_root: Path, region: str) -> Path:
    """Where ``prepare-data`` puts a region's shard: ``<root>/regions/<region>/``."""
    return Path(data_root) / REGIONS_DIR / region


def server_test_path(data_root: Path) -> Path:
    """The coordinator's held-out posts: ``<root>/server/test.jsonl`` (no region trains on them)."""
    return Path(data_root) / SERVER_DIR / TEST_FILE


def partition_meta_path(data_root: Path) -> Path:
    """The partition's spec and stats: ``<root>/partition.json``."""
    return Path(data_root) / PARTITION_FILE


def holds_one_region(data_dir: Path) -> bool:
    """True when ``data_dir`` is itself one region's shard (it holds ``train.jsonl``), as a deployed region is given."""
    return (Path(data_dir) / TRAIN_FILE).exists()


def region_dir(data_root: Path, region: str) -> Path:
    """A region's shard: ``<root>/regions/<region>/`` or ``<root>`` itself if it holds train.jsonl."""
    if holds_one_region(data_root):
        return data_root
    return region_shard_dir(data_root, region)


def region_train_path(data_root: Path, region: str) -> Path:
    return region_dir(data_root, region) / TRAIN_FILE


def region_test_path(data_root: Path, region: str) -> Path:
    return region_dir(data_root, region) / TEST_FILE


def load_region(data_root: Path, region: str) -> RegionShard:
    base = region_dir(data_root, region)
    if not base.is_dir():
        raise DataError(f"no data for region {region!r} under {data_root}: expected {base}/{TRAIN_FILE}")
    return RegionShard(train=read_jsonl(base / TRAIN_FILE), test=read_jsonl(base / TEST_FILE),
                       names_authors=jsonl_names_authors(base / TRAIN_FILE))


def cap_shard(shard: RegionShard, max_examples: int, seed: int) -> RegionShard:
    """The region's own share of a run's ``max-examples-per-region`` cap: at most ``max_examples`` training
    posts and ``max(1, max_examples // 4)`` test posts (as a simulation's partition caps them), chosen by a
    permutation of the public ``seed`` alone (not by the posts' content); ``0`` keeps everything.

    ``fedpriv simulate`` writes capped shards; a deployed region holds its whole shard, so it applies the cap
    itself (``fedpriv run --preset smoke`` trained on 14 886 posts where the config said 600).
    """
    if max_examples <= 0:
        return shard

    def first(examples: list[Example], n: int) -> list[Example]:
        if len(examples) <= n:
            return examples
        keep = np.sort(np.random.default_rng(seed).permutation(len(examples))[:n])
        return [examples[i] for i in keep]

    return RegionShard(train=first(shard.train, max_examples), test=first(shard.test, max(1, max_examples // 4)),
                       names_authors=shard.names_authors)


def load_server_test(data_root: Path) -> list[Example]:
    return read_jsonl(server_test_path(data_root))


def read_partition_stats(data_root: Path) -> dict:
    path = partition_meta_path(data_root)
    return json.loads(path.read_text())["stats"] if path.exists() else {}


def partition_spec(cfg: "FedprivConfig") -> PartitionSpec:
    """The partition a run config asks for (its fingerprint names the shard directory)."""
    return PartitionSpec(regions=cfg.regions, seed=cfg.seed, neutral_band=cfg.neutral_band, dirichlet_alpha=cfg.dirichlet_alpha,
                         domain_skew=cfg.domain_skew, local_test_fraction=cfg.local_test_fraction,
                         server_test_fraction=cfg.server_test_fraction,
                         max_examples_per_region=cfg.max_examples_per_region,
                         max_server_examples=cfg.max_server_examples, split_unit=cfg.split_unit)


def check_prepared_regions(data_root: Path, regions: Sequence[str], batch_size: int, remedy: str) -> None:
    """The run's regions were prepared under ``data_root`` with at least ``batch_size`` training posts each.

    Reads the partition's stats (``partition.json``); nothing to check when there is none (a
    deployed coordinator may hold only the server's held-out set). ``remedy`` ends the one-line
    error for a region that is too small: what the caller's user can change.
    """
    meta = partition_meta_path(data_root)
    if not meta.is_file():
        return
    try:
        stats = json.loads(meta.read_text())["stats"]
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{meta} is unreadable or not a fedpriv partition ({exc}): re-run `fedpriv prepare-data --out`") from None
    prepared = sorted(k for k in stats if k != SERVER_DIR)
    for region in regions:
        if region not in stats:
            raise DataError(f"unknown region {region!r}: {data_root} was prepared for {', '.join(prepared)} "
                            f"(re-run `fedpriv prepare-data --out DIR --regions ...`)")
        n = int(stats[region].get("train", 0))
        if n < batch_size:
            raise DataError(f"region {region!r} has {n} training posts, fewer than batch-size = {batch_size}: "
                            f"expected batch-size <= {n} ({remedy})")

