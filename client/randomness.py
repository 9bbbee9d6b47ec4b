"""The randomness a DP release depends on: fresh OS entropy for every release, never a seed.

DP-SGD's guarantee holds only if nobody who sees the release can predict the Gaussian
noise or the Poisson sample. The run config's ``seed`` is chosen by the coordinator and
printed in the report, so anything derived from it is known to the party the noise must
hide the data from: re-running the training on dummy data would reproduce the noise
exactly, and subtracting it recovers the noiseless sum of clipped gradients. So:

* :func:`release_randomness` makes a *new* pair of generators for every release — the
  noise generator on the parameters' device (Opacus draws ``torch.normal`` there) and the
  Poisson sampler's on the CPU (Opacus' sampler draws its coins there) — from
  ``os.urandom``, and the entropy is never stored, logged or reported.
* A CPU generator (Mersenne Twister) gets its whole 19,937-bit state from the OS, not a
  64-bit seed an attacker could enumerate; a CUDA generator (Philox) gets a random 64-bit
  key *and* a random counter offset, all the state it has. If either cannot be set, the
  release fails with :class:`RandomnessError`: there is no fallback to a smaller state.
* :func:`enable_secure_noise` turns on Opacus' defence against the floating-point attack on
  Gaussian sampling (Jin et al. 2021; Opacus sums four draws, after Mironov 2012's attack on
  the Laplace mechanism), which ``PrivacyEngine(secure_mode=True)`` would only do together
  with ``torchcsprng`` (not installed). It costs four normal draws per parameter per step.

The ``insecure-deterministic-noise`` testing key replaces the OS entropy by the run's
seed, so that tests can replay a release; region policies refuse it in a deployment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

_MT_STATE_BYTES = 5056   # torch's CPUGeneratorImplState: seed, left, seeded, next, 624 words, normal caches
_MT_WORDS_AT, _MT_WORDS = 24, 624


@dataclass(frozen=True)
class ReleaseRandomness:
    """The two generators one DP release draws from, and whether they are replayable (testing only)."""

    noise: torch.Generator      # on the parameters' device: Opacus' Gaussian noise
    sampling: torch.Generator   # on the CPU: Opacus' Poisson sampler
    deterministic: bool


def release_randomness(device: torch.device, deterministic_seed: int | None = None) -> ReleaseRandomness:
    """Fresh, unpredictable generators for one release; seeded from ``deterministic_seed`` only when given.

    ``deterministic_seed`` exists for the ``insecure-deterministic-noise`` testing key alone:
    with it the release gives no privacy against whoever knows the seed.
    """
    if deterministic_seed is None:
        return ReleaseRandomness(noise=fresh_generator(device), sampling=fresh_generator(torch.device("cpu")),
                                 deterministic=False)
    noise_seed, sampling_seed = np.random.SeedSequence([int(deterministic_seed), 0x6E6F697365]).generate_state(2)
    noise = torch.Generator(device=device).manual_seed(int(noise_seed))
    sampling = torch.Generator().manual_seed(int(sampling_seed))
    return ReleaseRandomness(noise=noise, sampling=sampling, deterministic=True)


class RandomnessError(RuntimeError):
    """Fresh, unpredictable randomness could not be set up: the release must not happen."""


def _entropy_int(nbytes: int) -> int:
    return int.from_bytes(os.urandom(nbytes), "little")


def fresh_generator(device: torch.device | str) -> torch.Generator:
    """A torch generator on ``device`` whose whole state comes from ``os.urandom``.

    Raises :class:`RandomnessError` when the generator's full state cannot be set (never a
    silent fallback to a smaller, enumerable state).
    """
    device = torch.device(device)
    generator = torch.Generator(device=device)
    if device.type == "cpu":
        return _fill_mersenne_twister(generator)
    # Philox (CUDA and other counter-based backends): a 64-bit key and a counter offset (a multiple of 4).
    key, offset = _entropy_int(8), 4 * (_entropy_int(8) >> 4)
    generator.manual_seed(key)
    try:
        generator.set_offset(offset)
        taken = generator.get_offset()
    except (RuntimeError, AttributeError, NotImplementedError) as err:
        raise RandomnessError(
            f"the {device.type} noise generator cannot take a random counter offset ({err}); "
            "fedpriv will not draw DP noise from a generator whose only secret is a 64-bit key"
        ) from None
    if taken != offset:
        raise RandomnessError(f"the {device.type} noise generator did not keep its random counter offset")
    return generator


def _fill_mersenne_twister(generator: torch.Generator) -> torch.Generator:
    """Overwrite the 624 state words of a CPU generator with OS entropy (and forget the seed it had).

    Layout of torch's CPU state: uint64 seed | int32 left | int32 seeded | uint64 next | uint64 state[624] | ...
    ``left = 1`` makes the next draw twist the whole state first. Should a future torch change the
    layout, this raises :class:`RandomnessError` rather than fall back to a 64-bit seed.
    """
    generator.manual_seed(0)  # resets the normal-sample caches; left = 1, seeded = 1, next = 0
    state = generator.get_state().numpy().copy()
    if state.size != _MT_STATE_BYTES:
        raise RandomnessError(
            f"torch's CPU generator state is {state.size} bytes, not the {_MT_STATE_BYTES} this fedpriv fills "
            "with OS entropy; fedpriv will not fall back to a 64-bit seed (update fedpriv for this torch)"
        )
    words = np.frombuffer(os.urandom(4 * _MT_WORDS), dtype="<u4").astype("<u8")
    state[_MT_WORDS_AT: _MT_WORDS_AT + 8 * _MT_WORDS] = np.frombuffer(words.tobytes(), dtype=np.uint8)
    generator.set_state(torch.from_numpy(state))
    if not torch.equal(generator.get_state(), torch.from_numpy(state)):
        raise RandomnessError("torch's CPU generator did not keep the state fedpriv gave it")
    return generator


def enable_secure_noise(dp_optimizer) -> None:
    """Make an Opacus ``DPOptimizer`` draw each noise value as the sum of four Gaussians (Opacus' secure mode)."""
    dp_optimizer.secure_mode = True
