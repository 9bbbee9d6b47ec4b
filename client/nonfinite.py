"""Non-finite containment: an example whose loss, gradient or norm is not finite adds nothing to the clipped sum.

The coordinator chooses the global weights. Finite weights can be crafted so that one target post's logit,
loss or gradient overflows (issue 21: a head row of 2e38 on the target's features). Opacus' clip factor
``min(1, C / ‖∇_i‖)`` is then NaN for that post, and one NaN in a sum makes the whole sum -- the release --
NaN: the target's presence decides whether the region's update is usable, a membership test no noise hides.

DP-SGD needs only that the clipped sum is ``Σ_i f(x_i)`` with ``‖f(x_i)‖ ≤ C`` and ``f(x_i)`` computed from
post i (and the public weights) alone. ``f(x_i) = 0`` for a non-finite post meets both, so:

1. The decision is per example: ``keep_i`` = post i's own loss and gradient norm are finite
   (:func:`keep_mask`). It is taken with ``torch.where`` on every post, every step -- the same work whatever
   the data, never a branch or a retry.
2. The example is removed *where it enters the sum*. ``0 · NaN = NaN``: a zero clip factor is not enough, so
   the example's rows of whatever the sum is formed from (per-sample gradients, a layer's stored input and
   output gradient, the output gradient of a second backward pass) are replaced by zeros (:func:`zero_rows`).

One clipping path per mode, each with both rules: book-keeping (``client/book_keeping.py``), Opacus' hooks
(:class:`ContainedDPOptimizer`) and ghost clipping (:class:`ContainedGhostLoss`), all built by
:class:`ContainedPrivacyEngine`. The rows are per example, so per-author clipping can apply the same two
functions to per-author rows. How many examples were zeroed is counted on the device and written to the
region's own log once per round (:class:`ZeroedExamples`); it never leaves the region.

What makes a row a function of its own post only is that nothing else in the batch reaches it: padding and
attention masks keep posts apart as long as the forward pass stays finite, which the region's weight bound
guarantees (``client/incoming.py``).
"""

from __future__ import annotations

import logging

import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping, DPTensorFastGradientClipping
from torch import nn

logger = logging.getLogger(__name__)


def keep_mask(norms: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
    """Which examples contribute: finite gradient norm (hence a finite gradient) and, when given, finite loss."""
    keep = torch.isfinite(norms)
    return keep if losses is None else keep & torch.isfinite(losses.to(keep.device))


def clip_factors(norms: torch.Tensor, max_grad_norm: float, keep: torch.Tensor) -> torch.Tensor:
    """Opacus' ``min(1, C / (‖∇_i‖ + 1e-6))`` for the kept examples, exactly 0 for the others."""
    factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    return torch.where(keep, factor, torch.zeros_like(factor))


def zero_rows(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``x`` (batch first) with the rows of the examples not kept replaced by zeros (not multiplied: 0·NaN)."""
    return torch.where(keep.to(x.device).view(-1, *([1] * (x.dim() - 1))), x, torch.zeros((), dtype=x.dtype,
                                                                                          device=x.device))


class ZeroedExamples:
    """How many examples a round's clipping zeroed. Summed on the device (no synchronisation per step) and read
    once, at the round's end, for one line in the region's own log: a count derived from the data, so it is
    never part of a reply, a metric or the report."""

    def __init__(self) -> None:
        self.count: torch.Tensor | int = 0

    def add(self, keep: torch.Tensor) -> None:
        self.count = self.count + (~keep).sum()

    def log(self, label: str) -> None:
        zeroed = int(self.count)
        if zeroed:
            logger.warning("%s: %d example gradient(s) were not finite this round (weights that overflow on them); "
                           "they contributed nothing to the clipped sums", label, zeroed)


class ContainedDPOptimizer(DPOptimizer):
    """Opacus' ``DPOptimizer`` (``grad-sample-mode = hooks``) whose clipping contains non-finite examples."""

    def __init__(self, *args, zeroed: ZeroedExamples | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.zeroed = zeroed if zeroed is not None else ZeroedExamples()

    def clip_and_accumulate(self) -> None:
        """``p.summed_grad += Σ_i c_i ∇_i p`` as Opacus computes it, with non-finite examples' rows zeroed (in place:
        a copy of every per-sample gradient would double this mode's largest memory cost)."""
        samples = self.grad_samples
        if len(samples[0]) == 0:  # an empty physical batch: nothing to clip
            return super().clip_and_accumulate()
        norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1).to(samples[0].device) for g in samples],
                            dim=1).norm(2, dim=1)
        keep = keep_mask(norms)
        factor = clip_factors(norms, self.max_grad_norm, keep)
        self.zeroed.add(keep)
        for p in self.params:
            _check_processed_flag(p.grad_sample)
            grad_sample = self._get_flat_grad_sample(p).to(p.dtype)  # Opacus' own copy, discarded after this step
            grad_sample.masked_fill_(~keep.to(grad_sample.device).view(-1, *([1] * (grad_sample.dim() - 1))), 0.0)
            grad = torch.einsum("i,i...", factor.to(grad_sample.device, p.dtype), grad_sample)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
            _mark_as_processed(p.grad_sample)


