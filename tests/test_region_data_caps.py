"""A deployed region applies the run's data caps to its own shard, says what it used, and shows progress.

Before (issue 23, item 5): ``fedpriv run --preset smoke`` trained each region on its whole shard (14 886
posts, round 1 silent for ~8.5 minutes of feature extraction) while the report's config claimed 600
examples, and the report's "Data partition" described the coordinator's own files, including a region
that never took part.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import TINY, write_corpus
from fedpriv.client.region import RegionIdentity, RegionRuntime
from fedpriv.core.config import resolve_config
from fedpriv.privacy.policy import policy_from_mapping
from fedpriv.privacy.report import RunReport, declared_partition
from fedpriv.task.data import load_corpus
from fedpriv.task.partition import (RegionShard, cap_shard, partition_corpus, partition_spec, read_partition_stats,
                                    region_shard_dir, write_shards)

POLICY = {"delta": 1e-5, "max-lifetime-epsilon": 50.0, "max-job-epsilon": 50.0}


def _deployed_region(tmp_path: Path, cap: int) -> RegionRuntime:
    """us-east as a deployed SuperNode holds it: its whole shard, prepared without a cap."""
    corpus = write_corpus(tmp_path / "corpus", 1200)
    _, whole = resolve_config({**TINY, "max-examples-per-region": 0})
    root = tmp_path / "prepared"
    write_shards(partition_corpus(load_corpus(corpus), partition_spec(whole)), root)
    _, cfg = resolve_config({**TINY, "max-examples-per-region": cap, "data-dir": str(root),
                             "run-dir": str(tmp_path / "run")})
    shard_dir = region_shard_dir(root, "us-east")  # a region is given only its own shard directory
    identity = RegionIdentity("us-east", 0, shard_dir, tmp_path / "ledger.sqlite", policy_from_mapping(POLICY, "test"))
    return RegionRuntime(cfg, identity)


def test_cap_shard_keeps_a_seeded_subset_and_zero_keeps_all():
    from conftest import synthetic_examples

    shard = RegionShard(train=synthetic_examples(500), test=synthetic_examples(100, seed=1))
    capped = cap_shard(shard, 120, seed=3)
    assert len(capped.train) == 120 and len(capped.test) == 30
    assert {e.id for e in capped.train} <= {e.id for e in shard.train}
    assert [e.id for e in cap_shard(shard, 120, seed=3).train] == [e.id for e in capped.train]
    assert [e.id for e in cap_shard(shard, 120, seed=4).train] != [e.id for e in capped.train]
    assert cap_shard(shard, 0, seed=3) is shard
    assert cap_shard(shard, 10_000, seed=3).train == shard.train


def test_a_deployed_region_trains_on_the_capped_shard_and_declares_that_n(tmp_path, capsys):
    region = _deployed_region(tmp_path, cap=96)
    whole = read_partition_stats(tmp_path / "prepared")["us-east"]["train"]
    assert whole > 300, whole  # the shard itself is much larger than the cap
    assert len(region.shard.train) == 96 and len(region.shard.test) == 24
    from fedpriv.task.model import get_trainable

    outcome = region.train(get_trainable(region.split.model), 1, job_id="job", attempt_id="a1")
    assert outcome.result.num_examples == 96  # N in the train reply: what the region actually used
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("us-east: feature extraction (train): ")]
    assert lines and lines[-1].startswith("us-east: feature extraction (train): 96/96 posts (100%)"), err[-2000:]


def test_the_partition_section_is_what_regions_declared_not_the_coordinators_files(tmp_path):
    prepared = {"us-east": {"train": 14886, "test": 1654, "positive_fraction": 0.6, "domains": {"tweets": 14886}},
                "eu-west": {"train": 96, "test": 24, "positive_fraction": 0.5, "domains": {"movies": 96}},
                "ap-south": {"train": 9000, "test": 1000}, "server": {"test": 4000}}
    report = RunReport(tmp_path, {}, "rdp", 1e-5, ["us-east", "eu-west"])
    report.partition = prepared
    report.run_info["server_test_examples"] = 400
    metrics = {"dp": 1, "steps": 3, "noise-multiplier": 1.0, "sample-rate": 0.1, "max-grad-norm": 1.0, "epsilon": 0.5}
    report.record_training("us-east", 1, {**metrics, "num-examples": 600}, [(1.0, 0.1, 3)])
    report.record_training("eu-west", 1, {**metrics, "num-examples": 96}, [(1.0, 0.1, 3)])
    part = report.to_dict()["partition"]
    assert sorted(part) == ["eu-west", "server", "us-east"]  # ap-south never took part
    assert part["us-east"] == {"train": 600, "source": "declared by the region"}  # not the file's 14 886
    assert part["eu-west"]["train"] == 96 and part["eu-west"]["domains"] == {"movies": 96}
    assert part["server"]["test"] == 400
    md = (report.write().parent / "privacy_report.md").read_text()
    assert "| us-east | 600 | – | – | – |" in md and "14886" not in md and "ap-south" not in md
    assert declared_partition({}, {}, None) == {}


@pytest.mark.parametrize("done, total, expected", [
    (4096, 14886, "us-east: feature extraction (train): 4096/14886 posts (28%), 141s, about 6 min left"),
    (14886, 14886, "us-east: feature extraction (train): 14886/14886 posts (100%), 141s"),
])
def test_progress_lines_are_readable_in_a_log_file(done, total, expected):
    import io

    from fedpriv.task.progress import Progress

    progress = Progress("us-east: feature extraction (train)", total, stream=io.StringIO())
    progress(done)
    assert progress.line(progress.started + 141) == expected
