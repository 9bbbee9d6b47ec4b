"""Book-keeping clipping (client/book_keeping.py) against an independent reference: one example at a time.

The reference takes every example's gradient with plain autograd on a batch of one, clips it as Opacus
does (``min(1, C / (‖g‖ + 1e-6))``) and sums. Book-keeping must give the same per-sample norms and the
same clipped sum (tolerance 1e-5 of the largest gradient entry: fp32 rounding of different summation
orders, measured ~5e-7), for every trainable layer kind fedpriv uses: encoder layers (Linear, LayerNorm
on token sequences), the head on pooled vectors, and LoRA adapters.
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch

from conftest import TINY
from fedpriv.client.book_keeping import BookKeeping, UnsupportedLayer
from fedpriv.client.trainer import LocalTrainer
from fedpriv.core.config import resolve_config
from fedpriv.task.features import FeatureDataset, SplitClassifier, collate_features
from fedpriv.task.model import build_model, get_trainable


@functools.cache
def _model(trainable: str, lora_rank: int = 0):
    return build_model("tiny", trainable, seed=0, pooling="mean", lora_rank=lora_rank)


def _top(trainable: str, lora_rank: int = 0):
    return SplitClassifier(copy.deepcopy(_model(trainable, lora_rank)), trainable).top


def _batch(n: int, tokens: int, dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Posts of different lengths (padding inside the batch), features large enough that some clip."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, tokens + 1, n) if tokens > 1 else [1] * n
    feats = [(rng.standard_normal((int(k), dim)) * 3).astype(np.float16) for k in lengths]
    return collate_features([(f, i % 2) for i, f in enumerate(feats)])


def _reference(top, batch, clip: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    params = [p for p in top.parameters() if p.requires_grad]
    per_example = []
    for i in range(len(batch["labels"])):
        top.zero_grad()
        top(**{k: v[i:i + 1] for k, v in batch.items()}).loss.backward()
        per_example.append([p.grad.detach().clone() for p in params])
    norms = torch.stack([torch.sqrt(sum((g.double() ** 2).sum() for g in grads)) for grads in per_example]).float()
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    summed = [sum(f * grads[k] for f, grads in zip(factors, per_example)) for k in range(len(params))]
    top.zero_grad()
    return norms, summed


@pytest.mark.parametrize("trainable,lora_rank,tokens", [("all", 0, 6), ("head", 0, 1), ("all", 4, 6)])
def test_book_keeping_clipped_sum_is_each_examples_clipped_gradient_summed(trainable, lora_rank, tokens):
    top = _top(trainable, lora_rank).eval()  # no dropout: the reference and the batch see the same function
    batch = _batch(8, tokens, top.config.hidden_size)
    norms, expected = _reference(top, batch, clip=1.0)
    clip = float(norms.median())  # half the examples are clipped, half are not
    _, expected = _reference(top, batch, clip)
    bk = BookKeeping(top, clip)
    out = bk(**batch)
    got_norms = bk.clip_and_sum(bk.criterion(out.logits, batch["labels"]).per_sample)
    torch.testing.assert_close(got_norms, norms, rtol=1e-5, atol=0)
    params = [p for p in top.parameters() if p.requires_grad]
    scale = max(float(e.abs().max()) for e in expected)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=0, atol=1e-5 * scale)
    bk._close()
    assert all(not m._forward_hooks for m in top.modules()), "closing removes every hook"


def test_a_round_with_book_keeping_is_the_hooks_round():
    """The same Poisson batches, clipping, noise draws and accounting as Opacus' hooks: only the arithmetic
    of the per-sample norms differs (whole encoder, σ = 0.5, logical batches split into physical ones)."""
    rng = np.random.default_rng(1)
    dim = _model("all").config.hidden_size
    data = FeatureDataset([rng.standard_normal((int(rng.integers(2, 7)), dim)).astype(np.float16) for _ in range(48)],
                          [i % 2 for i in range(48)])
    results = {}
    for mode in ("hooks", "bk"):
        _, cfg = resolve_config({**TINY, "trainable": "all", "grad-sample-mode": mode, "batch-size": 24,
                                 "physical-batch-size": 8, "max-grad-norm": 0.05, "local-epochs": 1.0,
                                 "local-optimizer": "adam", "learning-rate": 1e-2, "momentum": 0.0,
                                 "insecure-deterministic-noise": True})
        split = SplitClassifier(copy.deepcopy(_model("all")), "all")
        results[mode] = LocalTrainer(split, data, cfg, torch.device("cpu")).train([], noise_multiplier=0.5, seed=3)
    hooks, bk = results["hooks"], results["bk"]
    assert hooks.history == bk.history and hooks.steps == bk.steps == 2
    start = get_trainable(_model("all"))
    assert any(np.abs(hooks.values[k] - start[k]).max() > 1e-3 for k in start)  # it trained
    for key in hooks.values:
        np.testing.assert_allclose(bk.values[key], hooks.values[key], atol=1e-5, err_msg=key)


def test_layers_book_keeping_cannot_clip_are_refused_before_training():
    conv = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Conv1d(4, 4, 1))
    with pytest.raises(UnsupportedLayer, match=r"^grad-sample-mode = 'bk' clips .* 1 is a trainable Conv1d"):
        BookKeeping(conv, 1.0)
    tied = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 4, bias=False))
    tied[1].weight = tied[0].weight
    with pytest.raises(UnsupportedLayer, match="tied weights"):
        BookKeeping(tied, 1.0)


def test_an_output_changed_in_place_after_the_forward_is_refused():
    """The gradient autograd would give for such an output is not the layer's: refuse rather than mis-clip."""
    class InPlace(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, x):
            y = self.lin(x)
            y.mul_(2.0)
            return torch.nn.functional.log_softmax(y, dim=-1)

    bk = BookKeeping(InPlace(), 1.0)
    out = bk(torch.randn(4, 3))
    with pytest.raises(RuntimeError, match="modified in place"):
        bk.clip_and_sum(torch.nn.functional.nll_loss(out, torch.tensor([0, 1, 0, 1]), reduction="none"))