class RowGate:
    """Zeroes chosen examples' rows of the gradient arriving at every trainable layer's output, during a
    backward pass that asks for it: there the layer's parameter gradient is formed, so a non-finite example's
    ``0 · NaN`` never reaches it. A forward hook puts a tensor hook on each such output; it does nothing while
    ``keep`` is None."""

    def __init__(self, module: nn.Module):
        self.keep: torch.Tensor | None = None
        self.handles = [m.register_forward_hook(self._on_forward) for m in module.modules()
                        if any(p.requires_grad for p in m.parameters(recurse=False))]

    def _on_forward(self, module: nn.Module, args: tuple, output) -> None:
        if isinstance(output, torch.Tensor) and output.requires_grad and torch.is_grad_enabled():
            output.register_hook(self._mask)

    def _mask(self, grad: torch.Tensor) -> torch.Tensor | None:
        return None if self.keep is None else zero_rows(grad, self.keep)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


class ContainedGhostTensor(DPTensorFastGradientClipping):
    """Opacus' ghost-clipping loss whose ``backward`` contains non-finite examples (its two passes, as Opacus)."""

    def __init__(self, module, optimizer, loss_per_sample, loss_reduction, gate: RowGate, zeroed: ZeroedExamples):
        super().__init__(module, optimizer, loss_per_sample, loss_reduction)
        self.gate, self.zeroed = gate, zeroed

    def backward(self) -> None:
        """Pass 1: per-sample norms in Opacus' hooks. Pass 2: ``Σ_i c_i L_i`` backward with ``c_i = 0`` and the
        example's output-gradient rows zeroed for every example whose loss or norm is not finite."""
        losses = self.loss_per_sample
        reduced = losses.mean(dim=0) if self.loss_reduction == "mean" else losses.sum(dim=0)
        reduced.backward(retain_graph=True)
        self.optimizer.zero_grad()
        norms = self.module.get_norm_sample()
        keep = keep_mask(norms, losses.detach())
        coeff = clip_factors(norms, self.module.max_grad_norm, keep).to(losses.device)
        self.zeroed.add(keep)
        second = (coeff * torch.where(keep, losses, torch.zeros_like(losses))).sum()
        self.module.disable_hooks()
        self.gate.keep = keep
        try:
            second.backward()
        finally:
            self.gate.keep = None
            self.module.enable_hooks()

    def detach(self) -> torch.Tensor:
        return finite_mean(self.loss_per_sample)


class ContainedGhostLoss(DPLossFastGradientClipping):
    """Opacus' ghost-clipping criterion wrapper, returning :class:`ContainedGhostTensor`."""

    def __init__(self, module, optimizer, criterion, loss_reduction: str = "mean", *, zeroed: ZeroedExamples):
        super().__init__(module, optimizer, criterion, loss_reduction)
        self.gate, self.zeroed = RowGate(module), zeroed

    def __call__(self, *args, **kwargs) -> ContainedGhostTensor:
        plain = super().__call__(*args, **kwargs)
        return ContainedGhostTensor(self.module, self.optimizer, plain.loss_per_sample, self.loss_reduction,
                                    self.gate, self.zeroed)

    def close(self) -> None:
        self.gate.remove()


class ContainedPrivacyEngine(PrivacyEngine):
    """Opacus' ``PrivacyEngine`` whose hooks optimizer and ghost-clipping criterion contain non-finite examples.

    Everything else -- the Poisson loader, the grad-sample module, the noise, the accountant hook -- is Opacus'
    own. ``zeroed`` counts the examples every clipping step zeroed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.zeroed = ZeroedExamples()
        self._criteria: list[ContainedGhostLoss] = []

    def _prepare_optimizer(self, *, optimizer, grad_sample_mode="hooks", clipping="flat", distributed=False,
                           noise_generator=None, **kwargs):
        if grad_sample_mode != "hooks" or clipping != "flat" or distributed:
            return super()._prepare_optimizer(optimizer=optimizer, grad_sample_mode=grad_sample_mode,
                                              clipping=clipping, distributed=distributed,
                                              noise_generator=noise_generator, **kwargs)
        if isinstance(optimizer, DPOptimizer):
            optimizer = optimizer.original_optimizer
        generator = self.secure_rng if self.secure_mode else noise_generator
        return ContainedDPOptimizer(optimizer=optimizer, generator=generator, secure_mode=self.secure_mode,
                                    zeroed=self.zeroed, **kwargs)

    def _prepare_criterion(self, *, module, optimizer, criterion, loss_reduction: str = "mean", **kwargs):
        contained = ContainedGhostLoss(module, optimizer, criterion, loss_reduction, zeroed=self.zeroed)
        self._criteria.append(contained)
        return contained

    def close(self) -> None:
        """Remove the hooks this engine added (Opacus' own go with ``module._close()``)."""
        for criterion in self._criteria:
            criterion.close()


def finite_mean(per_sample: torch.Tensor) -> torch.Tensor:
    """The mean loss over the examples whose loss is finite (what the local train-loss metric reports)."""
    per_sample = per_sample.detach()
    finite = torch.isfinite(per_sample)
    return torch.where(finite, per_sample, 0).sum() / finite.sum().clamp(min=1)
