"""Length-sorted physical batches (client/batching.py): less padding, the same release.

A round whose Poisson batches are cut into physical batches by length must release what the round cut
in drawing order releases (same posts sampled, same noise draws, same history; tolerance 1e-5 absolute
on weights of order 0.1: fp32 rounding of different summation orders) and must pad fewer tokens.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import fedpriv.client.trainer as trainer_mod
from conftest import TINY
from fedpriv.client.batching import LengthSortedBatches
from fedpriv.client.trainer import LocalTrainer
from fedpriv.core.config import resolve_config
from fedpriv.task.features import FeatureDataset, SplitClassifier, collate_features
from fedpriv.task.model import build_model, get_trainable


def _data(n: int = 64, dim: int = 32) -> FeatureDataset:
    """Mostly short posts and a few long ones, as on the real split (mean 25 tokens, cap 64)."""
    rng = np.random.default_rng(4)
    lengths = np.where(rng.random(n) < 0.1, 16, rng.integers(2, 6, n))
    return FeatureDataset([rng.standard_normal((int(k), dim)).astype(np.float16) for k in lengths],
                          [i % 2 for i in range(n)])


def _round(monkeypatch, data: FeatureDataset, mode: str, sort: bool):
    padded: list[int] = []

    def counting_collate(batch, dim=1):
        out = collate_features(batch, dim)
        padded.append(int(out["attention_mask"].numel()))
        return out

    monkeypatch.setattr(trainer_mod, "collate_features", counting_collate)
    if not sort:
        monkeypatch.setattr(trainer_mod, "sort_batches_by_length", lambda loader, lengths: loader)
    _, cfg = resolve_config({**TINY, "trainable": "all", "grad-sample-mode": mode, "batch-size": 32,
                             "physical-batch-size": 8, "max-grad-norm": 0.05, "local-epochs": 1.0,
                             "local-optimizer": "adam", "learning-rate": 1e-2, "momentum": 0.0,
                             "insecure-deterministic-noise": True})
    model = build_model("tiny", "all", seed=0, pooling="mean")
    result = LocalTrainer(SplitClassifier(model, "all"), data, cfg, torch.device("cpu")).train(
        [], noise_multiplier=0.5, seed=3)
    monkeypatch.undo()
    return result, sum(padded)


@pytest.mark.parametrize("mode", ["bk", "ghost", "hooks"])
def test_sorting_physical_batches_by_length_releases_the_same_update_with_less_padding(monkeypatch, mode):
    data = _data()
    plain, plain_tokens = _round(monkeypatch, data, mode, sort=False)
    sorted_, sorted_tokens = _round(monkeypatch, data, mode, sort=True)
    assert plain.history == sorted_.history and plain.steps == sorted_.steps == 2
    start = get_trainable(build_model("tiny", "all", seed=0, pooling="mean"))
    assert any(np.abs(plain.values[k] - start[k]).max() > 1e-3 for k in start)  # it trained
    for key in plain.values:
        np.testing.assert_allclose(sorted_.values[key], plain.values[key], atol=1e-5, err_msg=key)
    assert sorted_tokens < 0.8 * plain_tokens, (sorted_tokens, plain_tokens)  # measured 322 vs 427


def test_sorting_keeps_every_drawn_index_and_only_reorders_within_a_batch():
    batches = [[5, 1, 4], [], [2, 0, 3, 1]]
    lengths = [3, 9, 1, 7, 2, 5]
    got = list(LengthSortedBatches(batches, lengths))
    assert [sorted(b) for b in got] == [sorted(b) for b in batches]
    assert got == [[4, 5, 1], [], [2, 0, 3, 1]]
    assert len(LengthSortedBatches(batches, lengths)) == 3
