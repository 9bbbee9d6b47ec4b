"""Contribution bounding: at most m posts per author, a fresh OS-entropy choice each round."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from fedpriv.client.contribution import bounded_count, bounded_indices

AUTHORS = ["a"] * 9 + ["b"] * 3 + ["c"] + ["d"] * 2


@pytest.mark.parametrize("m", [1, 2, 3, 5])
def test_no_author_keeps_more_than_m_posts_and_small_authors_keep_all(m):
    kept = bounded_indices(AUTHORS, m)
    per_author = Counter(AUTHORS[i] for i in kept)
    assert all(per_author[a] == min(n, m) for a, n in Counter(AUTHORS).items())
    assert len(kept) == bounded_count(AUTHORS, m) == len(set(kept)) and kept == sorted(kept)


def test_the_choice_is_fresh_each_round_and_uniform():
    seen = Counter(tuple(bounded_indices(AUTHORS, 2)) for _ in range(400))
    assert len(seen) > 20  # C(9,2) * C(3,2) = 108 possible choices: not one fixed subset
    picks = Counter(i for _ in range(3000) for i in bounded_indices(AUTHORS, 1) if AUTHORS[i] == "a")
    assert set(picks) == set(range(9)) and max(picks.values()) < 2 * min(picks.values())


def test_default_randomness_is_os_entropy_not_the_global_generator():
    random.seed(0)
    first = bounded_indices(AUTHORS, 1)
    draws = set()
    for _ in range(50):
        random.seed(0)  # a caller seeding Python's global generator cannot replay the choice
        draws.add(tuple(bounded_indices(AUTHORS, 1)))
    assert len(draws | {tuple(first)}) > 1


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_a_bound_below_one_is_refused(bad):
    with pytest.raises(ValueError, match="max-posts-per-author"):
        bounded_indices(AUTHORS, bad)
