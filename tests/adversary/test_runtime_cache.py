"""A region's runtime kept across rounds (client/runtime_cache.py) must not carry anything into the next release.

The coordinator sends every message; the region reuses its loaded model and features between them. Played
here: (1) a round through a reused runtime releases exactly what a freshly built runtime releases for the
same message (replayable noise, the testing key, so the two releases can be compared value for value);
(2) a round that fails half-way (after Opacus attached its hooks) does not leave its runtime behind;
(3) another run config or a rewritten shard gets a runtime of its own.
"""

from __future__ import annotations

import numpy as np
import pytest
from adversary_support import Region, global_arrays, run_config, shard_root, task_identity  # noqa: F401

from fedpriv.client import runtime_cache
from fedpriv.core import contract
from fedpriv.task.model import from_array_record


@pytest.fixture(autouse=True)
def empty_cache():
    runtime_cache.clear()
    yield
    runtime_cache.clear()


# plain rounds with replayable noise (the testing key), so two releases can be compared value for value
POLICY = {"allow-deterministic-noise": True, "require-secure-aggregation": False}


def _flat(shard_root, tmp_path, **over):
    return run_config(shard_root, tmp_path / "run", **{"insecure-deterministic-noise": True,
                                                       "secure-aggregation": False, **over})


def _values(reply):
    assert not reply.has_error(), reply.error.reason
    return from_array_record(reply.content[contract.ARRAYS])


def test_a_reused_runtime_releases_what_a_fresh_one_releases(shard_root, tmp_path, monkeypatch):
    import fedpriv.client.region as region_mod

    builds = []
    real_build = region_mod.build_model
    monkeypatch.setattr(region_mod, "build_model", lambda *a, **k: (builds.append(1), real_build(*a, **k))[1])
    flat = _flat(shard_root, tmp_path)
    start = global_arrays(flat)
    reused = Region("us-east", shard_root, tmp_path / "a", flat, **POLICY)
    _values(reused.train(start, server_round=1, secagg_round=None))
    second = _values(reused.train(start, server_round=2, secagg_round=None))
    assert len(builds) == 1, "the second round reused the loaded model"

    runtime_cache.clear()
    fresh = Region("us-east", shard_root, tmp_path / "b", flat, **POLICY)
    _values(fresh.train(start, server_round=1, secagg_round=None))
    runtime_cache.clear()  # round 2 from a runtime built for it
    expected = _values(fresh.train(start, server_round=2, secagg_round=None))
    assert len(builds) == 3
    initial = from_array_record(start)
    assert any(np.abs(expected[k] - initial[k]).max() > 1e-4 for k in expected)  # it trained
    for key in expected:
        np.testing.assert_array_equal(second[key], expected[key], err_msg=key)


def test_a_round_that_fails_half_way_leaves_no_runtime_behind(shard_root, tmp_path, monkeypatch):
    import fedpriv.client.trainer as trainer_mod

    flat = _flat(shard_root, tmp_path)
    region = Region("us-east", shard_root, tmp_path / "a", flat, **POLICY)

    def crash(*args, **kwargs):  # Opacus' hooks are on the model by now
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(trainer_mod.LocalTrainer, "_loop", crash)
    with pytest.raises(RuntimeError, match="simulated"):  # Flower's runner turns it into an error reply
        region.train(global_arrays(flat), server_round=1, secagg_round=None)
    assert not runtime_cache._RUNTIMES, "the failed round's runtime (with its hooks) was dropped"
    monkeypatch.undo()
    assert _values(region.train(global_arrays(flat), server_round=1, secagg_round=None))  # the next round trains


def test_another_config_or_a_rewritten_shard_gets_its_own_runtime(shard_root, tmp_path):
    from fedpriv.client.region import identify_region
    from fedpriv.core.config import FedprivConfig
    from fedpriv.task.partition import region_train_path

    flat = _flat(shard_root, tmp_path)
    cfg = FedprivConfig.from_run_config(flat)
    identity = identify_region({"partition-id": 0}, cfg)
    first = runtime_cache.runtime(cfg, identity)
    assert runtime_cache.runtime(cfg, identity) is first
    other = FedprivConfig.from_run_config({**flat, "max-length": 32})
    assert runtime_cache.runtime(other, identify_region({"partition-id": 0}, other)) is not first
    shard = region_train_path(identity.data_root, identity.name)
    shard.write_bytes(shard.read_bytes())  # same content, new modification time: reloaded
    assert runtime_cache.runtime(cfg, identity) is not first
