"""Kept local optimizer state (``local-optimizer-state = keep``, client/optimizer_state.py) may carry into a
release only what the region's ledger has accounted, and never leaves the region.

Adam's moments are a function of the noised gradients of every step they saw. If a round's steps were not
recorded (the round was refused after training, or crashed before its release was reserved), moments carried
from it would let a later release depend on the region's data through steps no ε counts. Played here with
real regions (ClientApp, RegionRuntime, ledger) and replayable noise (the testing key, allowed by policy):

1. a round refused *after* it trained (another process released that round meanwhile) leaves no moments:
   the next round trains exactly as with a fresh optimizer;
2. moments whose round is not the job's last recorded release (saved, then a later release recorded without
   them) are not loaded;
3. the moments do carry between accounted rounds (round 2 differs from a fresh optimizer's), and deleting
   them gives exactly the fresh optimizer's round;
4. the reply carries the trainable values only; the state file lies beside the ledger, owner-only, and is
   deleted after the job's last round (a state left on disk is data-derived and 180 MB for the whole encoder).
"""

from __future__ import annotations

import stat

import numpy as np
import pytest
from adversary_support import Region, global_arrays, refusal, run_config, shard_root, task_identity  # noqa: F401

from fedpriv.client import optimizer_state, runtime_cache
from fedpriv.core import contract
from fedpriv.privacy.ledger import PrivacyLedger
from fedpriv.task.model import from_array_record

POLICY = {"allow-deterministic-noise": True, "require-secure-aggregation": False}
ADAM = {"insecure-deterministic-noise": True, "secure-aggregation": False, "local-optimizer": "adam",
        "learning-rate": 1e-2, "momentum": 0.0}


def _flat(shard_root, tmp_path, keep: bool = True, **over):
    return run_config(shard_root, tmp_path / "run", **ADAM,
                      **{"local-optimizer-state": "keep" if keep else "reset", **over})


def _values(reply):
    assert not reply.has_error(), reply.error.reason
    return from_array_record(reply.content[contract.ARRAYS])


def _state_file(region: Region, job: str = "job-1"):
    return optimizer_state.state_file(region.ledger_path, region.name, job)


def _round_two(shard_root, home, flat, between=None):
    """Rounds 1 and 2 of one region from the same global values; ``between(region)`` runs in between."""
    runtime_cache.clear()
    region = Region("us-east", shard_root, home, flat, **POLICY)
    start = global_arrays(flat)
    first = _values(region.train(start, server_round=1, secagg_round=None))
    if between is not None:
        between(region)
    return region, first, region.train(start, server_round=2, secagg_round=None)


def test_moments_carry_between_accounted_rounds_and_a_missing_file_means_fresh(shard_root, tmp_path):
    _, first_reset, reply = _round_two(shard_root, tmp_path / "reset", _flat(shard_root, tmp_path, keep=False))
    fresh = _values(reply)
    region, first_keep, reply = _round_two(shard_root, tmp_path / "keep", _flat(shard_root, tmp_path))
    kept = _values(reply)
    assert _state_file(region).is_file()
    for key in fresh:  # round 1 has nothing to carry
        np.testing.assert_array_equal(first_keep[key], first_reset[key], err_msg=key)
    assert max(np.abs(kept[k] - fresh[k]).max() for k in fresh) > 1e-4, "round 2 used round 1's moments"

    _, _, reply = _round_two(shard_root, tmp_path / "deleted", _flat(shard_root, tmp_path),
                             between=lambda r: _state_file(r).unlink())
    for key, value in _values(reply).items():
        np.testing.assert_array_equal(value, fresh[key], err_msg=key)


