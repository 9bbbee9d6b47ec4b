"""The generators a DP release draws its noise and Poisson sample from (client/randomness.py).

* The real CUDA generator (Philox) runs when a GPU is at hand (skipped otherwise, with the reason).
* Everything around it runs on CPU: the CUDA branch against a fake generator that records what it is
  given, a generator that refuses the counter offset (or silently drops it) is an error, never a fallback
  to a 64-bit key; a CPU state layout fedpriv does not know is an error, never a fallback to a 64-bit seed;
  every release reads fresh OS entropy, and its state depends on nothing else.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from opacus.optimizers.optimizer import _generate_noise

import fedpriv.client.randomness as randomness

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device: the real Philox generator runs only on a GPU machine")


class FakePhilox:
    """Stands in for ``torch.Generator(device="cuda")`` on a CPU-only machine: records key and offset."""

    made: list[FakePhilox] = []

    def __init__(self, device="cpu"):
        self.device, self.seed, self.offset = torch.device(device), None, 0
        FakePhilox.made.append(self)

    def manual_seed(self, seed):
        self.seed = seed
        return self

    def set_offset(self, offset):
        self.offset = offset

    def get_offset(self):
        return self.offset


@pytest.fixture
def fake_cuda(monkeypatch):
    real = torch.Generator
    FakePhilox.made = []
    monkeypatch.setattr(randomness.torch, "Generator", lambda device="cpu": (
        FakePhilox(device) if torch.device(device).type != "cpu" else real(device=device)))
    return FakePhilox


def _constant_urandom(n: int) -> bytes:
    return bytes(range(256)) * (n // 256) + bytes(range(n % 256))


# --- the CPU generator (Mersenne Twister) ---------------------------------------------------------


def test_fresh_cpu_generators_are_unrelated_and_carry_no_seed():
    a, b = randomness.fresh_generator("cpu"), randomness.fresh_generator("cpu")
    assert a.initial_seed() == 0 == b.initial_seed()  # nothing a report could print or a log could leak
    assert not torch.equal(torch.randn(1000, generator=a), torch.randn(1000, generator=b))
    state = a.get_state().numpy()[24: 24 + 8 * 624].view("<u8")
    assert state.max() < 2**32 and len(np.unique(state)) > 600  # 624 words of OS entropy, not a seeded twister
    rng = randomness.release_randomness(torch.device("cpu"))
    assert rng.noise.device.type == "cpu" and rng.sampling.device.type == "cpu" and not rng.deterministic


def test_every_release_reads_fresh_os_entropy_and_nothing_else(monkeypatch):
    """Two releases never share noise: each reads the OS anew, and its state is a function of those bytes only."""
    reads = []
    real_urandom = os.urandom

    def counting(n):
        reads.append(n)
        return real_urandom(n)

    monkeypatch.setattr(randomness.os, "urandom", counting)
    one, two = randomness.release_randomness(torch.device("cpu")), randomness.release_randomness(torch.device("cpu"))
    assert sum(reads) >= 4 * 4 * 624  # two generators per release, 624 words of 4 bytes each
    for name in ("noise", "sampling"):
        assert not torch.equal(torch.randn(100, generator=getattr(one, name)),
                               torch.randn(100, generator=getattr(two, name)))
    # The same OS bytes give the same generator: no clock, pid or seed mixed in that the test would not see.
    monkeypatch.setattr(randomness.os, "urandom", _constant_urandom)
    a, b = randomness.fresh_generator("cpu"), randomness.fresh_generator("cpu")
    assert torch.equal(torch.randn(100, generator=a), torch.randn(100, generator=b))


def test_an_unknown_cpu_state_layout_is_an_error_not_a_64_bit_seed(monkeypatch):
    monkeypatch.setattr(randomness, "_MT_STATE_BYTES", randomness._MT_STATE_BYTES + 8)  # as a future torch might
    with pytest.raises(randomness.RandomnessError, match="will not fall back to a 64-bit seed"):
        randomness.fresh_generator("cpu")
    with pytest.raises(randomness.RandomnessError):
        randomness.release_randomness(torch.device("cpu"))


def test_deterministic_generators_replay_only_under_the_testing_seed():
    one, two = (randomness.release_randomness(torch.device("cpu"), 7) for _ in range(2))
    assert one.deterministic
    for name in ("noise", "sampling"):
        assert torch.equal(torch.randn(50, generator=getattr(one, name)), torch.randn(50, generator=getattr(two, name)))
    other = randomness.release_randomness(torch.device("cpu"), 8)
    assert not torch.equal(torch.randn(50, generator=other.noise), torch.randn(50, generator=one.noise))


# --- the CUDA branch on CPU, against a fake Philox ------------------------------------------------


def test_the_noise_generator_is_made_on_the_training_device_with_a_random_key_and_offset(fake_cuda):
    rng = randomness.release_randomness(torch.device("cuda"))
    assert rng.noise.device.type == "cuda" and rng.sampling.device.type == "cpu"
    assert isinstance(rng.noise, fake_cuda) and rng.noise.offset % 4 == 0 and rng.noise.offset > 0
    assert 0 <= rng.noise.seed < 2**64
    again = randomness.release_randomness(torch.device("cuda"))
    assert again.noise.seed != rng.noise.seed and again.noise.offset != rng.noise.offset
    replay = randomness.release_randomness(torch.device("cuda"), 3)
    assert replay.noise.device.type == "cuda" and replay.noise.offset == 0 and replay.deterministic


def test_the_philox_key_and_offset_come_from_os_entropy(fake_cuda, monkeypatch):
    monkeypatch.setattr(randomness.os, "urandom", _constant_urandom)
    a, b = randomness.fresh_generator("cuda"), randomness.fresh_generator("cuda")
    assert (a.seed, a.offset) == (b.seed, b.offset)  # nothing but the OS's bytes decides them


@pytest.mark.parametrize("failure", [RuntimeError("offsets not supported"), AttributeError("set_offset"),
                                     NotImplementedError("set_offset")])
def test_a_generator_that_refuses_the_offset_is_an_error_not_a_64_bit_key(fake_cuda, monkeypatch, failure):
    def refuse(self, offset):
        raise failure

    monkeypatch.setattr(fake_cuda, "set_offset", refuse)
    with pytest.raises(randomness.RandomnessError, match="cannot take a random counter offset"):
        randomness.fresh_generator("cuda")
    with pytest.raises(randomness.RandomnessError):
        randomness.release_randomness(torch.device("cuda"))


def test_a_generator_that_drops_the_offset_silently_is_an_error(fake_cuda, monkeypatch):
    monkeypatch.setattr(fake_cuda, "set_offset", lambda self, offset: None)
    with pytest.raises(randomness.RandomnessError, match="did not keep its random counter offset"):
        randomness.fresh_generator("cuda")


# --- the real CUDA generator ----------------------------------------------------------------------


@needs_cuda
def test_real_cuda_generators_take_a_random_offset_and_never_share_noise():
    a, b = randomness.fresh_generator("cuda"), randomness.fresh_generator("cuda")
    assert a.device.type == "cuda" == b.device.type
    assert a.get_offset() % 4 == 0 and a.get_offset() > 0 and a.get_offset() != b.get_offset()
    assert a.initial_seed() != b.initial_seed()
    reference = torch.zeros(4096, device="cuda")
    # Opacus' own noise draw (secure mode: four normals summed), as the DP optimizer makes it.
    noise_a = _generate_noise(1.0, reference, generator=a, secure_mode=True)
    noise_b = _generate_noise(1.0, reference, generator=b, secure_mode=True)
    assert noise_a.device.type == "cuda" and not torch.equal(noise_a, noise_b)
    assert abs(float(noise_a.std()) - 1.0) < 0.05 and abs(float(noise_a.mean())) < 0.05
    rng = randomness.release_randomness(torch.device("cuda"))
    assert rng.noise.device.type == "cuda" and rng.sampling.device.type == "cpu" and not rng.deterministic
    one, two = (randomness.release_randomness(torch.device("cuda"), 5) for _ in range(2))
    assert torch.equal(torch.randn(64, device="cuda", generator=one.noise),
                       torch.randn(64, device="cuda", generator=two.noise))


@needs_cuda
def test_a_dp_step_on_cuda_draws_its_noise_from_a_fresh_release_generator():
    """Through the real trainer on the GPU: two releases of the same data differ; the testing seed replays one."""
    import copy

    from test_trainer_gpu_path import _cfg, _data, _model

    from fedpriv.client.trainer import LocalTrainer
    from fedpriv.task.features import SplitClassifier
    from fedpriv.task.model import get_trainable

    def release(deterministic: bool) -> np.ndarray:
        split = SplitClassifier(copy.deepcopy(_model("all")), "all")
        start = get_trainable(split.model)
        cfg = _cfg(**{"insecure-deterministic-noise": deterministic})
        result = LocalTrainer(split, _data(32), cfg, torch.device("cuda")).train([], noise_multiplier=1.0, seed=5)
        return np.concatenate([(result.values[k] - start[k]).ravel() for k in start]).astype(np.float64)

    one, two = release(False), release(False)
    assert np.all(np.isfinite(one)) and np.abs(one - two).max() > 1e-4
    np.testing.assert_allclose(release(True), release(True), atol=1e-6)
