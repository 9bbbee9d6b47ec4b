"""A region whose ledger was damaged trains nothing: it would otherwise spend its budget again.

Real regions (ClientApp, RegionRuntime, tiny model) with a ledger of two releases, then the ledger is emptied
(0 bytes: before this, silently a new, empty ledger, and the region trained again), truncated, overwritten with
random bytes, replaced by an older copy of itself, or deleted. Each time the next round is refused before any
training, the refusal is one line without the region's paths (the log has them), and nothing is written.
"""

from __future__ import annotations

import os
import shutil

import pytest
from adversary_support import Region, global_arrays, refusal, run_config, shard_root, task_identity  # noqa: F401

from fedpriv.core import contract

PLAIN = {"require-secure-aggregation": False}


def _zero(path, old):
    path.write_bytes(b"")


def _truncated(path, old):
    blob = path.read_bytes()
    path.write_bytes(blob[:len(blob) // 2])


def _random(path, old):
    path.write_bytes(os.urandom(path.stat().st_size))


def _rolled_back(path, old):
    shutil.copy(old, path)


def _missing(path, old):
    path.unlink()


@pytest.mark.parametrize("damage", [_zero, _truncated, _random, _rolled_back, _missing],
                         ids=["zero-bytes", "truncated", "random-bytes", "rolled-back", "missing"])
def test_a_damaged_ledger_trains_nothing(shard_root, tmp_path, train_calls, damage):
    flat = run_config(shard_root, tmp_path / "run", **{"secure-aggregation": False, "num-server-rounds": 4})
    region = Region("us-east", shard_root, tmp_path / "home", flat, **PLAIN)
    values = global_arrays(flat)
    reply = region.train(values, server_round=1, secagg_round=None)
    assert not reply.has_error(), reply.error.reason
    old = tmp_path / "round-1-copy.sqlite"
    shutil.copy(region.ledger_path, old)  # a backup taken after round 1 (the ledger is closed between rounds)
    reply = region.train(reply.content[contract.ARRAYS], server_round=2, secagg_round=None)
    assert not reply.has_error(), reply.error.reason
    assert len(train_calls) == 2
    damage(region.ledger_path, old)
    before = region.ledger_path.read_bytes() if region.ledger_path.exists() else None
    err = refusal(region.train(reply.content[contract.ARRAYS], server_round=3, secagg_round=None))
    assert "privacy ledger failed its checks" in err.text and "\n" not in err.text
    assert str(tmp_path) not in err.text  # the path stays in the region's log
    assert len(train_calls) == 2, "the region trained on a damaged ledger"
    assert (region.ledger_path.read_bytes() if region.ledger_path.exists() else None) == before
    from fedpriv.privacy.ledger import anchor_path

    assert anchor_path(region.ledger_path).is_file()