def test_a_round_refused_after_training_leaves_no_moments(shard_root, tmp_path, monkeypatch):
    import fedpriv.client.region as region_mod

    flat = _flat(shard_root, tmp_path)
    region = Region("us-east", shard_root, tmp_path / "a", flat, **POLICY)
    start = global_arrays(flat)
    _values(region.train(start, server_round=1, secagg_round=None))
    saved_after_round_1 = _state_file(region).read_bytes()

    real = region_mod.LocalTrainer.train

    def train_while_another_process_releases(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        with PrivacyLedger(region.ledger_path) as ledger:  # round 2 released elsewhere during our training
            first = ledger.releases()[0]
            ledger.record(type(first)(**{**first.__dict__, "round": 2, "created_at": None}))
        return result

    monkeypatch.setattr(region_mod.LocalTrainer, "train", train_while_another_process_releases)
    refusal(region.train(start, server_round=2, secagg_round=None))
    monkeypatch.undo()
    assert _state_file(region).read_bytes() == saved_after_round_1, "the refused round's moments were kept"

    # round 3: the ledger's last release (round 2) has no moments here, so round 3 starts fresh
    seen = []
    monkeypatch.setattr(region_mod.LocalTrainer, "train",
                        lambda self, *a, **k: (seen.append(k.get("optimizer_state")), real(self, *a, **k))[1])
    _values(region.train(start, server_round=3, secagg_round=None))
    assert seen == [None]


def test_moments_that_are_not_of_the_jobs_last_release_are_not_loaded(shard_root, tmp_path, monkeypatch):
    import fedpriv.client.region as region_mod

    flat = _flat(shard_root, tmp_path, **{"num-server-rounds": 5})  # round 4 is not the job's last
    region = Region("us-east", shard_root, tmp_path / "a", flat, **POLICY)
    start = global_arrays(flat)
    _values(region.train(start, server_round=1, secagg_round=None))
    with PrivacyLedger(region.ledger_path) as ledger:  # round 2 reserved, then the process died before saving
        first = ledger.releases()[0]
        ledger.record(type(first)(**{**first.__dict__, "round": 2, "created_at": None}))
    seen = []
    real = region_mod.LocalTrainer.train
    monkeypatch.setattr(region_mod.LocalTrainer, "train",
                        lambda self, *a, **k: (seen.append(k.get("optimizer_state")), real(self, *a, **k))[1])
    _values(region.train(start, server_round=3, secagg_round=None))
    assert seen == [None], "moments of round 1 were carried past the unsaved round 2"
    _values(region.train(start, server_round=4, secagg_round=None))
    assert seen[1] is not None, "round 4 carries round 3's moments"
    # another job on the same data never sees this job's moments
    other = Region("us-east", shard_root, tmp_path / "a", {**flat, "job-id": "job-2"}, **POLICY)
    _values(other.train(start, server_round=1, secagg_round=None))
    assert seen[2] is None


def test_the_moments_stay_in_the_region(shard_root, tmp_path):
    flat = _flat(shard_root, tmp_path)
    region = Region("us-east", shard_root, tmp_path / "a", flat, **POLICY)
    start = global_arrays(flat)
    reply = region.train(start, server_round=1, secagg_round=None)
    assert sorted(_values(reply)) == sorted(from_array_record(start)), "the reply carries the update only"
    assert list(reply.content.array_records) == [contract.ARRAYS]
    path = _state_file(region)
    assert path.parent.parent == region.ledger_path.parent
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    saved = optimizer_state.load_state(path, "job-1", 1)
    assert saved and all(k.split("/", 1)[1] in ("step", "exp_avg", "exp_avg_sq") for k in saved)
    assert not any("optimizer" in k or "exp_avg" in k for k in region.context.state.array_records)


def test_the_jobs_last_round_leaves_no_moments_on_disk(shard_root, tmp_path):
    flat = _flat(shard_root, tmp_path)  # 3 rounds
    region = Region("us-east", shard_root, tmp_path / "a", flat, **POLICY)
    start = global_arrays(flat)
    for server_round in (1, 2):
        _values(region.train(start, server_round=server_round, secagg_round=None))
        assert _state_file(region).is_file()
    _values(region.train(start, server_round=3, secagg_round=None))
    assert not _state_file(region).exists()
    assert not list(_state_file(region).parent.iterdir()), "no partial file either"


def test_a_stale_state_of_an_ended_job_is_pruned_by_any_later_round(shard_root, tmp_path):
    import os

    flat = _flat(shard_root, tmp_path, keep=False)  # this job keeps nothing, yet cleans up after older ones
    region = Region("us-east", shard_root, tmp_path / "a", flat, **POLICY)
    stale = _state_file(region, "ended-job")
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"moments of a job that never ran its last round")
    week_ago = stale.stat().st_mtime - optimizer_state.STALE_AFTER_S - 60
    os.utime(stale, (week_ago, week_ago))
    _values(region.train(global_arrays(flat), server_round=1, secagg_round=None))
    assert not stale.exists()


@pytest.fixture(autouse=True)
def _no_kept_runtimes():
    runtime_cache.clear()
    yield
    runtime_cache.clear()
