"""A region's local training round: DP-SGD with Opacus, or plain SGD when DP is off.

:class:`LocalTrainer` runs one round on the region's shard. For DP it builds an
Opacus ``PrivacyEngine`` whose accountant is *seeded with the region's history*
from earlier rounds, so the ε it reports composes the whole run. Poisson
sampling gives the privacy amplification the accountant assumes; logical batches
of ``batch-size`` are split into physical batches of ``physical-batch-size`` by
Opacus' ``BatchMemoryManager`` so per-sample gradients fit in memory
(about physical batch x trainable parameters x 4 bytes).

Randomness: the run's ``seed`` (through the region's round seed) drives only what is
not privacy-critical — dropout, and shuffling when DP is off. The DP noise and the
Poisson sample come from fresh OS entropy for every release (``client/randomness.py``),
unless the testing-only ``insecure-deterministic-noise`` key asks for a replayable release.

Weights the coordinator crafted (issue 21): every clipping mode zeroes an example whose loss or gradient is
not finite (``client/nonfinite.py``), and the trainable weights are kept within the region's
``max-weight-magnitude`` before the first step and after every step (``client/incoming.py``), so the release
is always finite and of the model's shape, whatever the data. Without DP nothing is clipped: a gradient that
overflows makes the step's weights NaN, which the projection turns into 0 -- the release stays finite, and
(being non-DP) was never private.
"""

from __future__ import annotations

import contextlib
import warnings
import sys
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from fedpriv.task.device import choose_physical_batch_size, exact_fp32_matmul, forward_precision, peak_memory_mb
from fedpriv.client import book_keeping
from fedpriv.client.batching import sort_batches_by_length
from fedpriv.client.incoming import keep_within
from fedpriv.client.nonfinite import ContainedDPOptimizer, ContainedGhostLoss, ContainedPrivacyEngine, finite_mean
from fedpriv.client.optimizer_state import export_state, import_state
from fedpriv.client.randomness import enable_secure_noise, release_randomness
from fedpriv.core.config import FedprivConfig
from fedpriv.privacy.accountant import Entry
from fedpriv.privacy.policy import DEFAULT_MAX_WEIGHT_MAGNITUDE
from fedpriv.privacy.schedule import Schedule, choose_noise_multiplier, region_schedule  # noqa: F401  (re-exported)
from fedpriv.task.features import FeatureDataset, SplitClassifier, collate_features
from fedpriv.task.model import get_trainable


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
    optimizer_state: "dict[str, np.ndarray] | None" = None  # ``local-optimizer-state = keep``: client/optimizer_state.py


