"""Where a region trains, and in which number formats: its GPU when it has one, else the CPU.

Nothing here assumes a device type: every helper takes the ``torch.device`` the region
trains on, so the same code (and the same tests, on CPU) covers both.

Precision and DP: the forward pass may run in a cheaper format (TF32 matmuls on CUDA, bf16 autocast with
``mixed-precision = "bf16"``). What DP's sensitivity bound rests on -- per-sample norms, clipping, the clipped
sum and the noise -- runs in exact fp32 (:func:`exact_fp32_matmul`), so a contribution is never more than
``max-grad-norm`` long. Reduced precision is not harmless by itself: the kernel a GPU library picks depends on
the batch's shape, so one post joining a batch can change the rounding of the *other* posts' per-sample
gradients (measured on an H200 with Opacus' hooks under TF32: the clipped sum moved by 1.000028 C). So under
DP the backward pass of Opacus' hooks and ghost clipping, where their per-sample gradients and norms are formed,
is exact fp32 too (client/trainer.py). Book-keeping forms them from its stored tensors in exact fp32; its
backward keeps TF32 (the output gradients it stores come from there), measured within the bound: 0.99999998 C.
"""

from __future__ import annotations

import contextlib
import resource
from typing import Iterator

import torch

from fedpriv.core.errors import ConfigError

MIXED_PRECISION = {"off": None, "bf16": torch.bfloat16}


def select_device(num_threads: int, prefer: str = "auto") -> torch.device:
    """CUDA when available (and not disabled with ``prefer='cpu'``), otherwise CPU.

    The CPU thread count is set either way: tokenisation and evaluation run there,
    and on a shared host one region must not take every core. On CUDA, fp32 matmuls
    may use TF32 ("high"): the DP-critical arithmetic opts out with :func:`exact_fp32_matmul`.
    """
    torch.set_num_threads(max(1, int(num_threads)))
    if prefer != "cpu" and torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
        return torch.device("cuda")
    return torch.device("cpu")


CPU_PHYSICAL_BATCH = 256
"""``physical-batch-size = 0`` on a CPU: the measured sweet spot on 2 cores (bench/dp_cost.py)."""


def choose_physical_batch_size(device: torch.device, logical_batch: int, per_example_bytes: int,
                               free_bytes: int | None = None, share: float = 0.5) -> int:
    """``physical-batch-size = 0`` ("auto"): 256 on a CPU; on CUDA the largest power of two whose estimated
    per-example memory fits in ``share`` of the device's free memory (``free_bytes``: measured if not given).

    Never above the logical batch, never below 1. Only memory and speed depend on it: the physical batch
    splits a logical (Poisson) batch, so the DP step and ε are the same whatever it is.
    """
    if device.type != "cuda":
        return max(1, min(logical_batch, CPU_PHYSICAL_BATCH))
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    fits = int(share * free_bytes) // max(1, int(per_example_bytes))
    return max(1, min(logical_batch, 1 << max(0, fits.bit_length() - 1)))


def autocast_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``mixed-precision = mode`` on ``device`` (None: plain fp32)."""
    if mode not in MIXED_PRECISION:
        raise ConfigError(f"mixed-precision = {mode!r}: expected one of {', '.join(MIXED_PRECISION)}")
    dtype = MIXED_PRECISION[mode]
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"mixed-precision = {mode!r}: this GPU has no bf16 support; expected 'off'")
    return dtype


def forward_precision(mode: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context a forward pass runs in: ``torch.autocast`` on ``device``'s type, or nothing."""
    dtype = autocast_dtype(mode, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def exact_fp32_matmul() -> Iterator[None]:
    """fp32 matmuls in full precision (no TF32) inside the block, whatever the process-wide setting."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def peak_memory_mb() -> float:
    """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
