"""Split the classifier at the freeze line: a frozen prefix and a trainable top.

With the embeddings and the lower encoder layers frozen, their output for a post
never changes. :class:`FrozenPrefix` computes it once (no gradients, eval mode);
:class:`ClassifierTop` — the last ``k`` encoder layers, the pooler and the
classifier, *sharing parameters with the full model* — is all that DP-SGD has to
run forward, backward and per-sample through. On 2 CPU cores this is what makes
private fine-tuning of all-MiniLM affordable, and Opacus never sees the embedding
layer (whose per-sample gradients need explicit ``position_ids``).

A region caches its prefix features on its own disk (next to its shard, never
sent anywhere), keyed by model, trainable policy, sequence length and shard
content, so later rounds and later runs skip the frozen forward pass. Features are
stored unpadded in fp16. With ``trainable = "all"`` the prefix is the embeddings alone and
a post's features are its token vectors: measured on the default corpus (22 tokens per
post on average at ``max-length = 64``), 17 KiB per post, 0.4 GB for all 23,320 posts
(not the 1.5 GB of padded fp32); computing them takes ~0.36 ms per post on one CPU thread
and reading them back ~0.02 ms, so the cache is kept for that policy too.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedpriv.core.files import atomic_open
from torch.utils.data import Dataset
from transformers.masking_utils import create_bidirectional_mask

from fedpriv.task.encoding import EncodedDataset, collate
from fedpriv.task.model import is_mean_pooling, trainable_layer_count

FEATURE_VERSION = "1"


class FrozenPrefix(nn.Module):
    """Embeddings + the frozen encoder layers; returns the hidden states the top starts from.

    When nothing above the freeze line is an encoder layer (``trainable = "head"``)
    the pooling is frozen too, and the prefix returns the pooled vector as a
    length-1 sequence: one 384-float vector per post is all the head needs.
    """

    def __init__(self, model: nn.Module, k: int):
        super().__init__()
        self.config = model.config
        self.embeddings = model.bert.embeddings
        layers = list(model.bert.encoder.layer)
        self.layers = nn.ModuleList(layers[: len(layers) - k])
        self.pool_here = k == 0
        self.mean_pooling = is_mean_pooling(model)

    @torch.no_grad()
    def forward(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        hidden = self.embeddings(input_ids=input_ids, position_ids=position_ids)
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)
        for layer in self.layers:
            hidden = layer(hidden, mask)
        if not self.pool_here:
            return hidden
        return pool(hidden, attention_mask, self.mean_pooling).unsqueeze(1)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mean: bool) -> torch.Tensor:
    if not mean:
        return hidden[:, 0]
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


class ClassifierTop(nn.Module):
    """The trainable part: top-k layers → pooling → dense+tanh → dropout → classifier → cross-entropy.

    Its submodules *are* the full model's modules, so training it trains the model.
    """

    def __init__(self, model: nn.Module, k: int):
        super().__init__()
        self.config = model.config
        layers = list(model.bert.encoder.layer)
        self.layers = nn.ModuleList(layers[len(layers) - k:] if k else [])
        self.mean_pooling = is_mean_pooling(model)
        self.dense = model.pre_classifier if self.mean_pooling else model.bert.pooler.dense
        self.dropout = model.dropout
        self.classifier = model.classifier

    def forward(self, hidden, attention_mask, labels=None):
        if len(self.layers):
            mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)
            for layer in self.layers:
                hidden = layer(hidden, mask)
            pooled = pool(hidden, attention_mask, self.mean_pooling)
        else:
            pooled = hidden[:, 0]
        logits = self.classifier(self.dropout(torch.tanh(self.dense(pooled))))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SimpleNamespace(loss=loss, logits=logits)


@dataclass
class FeatureDataset(Dataset):
    """Per-post prefix features (float16, unpadded) and labels."""

    features: list[np.ndarray]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        """A tensor (a view of the stored array), so that Opacus can shape an empty Poisson batch drawn before
        any other from the dataset's first item (it cannot from a numpy dtype)."""
        return torch.from_numpy(self.features[i]), self.labels[i]


