"""Bound each author's contribution before a round: at most ``max-posts-per-author`` posts per person.

Author-level DP by example-level sampling (Charles et al. 2024, "ELS"): the region keeps at most m
posts of each author for the round, then runs ordinary post-level DP-SGD on them (Poisson sampling
of posts, each post clipped to C, Gaussian noise). Removing one author then removes at most m posts,
j ~ Binomial(m, q) of them in any step's sample, so each step is the mixture-of-Gaussians
mechanism of :mod:`fedpriv.privacy.group_privacy` with group size m; with m = 1 it is exactly the
post-level mechanism, so the author gets the post-level ε.

Which posts an author keeps is drawn afresh every round from OS entropy (never from the run's
seed): a fixed choice would let the coordinator, who picks the seed, pick which posts train. The
number kept, Σ_a min(n_a, m), does not depend on the draw, so the round's N and schedule do not either.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Sequence

__all__ = ["bounded_count", "bounded_indices"]


def _by_author(authors: Sequence[str]) -> dict[str, list[int]]:
    posts: dict[str, list[int]] = defaultdict(list)
    for i, author in enumerate(authors):
        posts[author].append(i)
    return posts


def bounded_count(authors: Sequence[str], max_posts: int) -> int:
    """How many posts the bound keeps: Σ over authors of min(posts, ``max_posts``)."""
    _check(max_posts)
    return sum(min(len(idx), max_posts) for idx in _by_author(authors).values())


def bounded_indices(authors: Sequence[str], max_posts: int, rng: random.Random | None = None) -> list[int]:
    """Indices of at most ``max_posts`` posts per author (``authors[i]`` wrote post i), sorted.

    An author with more posts keeps a uniformly random subset drawn from ``rng`` — by default a
    fresh :class:`random.SystemRandom` (OS entropy); tests may pass their own.
    """
    _check(max_posts)
    rng = rng or random.SystemRandom()
    kept: list[int] = []
    for idx in _by_author(authors).values():
        kept.extend(idx if len(idx) <= max_posts else rng.sample(idx, max_posts))
    return sorted(kept)


def _check(max_posts: int) -> None:
    if isinstance(max_posts, bool) or not isinstance(max_posts, int) or max_posts < 1:
        raise ValueError(f"max-posts-per-author = {max_posts!r}: expected an integer >= 1")
