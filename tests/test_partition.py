"""The region partitioner: deterministic, disjoint, complete, and skewed as configured."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import synthetic_examples
from fedpriv.core.errors import DataError
from fedpriv.task.partition import PartitionSpec, load_region, load_server_test, partition_corpus, write_shards

REGIONS = ("us-east", "eu-west", "ap-south")


def ids(examples):
    return [e.id for e in examples]


def all_ids(part):
    out = ids(part.server_test)
    for shard in part.regions.values():
        out += ids(shard.train) + ids(shard.test)
    return out


def test_same_seed_same_partition_other_seed_differs():
    corpus = synthetic_examples(2000)
    a = partition_corpus(corpus, PartitionSpec(REGIONS, seed=7))
    b = partition_corpus(corpus, PartitionSpec(REGIONS, seed=7))
    c = partition_corpus(corpus, PartitionSpec(REGIONS, seed=8))
    assert all_ids(a) == all_ids(b)
    assert all_ids(a) != all_ids(c)


def test_disjoint_and_covers_everything_outside_the_neutral_band():
    corpus = synthetic_examples(3000)
    part = partition_corpus(corpus, PartitionSpec(REGIONS, neutral_band=0.0))
    got = all_ids(part)
    assert len(got) == len(set(got)), "an example landed in two places"
    assert set(got) == {e.id for e in corpus}
    # the server's held-out set is its own fraction and no region trains on it
    assert abs(len(part.server_test) / len(corpus) - 0.15) < 0.01
    train_ids = {i for s in part.regions.values() for i in ids(s.train)}
    assert not train_ids & set(ids(part.server_test))


def test_neutral_band_drops_weak_ratings():
    corpus = synthetic_examples(1000)
    part = partition_corpus(corpus, PartitionSpec(REGIONS, neutral_band=2.0))
    kept = set(all_ids(part))
    assert kept == {e.id for e in corpus if abs(e.rating) >= 2.0}


def label_spread(part) -> float:
    fractions = [np.mean([e.label for e in s.train]) for s in part.regions.values()]
    return float(np.std(fractions))


def home_domain_share(part) -> float:
    domains = ["tweets", "amazon", "movies", "nyt"]
    shares = []
    for r, shard in enumerate(part.regions.values()):
        shares.append(np.mean([e.domain == domains[r % 4] for e in shard.train]))
    return float(np.mean(shares))


def test_dirichlet_alpha_controls_label_skew():
    corpus = synthetic_examples(4000)
    skewed = [label_spread(partition_corpus(corpus, PartitionSpec(REGIONS, seed=s, dirichlet_alpha=0.1))) for s in range(5)]
    iid = [label_spread(partition_corpus(corpus, PartitionSpec(REGIONS, seed=s, dirichlet_alpha=1000.0))) for s in range(5)]
    assert np.mean(iid) < 0.03
    assert np.mean(skewed) > 3 * np.mean(iid)


def test_domain_skew_puts_the_home_domain_first():
    corpus = synthetic_examples(4000)
    uniform = home_domain_share(partition_corpus(corpus, PartitionSpec(REGIONS, domain_skew=0.0, dirichlet_alpha=1000.0)))
    skewed = home_domain_share(partition_corpus(corpus, PartitionSpec(REGIONS, domain_skew=0.9, dirichlet_alpha=1000.0)))
    assert abs(uniform - 0.25) < 0.05  # four equally frequent domains
    assert skewed > 0.6


def test_shards_round_trip_and_each_region_reads_only_its_own(tmp_path):
    part = partition_corpus(synthetic_examples(600), PartitionSpec(REGIONS))
    write_shards(part, tmp_path)
    for name, shard in part.regions.items():
        loaded = load_region(tmp_path, name)
        assert ids(loaded.train) == ids(shard.train) and ids(loaded.test) == ids(shard.test)
    assert ids(load_server_test(tmp_path)) == ids(part.server_test)
    with pytest.raises(DataError, match="no data for region 'mars'"):
        load_region(tmp_path, "mars")


def test_the_path_helpers_name_the_files_write_shards_writes(tmp_path):
    from fedpriv.task.partition import (partition_meta_path, region_dir, region_shard_dir, region_test_path,
                                        region_train_path, server_test_path)

    part = partition_corpus(synthetic_examples(600), PartitionSpec(REGIONS))
    write_shards(part, tmp_path)
    written = {p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()}
    named = {server_test_path(tmp_path), partition_meta_path(tmp_path)}
    for name in REGIONS:
        named |= {region_train_path(tmp_path, name), region_test_path(tmp_path, name)}
        assert region_dir(tmp_path, name) == region_shard_dir(tmp_path, name)
    assert written == {p.relative_to(tmp_path) for p in named}
    # a deployed region is given its own shard folder: that folder is the region's data for any name
    one = region_shard_dir(tmp_path, REGIONS[0])
    assert region_dir(one, "anything") == one and ids(load_region(one, "x").train) == ids(part.regions[REGIONS[0]].train)
