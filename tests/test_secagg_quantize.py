"""Fixed-point encoding: modulus choice, unbiased stochastic rounding, error bound."""

import numpy as np
import pytest

from fedpriv.privacy.secagg import SecAggConfig
from fedpriv.privacy.secagg.quantize import (
    MAX_MOD_BITS,
    average_error_bound,
    dequantize,
    dequantize_sum,
    quantization_step,
    quantize,
    required_mod_bits,
    sum_error_bound,
    word_dtype,
)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 10, 17, 100])
@pytest.mark.parametrize("bits", [1, 8, 16, 24, 40])
def test_modulus_is_the_smallest_that_cannot_wrap(n, bits):
    k = required_mod_bits(n, bits)
    largest = n * ((1 << bits) - 1)
    assert largest < 1 << k  # cannot wrap
    assert largest >= 1 << (k - 1)  # and no larger than needed


def test_modulus_covers_the_weight_coordinate():
    assert required_mod_bits(4, 4, max_weight=1000) == (4 * 1000).bit_length()
    assert required_mod_bits(4, 16, max_weight=1000) == (4 * 65535).bit_length()


@pytest.mark.parametrize("n, bits", [(3, 16), (10, 20), (7, 28), (5, 40)])
def test_modular_sum_of_extreme_values_does_not_wrap(n, bits):
    k = required_mod_bits(n, bits)
    dtype = word_dtype(k)
    mask = dtype.type((1 << k) - 1)
    top = quantize(np.full(8, 5.0), 1.0, bits, dtype=dtype)  # clipped to +clip -> 2**bits - 1
    assert np.all(top == (1 << bits) - 1)
    acc = np.zeros(8, dtype=dtype)
    for _ in range(n):
        np.add(acc, top, out=acc)
    np.bitwise_and(acc, mask, out=acc)
    assert np.all(acc.astype(np.uint64) == n * ((1 << bits) - 1))
    np.testing.assert_allclose(dequantize_sum(acc, n, 1.0, bits), n * 1.0, rtol=0, atol=1e-9)


def test_quantize_range_clip_and_single_vector_error():
    rng = np.random.default_rng(0)
    x = rng.uniform(-3, 3, 10_000)
    q = quantize(x, 2.0, 12, rng=rng)
    assert q.dtype == np.uint64 and q.min() >= 0 and q.max() <= (1 << 12) - 1
    err = np.abs(dequantize(q, 2.0, 12) - np.clip(x, -2.0, 2.0))
    assert err.max() < quantization_step(2.0, 12)


def test_stochastic_rounding_is_unbiased():
    rng = np.random.default_rng(1)
    bits, clip = 4, 1.0
    step = quantization_step(clip, bits)
    x = np.array([-0.93, -0.31, 0.0, 0.123, 0.5, 0.77])
    reps = 20_000
    mean = dequantize(quantize(np.tile(x, reps), clip, bits, rng=rng), clip, bits).reshape(reps, -1).mean(0)
    # Each rounding is a +-step Bernoulli; 6 standard errors of the mean.
    assert np.all(np.abs(mean - x) < 6 * step / 2 / np.sqrt(reps))
    # Deterministic rounding would be biased by up to half a step on this grid.
    assert np.abs(np.round((x + clip) / step) * step - clip - x).max() > 0.2 * step


@pytest.mark.parametrize("n", range(3, 11))
def test_dequantised_sum_within_bound(n):
    rng = np.random.default_rng(n)
    clip, bits = 0.5, 10
    xs = [rng.normal(0, 0.2, 5_000) for _ in range(n)]
    qsum = sum(quantize(x, clip, bits, rng=rng) for x in xs)
    err = np.abs(dequantize_sum(qsum, n, clip, bits) - sum(np.clip(x, -clip, clip) for x in xs))
    bound = sum_error_bound(n, clip, bits)
    assert bound == pytest.approx(n * 2 * clip / (2**bits - 1))
    assert err.max() <= bound


def test_average_error_bound_scales_with_weights():
    assert average_error_bound(4, 4, 1, 1.0, 8) == pytest.approx(quantization_step(1.0, 8))
    assert average_error_bound(4, 40, 100, 1.0, 8) == pytest.approx(4 * quantization_step(1.0, 8) * 100 / 40)
    with pytest.raises(ValueError, match="total_weight"):
        average_error_bound(4, 0, 1, 1.0, 8)


def test_non_finite_values_rejected():
    with pytest.raises(ValueError, match="coordinate 2"):
        quantize(np.array([0.0, 1.0, np.nan]), 1.0, 8)


def test_config_refuses_a_modulus_wider_than_62_bits():
    with pytest.raises(ValueError, match=f"at most {MAX_MOD_BITS} bits"):
        SecAggConfig(num_clients=100_000, threshold=2, quant_bits=48, max_weight=1)
    cfg = SecAggConfig(num_clients=10, threshold=3, quant_bits=24)
    assert cfg.mod_bits == 28 and cfg.word_dtype == np.uint32
    assert SecAggConfig(num_clients=10, threshold=3, quant_bits=30).word_dtype == np.uint64
