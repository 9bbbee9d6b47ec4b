"""An active coordinator crafts finite global weights that overflow on one target post (issue 21, attack 1).

The attacker knows the target's post (its features are public to it in this test) and builds a head in
which two units fire only on it (``tanh`` saturated at +1 there, -1 on every other post), two always fire,
and the classifier's first row holds 1e38 on all four: the target's logit is 4e38 = inf, every other
post's is 0. Before issue 21 the target's clip factor was NaN and so was the whole clipped sum: the
region's release was NaN exactly when the target was in its data (a membership test DP forbids).

Each test runs the real :class:`~fedpriv.client.trainer.LocalTrainer` (or the real ClientApp of a region
with its own policy file) on a world with the target and one without it, with the weight projection off
(``max_weight_magnitude = inf``: clipping must contain the overflow by itself) in every clipping mode:
book-keeping (fp32 and bf16), Opacus' hooks, ghost clipping, and LoRA adapters.
"""

from __future__ import annotations

import functools
import json
import math
import shutil

import numpy as np
import pytest
import torch
from adversary_support import Region, run_config, shard_root, task_identity  # noqa: F401
from conftest import TINY
from flwr.app import ArrayRecord

from fedpriv.client.trainer import LocalTrainer
from fedpriv.core import contract
from fedpriv.core.config import resolve_config
from fedpriv.task.features import FeatureDataset, SplitClassifier, collate_features
from fedpriv.task.model import build_model, from_array_record, get_trainable, to_array_record

HUGE = 1e38
N = 24
MODES = [("bk", "off", 0), ("bk", "bf16", 0), ("hooks", "off", 0), ("ghost", "off", 0),
         ("bk", "off", 4), ("hooks", "off", 4), ("ghost", "off", 4)]


@functools.cache
def _world() -> tuple[list[np.ndarray], list[int], np.ndarray]:
    """Honest posts' features and labels, and the target's features (distinct from everyone's)."""
    rng = np.random.default_rng(0)
    honest = [rng.standard_normal((int(rng.integers(3, 9)), 32)).astype(np.float16) for _ in range(N)]
    target = (3 * rng.standard_normal((5, 32))).astype(np.float16)
    return honest, [int(i % 3 == 0) for i in range(N)], target  # unbalanced: the honest sum is not 0


def _split(lora_rank: int) -> SplitClassifier:
    trainable = "top-1" if lora_rank else "all"
    return SplitClassifier(build_model("tiny", trainable, seed=0, pooling="mean", lora_rank=lora_rank), trainable)


def head_inputs(top: torch.nn.Module, data: FeatureDataset) -> torch.Tensor:
    """What the head's dense layer sees for each post (the attacker runs the public model on public posts)."""
    seen = []
    handle = top.dense.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    with torch.no_grad():
        top(**collate_features([data[i] for i in range(len(data))]))
    handle.remove()
    return seen[0].float()


def craft(top: torch.nn.Module, pooled: torch.Tensor, target: int) -> None:
    """Units 0-1 fire (+1) on ``pooled[target]`` only (-1 elsewhere), units 2-3 always; logit 0 = 1e38 x each."""
    others = torch.cat([pooled[:target], pooled[target + 1:]])
    u = pooled[target] - others.mean(0)
    u = u / u.norm()
    gap = float(u @ pooled[target] - (others @ u).max())
    assert gap > 0, "the target must be separable for the attack to be the issue's"
    theta, scale = float(u @ pooled[target]) - gap / 2, 80.0 / gap
    with torch.no_grad():
        for p in list(top.dense.parameters()) + list(top.classifier.parameters()):
            p.zero_()
        top.dense.weight[:2] = scale * u
        top.dense.bias[:2] = -scale * theta
        top.dense.bias[2:4] = 100.0
        top.classifier.weight[0, :4] = HUGE


def _config(mode: str, precision: str, lora_rank: int, n: int, **over):
    _, cfg = resolve_config({**TINY, "trainable": "top-1" if lora_rank else "all", "lora-rank": lora_rank,
                             "grad-sample-mode": mode, "mixed-precision": precision, "batch-size": n,
                             "physical-batch-size": n, "local-steps": 1, "learning-rate": 1.0, "momentum": 0.0,
                             "max-grad-norm": 1.0, "insecure-deterministic-noise": True, **over})
    return cfg


def release(mode: str, precision: str, lora_rank: int, with_target: bool, sigma: float = 1.0):
    """(start, TrainResult) of one DP step on the world with or without the target, under crafted weights."""
    honest, labels, target = _world()
    data = FeatureDataset(honest + ([target] if with_target else []), labels + ([1] if with_target else []))
    split = _split(lora_rank)
    craft(split.top, head_inputs(split.top, FeatureDataset(honest + [target], labels + [1])), target=N)
    start = get_trainable(split.model)
    cfg = _config(mode, precision, lora_rank, len(data))
    trainer = LocalTrainer(split, data, cfg, torch.device("cpu"), max_weight_magnitude=math.inf)
    return start, trainer.train([], noise_multiplier=sigma, seed=3)


