"""Fixed-point encoding of model updates for secure aggregation.

Secure aggregation sums integers modulo ``2**k``; model updates are floats. Each
client therefore encodes its update as follows (all before any masking):

1. The update handed to secure aggregation is *already* clipped (DP-SGD per-sample
   clipping) and *already* noised (DP-SGD Gaussian noise). Everything below is
   post-processing of a differentially private quantity, so the DP guarantee is
   unchanged by it.
2. Each coordinate is clipped to ``[-clip_range, clip_range]``. This is a
   coordinate-wise bound needed by the fixed-point encoding (not the DP clip);
   choose ``clip_range`` large enough that it rarely bites.
3. The clipped value is mapped affinely onto ``[0, 2**b - 1]`` and rounded
   *stochastically* (up with probability equal to the fractional part), which is
   unbiased: ``E[dequantize(quantize(x))] == clip(x)``.

The modulus is chosen so that the modular sum cannot wrap: the sum of ``n`` values
each in ``[0, 2**b)`` is at most ``n * (2**b - 1)``, so ``k`` is the bit length of
that number (and of ``n * max_weight`` for the weight coordinate). ``k <= 62``
keeps every intermediate inside ``uint64``; when ``k <= 32`` the protocol uses
``uint32`` words, halving the upload.

Error bound. Each client's stochastic rounding error is strictly less than one step
``step = 2 * clip_range / (2**b - 1)`` per coordinate, so after summing ``n``
clients ``|dequantised sum - sum of clipped values| < n * step`` per coordinate
(:func:`sum_error_bound`). Float64 arithmetic adds a relative error around 1e-16,
negligible for ``b <= 48``.
"""

from __future__ import annotations

import numpy as np

#: Largest modulus exponent: sums stay inside uint64 with headroom.
MAX_MOD_BITS = 62
#: Largest quantisation bit width: float64 still resolves one step exactly.
MAX_QUANT_BITS = 48


def quantization_step(clip_range: float, quant_bits: int) -> float:
    """Width of one quantisation level: ``2 * clip_range / (2**quant_bits - 1)``."""
    return 2.0 * float(clip_range) / float((1 << quant_bits) - 1)


def required_mod_bits(num_clients: int, quant_bits: int, max_weight: int = 1) -> int:
    """Smallest ``k`` such that summing ``num_clients`` encoded vectors cannot wrap mod ``2**k``.

    Each quantised coordinate lies in ``[0, 2**quant_bits - 1]`` and the weight
    coordinate in ``[0, max_weight]``; ``k`` is the bit length of the largest
    possible sum, so ``largest_sum < 2**k``.
    """
    largest = max(num_clients * ((1 << quant_bits) - 1), num_clients * int(max_weight))
    return max(1, largest.bit_length())


def word_dtype(mod_bits: int) -> np.dtype:
    """Unsigned word used for vectors mod ``2**mod_bits``: uint32 up to 32 bits, else uint64."""
    if not 1 <= mod_bits <= MAX_MOD_BITS:
        raise ValueError(f"mod_bits={mod_bits} is outside [1, {MAX_MOD_BITS}]")
    return np.dtype(np.uint32) if mod_bits <= 32 else np.dtype(np.uint64)


def quantize(
    values: np.ndarray,
    clip_range: float,
    quant_bits: int,
    *,
    scale: float = 1.0,
    rng: np.random.Generator | None = None,
    dtype: np.dtype | type = np.uint64,
) -> np.ndarray:
    """Clip ``scale * values`` to ``[-clip_range, clip_range]`` and round stochastically onto ``[0, 2**quant_bits - 1]``.

    ``rng`` drives the rounding (pass a seeded generator for reproducibility); the
    rounding noise is not secret, so a non-cryptographic generator is fine.
    Raises ``ValueError`` on NaN or infinite input.
    """
    work = np.multiply(np.asarray(values).ravel(), scale, dtype=np.float64)  # private float64 copy
    if not np.isfinite(work).all():
        bad = int(np.flatnonzero(~np.isfinite(work))[0])
        raise ValueError(f"update coordinate {bad} is {work[bad]!r}; secure aggregation needs finite values")
    top = (1 << quant_bits) - 1
    rng = np.random.default_rng() if rng is None else rng
    np.clip(work, -clip_range, clip_range, out=work)
    work += clip_range
    work *= top / (2.0 * clip_range)  # now in [0, top] up to one ulp
    low = np.floor(work)
    work -= low  # fractional part, in [0, 1)
    up = rng.random(work.shape[0]) < work
    q = low.astype(dtype)
    q += up
    np.minimum(q, q.dtype.type(top), out=q)  # the ulp at the top end must not round past it
    return q


def dequantize_sum(
    quantized_sum: np.ndarray, num_summed: int, clip_range: float, quant_bits: int
) -> np.ndarray:
    """Map a sum of ``num_summed`` quantised vectors back to floats (sum of the clipped values)."""
    step = quantization_step(clip_range, quant_bits)
    out = np.asarray(quantized_sum).astype(np.float64)
    out *= step
    out -= num_summed * float(clip_range)
    return out


def dequantize(quantized: np.ndarray, clip_range: float, quant_bits: int) -> np.ndarray:
    """Inverse of :func:`quantize` for a single vector (up to one step of rounding)."""
    return dequantize_sum(quantized, 1, clip_range, quant_bits)


def sum_error_bound(num_summed: int, clip_range: float, quant_bits: int) -> float:
    """Per-coordinate bound on ``|dequantised sum - sum of clipped values|``: ``num_summed * step``."""
    return num_summed * quantization_step(clip_range, quant_bits)


def average_error_bound(
    num_summed: int, total_weight: int, max_weight: int, clip_range: float, quant_bits: int
) -> float:
    """Per-coordinate bound on the error of the weighted average recovered by the server.

    Clients encode ``(weight / max_weight) * update``; the server multiplies the
    dequantised sum by ``max_weight`` and divides by ``total_weight``, which scales the
    :func:`sum_error_bound` by ``max_weight / total_weight``. With equal weights this
    is one step; it grows when ``max_weight`` is much larger than the typical weight,
    so declare ``max_weight`` tightly.
    """
    if total_weight <= 0:
        raise ValueError(f"total_weight={total_weight} must be > 0")
    return sum_error_bound(num_summed, clip_range, quant_bits) * max_weight / total_weight
