"""Run a whole secure-aggregation round in one process (tests, benchmarks, local simulation).

The driver passes messages exactly as a transport would: each stage's replies go
to the server as one batch, clients listed in ``drop[stage]`` never answer that
stage (nor any later one), and -- with ``persist_state`` -- every client is
rebuilt from :meth:`SecAggClient.to_state` between stages, as when each message is
handled by a fresh process.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from .protocol import SecAggClient, SecAggConfig, SecAggResult, SecAggServer

#: Stages at which a client can drop, in protocol order.
DROP_STAGES = ("advertise", "share_keys", "masked_input", "unmask")
_ID_BYTES = 8


@dataclass
class RoundStats:
    """Compute seconds and payload bytes (message framing excluded) of one simulated round."""

    client_seconds: dict[int, float] = field(default_factory=dict)
    client_bytes: dict[int, int] = field(default_factory=dict)
    server_seconds: float = 0.0
    server_bytes: int = 0

    def _client(self, nid: int, seconds: float, nbytes: int) -> None:
        self.client_seconds[nid] = self.client_seconds.get(nid, 0.0) + seconds
        self.client_bytes[nid] = self.client_bytes.get(nid, 0) + nbytes


def simulate_round(
    config: SecAggConfig,
    updates: Mapping[int, np.ndarray],
    weights: Mapping[int, int] | None = None,
    *,
    drop: Mapping[str, Iterable[int]] | None = None,
    round_id: int = 0,
    round_seed: bytes | None = None,
    rngs: Mapping[int, np.random.Generator] | None = None,
    persist_state: bool = True,
    stats: RoundStats | None = None,
) -> SecAggResult:
    """Run one round over ``updates`` (node id -> vector) and return the server's result.

    ``weights`` defaults to 1 per client. ``drop`` maps a stage name from
    :data:`DROP_STAGES` to the clients that stop answering from that stage on.
    ``rngs`` seeds each client's stochastic rounding. Raises ``SecAggAbort`` like
    the server would.
    """
    drop = {stage: set(ids) for stage, ids in (drop or {}).items()}
    unknown = set(drop) - set(DROP_STAGES)
    if unknown:
        raise ValueError(f"unknown drop stage(s) {sorted(unknown)}; use {DROP_STAGES}")
    gone: set[int] = set()
    stats = stats if stats is not None else RoundStats()
    vector_size = int(np.asarray(next(iter(updates.values()))).size)
    server = SecAggServer(config, round_id=round_id, round_seed=round_seed, vector_size=vector_size)
    setup = server.setup_message()
    state: dict[int, object] = {}

    def load(nid: int) -> SecAggClient:
        obj = state[nid]
        return SecAggClient.from_state(obj) if persist_state else obj  # type: ignore[arg-type]

    def save(nid: int, client: SecAggClient) -> None:
        state[nid] = client.to_state() if persist_state else client

    def serve(call, *args):
        start = time.perf_counter()
        out = call(*args)
        stats.server_seconds += time.perf_counter() - start
        return out

    # Stage 1: advertise keys.
    gone |= drop.get("advertise", set())
    adverts = {}
    for nid in sorted(set(updates) - gone):
        start = time.perf_counter()
        client = SecAggClient.from_setup(nid, setup)
        adverts[nid] = client.advertise()
        save(nid, client)
        stats._client(nid, time.perf_counter() - start, sum(len(v) for v in adverts[nid].values()))
    public_keys = serve(server.collect_advertisements, adverts)
    broadcast_bytes = sum(_ID_BYTES + len(e["c_pk"]) + len(e["s_pk"]) for e in public_keys.values())
    stats.server_bytes += broadcast_bytes * len(public_keys)

    # Stage 2: share keys.
    gone |= drop.get("share_keys", set())
    shares = {}
    for nid in sorted(set(public_keys) - gone):
        start = time.perf_counter()
        client = load(nid)
        shares[nid] = client.share_keys(public_keys)
        save(nid, client)
        stats._client(nid, time.perf_counter() - start, sum(_ID_BYTES + len(c) for c in shares[nid].values()))
    routed = serve(server.route_shares, shares)
    stats.server_bytes += sum(_ID_BYTES + len(c) for inbox in routed.values() for c in inbox.values())

    # Stage 3: masked input.
    gone |= drop.get("masked_input", set())
    masked = {}
    for nid in sorted(set(routed) - gone):
        start = time.perf_counter()
        client = load(nid)
        w = 1 if weights is None else weights[nid]
        rng = None if rngs is None else rngs[nid]
        masked[nid] = client.masked_input(updates[nid], routed[nid], w, rng=rng)
        save(nid, client)
        stats._client(nid, time.perf_counter() - start, masked[nid].nbytes)
    requests = serve(server.collect_masked_inputs, masked)
    stats.server_bytes += sum(_ID_BYTES * (len(r["survivors"]) + len(r["dropped"])) for r in requests.values())

    # Stage 4: unmask.
    gone |= drop.get("unmask", set())
    answers = {}
    for nid in sorted(set(requests) - gone):
        start = time.perf_counter()
        client = load(nid)
        answers[nid] = client.unmask(requests[nid]["survivors"], requests[nid]["dropped"])
        save(nid, client)
        sent = sum(_ID_BYTES + len(s) for part in answers[nid].values() for s in part.values())
        stats._client(nid, time.perf_counter() - start, sent)
    return serve(server.unmask, answers)
