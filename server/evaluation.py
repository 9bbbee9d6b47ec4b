"""Central evaluation of the global model on the server's held-out set.

The held-out posts were split off before any region got data, so no region ever
trained on them: this is the honest utility number in the report.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fedpriv.task.encoding import encode
from fedpriv.task.features import FeatureDataset, SplitClassifier, evaluate_top
from fedpriv.task.model import set_trainable_values
from fedpriv.task.partition import load_server_test


class CentralEvaluator:
    """Evaluates from the frozen prefix's features, computed once for the whole run."""

    def __init__(self, split: SplitClassifier, tokenizer, data_root: Path, max_length: int, device: torch.device):
        self.split = split
        self.device = device
        encoded = encode(load_server_test(data_root), tokenizer, max_length)
        self.data: FeatureDataset = split.features(encoded, device)

    def __call__(self, values: "dict[str, np.ndarray]") -> tuple[float, float]:
        """(loss, accuracy) of the model with these trainable values."""
        set_trainable_values(self.split.model, values)
        return evaluate_top(self.split.top, self.data, self.device)

    @property
    def size(self) -> int:
        return len(self.data)
