"""Per-sample gradients are what DP-SGD clips: Opacus must compute them right for every model fedpriv trains.

Opacus issue #820: with some Opacus/PEFT versions, LoRA adapters' updates came out silently wrong.
These tests pin the pinned versions down on the tiny model (no download): the per-sample gradients
Opacus' hooks compute for LoRA adapters (on the full model and on the split top that
``LocalTrainer`` wraps) equal one backward pass per example. (A noiseless DP step on the
adapters equal to the plain SGD step is ``tests/test_lora.py``.)
"""

from __future__ import annotations

import torch
from opacus import GradSampleModule

from conftest import synthetic_examples
from fedpriv.task.encoding import collate, encode
from fedpriv.task.features import SplitClassifier, collate_features
from fedpriv.task.model import build_model, load_tokenizer


def _no_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # the same function for the batch and for each example alone


def _lora_model(seed: int = 0) -> torch.nn.Module:
    model = build_model("tiny", "top-1", seed, "mean", lora_rank=4).train()
    _no_dropout(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0.0, 0.1)  # B = 0 at init makes A's gradient vanish: give both matrices a gradient
    return model


def _per_example_reference(module: torch.nn.Module, batch: dict, forward) -> dict[str, torch.Tensor]:
    """Each trainable parameter's gradient for each example alone: (batch, *shape)."""
    grads: dict[str, list[torch.Tensor]] = {}
    n = len(batch["labels"])
    for i in range(n):
        module.zero_grad()
        forward(module, {k: v[i:i + 1] for k, v in batch.items()}).backward()
        for name, p in module.named_parameters():
            if p.requires_grad:
                grads.setdefault(name, []).append(p.grad.detach().clone())
    module.zero_grad()
    return {name: torch.stack(g) for name, g in grads.items()}


def _assert_opacus_matches(module: torch.nn.Module, batch: dict, forward) -> None:
    reference = _per_example_reference(module, batch, forward)
    assert any(".lora_A." in n for n in reference) and any(".lora_B." in n for n in reference)
    gsm = GradSampleModule(module)
    try:
        forward(gsm, batch).backward()  # mean reduction: Opacus rescales grad_sample to per-example gradients
        n = len(batch["labels"])
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            ref = reference[name]
            assert p.grad_sample is not None and p.grad_sample.shape == ref.shape, name
            # every example's gradient is non-trivial, so a zeroed row cannot pass
            assert bool((ref.flatten(1).abs().amax(1) > 0).all()), name
            scale = ref.abs().max().clamp(min=1e-12)
            err = float((p.grad_sample - ref).abs().max() / scale)
            assert err < 1e-4, f"{name}: per-sample gradients differ from a per-example loop (relative {err:.1e})"
            assert torch.allclose(p.grad_sample.sum(0) / n, p.grad, atol=1e-6, rtol=1e-4), name
    finally:
        gsm._close()


def _tokenised(n: int, seed: int) -> tuple[list, object]:
    """``n`` posts of different lengths, so a padded batch holds padding (masks differ per example)."""
    from dataclasses import replace

    examples = [replace(e, text=e.text + " really" * i) for i, e in enumerate(synthetic_examples(n, seed=seed))]
    return examples, encode(examples, load_tokenizer(), 32)


def test_lora_per_sample_gradients_of_the_full_model_equal_a_per_example_loop():
    torch.manual_seed(0)
    model = _lora_model()
    _, data = _tokenised(6, seed=3)
    batch = collate([data[i] for i in range(len(data))])  # padded to the longest post: masks differ per example
    assert bool((batch["attention_mask"] == 0).any()), "the batch should hold padded posts"

    def forward(module, b):
        inputs = {k: v for k, v in b.items() if k != "labels"}
        return torch.nn.functional.cross_entropy(module(**inputs).logits, b["labels"])

    _assert_opacus_matches(model, batch, forward)


def test_lora_per_sample_gradients_of_the_split_top_equal_a_per_example_loop():
    """What LocalTrainer hands Opacus: the trainable top over cached frozen-prefix features."""
    torch.manual_seed(0)
    model = _lora_model()
    split = SplitClassifier(model, "top-1")
    _, data = _tokenised(6, seed=4)
    features = split.features(data, torch.device("cpu"))
    batch = collate_features([features[i] for i in range(len(features))])
    top = split.top.train()

    def forward(module, b):
        return torch.nn.functional.cross_entropy(
            module(hidden=b["hidden"], attention_mask=b["attention_mask"]).logits, b["labels"])

    _assert_opacus_matches(top, batch, forward)