class LocalTrainer:
    """One round of local training for one region.

    DP-SGD runs on the model's trainable top only, fed with the frozen prefix's
    (cached) features: mathematically the same model and gradients as running the
    whole network, at a fraction of the cost.
    """

    def __init__(self, split: SplitClassifier, data: FeatureDataset, cfg: FedprivConfig, device: torch.device,
                 max_weight_magnitude: float = DEFAULT_MAX_WEIGHT_MAGNITUDE):
        self.max_weight_magnitude = max_weight_magnitude  # the region's policy: client/incoming.py
        self.model = split.model.to(device)
        self.top = split.top
        self.data = data
        self.cfg = cfg
        self.device = device
        self.schedule = region_schedule(len(data), cfg)
        self.lengths = [f.shape[0] for f in data.features]

    def train(self, history: list[Entry], noise_multiplier: float, seed: int, label: str = "",
              optimizer_state: "dict[str, np.ndarray] | None" = None) -> TrainResult:
        """One round. ``seed`` (public: derived from the run config) seeds dropout and non-DP shuffling only.

        ``optimizer_state``: the local optimizer's state after the region's previous round of this job
        (``local-optimizer-state = keep``; the caller vouches that round was accounted, client/optimizer_state.py);
        with ``keep`` the result carries the state after this round."""
        torch.manual_seed(seed)
        self.top.train()
        named = [(n, p) for n, p in self.top.named_parameters() if p.requires_grad]
        keep_within([p for _, p in named], self.max_weight_magnitude)
        optimizer = local_optimizer([p for _, p in named], self.cfg)
        if optimizer_state and not import_state(optimizer, [n for n, _ in named], optimizer_state):
            warnings.warn(f"{label}: the kept optimizer state does not match the trainable parameters; this round "
                          "starts with a fresh optimizer")
        if self.cfg.dp:
            result = self._train_private(optimizer, history, noise_multiplier, seed, label)
        else:
            loader = DataLoader(self.data, batch_size=self.cfg.batch_size, shuffle=True, collate_fn=collate_features,
                                generator=torch.Generator().manual_seed(seed))
            losses, correct, seen = self._loop(self.top, optimizer, loader, self.cfg.batch_size, label)
            result = self._result(losses, correct, seen, history, 0.0)
        if self.cfg.local_optimizer_state == "keep":
            result.optimizer_state = export_state(optimizer, [n for n, _ in named])
        return result

    def _train_private(self, optimizer, history, noise_multiplier, seed, label) -> TrainResult:
        """Opacus DP-SGD. ``grad-sample-mode = ghost``: per-sample gradient *norms* only, then a second
        backward on the clipped loss (same clipping, noise and accounting as ``hooks``, which materialise every
        per-sample gradient: at batch 256 that is most of a step's cost on the head, see bench/dp_cost.py);
        ``bk``: book-keeping (client/book_keeping.py), norms and the clipped sum from one backward, with
        Opacus' sampler, noise and accountant.

        Noise and Poisson sampling draw from generators made for this release alone (OS entropy)."""
        rng = release_randomness(self.device, seed if self.cfg.insecure_deterministic_noise else None)
        loader = DataLoader(self.data, batch_size=self.cfg.batch_size, collate_fn=collate_features,
                            generator=rng.sampling)  # Opacus' Poisson sampler draws from the loader's generator
        with warnings.catch_warnings():
            # Opacus warns "Secure RNG turned off" because its own secure_mode (which needs torchcsprng) is off.
            # It does not apply here: fedpriv passes OS-entropy generators and turns on secure-mode noise itself
            # (client/randomness.py), so the warning would tell an operator the opposite of what is true.
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            engine = ContainedPrivacyEngine(accountant="rdp")  # only records the (σ, q, steps) history; ε: fedpriv.privacy.accountant
        engine.accountant.history = list(history)
        kwargs = dict(module=self.top, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
                      max_grad_norm=self.cfg.max_grad_norm, poisson_sampling=True, noise_generator=rng.noise)
        criterion = None
        if self.cfg.grad_sample_mode == "ghost":
            module, dp_optimizer, criterion, dp_loader = engine.make_private(
                **kwargs, criterion=torch.nn.CrossEntropyLoss(), grad_sample_mode="ghost")
        elif self.cfg.grad_sample_mode == "bk":
            module, dp_optimizer, criterion, dp_loader = book_keeping.make_private(
                self.top, optimizer, loader, engine.accountant, noise_multiplier=noise_multiplier,
                max_grad_norm=self.cfg.max_grad_norm, noise_generator=rng.noise, zeroed=engine.zeroed)
        else:
            module, dp_optimizer, dp_loader = engine.make_private(**kwargs)
        contained = {"ghost": isinstance(criterion, ContainedGhostLoss), "bk": isinstance(module, book_keeping.BookKeeping)}
        if not contained.get(self.cfg.grad_sample_mode, isinstance(dp_optimizer, ContainedDPOptimizer)):
            raise RuntimeError("Opacus did not take fedpriv's non-finite containment: refusing to clip without it")
        enable_secure_noise(dp_optimizer)
        if dp_loader.batch_sampler.generator is not rng.sampling or dp_optimizer.generator is not rng.noise:
            raise RuntimeError("Opacus did not take the release's generators: refusing to train on predictable noise")
        physical = self.physical_batch_size()
        dp_loader = sort_batches_by_length(dp_loader, self.lengths)  # physical batches of similar length: less padding
        with BatchMemoryManager(data_loader=dp_loader, max_physical_batch_size=physical,
                                optimizer=dp_optimizer) as memory_safe_loader:
            losses, correct, seen = self._loop(module, dp_optimizer, memory_safe_loader, physical, label, criterion)
        result = self._result(losses, correct, seen, list(engine.accountant.history), noise_multiplier)
        module._close()  # remove Opacus hooks: the plain model goes back to the caller
        engine.close()
        engine.zeroed.log(label)  # the region's own log only: a count derived from the data
        return result

    def physical_batch_size(self) -> int:
        """``physical-batch-size``, or with 0 the device's choice for this model (task/device.py)."""
        if self.cfg.physical_batch_size:
            return self.cfg.physical_batch_size
        tokens = self.cfg.max_length if len(self.top.layers) else 1  # the longest a post can be: no data needed
        return choose_physical_batch_size(self.device, self.cfg.batch_size, per_example_bytes(self.top, self.cfg, tokens))

    def _loop(self, module, optimizer, loader, physical: int, label: str, criterion=None) -> tuple[list[float], int, int]:
        """Iterate until ``steps_per_round`` logical steps have been taken (epochs may be fractional).

        ``criterion``: Opacus' ghost-clipping loss wrapper (its ``backward`` runs both passes) or book-keeping's
        (its ``backward`` clips per example); else the model's own loss."""
        target = self.schedule.steps_per_round
        params = [p for group in optimizer.param_groups for p in group["params"]]
        losses: list[float] = []
        correct = seen = steps = 0
        bar = tqdm(total=target, desc=f"{label} local DP-SGD" if self.cfg.dp else f"{label} local SGD",
                   unit="step", disable=not sys.stderr.isatty(), leave=False)
        while steps < target:
            for batch in loader:
                if isinstance(batch, dict) and len(batch["labels"]):
                    batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
                    loss, logits = self._forward_backward(module, batch, criterion)
                    per_sample = F.cross_entropy(logits.detach().float(), batch["labels"], reduction="none")
                    losses.append(float(finite_mean(per_sample)))  # a crafted overflow: not NaN, like the sum
                    correct += int((logits.argmax(-1) == batch["labels"]).sum())
                    seen += len(batch["labels"])
                else:  # Poisson sampling drew no post: the logical step still happens (noise only)
                    no_contribution(optimizer)
                with exact_fp32_matmul() if self.cfg.dp else contextlib.nullcontext():
                    optimizer.step()
                keep_within(params, self.max_weight_magnitude)
                optimizer.zero_grad(set_to_none=True)
                if not getattr(optimizer, "_is_last_step_skipped", False) or not self.cfg.dp:
                    steps += 1
                    bar.update(1)
                if steps >= target:
                    break
        bar.close()
        return losses, correct, seen

    def _forward_backward(self, module, batch, criterion) -> tuple[torch.Tensor, torch.Tensor]:
        with forward_precision(self.cfg.mixed_precision, self.device):
            out = module(**batch)
            loss = out.loss if criterion is None else criterion(out.logits, batch["labels"])
        # DP: what bounds a contribution (per-sample norms, clipping, the clipped sum, noise) is exact fp32.
        # Ghost clipping takes the norms and the clipped sum from two backward passes, which must agree.
        # Opacus' hooks form every per-sample gradient in the backward pass: under TF32 the kernel cuBLAS picks
        # depends on the batch's shape, so one post joining moved the *other* posts' gradients (H200: the
        # clipped sum moved by 1.000028 C, bench/clipping_bound.py). Book-keeping takes norms and clipped sum
        # from one set of stored tensors and makes its own arithmetic exact (measured 0.99999998 C under TF32).
        exact = self.cfg.dp and self.cfg.grad_sample_mode in ("ghost", "hooks")
        with exact_fp32_matmul() if exact else contextlib.nullcontext():
            loss.backward()
        return loss, out.logits

    def _result(self, losses, correct, seen, history, noise_multiplier) -> TrainResult:
        return TrainResult(
            values=get_trainable(self.model), loss=float(np.mean(losses)) if losses else float("nan"),
            accuracy=correct / seen if seen else float("nan"), num_examples=len(self.data),
            steps=self.schedule.steps_per_round, history=history, noise_multiplier=noise_multiplier,
            sample_rate=self.schedule.sample_rate, peak_memory_mb=peak_memory_mb(),
        )


