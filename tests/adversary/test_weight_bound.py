"""The region's weight bound (``max-weight-magnitude``) holds through training, and makes forward passes finite.

The coordinator picks the learning rate as well as the weights: one step at lr 1e38 would leave weights that
are inf (or NaN under Adam), so the next forward pass overflows on every post and the release is not finite.
The trainer projects the trainable weights onto ±bound before the first step and after every step
(client/incoming.py). Without DP there is no clipping to contain an overflowing post; the projection still
keeps the release finite. And at the default bound no forward pass of all-MiniLM can overflow (the reason the
default is what it is): checked here with every trainable weight at ±100.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_crafted_weights import N, _config, _split, _world, craft, head_inputs

from fedpriv.client.trainer import LocalTrainer
from fedpriv.privacy.policy import DEFAULT_MAX_WEIGHT_MAGNITUDE
from fedpriv.task.features import FeatureDataset, SplitClassifier, collate_features
from fedpriv.task.model import build_model, get_trainable

BOUND = DEFAULT_MAX_WEIGHT_MAGNITUDE


def _train(cfg, with_target: bool, bound: float = BOUND, crafted: bool = True, sigma: float = 1.0):
    honest, labels, target = _world()
    data = FeatureDataset(honest + ([target] if with_target else []), labels + ([1] if with_target else []))
    split = _split(0)
    if crafted:
        craft(split.top, head_inputs(split.top, FeatureDataset(honest + [target], labels + [1])), target=N)
    return LocalTrainer(split, data, cfg, torch.device("cpu"), max_weight_magnitude=bound).train([], sigma, seed=5)


def _finite_within(values, bound):
    return all(np.isfinite(v).all() and float(np.abs(v).max()) <= bound for v in values.values())


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_huge_learning_rate_cannot_take_the_weights_beyond_the_bound(optimizer):
    # Adam's step size is lr / (1 - β1): torch refuses one beyond float range (lr 1e38), the same for any data.
    lr = 1e38 if optimizer == "sgd" else 1e36
    cfg = _config("bk", "off", 0, N, **{"learning-rate": lr, "local-steps": 3, "local-optimizer": optimizer})
    result = _train(cfg, with_target=False, crafted=False)
    assert _finite_within(result.values, BOUND)


@pytest.mark.parametrize("with_target", [True, False])
def test_without_dp_a_crafted_overflow_still_releases_finite_weights(with_target):
    """dp = false (a policy must allow it; the release is not private): nothing is clipped, the crafted weights
    are projected onto the bound before the first step, and the release is finite in both worlds."""
    cfg = _config("bk", "off", 0, N, dp=False)
    assert _finite_within(_train(cfg, with_target).values, BOUND)


def test_empty_poisson_batches_between_overflowing_ones_stay_finite():
    """q = 1/25: most logical steps draw no post (noise only), some draw the target; the projection is off, so
    only the clipping's containment keeps the release finite."""
    cfg = _config("bk", "off", 0, 1, **{"local-steps": 30})
    result = _train(cfg, with_target=True, bound=math.inf)
    assert result.sample_rate == pytest.approx(1 / (N + 1))
    assert all(np.isfinite(v).all() for v in result.values.values())


@pytest.mark.parametrize("signs,precision", [("random", "off"), ("positive", "bf16")])
def test_no_forward_pass_of_minilm_overflows_at_the_default_bound(signs, precision):
    """Every trainable weight of all-MiniLM (all six layers and the head) set to ±100: the logits of posts of
    every length, padded together, are finite -- so is every per-example quantity's forward input."""
    from fedpriv.task.device import forward_precision
    from fedpriv.task.encoding import encode
    from fedpriv.task.data import Example
    from fedpriv.task.model import load_tokenizer

    model = build_model("minilm", "all", seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                sign = torch.ones_like(p) if signs == "positive" else torch.randint(0, 2, p.shape, generator=gen) * 2 - 1.0
                p.copy_(BOUND * sign)
    split = SplitClassifier(model, "all")
    posts = [Example(id=str(i), text=" ".join(["great movie"] * (1 + 7 * i)), label=i % 2, domain="d", rating=1.0)
             for i in range(4)]
    data = split.features(encode(posts, load_tokenizer(), 64), torch.device("cpu"))
    batch = collate_features([data[i] for i in range(len(data))])
    largest = []
    handles = [m.register_forward_hook(lambda m, a, out: largest.append(float(out.float().abs().max())))
               for m in split.top.modules() if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm))]
    with torch.no_grad(), forward_precision(precision, torch.device("cpu")):
        logits = split.top(**batch).logits
    for handle in handles:
        handle.remove()
    assert torch.isfinite(logits).all()
    assert len(largest) > 6 * 6 and max(largest) < 1e20, f"a layer output reached {max(largest):.3g}"
    assert max(float(np.abs(v).max()) for v in get_trainable(model).values()) == BOUND
