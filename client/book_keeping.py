"""Book-keeping per-sample clipping: DP-SGD's clipped gradient sum from one backward pass.

Opacus offers two exact ways to clip each example's gradient: ``hooks`` materialise every per-sample
gradient (memory ∝ batch x parameters, and most of a step's time for a whole encoder), and ghost
clipping takes per-sample *norms* in a first backward and the clipped sum from a second one (two
backward passes: 0.33x of the non-private step for all-MiniLM on an H200). Book-keeping (Bu, Wang, Zha
& Karypis 2023, "Differentially private optimization on large model at small cost") needs one backward:

1. The backward computes gradients with respect to the trainable layers' *outputs* only
   (``torch.autograd.grad``), so autograd skips the weight gradients it would otherwise throw away.
2. Each trainable layer's input ``a`` (kept by a forward hook) and output gradient ``g`` give example
   i's squared gradient norm: for a linear layer ``Σ_{t,t'} (a_t·a_t')(g_t·g_t')`` (ghost norm, when
   cheaper) or ``‖g_iᵀ a_i‖²`` (materialised); for LayerNorm ``‖Σ_t g_t ⊙ x̂_t‖²`` and ``‖Σ_t g_t‖²``.
3. With Opacus' clip factor ``c_i = min(1, C / (‖∇_i‖ + 1e-6))`` the clipped sum of a linear weight is
   ``(c ⊙ g)ᵀ a``: one matmul, the cost of the weight gradient step 1 skipped.

Norms and clipped sums are computed in exact fp32 from the *same* stored ``a`` and ``g``, so the bound
``‖c_i ∇_i‖ ≤ C`` holds however those were computed — also under bf16 autocast, which ghost clipping's
two passes cannot promise. Noise, the Poisson sampler and the accountant stay Opacus' own
(``DPOptimizerFastGradientClipping`` adds the noise to the clipped sum, exactly as for ghost clipping).

Supported trainable layers: ``nn.Linear`` (also inside peft's LoRA adapters) and ``nn.LayerNorm`` — every
layer fedpriv's models train. Anything else is refused before a step is taken.

Non-finite containment (``client/nonfinite.py``): an example whose loss or norm is not finite gets factor 0 and
its rows of every stored ``a`` and ``g`` are zeroed before the clipped sum is formed, so it adds exactly nothing
(``0 · NaN`` would otherwise poison the whole sum).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizerFastGradientClipping
from torch import nn
from torch.utils.data import DataLoader

from fedpriv.client.nonfinite import ZeroedExamples, finite_mean, clip_factors, keep_mask, zero_rows
from fedpriv.task.device import exact_fp32_matmul

SUPPORTED = (nn.Linear, nn.LayerNorm)


class UnsupportedLayer(ValueError):
    """A trainable layer book-keeping cannot clip per example."""


@dataclass
class _Layer:
    """One trainable layer: what its forward saw, for the backward's per-sample arithmetic."""

    name: str
    module: nn.Module
    params: list[nn.Parameter]
    inputs: torch.Tensor | None = None
    output: torch.Tensor | None = None
    version: int = 0
    handles: list = field(default_factory=list)

    def capture(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
            return  # evaluation, or a layer nothing trainable depends on
        if self.output is not None:
            raise RuntimeError(f"book-keeping: layer {self.name} ran twice in one forward pass; "
                               "its per-sample gradient would be split over two uses")
        x = args[0] if args else kwargs["input"]
        self.inputs, self.output, self.version = x.detach(), output, output._version

    def clear(self) -> None:
        self.inputs = self.output = None


class BookKeeping(nn.Module):
    """The trainable model with book-keeping clipping; pair it with :meth:`criterion` and a DP optimizer.

    ``forward`` is the wrapped module's; ``criterion(logits, labels)`` returns a loss whose ``backward()``
    leaves the *clipped, un-noised sum* of the batch's per-sample gradients in every ``p.grad``."""

    def __init__(self, module: nn.Module, max_grad_norm: float, zeroed: ZeroedExamples | None = None):
        super().__init__()
        self._module = module
        self.max_grad_norm = float(max_grad_norm)
        self.zeroed = zeroed if zeroed is not None else ZeroedExamples()
        self.layers = _trainable_layers(module)
        for layer in self.layers:
            layer.handles.append(layer.module.register_forward_hook(layer.capture, with_kwargs=True))

    def forward(self, *args, **kwargs):
        for layer in self.layers:
            layer.clear()
        return self._module(*args, **kwargs)

    def criterion(self, logits: torch.Tensor, labels: torch.Tensor) -> "BookKeepingLoss":
        per_sample = nn.functional.cross_entropy(logits.float(), labels, reduction="none")
        return BookKeepingLoss(per_sample, self)

    def clip_and_sum(self, per_sample_loss: torch.Tensor) -> torch.Tensor:
        """Set every ``p.grad`` to the clipped per-sample gradient sum; return the per-sample norms.

        An example whose loss or norm is not finite contributes exactly zero (its norm is returned as it is)."""
        n = per_sample_loss.shape[0]
        live = [layer for layer in self.layers if layer.output is not None]
        for layer in live:
            if layer.output._version != layer.version:
                raise RuntimeError(f"book-keeping: the output of {layer.name} was modified in place after the forward")
        grads = torch.autograd.grad(per_sample_loss.sum(), [layer.output for layer in live],
                                    allow_unused=True) if live and n else []
        live, grads = [layer for layer, g in zip(live, grads) if g is not None], [g for g in grads if g is not None]
        with exact_fp32_matmul():
            parts = [(layer, _per_sample_parts(layer, g.float())) for layer, g in zip(live, grads)]
            sq = torch.zeros(n, dtype=torch.float32, device=per_sample_loss.device)
            for layer, part in parts:
                sq += _squared_norms(layer, part)
            norms = sq.sqrt()
            keep = keep_mask(norms, per_sample_loss.detach())
            factor = clip_factors(norms, self.max_grad_norm, keep)
            self.zeroed.add(keep)
            for layer in self.layers:
                for p in layer.params:
                    p.grad = torch.zeros_like(p)
            for layer, part in parts:
                _add_clipped_sum(layer, part, factor, keep)
        for layer in self.layers:
            layer.clear()
        return norms

    def _close(self) -> None:
        """Remove the hooks (the name Opacus' wrappers use, so the trainer releases either kind alike)."""
        for layer in self.layers:
            for handle in layer.handles:
                handle.remove()
            layer.handles.clear()
            layer.clear()


class BookKeepingLoss:
    """The per-sample losses of one physical batch; ``backward()`` clips per example (Opacus' ghost loss API)."""

    def __init__(self, per_sample: torch.Tensor, owner: BookKeeping):
        self.per_sample, self.owner = per_sample, owner

    def backward(self) -> None:
        self.owner.clip_and_sum(self.per_sample)

    def detach(self) -> torch.Tensor:
        return finite_mean(self.per_sample)


def make_private(module: nn.Module, optimizer: torch.optim.Optimizer, data_loader: DataLoader, accountant, *,
                 noise_multiplier: float, max_grad_norm: float, noise_generator: torch.Generator,
                 zeroed: ZeroedExamples | None = None):
    """Opacus' pieces around book-keeping, as ``PrivacyEngine.make_private`` assembles them for ghost clipping.

    Poisson sampling at ``q = 1 / len(data_loader)`` drawing from the loader's generator, the noise from
    ``noise_generator``, expected batch ``int(len(dataset) · q)`` and the accountant's step hook at that
    ``q``. Returns ``(module, optimizer, criterion, data_loader)`` like the ghost-clipping call."""
    wrapped = BookKeeping(module, max_grad_norm, zeroed)
    dp_loader = DPDataLoader.from_data_loader(data_loader, generator=data_loader.generator)
    sample_rate = 1 / len(data_loader)
    dp_optimizer = DPOptimizerFastGradientClipping(
        optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        expected_batch_size=int(len(data_loader.dataset) * sample_rate), loss_reduction="mean",
        generator=noise_generator)
    dp_optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    return wrapped, dp_optimizer, wrapped.criterion, dp_loader


def _trainable_layers(module: nn.Module) -> list[_Layer]:
    layers, seen = [], set()
    for name, sub in module.named_modules():
        params = [p for p in sub.parameters(recurse=False) if p.requires_grad]
        if not params:
            continue
        if not isinstance(sub, SUPPORTED):
            raise UnsupportedLayer(f"grad-sample-mode = 'bk' clips trainable nn.Linear and nn.LayerNorm layers; "
                                   f"{name or 'the model'} is a trainable {type(sub).__name__} (use 'hooks' or 'ghost')")
        if any(id(p) in seen for p in params):
            raise UnsupportedLayer(f"grad-sample-mode = 'bk': {name} shares a trainable parameter with another layer "
                                   "(tied weights); its per-sample norm would count it twice")
        seen.update(id(p) for p in params)
        layers.append(_Layer(name, sub, params))
    return layers


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(batch, ..., features) -> (batch, tokens, features): every middle dimension counts as a token."""
    return x.float().reshape(x.shape[0], -1, x.shape[-1])


def _per_sample_parts(layer: _Layer, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What both the norms and the clipped sum are computed from, once per layer: for a linear layer its input
    and output gradient as (batch, tokens, features); for LayerNorm the per-sample gradients of its weight and
    bias, Σ_t g_t ⊙ x̂_t and Σ_t g_t."""
    m = layer.module
    if not isinstance(m, nn.LayerNorm):
        return _flat(layer.inputs), _flat(g)
    x_hat = nn.functional.layer_norm(layer.inputs.float(), m.normalized_shape, eps=m.eps)
    dims = tuple(range(1, g.dim() - len(m.normalized_shape)))
    return (g * x_hat).sum(dim=dims), g.sum(dim=dims)


def _squared_norms(layer: _Layer, part: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Each example's squared gradient norm over this layer's trainable parameters."""
    m = layer.module
    if isinstance(m, nn.LayerNorm):
        return sum(x.flatten(1).pow(2).sum(1) for x, p in zip(part, (m.weight, m.bias))
                   if p is not None and p.requires_grad)
    a, gf = part
    sq = torch.zeros(a.shape[0], dtype=torch.float32, device=a.device)
    if m.weight.requires_grad:
        tokens, d_in, d_out = a.shape[1], a.shape[2], gf.shape[2]
        if tokens * (d_in + d_out) < d_in * d_out:  # ghost norm: two T x T Gram matrices
            sq += (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(gf, gf.transpose(1, 2))).sum(dim=(1, 2))
        else:  # the per-sample gradient itself is the smaller object
            sq += torch.bmm(gf.transpose(1, 2), a).pow(2).sum(dim=(1, 2))
    if m.bias is not None and m.bias.requires_grad:
        sq += gf.sum(dim=1).pow(2).sum(dim=1)
    return sq


def _add_clipped_sum(layer: _Layer, part: tuple[torch.Tensor, torch.Tensor], factor: torch.Tensor,
                     keep: torch.Tensor) -> None:
    """``p.grad += Σ_i c_i ∇_i p`` for this layer's trainable parameters; the rows of the examples not kept are
    zeroed in every operand (their factor is 0, but ``0 · NaN`` is NaN)."""
    m = layer.module
    if isinstance(m, nn.LayerNorm):
        for per_sample, p in zip(part, (m.weight, m.bias)):
            if p is not None and p.requires_grad:
                p.grad += torch.einsum("b,b...->...", factor, zero_rows(per_sample, keep)).to(p.dtype)
        return
    a, gf = zero_rows(part[0], keep), part[1]
    scaled = zero_rows(gf * factor[:, None, None], keep)
    if m.weight.requires_grad:
        m.weight.grad += (scaled.reshape(-1, scaled.shape[-1]).T @ a.reshape(-1, a.shape[-1])).to(m.weight.dtype)
    if m.bias is not None and m.bias.requires_grad:
        m.bias.grad += scaled.sum(dim=(0, 1)).to(m.bias.dtype)
