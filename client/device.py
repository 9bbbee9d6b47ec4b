"""Where a region trains: its GPU when it has one, else the CPU with a bounded thread count."""

from __future__ import annotations

import torch


def select_device(num_threads: int, prefer: str = "auto") -> torch.device:
    """CUDA when available (and not disabled with ``prefer='cpu'``), otherwise CPU.

    The CPU thread count is set either way: tokenisation and evaluation run there,
    and on a shared host one region must not take every core.
    """
    torch.set_num_threads(max(1, int(num_threads)))
    if prefer != "cpu" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")
