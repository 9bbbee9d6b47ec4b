"""Who exchanges masks with whom.

* Complete graph (Bonawitz et al. 2017): every participant is every other's
  neighbour; ``num_neighbours=None`` or ``>= n - 1``.
* Sparse graph (SecAgg+, Bell et al. 2020): a Harary graph ``H(k, n)`` -- the
  k-regular circulant graph ("each node linked to the k/2 nearest on each side of
  a ring") -- laid over a pseudo-random permutation of the participants. When ``k``
  is odd, each node is also linked to the node opposite it on the ring; if ``n`` is
  odd too, a k-regular graph cannot exist and exactly one node gets ``k + 1``
  neighbours. Every node has at least ``k`` neighbours and, for k >= 2, the graph is
  ``k``-connected.

The permutation is a deterministic function of the public ``round_seed``: the server
and every client compute the same graph without exchanging it. (A server free to pick
the graph could isolate a victim; against an honest-but-curious server a random
public seed is enough. A malicious-server deployment would derive the seed
jointly, e.g. from a commit-reveal among clients.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

_GRAPH_LABEL = b"fedpriv-secagg/v1/graph"


def _order(node_ids: list[int], round_seed: bytes) -> list[int]:
    prefix = _GRAPH_LABEL + len(round_seed).to_bytes(8, "big") + bytes(round_seed)
    return sorted(node_ids, key=lambda nid: (hashlib.sha256(prefix + nid.to_bytes(8, "big")).digest(), nid))


def neighbour_graph(
    node_ids: Iterable[int], num_neighbours: int | None, round_seed: bytes
) -> dict[int, frozenset[int]]:
    """Map every node id to the set of its neighbours (never itself).

    ``num_neighbours=None`` (or ``>= n - 1``) gives the complete graph.
    """
    ids = sorted(set(int(i) for i in node_ids))
    for nid in ids:
        if not 0 <= nid < 1 << 64:
            raise ValueError(f"node id {nid} is not an unsigned 64-bit integer")
    n = len(ids)
    if num_neighbours is not None and num_neighbours < 1:
        raise ValueError(f"num_neighbours={num_neighbours} must be >= 1 (or None for the complete graph)")
    if num_neighbours is None or num_neighbours >= n - 1:
        everyone = frozenset(ids)
        return {nid: everyone - {nid} for nid in ids}

    k = num_neighbours
    ring = _order(ids, round_seed)
    adj: dict[int, set[int]] = {nid: set() for nid in ids}

    def link(i: int, j: int) -> None:
        a, b = ring[i % n], ring[j % n]
        if a != b:
            adj[a].add(b)
            adj[b].add(a)

    for i in range(n):
        for off in range(1, k // 2 + 1):
            link(i, i + off)
    if k % 2 == 1:
        if n % 2 == 0:
            for i in range(n // 2):
                link(i, i + n // 2)
        else:
            half = (n - 1) // 2
            for i in range(half + 1):
                link(i, i + half)
    return {nid: frozenset(nbrs) for nid, nbrs in adj.items()}


def share_holders(graph: dict[int, frozenset[int]], owner: int) -> list[int]:
    """Who holds shares of ``owner``'s secrets, in x-coordinate order (share ``i+1`` goes to entry ``i``).

    The owner keeps one share itself, so its holders are its neighbours plus itself.
    """
    return sorted(graph[owner] | {owner})