def test_the_crafted_weights_overflow_the_target_alone():
    """The attack is the issue's: the target's logit is inf, every other post's is finite."""
    honest, labels, target = _world()
    split = _split(0)
    data = FeatureDataset(honest + [target], labels + [1])
    craft(split.top, head_inputs(split.top, data), target=N)
    with torch.no_grad():
        logits = split.top(**collate_features([data[i] for i in range(len(data))])).logits
    assert not torch.isfinite(logits[N]).all()
    assert torch.isfinite(logits[:N]).all()


@pytest.mark.parametrize("mode,precision,lora_rank", MODES)
def test_target_in_or_out_the_release_is_finite_and_the_same_kind(mode, precision, lora_rank):
    worlds = [release(mode, precision, lora_rank, with_target) for with_target in (True, False)]
    (start, inside), (_, outside) = worlds
    for result in (inside, outside):
        assert list(result.values) == list(start)
        for name, value in result.values.items():
            assert value.shape == start[name].shape and value.dtype == np.float32
            assert np.isfinite(value).all(), f"{name} is not finite: the release tells whether the target is in"
        assert math.isfinite(result.loss) and result.steps == 1
    moved = sum(float(np.abs(inside.values[k] - start[k]).sum()) for k in start)
    assert moved > 0, "the step must have released something (noise at least)"


@pytest.mark.parametrize("mode,precision,lora_rank", MODES)
def test_removing_the_overflowing_post_changes_the_clipped_sum_by_at_most_c(mode, precision, lora_rank):
    """σ = 0, q = 1, one SGD step at lr 1: the update is -(clipped sum) / expected batch. The target contributes
    nothing, so the sum without it equals the sum with it (up to rounding) -- in particular within C."""
    sums = []
    for with_target in (True, False):
        start, result = release(mode, precision, lora_rank, with_target, sigma=0.0)
        n = N + with_target
        sums.append(np.concatenate([(start[k] - result.values[k]).ravel() * n for k in start]).astype(np.float64))
    assert np.isfinite(sums[0]).all()
    assert np.linalg.norm(sums[0]) > 0.1, "the honest posts must contribute for the comparison to mean anything"
    assert np.linalg.norm(sums[0] - sums[1]) <= 1.0 + 1e-5
    assert np.linalg.norm(sums[0] - sums[1]) < 1e-3 * np.linalg.norm(sums[0]), "the other posts' part moved"


# ----------------------------------------------------------------------------- through the region's ClientApp


def _without_post(root, region: str, dest):
    """A copy of the shards in which ``region``'s first training post (the target) is replaced by another
    post's text: the neighbouring world, with as many posts (so that q = 1 in both)."""
    from fedpriv.task.partition import region_train_path

    shutil.copytree(root, dest)
    path = region_train_path(dest, region)
    posts = [json.loads(line) for line in path.read_text().splitlines()]
    posts[0] = {**posts[1], "id": posts[0]["id"]}
    path.write_text("".join(json.dumps(post) + "\n" for post in posts))
    return dest


def _crafted_arrays(region: Region, flat) -> ArrayRecord:
    """The coordinator's crafted global model for ``region``, keyed on its first training post."""
    from fedpriv.client.region import RegionRuntime, identify_region

    cfg = region.cfg
    runtime = RegionRuntime(cfg, identify_region(region.context.node_config, cfg))
    data = runtime._features("train")
    craft(runtime.split.top, head_inputs(runtime.split.top, data), target=0)
    return to_array_record(get_trainable(runtime.split.model))


@pytest.mark.parametrize("mode", ["bk", "ghost", "hooks"])
def test_a_region_replies_alike_with_or_without_the_target(mode, shard_root, tmp_path):
    """A region whose policy admits weights up to 1e38 (the default refuses them: test_bad_weights.py) trains on
    the crafted model in a plain round with q = 1 (every post in the step): both worlds return a finite update
    of the model's shape."""
    policy = dict(delta=1e-5, **{"require-secure-aggregation": False, "allow-plain-rounds": True,
                                 "allow-deterministic-noise": True, "max-weight-magnitude": 1e38})
    replies = []
    for world, root in (("in", shard_root), ("out", _without_post(shard_root, "us-east", tmp_path / "out"))):
        flat = run_config(root, tmp_path / f"run-{world}", **{"secure-aggregation": False, "grad-sample-mode": mode,
                                                                "batch-size": 64, "physical-batch-size": 64,
                                                                "local-steps": 1})
        region = Region("us-east", root, tmp_path / world, flat, **policy)
        arrays = _crafted_arrays(Region("us-east", shard_root, tmp_path / "attacker", flat, **policy), flat)
        reply = region.train(arrays, secagg_round=None)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        replies.append((from_array_record(reply.content[contract.ARRAYS]), from_array_record(arrays)))
    for values, sent in replies:
        assert list(values) == list(sent)
        for name in sent:
            assert values[name].shape == sent[name].shape
            assert np.isfinite(values[name]).all(), f"{name}: the region's update is not finite"
