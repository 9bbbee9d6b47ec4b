"""LoRA adapters on the trainable encoder layers (optional; ``peft`` pinned in pyproject).

With ``trainable = "top-K"`` the last K encoder layers normally train in full
(~1.8 M parameters per MiniLM layer). :func:`apply_lora` instead freezes those
layers too and adds rank-``r`` adapters to their attention ``query``/``value``
projections (``W x + (alpha / r) * B A x``, ``B`` initialised to zero so the
model starts exactly at the pretrained one); the classification head still
trains in full. For all-MiniLM with r = 8 that is 12,288 adapter parameters per
layer instead of 1.77 M: DP-SGD noise spreads over far fewer dimensions, and
each region's update (what travels, and what secure aggregation masks) shrinks
accordingly.

The adapters are injected *in place* (``peft.inject_adapter_in_model``): the
model keeps its class, its module tree and its parameter names (plus
``...query.lora_A.default.weight`` etc.), so :class:`fedpriv.task.features.SplitClassifier`,
:func:`fedpriv.task.model.get_trainable` and Opacus work unchanged. Adapters only ever sit
above the freeze line, so cached frozen-prefix features stay valid.

Opacus: ``peft``'s ``lora.Linear`` runs its adapters as plain ``nn.Linear``
submodules, which Opacus' per-sample hooks (and ghost clipping's norm samplers)
support. Two hazards from Opacus issue #820 are avoided by construction:
adapters are injected before any Opacus hook is registered, and the model is
on its device before ``make_private`` (``LocalTrainer`` moves it first). The
tests re-verify with the pinned versions that per-sample adapter gradients match a
per-example loop (``tests/test_per_sample_gradients.py``) and that the adapters
train under DP-SGD (``tests/test_lora.py``).

FedAvg averages ``A`` and ``B`` separately; the mean of the products ``B_i A_i``
is not the product of the means, a known approximation of federated LoRA that
costs little when rounds are short.
"""

from __future__ import annotations

import torch
from torch import nn

from fedpriv.core.errors import ConfigError
from fedpriv.task.model import head_modules, trainable_layer_count

DEFAULT_TARGETS = ("query", "value")


def apply_lora(model: nn.Module, trainable: str, rank: int, *, alpha: float | None = None, seed: int = 0,
               targets: tuple[str, ...] = DEFAULT_TARGETS, dropout: float = 0.0) -> nn.Module:
    """Add rank-``rank`` adapters to ``targets`` of the layers ``trainable`` names; train adapters + head only.

    Deterministic for a given ``seed`` (the ``A`` matrices are random), so a
    coordinator and its regions build the same initial adapters. Returns ``model``
    (modified in place).
    """
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ConfigError(f"lora-rank = {rank!r}: expected an adapter rank >= 1 (0 turns LoRA off)")
    k = trainable_layer_count(model, trainable)
    if k == 0:
        raise ConfigError("lora-rank > 0 with trainable = 'head': there is no trainable encoder layer to adapt; "
                          "expected trainable = top-K or all")
    if is_lora(model):
        raise ConfigError("the model already has LoRA adapters")
    n = len(model.bert.encoder.layer)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=dropout,
                        target_modules=list(targets), layers_to_transform=list(range(n - k, n)),
                        layers_pattern="layer", bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, model)
    for p in model.parameters():  # inject_adapter_in_model freezes all but adapters; be explicit anyway
        p.requires_grad = False
    for name, p in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            p.requires_grad = True
    for module in head_modules(model):
        for p in module.parameters():
            p.requires_grad = True
    return model


def is_lora(model: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in model.modules())


def adapter_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain ``nn.Linear`` back (for export).

    The merged model is a stock (mean-pooling) BERT classifier: ``save_pretrained``
    then writes ordinary weights that load without ``peft``.
    """
    from peft.tuners.lora import LoraLayer

    replacements = [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    for name, module in replacements:
        module.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
    return model
