"""The unit of privacy is the region's: the author by default, and the coordinator cannot move it.

The coordinator asks for post-level training (a weaker unit), a region's prolific author tries to
weigh more than one person, and data with no author column tries to pass as author-level: each is
refused or bounded by the region's own policy, before anything trains or is recorded.
"""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from adversary_support import (REGIONS, Region, WORDS, global_arrays, refusal, run_config,  # noqa: F401 (fixtures)
                               shard_root, task_identity)
from fedpriv.core import contract
from fedpriv.task.data import Example
from fedpriv.task.partition import TEST_FILE, TRAIN_FILE, region_shard_dir
from fedpriv.task.data import write_jsonl


def prolific_shards(root, posts_by_author: dict[str, int]):
    """One region's shard in which each author wrote the given number of posts (every region the same)."""
    rng = random.Random(1)
    for region in REGIONS:
        posts, i = [], 0
        for author, count in posts_by_author.items():
            for _ in range(count):
                posts.append(Example(f"{region}-{i}", " ".join(rng.choice(WORDS) for _ in range(6)), i % 2, "amazon",
                                     1.5 if i % 2 else -1.5, author=author))
                i += 1
        write_jsonl(region_shard_dir(root, region) / TRAIN_FILE, posts)
        write_jsonl(region_shard_dir(root, region) / TEST_FILE, posts[:8])
    return root


def test_the_coordinator_cannot_downgrade_the_unit_to_posts(tmp_path, shard_root):
    flat = run_config(shard_root, tmp_path / "run", **{"privacy-unit": "post"})
    region = Region("us-east", shard_root, tmp_path / "home", flat)  # policy default: privacy-unit = author
    err = refusal(region.train(global_arrays(flat), secagg_round=None))
    assert err.kind == contract.POLICY and "privacy-unit" in err.text
    assert region.releases() == []


def test_nor_upgrade_it_past_what_a_post_level_region_gives(tmp_path, shard_root):
    flat = run_config(shard_root, tmp_path / "run")  # asks for author
    region = Region("us-east", shard_root, tmp_path / "home", flat, **{"privacy-unit": "post"})
    err = refusal(region.train(global_arrays(flat), secagg_round=None))
    assert "privacy-unit" in err.text and region.releases() == []


def test_a_prolific_author_trains_one_post_per_round_and_counts_once(tmp_path):
    from fedpriv.client.region import RegionRuntime, identify_region
    from fedpriv.core.config import FedprivConfig

    authors = {"prolific": 40, **{f"p{i}": 1 for i in range(24)}}
    root = prolific_shards(tmp_path / "shards", authors)
    flat = run_config(root, tmp_path / "run", **{"batch-size": 16, "physical-batch-size": 16})
    region = Region("us-east", root, tmp_path / "home", flat, **{"allow-plain-rounds": True,
                                                                 "require-secure-aggregation": False})
    runtime = RegionRuntime(FedprivConfig.from_run_config(flat), identify_region(region.context.node_config,
                                                                                 FedprivConfig.from_run_config(flat)))
    assert runtime.train_size() == 25  # 25 people: N is counted in authors, whatever the prolific one wrote
    features = runtime._features("train").features
    prolific = {id(f) for f, e in zip(features, runtime.shard.train) if e.author == "prolific"}
    picks = Counter()
    for _ in range(60):
        data = runtime._round_data()
        assert len(data) == 25
        mine = [id(f) for f in data.features if id(f) in prolific]
        assert len(mine) == 1  # never more than one of the prolific author's posts in a round
        picks[mine[0]] += 1
    assert len(picks) > 20  # a fresh choice every round, not one fixed post
    reply = region.train(global_arrays(flat), secagg_round=None)
    assert not reply.has_error(), reply.error.reason
    assert reply.content[contract.METRICS][contract.NUM_EXAMPLES] == 25
    assert str(reply.content[contract.REGION]["privacy-unit"]) == "author"


def test_data_without_an_author_column_is_refused_unless_the_policy_says_each_post_is_its_own(tmp_path, shard_root):
    root = tmp_path / "shards"
    for region in REGIONS:
        for name in (TRAIN_FILE, TEST_FILE):
            rows = [json.loads(line) for line in (region_shard_dir(shard_root, region) / name).read_text().splitlines()]
            target = region_shard_dir(root, region) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "author"}) + "\n" for r in rows))
    flat = run_config(root, tmp_path / "run")
    plain = {"allow-plain-rounds": True, "require-secure-aggregation": False}
    strict = Region("us-east", root, tmp_path / "strict", flat, **plain)
    err = refusal(strict.train(global_arrays(flat), secagg_round=None))
    assert "unnamed-authors" in err.text and strict.releases() == []
    lenient = Region("eu-west", root, tmp_path / "lenient", flat, **{"unnamed-authors": "own-author", **plain})
    reply = lenient.train(global_arrays(flat), secagg_round=None)
    assert not reply.has_error(), reply.error.reason
    assert len(lenient.releases()) == 1


@pytest.mark.parametrize("bound", [0, 2, 4])
def test_a_contribution_bound_other_than_one_is_refused_in_one_line(tmp_path, bound):
    from fedpriv.core.errors import ConfigError
    from fedpriv.privacy.policy import policy_from_mapping

    with pytest.raises(ConfigError, match="max-posts-per-author"):
        policy_from_mapping({"delta": 1e-5, "max-lifetime-epsilon": 8.0, "max-posts-per-author": bound}, "test")
