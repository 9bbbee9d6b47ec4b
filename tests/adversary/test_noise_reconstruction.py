"""A curious coordinator tries to predict a region's DP noise and sampling (issue 9, finding 1).

The coordinator knows everything public: the run config (including ``seed``), the global
model it sent, the round, and the region's N. It re-runs the region's real
:class:`fedpriv.client.trainer.LocalTrainer` on dummy data of the same size, twice — with the run's σ
and with σ = 0 — and takes the difference as its guess of the region's noise. If the guess
matched, subtracting it from the release would leave the noiseless sum of clipped gradients.

The schedule makes that attack as easy as possible: one logical step with sample rate 1
(every example in the batch, so no sampling randomness hides anything), split into
physical batches (``BatchMemoryManager``), ghost clipping, plain SGD with lr 1. The test
knows the region's true noise because it can re-run the region's noiseless step (with q = 1
that step is deterministic).

Under the testing key ``insecure-deterministic-noise = true`` the same attack must succeed:
that proves the test can tell predictable noise from fresh noise.
"""

from __future__ import annotations

import copy
import functools
import math

import numpy as np
import pytest
import torch

from fedpriv.client.trainer import LocalTrainer
from conftest import TINY
from fedpriv.core.config import resolve_config
from fedpriv.task.features import FeatureDataset, SplitClassifier
from fedpriv.task.model import build_model, get_trainable

N = 64
SIGMA = 1.0
CLIP = 0.05
ROUND_SEED = 1234  # what RegionRuntime.round_seed derives from the public run seed; known to the coordinator


def _config(insecure: bool, **overrides):
    _, cfg = resolve_config({**TINY, "trainable": "head", "batch-size": N, "physical-batch-size": 16,
                             "local-epochs": 1.0, "learning-rate": 1.0, "momentum": 0.0, "max-grad-norm": CLIP,
                             "grad-sample-mode": "ghost", "insecure-deterministic-noise": insecure, **overrides})
    return cfg


@functools.cache
def _global_model():
    return build_model("tiny", "head", seed=0)


def _split() -> SplitClassifier:
    return SplitClassifier(copy.deepcopy(_global_model()), "head")


def _data(seed: int, n: int = N) -> FeatureDataset:
    rng = np.random.default_rng(seed)
    dim = _global_model().config.hidden_size
    return FeatureDataset([rng.standard_normal((1, dim)).astype(np.float16) * 4 for _ in range(n)],
                          [int(x) for x in rng.integers(0, 2, n)])


def _update(cfg, data: FeatureDataset, sigma: float, seed: int = ROUND_SEED) -> np.ndarray:
    """One real release from the global model (the same start every time): the flattened update."""
    split = _split()
    start = get_trainable(split.model)
    result = LocalTrainer(split, data, cfg, torch.device("cpu")).train([], noise_multiplier=sigma, seed=seed)
    assert result.steps == 1 and result.sample_rate == 1.0
    return np.concatenate([(result.values[k] - start[k]).ravel() for k in start]).astype(np.float64)


def _attack(insecure: bool) -> dict[str, float]:
    cfg = _config(insecure)
    private = _data(seed=0)
    released = _update(cfg, private, SIGMA)
    true_noise = released - _update(cfg, private, 0.0)  # the region's own noiseless step, replayed by the test
    dummy = _data(seed=99)  # the coordinator has no data of the region's: anything of size N will do
    guessed_noise = _update(cfg, dummy, SIGMA) - _update(cfg, dummy, 0.0)
    expected_std = SIGMA * CLIP / N  # lr · σ · C / B
    assert true_noise.std() == pytest.approx(expected_std, rel=0.15), "the release carries the configured noise"
    assert guessed_noise.std() == pytest.approx(expected_std, rel=0.15)
    denoised = released - guessed_noise
    return {"correlation": float(np.corrcoef(true_noise, guessed_noise)[0, 1]),
            "residual": float(np.abs(denoised - (released - true_noise)).max() / expected_std)}


def test_the_coordinator_cannot_reconstruct_the_noise_from_the_run_config():
    outcome = _attack(insecure=False)
    # ~1,100 coordinates: independent noise gives |correlation| ~ 0.03; reconstructed noise gives 1
    assert abs(outcome["correlation"]) < 0.2, outcome
    assert outcome["residual"] > 1.0, "subtracting the guess must not leave the noiseless sum"


def test_with_the_testing_key_the_same_attack_recovers_the_noiseless_sum():
    """The testing key makes noise replayable from the seed: the attack above then works exactly."""
    outcome = _attack(insecure=True)
    assert outcome["correlation"] > 0.9999, outcome
    assert outcome["residual"] < 1e-3, outcome


def test_two_releases_with_identical_config_and_inputs_differ_in_their_noise():
    cfg = _config(insecure=False)
    data = _data(seed=0)
    first, second = _update(cfg, data, SIGMA), _update(cfg, data, SIGMA)
    # same seed, same data, same σ: only the noise differs, and by two independent draws' worth
    assert (first - second).std() / math.sqrt(2) == pytest.approx(SIGMA * CLIP / N, rel=0.15)
    assert abs(np.corrcoef(first - _update(cfg, data, 0.0), second - _update(cfg, data, 0.0))[0, 1]) < 0.2
    replay = _config(insecure=True)
    np.testing.assert_array_equal(_update(replay, data, SIGMA), _update(replay, data, SIGMA))


def test_two_releases_draw_different_poisson_samples():
    """σ = 0 and q = 1/4: the only randomness left is which examples each step samples."""
    cfg = _config(insecure=False, **{"batch-size": 16, "local-epochs": 0.25})
    data = _data(seed=0)
    first, second = _update_q(cfg, data), _update_q(cfg, data)
    assert np.abs(first - second).max() > 1e-4, "the same Poisson sample twice: sampling is predictable"
    replay = _config(insecure=True, **{"batch-size": 16, "local-epochs": 0.25})
    np.testing.assert_array_equal(_update_q(replay, data), _update_q(replay, data))


def _update_q(cfg, data):
    split = _split()
    start = get_trainable(split.model)
    result = LocalTrainer(split, data, cfg, torch.device("cpu")).train([], noise_multiplier=0.0, seed=ROUND_SEED)
    assert result.steps == 1 and result.sample_rate == 0.25
    return np.concatenate([(result.values[k] - start[k]).ravel() for k in start]).astype(np.float64)


@pytest.mark.parametrize("mode", ["ghost", "hooks", "bk"])
def test_noise_is_drawn_in_secure_mode_from_the_release_generator(monkeypatch, mode):
    """Every noise draw: Opacus' floating-point-attack defence on, a dedicated generator (never torch's
    global one, which the run seed sets), on the parameter's device."""
    import opacus.optimizers.optimizer as dp_optimizer
    import opacus.optimizers.optimizer_fast_gradient_clipping as ghost_optimizer

    calls = []
    real = dp_optimizer._generate_noise

    def spy(std, reference, generator=None, secure_mode=False):
        calls.append((secure_mode, generator, reference.device))
        return real(std, reference, generator, secure_mode)

    for module in (dp_optimizer, ghost_optimizer):  # each imported the function by name
        monkeypatch.setattr(module, "_generate_noise", spy)
    _update(_config(insecure=False, **{"grad-sample-mode": mode}), _data(seed=0), SIGMA)
    assert calls and all(secure for secure, _, _ in calls)
    generators = {id(g) for _, g, _ in calls}
    assert None not in {g for _, g, _ in calls} and len(generators) == 1
    assert torch.default_generator is not calls[0][1]
    assert all(g.device == device for _, g, device in calls)
