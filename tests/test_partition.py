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


def with_authors(corpus, posts_per_author=7):
    """The same posts, written by people with several posts each (one domain per author, as in the corpus)."""
    from dataclasses import replace

    seen: dict[str, int] = {}
    out = []
    for e in corpus:
        n = seen[e.domain] = seen.get(e.domain, -1) + 1
        out.append(replace(e, author=f"{e.domain}-person-{n // posts_per_author}"))
    return out


def sides(part):
    """Which split each author's posts landed on: region/train, region/test or server."""
    from fedpriv.task.data import author_key

    where: dict[str, set[str]] = {}
    for e in part.server_test:
        where.setdefault(author_key(e), set()).add("server")
    for name, shard in part.regions.items():
        for split, posts in (("train", shard.train), ("test", shard.test)):
            for e in posts:
                where.setdefault(author_key(e), set()).add(f"{name}/{split}")
    return where


def test_every_author_lands_in_one_region_on_one_side_of_every_split():
    corpus = with_authors(synthetic_examples(3000))
    part = partition_corpus(corpus, PartitionSpec(REGIONS, seed=3, neutral_band=0.0))
    where = sides(part)
    assert len(where) == len({e.author for e in corpus})
    assert all(len(places) == 1 for places in where.values()), [p for p in where.values() if len(p) > 1][:3]
    assert sorted(all_ids(part)) == sorted(e.id for e in corpus)
    # the post-level split (kept for comparison) does scatter them
    scattered = sides(partition_corpus(corpus, PartitionSpec(REGIONS, seed=3, neutral_band=0.0, split_unit="post")))
    assert sum(len(places) > 1 for places in scattered.values()) > len(scattered) // 2


def test_caps_take_whole_authors():
    corpus = with_authors(synthetic_examples(3000))
    part = partition_corpus(corpus, PartitionSpec(REGIONS, neutral_band=0.0, max_examples_per_region=100,
                                                  max_server_examples=50))
    assert all(len(shard.train) <= 100 and len(shard.test) <= 25 for shard in part.regions.values())
    assert 0 < len(part.server_test) <= 50
    assert all(len(places) == 1 for places in sides(part).values())
    full = {e.author: 0 for e in corpus}
    for e in corpus:
        full[e.author] += 1
    kept = {}
    for shard in part.regions.values():
        for e in shard.train:
            kept[e.author] = kept.get(e.author, 0) + 1
    assert all(kept[a] == full[a] for a in kept)  # nobody is cut in half by a cap


def test_posts_without_an_author_are_their_own_author():
    corpus = synthetic_examples(1500)  # no author named
    by_author = partition_corpus(corpus, PartitionSpec(REGIONS, seed=5))
    by_post = partition_corpus(corpus, PartitionSpec(REGIONS, seed=5, split_unit="post"))
    assert all_ids(by_author) == all_ids(by_post)
    stats = by_author.stats()["us-east"]["authors"]
    assert stats["count"] == by_author.stats()["us-east"]["train"] and stats["named"] == 0
    assert stats["posts_per_author_max"] == 1


def test_region_stats_count_authors_and_their_posts():
    corpus = with_authors(synthetic_examples(3000), posts_per_author=5)
    stats = partition_corpus(corpus, PartitionSpec(REGIONS, neutral_band=0.0)).stats()
    for region in REGIONS:
        authors = stats[region]["authors"]
        assert authors["named"] == authors["count"] > 0
        assert authors["posts_per_author_max"] == 5
        assert authors["posts_per_author_mean"] == pytest.approx(stats[region]["train"] / authors["count"])


def test_the_packaged_corpus_names_reviews_and_editorials_as_authors():
    from fedpriv.task.data import label_examples

    rows = [("amazon-12_3", "t", 1.0, "amazon"), ("nyt-7_1", "t", -1.0, "nyt"), ("tweets-9", "t", 1.0, "tweets"),
            ("movies-4", "t", 1.0, "movies")]
    assert [e.author for e in label_examples(rows)] == ["amazon-review-12", "nyt-editorial-7", None, None]


def test_a_corpus_prepared_before_authors_is_refused(tmp_path):
    from fedpriv.task.data import CORPUS_FILE, load_corpus

    (tmp_path / CORPUS_FILE).write_text('{"id": "a", "text": "t", "label": 1, "domain": "tweets", "rating": 1.0}\n')
    with pytest.raises(DataError, match="re-run `fedpriv prepare-data`"):
        load_corpus(tmp_path)
