"""The coordinator sends global weights that are not a valid model (issue 21, attack 6).

Before issue 21 a region trained on NaN, ±inf and 1e300 weights (inf once cast to float32) and on a
broadcastable wrong shape, and recorded the release in its ledger: budget spent, nothing useful released.
Each class of bad weights must now be refused before the ledger is written and before anything trains, with
one line naming the rule and the array, the same line whatever the region's data; and the region's
``max-weight-magnitude`` bound refuses finite weights above it (the crafted 1e38 head of test_crafted_weights.py
among them).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from adversary_support import Region, refusal, run_config, shard_root, task_identity  # noqa: F401
from flwr.app import ConfigRecord, RecordDict

from fedpriv.core import contract
from fedpriv.task.model import build_model, get_trainable, to_array_record

HEAD = "classifier.weight"


def _honest(flat) -> dict[str, np.ndarray]:
    from fedpriv.core.config import FedprivConfig

    cfg = FedprivConfig.from_run_config(flat)
    return dict(get_trainable(build_model(cfg.model, cfg.trainable, cfg.seed, cfg.pooling, cfg.lora_rank)))


def _with(values, name, array):
    return {**values, name: array}


def _poison(value: float):
    def bad(values):
        array = values[HEAD].astype(np.float64 if abs(value) > 3e38 and np.isfinite(value) else np.float32)
        array.flat[7] = value
        return _with(values, HEAD, array)
    return bad


BAD = {
    "nan": (_poison(np.nan), "max-weight-magnitude"),
    "+inf": (_poison(np.inf), "max-weight-magnitude"),
    "-inf": (_poison(-np.inf), "max-weight-magnitude"),
    "1e300 (inf as float32)": (_poison(1e300), "max-weight-magnitude"),
    "over the policy bound": (_poison(100.5), "max-weight-magnitude"),
    "the issue's 2e38 head": (_poison(2e38), "max-weight-magnitude"),
    "missing name": (lambda v: {k: a for k, a in v.items() if k != HEAD}, "model-parameters"),
    "extra name": (lambda v: _with(v, "bert.embeddings.word_embeddings.weight", np.zeros((4, 4), np.float32)),
                   "model-parameters"),
    "wrong shape": (lambda v: _with(v, HEAD, np.ascontiguousarray(v[HEAD].T)), "model-parameters"),
    "broadcastable shape (1, n) for (n,)": (lambda v: _with(v, "classifier.bias", v["classifier.bias"][None, :]),
                                            "model-parameters"),
    "scalar broadcast into a matrix": (lambda v: _with(v, HEAD, np.float32(0.5).reshape(())), "model-parameters"),
    "not real numbers": (lambda v: _with(v, HEAD, v[HEAD].astype(np.bool_)), "model-parameters"),
}


def _other_world(root, dest):
    """The same shards with us-east's first training post replaced by another's (a neighbouring dataset)."""
    from fedpriv.task.partition import region_train_path

    shutil.copytree(root, dest)
    path = region_train_path(dest, "us-east")
    posts = [json.loads(line) for line in path.read_text().splitlines()]
    posts[0] = {**posts[1], "id": posts[0]["id"]}
    path.write_text("".join(json.dumps(post) + "\n" for post in posts))
    return dest


@pytest.mark.parametrize("case", list(BAD))
def test_bad_weights_are_refused_before_the_ledger_and_training(case, shard_root, tmp_path, train_calls):
    corrupt, rule = BAD[case]
    reasons = []
    for world, root in (("a", shard_root), ("b", _other_world(shard_root, tmp_path / "b-shards"))):
        flat = run_config(root, tmp_path / f"run-{world}")
        region = Region("us-east", root, tmp_path / world, flat)
        arrays = to_array_record(corrupt(_honest(flat)))
        err = refusal(region.train(arrays))
        assert err.text.startswith(f"{rule}:"), err.text
        assert region.releases() == [], "bad weights were recorded in the ledger: budget spent for nothing"
        reasons.append(err.text)
    assert train_calls == [], "bad weights were trained on"
    assert reasons[0] == reasons[1], "the refusal must not depend on the region's data"
    assert "\n" not in reasons[0]


def test_honest_weights_within_the_bound_still_train(shard_root, tmp_path, train_calls):
    flat = run_config(shard_root, tmp_path / "run")
    region = Region("us-east", shard_root, tmp_path / "home", flat)
    honest = _honest(flat)
    assert max(float(np.abs(v).max()) for v in honest.values()) < 100
    reply = region.train(to_array_record(honest))
    assert not reply.has_error(), reply.error.reason
    assert len(region.releases()) == 1 and len(train_calls) == 1


def test_the_bound_is_the_regions_own(shard_root, tmp_path, train_calls):
    """A region whose policy sets a lower bound refuses what the default admits."""
    flat = run_config(shard_root, tmp_path / "run")
    region = Region("us-east", shard_root, tmp_path / "home", flat, **{"max-weight-magnitude": 0.5})
    err = refusal(region.train(to_array_record(_poison(0.75)(_honest(flat)))))
    assert err.text.startswith("max-weight-magnitude:") and "0.5" in err.text
    assert region.releases() == [] and train_calls == []


def test_evaluation_refuses_bad_weights_too(shard_root, tmp_path):
    flat = run_config(shard_root, tmp_path / "run")
    region = Region("us-east", shard_root, tmp_path / "home", flat, **{"release-local-evaluation": True})
    arrays = to_array_record(_poison(np.nan)(_honest(flat)))
    err = refusal(region.send("evaluate", RecordDict({contract.ARRAYS: arrays, contract.CONFIG: ConfigRecord({})})))
    assert err.text.startswith("max-weight-magnitude:") and HEAD in err.text
    ok = region.send("evaluate", RecordDict({contract.ARRAYS: to_array_record(_honest(flat)),
                                              contract.CONFIG: ConfigRecord({})}))
    assert not ok.has_error(), ok.error.reason


def test_the_bound_is_checked_after_the_cast_to_float32():
    """1e300 is finite in float64 and inf in float32, the dtype the model computes in."""
    import torch

    from fedpriv.client.incoming import check_incoming
    from fedpriv.privacy.policy import PolicyRefusal

    model = torch.nn.Linear(3, 2)
    values = {"weight": np.zeros((2, 3)), "bias": np.array([0.0, 1e300])}
    assert np.isfinite(values["bias"]).all()
    with pytest.raises(PolicyRefusal, match="'bias' holds values that are not finite as float32"):
        check_incoming(values, model, 100.0)
    check_incoming({"weight": np.zeros((2, 3)), "bias": np.array([0.0, 100.0])}, model, 100.0)  # float64, in bound
