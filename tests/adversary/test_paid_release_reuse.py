"""A paid release is reused, never paid twice: a coordinator that asks for a round again gets the same release.

The coordinator plays retries of every kind -- a resumed job (a new Flower run, so a new attempt id), a lost reply,
a retry carrying *other* global weights -- against real regions (ClientApp, RegionRuntime, ledger, tiny model). Each
retry of a recorded round must come back with the very release the ledger paid for: the same bytes in a plain round,
the same update (masked afresh later) under secure aggregation; no training, no new row, the same ε and history as
the first reply. A resumed job pays exactly its rounds, checked against Opacus' own RDP accountant.
Before this, the ledger keyed releases on ``job/attempt``: a resumed job trained a recorded round again (five
releases for a four-round job).
"""

from __future__ import annotations

import numpy as np
import pytest
from adversary_support import Region, global_arrays, refusal, run_config, shard_root, task_identity  # noqa: F401
from opacus.accountants import RDPAccountant

from fedpriv.client import release_store
from fedpriv.client import secure_aggregation as secagg
from fedpriv.core import contract
from fedpriv.task.model import from_array_record, to_array_record

PLAIN = {"require-secure-aggregation": False, "accountant": "rdp"}
DELTA = 1e-5


def _plain_config(shard_root, tmp_path, **over):
    return run_config(shard_root, tmp_path / "run", **{"secure-aggregation": False, **over})


def _ok(reply):
    assert not reply.has_error(), reply.error.reason
    return reply


def _bytes(reply) -> dict[str, bytes]:
    return {k: v.tobytes() for k, v in from_array_record(reply.content[contract.ARRAYS]).items()}


def _shifted(arrays, by: float):
    return to_array_record({k: v + np.asarray(by, dtype=v.dtype) for k, v in from_array_record(arrays).items()})


def _resume(region: Region, attempt: int) -> None:
    """The job continues under a new Flower run (``fedpriv run --resume``): same job id, new attempt."""
    region.context.run_id = attempt


def opacus_rdp(history) -> float:
    acc = RDPAccountant()
    acc.history = list(history)
    return acc.get_epsilon(delta=DELTA)


def test_a_retried_round_gets_the_same_bytes_no_training_and_no_new_epsilon(shard_root, tmp_path, train_calls):
    flat = _plain_config(shard_root, tmp_path)
    region = Region("us-east", shard_root, tmp_path / "home", flat, **PLAIN)
    start = global_arrays(flat)
    first = _ok(region.train(start, server_round=1, secagg_round=None))
    assert train_calls == ["us-east"] and len(region.releases()) == 1
    for attempt, weights in ((7, start), (8, start), (9, _shifted(start, 0.5))):  # lost reply, resume, other weights
        _resume(region, attempt)
        again = _ok(region.train(weights, server_round=1, secagg_round=None))
        assert _bytes(again) == _bytes(first)  # the release that was paid for, whatever weights the retry sent
        assert dict(again.content[contract.METRICS]) == dict(first.content[contract.METRICS])
        assert list(again.content[contract.REGION]["history"]) == list(first.content[contract.REGION]["history"])
    assert train_calls == ["us-east"], "a retry trained again"
    rows = region.releases()
    assert [(r.run_id, r.round, r.attempt) for r in rows] == [("job-1", 1, "7")]  # one release of (job, round)
    stored = list(release_store.release_dir(region.ledger_path).iterdir())
    assert len(stored) == 1 and (stored[0].stat().st_mode & 0o077) == 0  # owner-only, beside the ledger


def test_a_resumed_job_pays_exactly_its_rounds(shard_root, tmp_path, train_calls):
    flat = _plain_config(shard_root, tmp_path, **{"num-server-rounds": 4})
    region = Region("us-east", shard_root, tmp_path / "home", flat, **PLAIN)
    values = global_arrays(flat)
    for rnd in (1, 2):  # the coordinator dies after round 2 was released: its reply is lost
        reply = _ok(region.train(values, server_round=rnd, secagg_round=None))
    _resume(region, 8)  # --resume from the round-1 checkpoint: round 2 is asked again, then 3 and 4
    for rnd in (2, 3, 4):
        reply = _ok(region.train(values, server_round=rnd, secagg_round=None))
        values = reply.content[contract.ARRAYS]
    rows = region.releases()
    assert [(r.round, r.attempt) for r in rows] == [(1, "7"), (2, "7"), (3, "8"), (4, "8")]
    assert len(train_calls) == 4
    metrics = reply.content[contract.METRICS]
    expected = opacus_rdp([r.history_entry for r in rows])  # an independent accountant over the 4 releases
    assert metrics[contract.EPSILON] == pytest.approx(expected, rel=1e-9)
    assert metrics[contract.STEPS] == sum(r.steps for r in rows)


def test_a_secure_round_retry_masks_the_same_update_afresh(shard_root, tmp_path, train_calls):
    flat = run_config(shard_root, tmp_path / "run")
    region = Region("us-east", shard_root, tmp_path / "home", flat, accountant="rdp")
    start = global_arrays(flat)
    _ok(region.train(start, server_round=1, secagg_round=1))
    kept = np.array(region.context.state[secagg.STATE_UPDATE]["update"].numpy())
    first_seed = int(region.context.state[secagg.STATE_ROUND]["rounding-seed"])
    _resume(region, 8)
    region.context.state = type(region.context.state)()  # a resumed run's context starts empty
    _ok(region.train(_shifted(start, -0.25), server_round=1, secagg_round=1))
    again = np.array(region.context.state[secagg.STATE_UPDATE]["update"].numpy())
    np.testing.assert_array_equal(again, kept)  # the update that was paid for, not one against the new weights
    assert int(region.context.state[secagg.STATE_ROUND]["rounding-seed"]) != first_seed  # masked/rounded afresh
    assert train_calls == ["us-east"] and len(region.releases()) == 1


def test_an_altered_stored_release_is_never_sent_nor_trained_again(shard_root, tmp_path, train_calls):
    flat = _plain_config(shard_root, tmp_path)
    region = Region("us-east", shard_root, tmp_path / "home", flat, **PLAIN)
    start = global_arrays(flat)
    _ok(region.train(start, server_round=1, secagg_round=None))
    (stored,) = release_store.release_dir(region.ledger_path).iterdir()
    blob = bytearray(stored.read_bytes())
    blob[-1] ^= 1
    stored.write_bytes(bytes(blob))
    _resume(region, 8)
    err = refusal(region.train(start, server_round=1, secagg_round=None))
    assert "already released once" in err.text and str(tmp_path) not in err.text
    assert train_calls == ["us-east"] and len(region.releases()) == 1


def test_stored_releases_are_bounded_per_job(shard_root, tmp_path):
    flat = _plain_config(shard_root, tmp_path, **{"num-server-rounds": 4})
    region = Region("us-east", shard_root, tmp_path / "home", flat, **PLAIN)
    values = global_arrays(flat)
    for rnd in (1, 2, 3, 4):
        values = _ok(region.train(values, server_round=rnd, secagg_round=None)).content[contract.ARRAYS]
    names = sorted(p.name for p in release_store.release_dir(region.ledger_path).iterdir())
    assert len(names) == release_store.KEEP_ROUNDS_PER_JOB and ".r000003." in names[0] and ".r000004." in names[1]
    _resume(region, 8)
    err = refusal(region.train(values, server_round=1, secagg_round=None))  # too old to be kept: refused, not re-paid
    assert "already released once" in err.text and len(region.releases()) == 4