def test_a_layer_the_loss_does_not_use_gets_a_zero_gradient():
    class Branch(torch.nn.Module):  # the second layer runs but the loss never uses it
        def __init__(self):
            super().__init__()
            self.used, self.unused = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)

        def forward(self, x):
            self.unused(x)
            return self.used(x)

    model = Branch()
    bk = BookKeeping(model, 1.0)
    logits = bk(torch.randn(4, 3))
    bk.clip_and_sum(torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 0, 1]), reduction="none"))
    assert model.used.weight.grad.abs().sum() > 0 and not model.unused.weight.grad.any()


@pytest.mark.parametrize("mode", ["bk", "ghost", "hooks"])
def test_an_empty_poisson_batch_is_a_noise_only_step_for_encoder_layers(monkeypatch, mode):
    """Poisson sampling can draw no post (here q = 1/16, so about one step in three); the step must still be
    taken -- noise only -- without running a Transformer layer on zero posts (which cannot run)."""
    import fedpriv.client.trainer as trainer_mod

    empty = []
    real = trainer_mod.no_contribution
    monkeypatch.setattr(trainer_mod, "no_contribution", lambda opt: (empty.append(1), real(opt)))
    rng = np.random.default_rng(2)
    dim = _model("all").config.hidden_size
    data = FeatureDataset([rng.standard_normal((4, dim)).astype(np.float16) for _ in range(16)], [0, 1] * 8)
    _, cfg = resolve_config({**TINY, "trainable": "all", "grad-sample-mode": mode, "batch-size": 1,
                             "local-steps": 12, "physical-batch-size": 1, "max-grad-norm": 0.1,
                             "insecure-deterministic-noise": True})
    split = SplitClassifier(copy.deepcopy(_model("all")), "all")
    result = LocalTrainer(split, data, cfg, torch.device("cpu")).train([], noise_multiplier=1.0, seed=0)
    assert empty, "the seed must draw at least one empty batch for this test to mean anything"
    assert result.steps == 12 and len(result.history) == 1 and result.history[0][2] == 12
    start = get_trainable(_model("all"))
    assert all(np.isfinite(v).all() for v in result.values.values())
    assert any(np.abs(result.values[k] - start[k]).max() > 0 for k in start)