def collate_features(batch: Sequence[tuple[np.ndarray | torch.Tensor, int]], dim: int = 1) -> dict[str, torch.Tensor]:
    """Pad to the batch's longest post. An empty batch (Poisson sampling can draw one) has ``dim`` features."""
    if len(batch) == 0:
        return {"hidden": torch.zeros((0, 1, dim)), "attention_mask": torch.zeros((0, 1), dtype=torch.long),
                "labels": torch.zeros((0,), dtype=torch.long)}
    length = max(f.shape[0] for f, _ in batch)
    dim = batch[0][0].shape[1]
    hidden = torch.zeros((len(batch), length, dim), dtype=torch.float32)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, (feat, _) in enumerate(batch):
        hidden[row, : feat.shape[0]] = torch.as_tensor(feat)
        mask[row, : feat.shape[0]] = 1
    labels = torch.tensor([label for _, label in batch], dtype=torch.long)
    return {"hidden": hidden, "attention_mask": mask, "labels": labels}


def compute_features(prefix: FrozenPrefix, data: EncodedDataset, device: torch.device, batch_size: int = 64,
                     progress=None) -> list[np.ndarray]:  # noqa: ANN001 - progress: Callable[[int], None]
    """Run the frozen prefix once over every post (length-sorted batches, little padding); ``progress(n)``
    is told each batch's size (:class:`fedpriv.task.progress.Progress`)."""
    prefix.eval()
    order = sorted(range(len(data)), key=lambda i: len(data.input_ids[i]))
    out: list[np.ndarray | None] = [None] * len(data)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = collate([data[i] for i in idx])
        hidden = prefix(batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["position_ids"].to(device))
        for row, i in enumerate(idx):
            n = 1 if prefix.pool_here else len(data.input_ids[i])
            out[i] = hidden[row, :n].cpu().numpy().astype(np.float16)
        if progress is not None:
            progress(len(idx))
    return out  # type: ignore[return-value]


def cache_key(model_name: str, policy: str, pooling: str, max_length: int, seed: int, shard_file: Path) -> str:
    h = hashlib.sha256()
    h.update(f"{FEATURE_VERSION}|{model_name}|{policy}|{pooling}|{max_length}|{seed if model_name != 'minilm' else ''}|".encode())
    h.update(shard_file.read_bytes())
    return h.hexdigest()[:20]


def cached_features(cache_dir: Path, key: str, compute) -> list[np.ndarray]:
    """Load ``key`` from ``cache_dir`` or compute and store it (atomically)."""
    path = cache_dir / f"features-{key}.npz"
    if path.exists():
        with np.load(path) as z:
            flat, offsets = z["flat"], z["offsets"]
        return [flat[offsets[i]: offsets[i + 1]] for i in range(len(offsets) - 1)]
    features = compute()
    cache_dir.mkdir(parents=True, exist_ok=True)
    offsets = np.cumsum([0] + [f.shape[0] for f in features])
    with atomic_open(path, "wb") as fh:
        np.savez(fh, flat=np.concatenate(features, axis=0), offsets=offsets)
    return features


class SplitClassifier:
    """One model, seen as frozen prefix + trainable top (both share the model's parameters)."""

    def __init__(self, model: nn.Module, policy: str):
        k = trainable_layer_count(model, policy)
        self.model = model
        self.prefix = FrozenPrefix(model, k)
        self.top = ClassifierTop(model, k)

    def features(self, data: EncodedDataset, device: torch.device, cache: tuple[Path, str] | None = None,
                 progress=None) -> FeatureDataset:  # noqa: ANN001 - see compute_features
        """Prefix features for ``data``; with ``cache=(dir, key)`` they are read from / written to disk."""
        compute = lambda: compute_features(self.prefix, data, device, progress=progress)  # noqa: E731
        feats = compute() if cache is None else cached_features(cache[0], cache[1], compute)
        return FeatureDataset(feats, list(data.labels))


@torch.no_grad()
def evaluate_top(top: nn.Module, data: FeatureDataset, device: torch.device, batch_size: int = 256) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of the model, evaluated from prefix features."""
    if len(data) == 0:
        return float("nan"), float("nan")
    was_training = top.training
    top.eval()
    order = sorted(range(len(data)), key=lambda i: data.features[i].shape[0])
    total_loss, correct = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = collate_features([data[i] for i in order[start : start + batch_size]])
        batch = {k: v.to(device) for k, v in batch.items()}
        out = top(**batch)
        total_loss += float(out.loss) * len(batch["labels"])
        correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
    top.train(was_training)
    return total_loss / len(data), correct / len(data)
