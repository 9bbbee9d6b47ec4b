"""Turning posts into model inputs.

Texts are tokenised once, unpadded; each batch is padded only to its own longest
post (social-media posts are short, so this is ~2x cheaper than padding to
``max-length``). Every batch carries explicit contiguous ``position_ids`` of shape
(batch, length): Opacus' per-sample gradients for HF BERT fail without them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch.utils.data import Dataset

from fedpriv.task.data import Example


@dataclass
class EncodedDataset(Dataset):
    input_ids: list[list[int]]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[list[int], int]:
        return self.input_ids[i], self.labels[i]


def encode(examples: Sequence[Example], tokenizer, max_length: int) -> EncodedDataset:
    enc = tokenizer([e.text for e in examples], truncation=True, max_length=max_length)
    return EncodedDataset(input_ids=list(enc["input_ids"]), labels=[e.label for e in examples])


def collate(batch: Sequence[tuple[list[int], int]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Pad to the batch's longest sequence. An empty batch (Poisson sampling can draw one) stays empty."""
    if len(batch) == 0:
        empty = torch.zeros((0, 1), dtype=torch.long)
        return {"input_ids": empty, "attention_mask": empty, "position_ids": empty,
                "labels": torch.zeros((0,), dtype=torch.long)}
    length = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), length), dtype=torch.long)
    for row, (ids, _) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[row, : len(ids)] = 1
    position_ids = torch.arange(length, dtype=torch.long).unsqueeze(0).expand(len(batch), -1).contiguous()
    labels = torch.tensor([label for _, label in batch], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "position_ids": position_ids, "labels": labels}
