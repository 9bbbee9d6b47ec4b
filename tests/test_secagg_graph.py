"""Neighbour graphs: complete (SecAgg) and k-regular (SecAgg+), deterministic from a public seed."""

import random

import pytest

from fedpriv.privacy.secagg.graph import neighbour_graph, share_holders


def _connected(graph):
    start = next(iter(graph))
    seen, todo = {start}, [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return len(seen) == len(graph)


@pytest.mark.parametrize("k", [None, 4, 9, 50])
def test_complete_graph(k):
    ids = [3, 99, 2**63 + 1, 7, 12]
    g = neighbour_graph(ids, k, b"s" * 16)
    assert all(g[i] == set(ids) - {i} for i in ids)
    assert share_holders(g, 7) == sorted(ids)


@pytest.mark.parametrize("n", range(3, 21))
def test_sparse_graphs_are_symmetric_k_regular_and_connected(n):
    rnd = random.Random(n)
    ids = list({rnd.randrange(1, 1 << 64) for _ in range(n)})
    for k in range(1, n - 1):
        g = neighbour_graph(ids, k, bytes(16))
        assert set(g) == set(ids)
        for u in ids:
            assert u not in g[u]
            assert all(u in g[v] for v in g[u])
        degrees = sorted(len(g[u]) for u in ids)
        if (n * k) % 2 == 0:
            assert degrees == [k] * n
        else:  # no k-regular graph exists: exactly one node gets k + 1
            assert degrees == [k] * (n - 1) + [k + 1]
        assert k == 1 or _connected(g)


def test_graph_is_a_function_of_the_public_seed_only():
    ids = list(range(100, 120))
    g = neighbour_graph(ids, 4, b"round-seed-00001")
    assert g == neighbour_graph(list(reversed(ids)), 4, b"round-seed-00001")
    others = [neighbour_graph(ids, 4, bytes([i]) * 16) for i in range(5)]
    assert any(o != g for o in others)


def test_bad_inputs():
    with pytest.raises(ValueError, match="num_neighbours=0"):
        neighbour_graph([1, 2, 3], 0, bytes(16))
    with pytest.raises(ValueError, match="node id -1"):
        neighbour_graph([1, -1, 3], None, bytes(16))
