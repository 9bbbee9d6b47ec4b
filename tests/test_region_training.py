"""A region's DP training round: accounting composes over rounds, clipping and noise are real."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from fedpriv.client.region import RegionRuntime, identify_region
from conftest import TINY, write_corpus
from fedpriv.core.config import resolve_config
from fedpriv.task.data import load_corpus
from fedpriv.task.features import FeatureDataset, SplitClassifier, collate_features
from fedpriv.task.model import build_model, get_trainable
from fedpriv.task.partition import partition_corpus, partition_spec, write_shards


def make_region(tmp_path, **overrides) -> RegionRuntime:
    corpus_dir = write_corpus(tmp_path / "corpus", 800)
    flat, cfg = resolve_config({**TINY, **overrides})
    root = tmp_path / "shards"
    write_shards(partition_corpus(load_corpus(corpus_dir), partition_spec(cfg)), root)
    _, cfg = resolve_config({**TINY, **overrides, "data-dir": str(root), "run-dir": str(tmp_path / "run")})
    return RegionRuntime(cfg, identify_region({"partition-id": 0}, cfg))


def fresh_opacus_epsilon(history, delta):
    acc = RDPAccountant()
    acc.history = list(history)
    return acc.get_epsilon(delta=delta)


def google_rdp_epsilon(history, delta):
    acc = dp_accounting.rdp.RdpAccountant()
    for sigma, q, steps in history:
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


def test_epsilon_composes_over_rounds_and_matches_independent_accountants(tmp_path):
    region = make_region(tmp_path, **{"num-server-rounds": 3, "target-epsilon": 4.0, "accountant": "rdp"})
    values = get_trainable(region.split.model)
    epsilons = []
    for rnd in (1, 2, 3):
        outcome = region.train(values, rnd, job_id="job", attempt_id="a1")
        values = outcome.result.values
        epsilons.append(outcome.epsilon)
        sigma, q, steps = outcome.history[0]
        total_steps = sum(h[2] for h in outcome.history)
        # ε after round R is the composition of all R rounds, not the last round alone
        assert outcome.epsilon == pytest.approx(fresh_opacus_epsilon([(sigma, q, total_steps)], 1e-5), abs=1e-6)
        assert outcome.epsilon == pytest.approx(google_rdp_epsilon(outcome.history, 1e-5), rel=0.02)
    single_round = fresh_opacus_epsilon([outcome.history[0]], 1e-5)
    assert epsilons[0] == pytest.approx(single_round, abs=1e-6)
    assert epsilons[0] < epsilons[1] < epsilons[2]
    assert epsilons[2] > single_round
    # the planned σ spends (almost exactly) the target over the planned 3 rounds, never more
    assert 3.5 < epsilons[2] <= 4.0 + 1e-6


def test_history_survives_a_new_process_through_the_ledger(tmp_path):
    """Each Flower round runs in a fresh process: the ledger, not memory, carries the history."""
    region = make_region(tmp_path, **{"num-server-rounds": 2})
    values = get_trainable(region.split.model)
    first = region.train(values, 1, job_id="job", attempt_id="a1")
    restarted = RegionRuntime(region.cfg, region.identity)  # as a new process would
    second = restarted.train(first.result.values, 2, job_id="job", attempt_id="a1")
    assert len(second.history) == 2 and second.epsilon > first.epsilon
    # another job on the same data starts its own run history but the lifetime ε counts both
    other = restarted.train(values, 1, job_id="job-2", attempt_id="b1")
    assert other.epsilon == pytest.approx(first.epsilon, abs=1e-6)
    assert other.lifetime_epsilon > second.epsilon


N_POSTS, CLIP = 8, 0.01


def _head_and_data(n: int = N_POSTS):
    model = build_model("tiny", "head", seed=0, pooling="mean")
    rng = np.random.default_rng(0)
    feats = [rng.normal(size=(1, model.config.hidden_size)).astype(np.float16) * 50 for _ in range(n)]
    return model, FeatureDataset(feats, [i % 2 for i in range(n)])


def _trainer_step(sigma: float, deterministic: bool = False) -> np.ndarray:
    """One DP-SGD step of fedpriv's own trainer (LocalTrainer, the ClientApp's path) on a fresh copy of the
    head: batch-size = N, so Poisson's rate is 1 (every post in the one step) and the update is
    -lr·(Σ clip(g_i) + σ·C·z)/N, exactly."""
    from fedpriv.client.trainer import LocalTrainer

    model, data = _head_and_data()
    split = SplitClassifier(model, "head")
    start = get_trainable(split.model)
    _, cfg = resolve_config({**TINY, "trainable": "head", "batch-size": N_POSTS, "physical-batch-size": N_POSTS,
                             "local-epochs": 1.0, "learning-rate": 1.0, "momentum": 0.0, "max-grad-norm": CLIP,
                             "grad-sample-mode": "hooks", "insecure-deterministic-noise": deterministic})
    result = LocalTrainer(split, data, cfg, torch.device("cpu")).train([], noise_multiplier=sigma, seed=3)
    assert result.history == [(sigma, 1.0, 1)] and result.steps == 1  # one step at q = 1, as the test assumes
    return np.concatenate([(result.values[k] - start[k]).ravel() for k in start]).astype(np.float64)


def _reference_clipped_step():
    """The same step computed here with plain torch: one backward per post, each gradient clipped to C."""
    model, data = _head_and_data()
    top = SplitClassifier(model, "head").top
    params = [p for _, p in top.named_parameters() if p.requires_grad]
    norms, total = [], None
    for i in range(len(data)):
        top.zero_grad()
        top(**collate_features([data[i]])).loss.backward()
        grad = torch.cat([p.grad.reshape(-1) for p in params]).double()
        norms.append(float(grad.norm()))
        clipped = grad * min(1.0, CLIP / float(grad.norm()))
        total = clipped if total is None else total + clipped
    return np.array(norms), (-1.0 * total / len(data)).numpy()


def test_per_sample_clipping_bounds_each_contribution():
    raw_norms, expected = _reference_clipped_step()
    assert raw_norms.min() > 10 * CLIP, "the test needs every gradient far above the clipping bound"
    update = _trainer_step(sigma=0.0)
    # without noise the update is the mean of the per-post gradients, each clipped to C (not the raw mean)
    assert update.shape == expected.shape  # head: dense then classifier, in the same order on both sides
    np.testing.assert_allclose(update, expected, atol=1e-6 * CLIP)
    assert np.linalg.norm(update) <= CLIP + 1e-6


def test_gaussian_noise_is_present_with_the_configured_scale():
    sigma = 2.0
    _, clipped = _reference_clipped_step()
    draws = [_trainer_step(sigma) - _trainer_step(0.0) for _ in range(2)]  # fresh OS-entropy noise each release
    expected_std = 1.0 * sigma * CLIP / N_POSTS  # lr · σ · C / expected batch size
    for noise in draws:
        assert noise.std() == pytest.approx(expected_std, rel=0.1)
        assert abs(noise.mean()) < 4 * expected_std / math.sqrt(noise.size)
    assert np.corrcoef(draws[0], draws[1])[0, 1] < 0.2, "two releases must not share noise"
    np.testing.assert_allclose(_trainer_step(0.0, deterministic=True), _trainer_step(0.0), atol=1e-9)
    assert np.abs(clipped).max() > 0  # the noise rides on a real clipped step


def test_ghost_clipping_takes_the_same_dp_step_as_per_sample_hooks():
    """grad-sample-mode only changes how per-sample norms are computed, not the update or the accounting.

    Both runs must draw the same Poisson batches, so they replay the sampling from the seed (testing key)."""
    from fedpriv.client.trainer import LocalTrainer

    rng = np.random.default_rng(0)
    n, dim = 96, build_model("tiny", "head", seed=0, pooling="mean").config.hidden_size
    data = FeatureDataset([rng.standard_normal((1, dim)).astype(np.float16) * 4 for _ in range(n)],
                          [int(x) for x in rng.integers(0, 2, n)])
    results = {}
    for mode in ("hooks", "ghost"):
        _, cfg = resolve_config({**TINY, "trainable": "head", "grad-sample-mode": mode, "batch-size": 32,
                                 "physical-batch-size": 16, "max-grad-norm": 0.01, "local-epochs": 2.0,
                                 "insecure-deterministic-noise": True})
        split = SplitClassifier(build_model("tiny", "head", seed=0, pooling="mean"), "head")
        for module in split.top.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        results[mode] = LocalTrainer(split, data, cfg, torch.device("cpu")).train([], noise_multiplier=0.0, seed=3)
    hooks, ghost = results["hooks"], results["ghost"]
    assert hooks.history == ghost.history and hooks.steps == ghost.steps == 6
    start = get_trainable(SplitClassifier(build_model("tiny", "head", seed=0, pooling="mean"), "head").model)
    assert any(np.abs(hooks.values[k] - start[k]).max() > 1e-4 for k in start)  # it trained
    for key in hooks.values:
        np.testing.assert_allclose(ghost.values[key], hooks.values[key], atol=1e-6, err_msg=key)
