"""Central evaluation of the global model on the server's held-out set.

The held-out posts were split off before any region got data, so no region ever
trained on them: this is the honest utility number in the report.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from task.encoding import EncodedDataset, encode, evaluate
from task.model import set_trainable_values
from task.partition import load_server_test


class CentralEvaluator:
    def __init__(self, model: torch.nn.Module, tokenizer, data_root: Path, max_length: int, device: torch.device):
        self.model = model
        self.device = device
        self.data: EncodedDataset = encode(load_server_test(data_root), tokenizer, max_length)

    def __call__(self, values: "dict[str, np.ndarray]") -> tuple[float, float]:
        """(loss, accuracy) of the model with these trainable values."""
        set_trainable_values(self.model, values)
        return evaluate(self.model, self.data, self.device)

    @property
    def size(self) -> int:
        return len(self.data)
