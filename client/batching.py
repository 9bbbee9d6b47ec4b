"""Split each Poisson batch into physical batches of posts of similar length.

Opacus' ``BatchMemoryManager`` cuts a logical (Poisson) batch into physical batches in the order the
sampler drew it, and each physical batch is padded to its longest post. Posts here average 25 tokens
but almost every random batch of 256 holds one near the 64-token cap, so most of what an encoder
layer computes is padding: on the default split a physical batch of 256 is padded to 62 tokens on
average, one cut from the same logical batch sorted by length to 34 (64 posts: 56 -> 27).

Sorting changes which posts share a physical batch, nothing else: the logical batch (who was
sampled), each post's gradient (padding is masked out), its clip factor, the clipped sum and the
noise are the same, so the release and its ε are too — ``tests/test_batching.py`` checks a whole
round against the unsorted one.
"""

from __future__ import annotations

from typing import Iterator, Sequence

from torch.utils.data import DataLoader, Sampler


class LengthSortedBatches(Sampler[list[int]]):
    """The wrapped batch sampler's batches, each with its indices ordered by post length (shortest first)."""

    def __init__(self, sampler: Sampler[list[int]], lengths: Sequence[int]):
        self.sampler = sampler
        self.lengths = lengths

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.sampler:
            yield sorted(batch, key=self.lengths.__getitem__)

    def __len__(self) -> int:
        return len(self.sampler)


def sort_batches_by_length(loader: DataLoader, lengths: Sequence[int]) -> DataLoader:
    """``loader`` (a DP loader: Poisson batch sampler, Opacus' empty-batch collate) with length-sorted batches.

    Hand the result to ``BatchMemoryManager``: its equal-size cuts of a sorted batch are physical batches of
    similar length. The sampler, the collate function and the loader's generator (a DataLoader draws its
    workers' base seed from it on every pass) are the loader's own objects, so the draws are those it made."""
    return DataLoader(loader.dataset, batch_sampler=LengthSortedBatches(loader.batch_sampler, lengths),
                      collate_fn=loader.collate_fn, num_workers=loader.num_workers, pin_memory=loader.pin_memory,
                      generator=loader.generator)