def no_contribution(dp_optimizer) -> None:
    """What an empty physical batch leaves for the DP optimizer: a zero clipped sum, without running the model
    (a Transformer layer cannot run on zero posts). Ghost clipping and book-keeping hand the optimizer the
    clipped sum in ``p.grad``; Opacus' hooks hand it per-sample gradients, here none."""
    for p in dp_optimizer.params:
        if isinstance(dp_optimizer, DPOptimizerFastGradientClipping):
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = p.new_zeros((0, *p.shape))


def local_optimizer(params: list[torch.nn.Parameter], cfg: FedprivConfig) -> torch.optim.Optimizer:
    """The region's optimizer (``local-optimizer``). Under DP, Opacus clips and noises the gradient before it
    reaches any of them, so Adam's moments are post-processing of the DP gradient (no extra privacy cost)."""
    if cfg.local_optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if cfg.local_optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.learning_rate, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def per_example_bytes(top: torch.nn.Module, cfg: FedprivConfig, tokens: int) -> int:
    """Estimated device memory one example of a physical batch costs in a DP step (an upper-end estimate).

    Activations kept for the backward: per token and encoder layer h·(34 + 5·a·T/h) bytes at 16 bits
    (Korthikanti et al. 2022, "Reducing activation recomputation"), twice that in fp32. ``hooks``
    materialise one per-sample gradient (fp32); ghost clipping instead keeps two T x T Gram matrices per
    linear layer; book-keeping every trainable linear layer's input and output gradient (T x (in + out)
    values each). For all-MiniLM (T = 64, every layer trains) this gives ~55 MB per example with hooks and
    ~14 MB with ghost: ~14 / 3.6 GB at batch 256, the order of the 11.0 / 3.0 GiB peaks measured on an H100
    (issue 10).
    """
    config = top.config
    bits = 2 if cfg.mixed_precision == "bf16" else 4
    layers = len(getattr(top, "layers", []))
    per_token_layer = config.hidden_size * (34 + 5 * config.num_attention_heads * tokens / config.hidden_size) * bits / 2
    activations = tokens * max(1, layers) * per_token_layer
    trainable = sum(p.numel() for p in top.parameters() if p.requires_grad)
    if cfg.grad_sample_mode == "hooks":
        per_sample = trainable * 4
    elif cfg.grad_sample_mode == "bk":  # each trainable linear layer's input and output gradient, fp32 copies
        per_sample = sum(tokens * (m.in_features + m.out_features) * 4 for m in top.modules()
                         if isinstance(m, torch.nn.Linear) and m.weight.requires_grad) + 2 * tokens * tokens * 4
    else:
        linears = sum(1 for m in top.modules() if isinstance(m, torch.nn.Linear))
        per_sample = linears * 2 * tokens * tokens * 4
    return int(activations + per_sample)
