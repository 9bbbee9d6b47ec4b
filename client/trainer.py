"""A region's local training round: DP-SGD with Opacus, or plain SGD when DP is off.

:class:`LocalTrainer` runs one round on the region's shard. For DP it builds an
Opacus ``PrivacyEngine`` whose accountant is *seeded with the region's history*
from earlier rounds, so the ε it reports composes the whole run. Poisson
sampling gives the privacy amplification the accountant assumes; logical batches
of ``batch-size`` are split into physical batches of ``physical-batch-size`` by
Opacus' ``BatchMemoryManager`` so per-sample gradients fit in memory
(about physical batch x trainable parameters x 4 bytes).
"""

from __future__ import annotations

import math
import resource
import sys
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from fedpriv.config import FedprivConfig
from fedpriv.errors import DataError
from privacy.accountant import Entry
from privacy.schedule import Schedule, choose_noise_multiplier, region_schedule  # noqa: F401  (re-exported)
from task.features import FeatureDataset, SplitClassifier, collate_features
from task.model import get_trainable


@dataclass
class TrainResult:
    values: "OrderedDict[str, np.ndarray]"
    loss: float
    accuracy: float
    num_examples: int
    steps: int
    history: list[Entry]
    noise_multiplier: float
    sample_rate: float
    peak_memory_mb: float


class LocalTrainer:
    """One round of local training for one region.

    DP-SGD runs on the model's trainable top only, fed with the frozen prefix's
    (cached) features: mathematically the same model and gradients as running the
    whole network, at a fraction of the cost.
    """

    def __init__(self, split: SplitClassifier, data: FeatureDataset, cfg: FedprivConfig, device: torch.device):
        self.model = split.model.to(device)
        self.top = split.top
        self.data = data
        self.cfg = cfg
        self.device = device
        self.schedule = region_schedule(len(data), cfg)

    def train(self, history: list[Entry], noise_multiplier: float, seed: int, label: str = "") -> TrainResult:
        torch.manual_seed(seed)
        self.top.train()
        params = [p for p in self.top.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=self.cfg.learning_rate, momentum=self.cfg.momentum)
        loader = DataLoader(self.data, batch_size=self.cfg.batch_size, shuffle=True, collate_fn=collate_features,
                            generator=torch.Generator().manual_seed(seed))
        if self.cfg.dp:
            return self._train_private(optimizer, loader, history, noise_multiplier, label)
        losses, correct, seen = self._loop(self.top, optimizer, loader, self.cfg.batch_size, label)
        return self._result(losses, correct, seen, history, 0.0)

    def _train_private(self, optimizer, loader, history, noise_multiplier, label) -> TrainResult:
        """Opacus DP-SGD. ``grad-sample-mode = ghost``: per-sample gradient *norms* only, then a second
        backward on the clipped loss (same clipping, noise and accounting as ``hooks``, which materialise every
        per-sample gradient: at batch 256 that is most of a step's cost on the head, see bench/dp_cost.py)."""
        engine = PrivacyEngine(accountant="rdp")  # only records the (σ, q, steps) history; ε: privacy.accountant
        engine.accountant.history = list(history)
        kwargs = dict(module=self.top, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
                      max_grad_norm=self.cfg.max_grad_norm, poisson_sampling=True)
        criterion = None
        if self.cfg.grad_sample_mode == "ghost":
            module, dp_optimizer, criterion, dp_loader = engine.make_private(
                **kwargs, criterion=torch.nn.CrossEntropyLoss(), grad_sample_mode="ghost")
        else:
            module, dp_optimizer, dp_loader = engine.make_private(**kwargs)
        with BatchMemoryManager(data_loader=dp_loader, max_physical_batch_size=self.cfg.physical_batch_size,
                                optimizer=dp_optimizer) as memory_safe_loader:
            losses, correct, seen = self._loop(module, dp_optimizer, memory_safe_loader, self.cfg.physical_batch_size,
                                               label, criterion)
        result = self._result(losses, correct, seen, list(engine.accountant.history), noise_multiplier)
        module._close()  # remove Opacus hooks: the plain model goes back to the caller
        return result

    def _loop(self, module, optimizer, loader, physical: int, label: str, criterion=None) -> tuple[list[float], int, int]:
        """Iterate until ``steps_per_round`` logical steps have been taken (epochs may be fractional).

        ``criterion``: Opacus' ghost-clipping loss wrapper (its ``backward`` runs both passes); else the
        model's own loss."""
        target = self.schedule.steps_per_round
        losses: list[float] = []
        correct = seen = steps = 0
        bar = tqdm(total=target, desc=f"{label} local DP-SGD" if self.cfg.dp else f"{label} local SGD",
                   unit="step", disable=not sys.stderr.isatty(), leave=False)
        while steps < target:
            for batch in loader:
                batch = batch if isinstance(batch, dict) and len(batch["labels"]) else collate_features([], self.data.features[0].shape[1])
                batch = {k: v.to(self.device) for k, v in batch.items()}
                out = module(**batch)
                loss = out.loss if criterion is None else criterion(out.logits, batch["labels"])
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if len(batch["labels"]):
                    losses.append(float(loss.detach()))
                    correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
                    seen += len(batch["labels"])
                if not getattr(optimizer, "_is_last_step_skipped", False) or not self.cfg.dp:
                    steps += 1
                    bar.update(1)
                if steps >= target:
                    break
        bar.close()
        return losses, correct, seen

    def _result(self, losses, correct, seen, history, noise_multiplier) -> TrainResult:
        return TrainResult(
            values=get_trainable(self.model), loss=float(np.mean(losses)) if losses else float("nan"),
            accuracy=correct / seen if seen else float("nan"), num_examples=len(self.data),
            steps=self.schedule.steps_per_round, history=history, noise_multiplier=noise_multiplier,
            sample_rate=self.schedule.sample_rate, peak_memory_mb=peak_memory_mb(),
        )


def peak_memory_mb() -> float:
    """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
