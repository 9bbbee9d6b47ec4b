"""End-to-end rounds of the secure-aggregation protocol.

Exactness against plain weighted FedAvg, dropouts at every stage, abort below the
threshold, what a masked vector looks like to the server, refusals, and state that
survives a fresh process.
"""

import random
import re

import numpy as np
import pytest
from scipy import stats

from fedpriv.privacy.secagg.graph import neighbour_graph
from fedpriv.privacy.secagg import (
    DROP_STAGES,
    SecAggAbort,
    SecAggClient,
    SecAggConfig,
    SecAggProtocolError,
    SecAggServer,
    ShareDecryptionError,
    average_error_bound,
    quantize,
    simulate_round,
)

D = 64  # vector length for the protocol tests (the maths does not depend on it)


def _inputs(n, seed, max_weight=50, d=D):
    rnd = random.Random(seed)
    ids = set()
    while len(ids) < n:  # unsigned 64-bit ids, as Flower assigns them (some >= 2**63)
        ids.add(rnd.randrange(1, 1 << 64))
    ids = sorted(ids)
    rng = np.random.default_rng(seed)
    updates = {i: rng.uniform(-0.9, 0.9, d).astype(np.float32) for i in ids}  # inside clip_range
    weights = {i: int(rng.integers(1, max_weight + 1)) for i in ids}
    seeds = {i: seed * 1000 + j for j, i in enumerate(ids)}
    return ids, updates, weights, seeds


def _rngs(seeds):
    return {i: np.random.default_rng(s) for i, s in seeds.items()}


def _expected_sum(cfg, updates, weights, seeds, survivors):
    """Exact integer sum of the survivors' encoded vectors, recomputed independently."""
    d = next(iter(updates.values())).size
    total = np.zeros(d + 1, dtype=np.uint64)
    for u in survivors:
        vec = updates[u].astype(np.float64).ravel()
        if weights[u] != cfg.max_weight:
            vec *= weights[u] / cfg.max_weight
        q = quantize(vec, cfg.clip_range, cfg.quant_bits, rng=np.random.default_rng(seeds[u]), dtype=cfg.word_dtype)
        total[:-1] += q.astype(np.uint64)
        total[-1] += np.uint64(weights[u])
    return total


def _check(result, cfg, updates, weights, seeds, survivors):
    survivors = sorted(survivors)
    assert result.survivors == tuple(survivors)
    assert np.array_equal(result.quantized_sum, _expected_sum(cfg, updates, weights, seeds, survivors))
    total = sum(weights[u] for u in survivors)
    assert result.total_weight == total
    fedavg = sum(weights[u] * updates[u].astype(np.float64) for u in survivors) / total
    bound = average_error_bound(len(survivors), total, cfg.max_weight, cfg.clip_range, cfg.quant_bits)
    assert result.error_bound == pytest.approx(bound)
    assert np.max(np.abs(result.average - fedavg)) <= bound
    np.testing.assert_allclose(result.weighted_sum, result.average * total)


# ----------------------------------------------------------------- exactness

GRID = [  # (n, threshold, num_neighbours): even and odd share counts, complete and sparse
    (3, 2, None), (3, 3, None), (4, 2, None), (4, 3, None), (4, 4, None), (5, 3, None),
    (5, 4, None), (6, 4, None), (6, 6, None), (7, 4, None), (8, 5, None), (8, 8, None),
    (9, 6, None), (10, 6, None), (10, 7, None),
    (6, 3, 2), (7, 4, 4), (8, 3, 3), (8, 4, 3), (9, 4, 3), (9, 2, 1), (10, 4, 4), (10, 5, 5),
    (10, 6, 6), (10, 7, 7),
]


@pytest.mark.parametrize("n, t, k", GRID)
def test_aggregate_equals_weighted_fedavg(n, t, k):
    cfg = SecAggConfig(num_clients=n, threshold=t, num_neighbours=k, clip_range=1.0, quant_bits=16, max_weight=50)
    ids, updates, weights, seeds = _inputs(n, seed=n * 100 + t * 10 + (k or 0))
    result = simulate_round(cfg, updates, weights, rngs=_rngs(seeds), round_id=n)
    _check(result, cfg, updates, weights, seeds, ids)
    assert result.dropped == ()


def test_unweighted_round_uses_uint64_words_for_wide_moduli():
    cfg = SecAggConfig(num_clients=5, threshold=3, clip_range=2.0, quant_bits=40)  # k = 43 bits
    ids, updates, _, seeds = _inputs(5, seed=7)
    weights = {i: 1 for i in ids}
    result = simulate_round(cfg, updates, weights, rngs=_rngs(seeds))
    assert cfg.word_dtype == np.uint64
    _check(result, cfg, updates, weights, seeds, ids)


# ------------------------------------------------------------------ dropouts


@pytest.mark.parametrize("k, t", [(None, 4), (4, 3)])
@pytest.mark.parametrize("stage", DROP_STAGES)
def test_dropouts_at_each_stage_give_the_exact_sum_of_survivors(stage, k, t):
    cfg = SecAggConfig(num_clients=8, threshold=t, num_neighbours=k, quant_bits=16, max_weight=50)
    ids, updates, weights, seeds = _inputs(8, seed=10 * DROP_STAGES.index(stage) + (k or 0))
    gone = {ids[1], ids[5]}
    result = simulate_round(cfg, updates, weights, drop={stage: gone}, rngs=_rngs(seeds))
    # A client that dropped during unmask already sent its masked input: it is in the sum.
    survivors = ids if stage == "unmask" else [i for i in ids if i not in gone]
    _check(result, cfg, updates, weights, seeds, survivors)
    # `dropped` lists participants left out of the sum; a client that never advertised is unknown.
    assert set(result.dropped) == (set() if stage in ("advertise", "unmask") else gone)


@pytest.mark.parametrize("k, t", [(None, 5), (6, 3)])
def test_dropouts_at_every_stage_in_one_round(k, t):
    cfg = SecAggConfig(num_clients=10, threshold=t, num_neighbours=k, quant_bits=16, max_weight=50)
    ids, updates, weights, seeds = _inputs(10, seed=11)
    drop = {"advertise": {ids[0]}, "share_keys": {ids[3]}, "masked_input": {ids[6]}, "unmask": {ids[9]}}
    result = simulate_round(cfg, updates, weights, drop=drop, rngs=_rngs(seeds))
    _check(result, cfg, updates, weights, seeds, [i for i in ids if i not in (ids[0], ids[3], ids[6])])


@pytest.mark.parametrize("stage", DROP_STAGES)
def test_fewer_survivors_than_threshold_aborts(stage):
    cfg = SecAggConfig(num_clients=6, threshold=4, quant_bits=16)
    ids, updates, _, _ = _inputs(6, seed=3)
    with pytest.raises(SecAggAbort, match="threshold is 4"):
        simulate_round(cfg, updates, drop={stage: set(ids[:3])})


def test_sparse_graph_aborts_when_one_clients_holders_fall_below_threshold():
    cfg = SecAggConfig(num_clients=10, threshold=5, num_neighbours=4, quant_bits=16)  # t = k + 1
    ids, updates, _, _ = _inputs(10, seed=5)
    with pytest.raises(SecAggAbort, match=r"client \d+.*threshold is 5"):
        simulate_round(cfg, updates, drop={"unmask": {ids[0]}})


def _expected_outcome(ids, drop, t, graph_of):
    """What SecAgg+ (Bell et al. 2020, Bonawitz et al. 2017) must do, derived here from the rules alone.

    Returns the survivors whose inputs are summed, or ``None`` when the round must abort. A
    secret shared ``t``-of-(neighbours + owner) can be rebuilt only from ``t`` live holders:
    U1 advertise; U2 completed share-keys (clients with fewer than t-1 neighbours left in U2
    are pruned, repeatedly); U3 sent masked inputs; U4 answered unmask. Abort when a set is
    below ``t``, when a client cannot give its secrets ``t`` holders, or when fewer than ``t``
    holders of a secret the server must rebuild (a survivor's self-mask seed, a dropped
    neighbour's mask key) answer.
    """
    gone = lambda stage: set(drop.get(stage, ()))  # noqa: E731
    u1 = set(ids) - gone("advertise")
    if len(u1) < t:
        return None
    graph = graph_of(sorted(u1))
    assert all(u not in graph[u] and all(u in graph[v] for v in graph[u]) for u in u1)  # symmetric, no loops
    if any(len(graph[u]) + 1 < t for u in u1 - gone("share_keys")):
        return None  # a client cannot split its secrets t-of-(degree + 1)
    u2 = u1 - gone("share_keys")
    while True:
        weak = {u for u in u2 if len(graph[u] & u2) + 1 < t}
        if not weak:
            break
        u2 -= weak
    if len(u2) < t:
        return None
    u3 = u2 - gone("masked_input")
    if len(u3) < t:
        return None
    u4 = u3 - gone("unmask")
    for v in u3:  # the self-mask seed of every summed input: held by v's neighbours in U2 and v itself
        if len(graph[v] & u3) + 1 < t or len(((graph[v] & u3) | {v}) & u4) < t:
            return None
    for v in u2 - u3:  # a dropped client's pairwise masks are in the sum if a neighbour survived
        if graph[v] & u3 and (len(graph[v] & u3) < t or len(graph[v] & u4) < t):
            return None
    return sorted(u3)


def _random_pattern(trial):
    """A random config (complete or sparse graph), dropout pattern and public round seed."""
    rnd = random.Random(trial)
    n = rnd.randint(3, 10)
    k = None if rnd.random() < 0.5 or n <= 3 else rnd.randint(2, n - 2)
    cfg = SecAggConfig(num_clients=n, threshold=rnd.randint(2, (k if k else n - 1) + 1), num_neighbours=k,
                       quant_bits=12, max_weight=50)
    ids, updates, weights, seeds = _inputs(n, seed=trial)
    drop = {}
    for i in ids:
        if rnd.random() < 0.2:
            drop.setdefault(rnd.choice(DROP_STAGES), set()).add(i)
    round_seed = rnd.randbytes(32)  # fixed, so the test knows the (public) sparse graph
    expected = _expected_outcome(ids, drop, cfg.threshold, lambda u1: neighbour_graph(u1, k, round_seed))
    return cfg, (ids, updates, weights, seeds), drop, round_seed, expected


@pytest.mark.parametrize("trial", range(40))
def test_random_dropout_patterns_are_exact_or_abort_exactly_when_warranted(trial):
    cfg, (ids, updates, weights, seeds), drop, round_seed, expected = _random_pattern(trial)
    run = lambda: simulate_round(cfg, updates, weights, drop=drop, rngs=_rngs(seeds), round_seed=round_seed)  # noqa: E731
    if expected is None:
        with pytest.raises(SecAggAbort, match=r"threshold"):
            run()
        return
    _check(run(), cfg, updates, weights, seeds, expected)  # the exact FedAvg of exactly these survivors


def test_random_dropout_patterns_cover_sparse_aborts_and_sparse_sums():
    """The 40 patterns above include sparse graphs that abort and sparse graphs that sum (else they prove less)."""
    outcomes = set()
    for trial in range(40):
        cfg, _, _, _, expected = _random_pattern(trial)
        outcomes.add((cfg.num_neighbours is None, expected is None))
    assert outcomes == {(True, True), (True, False), (False, True), (False, False)}


def test_zero_total_weight_aborts():
    cfg = SecAggConfig(num_clients=3, threshold=2, max_weight=10, quant_bits=8)
    ids, updates, _, _ = _inputs(3, seed=1)
    with pytest.raises(SecAggAbort, match="total weight is 0"):
        simulate_round(cfg, updates, {i: 0 for i in ids})


# -------------------------------------------------------- manual stage driving


def _to_masked(cfg, updates, *, stop_before_masked=False, round_seed=b"r" * 16):
    server = SecAggServer(cfg, round_id=9, round_seed=round_seed)
    setup = server.setup_message()
    clients = {i: SecAggClient.from_setup(i, setup) for i in updates}
    keys = server.collect_advertisements({i: c.advertise() for i, c in clients.items()})
    routed = server.route_shares({i: c.share_keys(keys) for i, c in clients.items()})
    if stop_before_masked:
        return server, clients, routed, None
    masked = {i: c.masked_input(updates[i], routed[i]) for i, c in clients.items()}
    return server, clients, routed, masked


def test_masked_vector_is_uniform_and_uncorrelated_with_the_update():
    cfg = SecAggConfig(num_clients=3, threshold=2, clip_range=1.0, quant_bits=16)
    d = 20_000
    ramp = np.linspace(-1.0, 1.0, d)
    updates = {11: ramp, 22: np.zeros(d), 33: np.sin(np.arange(d))}
    _, _, _, masked = _to_masked(cfg, updates)
    k = cfg.mod_bits
    plain = quantize(ramp, 1.0, 16)

    def looks_uniform(v):
        v = v.astype(np.int64)
        high = np.bincount(v >> (k - 6), minlength=64)  # 64 buckets on the top bits
        low = np.bincount(v & 63, minlength=64)
        return min(stats.chisquare(high).pvalue, stats.chisquare(low).pvalue,
                   stats.kstest(v / float(1 << k), "uniform").pvalue) > 1e-6

    for nid, y in masked.items():
        assert int(y.max()) < 1 << k
        assert looks_uniform(y[:-1]), f"client {nid}'s masked vector is not uniform"
        assert abs(np.corrcoef(updates[nid] if nid != 22 else ramp, y[:-1].astype(np.float64))[0, 1]) < 5 / np.sqrt(d)
    assert not looks_uniform(plain)  # the test has teeth: an unmasked update fails it
    assert np.corrcoef(ramp, plain.astype(np.float64))[0, 1] > 0.99


def test_tampered_or_misrouted_ciphertext_is_rejected_naming_the_sender():
    cfg = SecAggConfig(num_clients=5, threshold=3, quant_bits=12)
    ids, updates, _, _ = _inputs(5, seed=2)
    server, clients, routed, _ = _to_masked(cfg, updates, stop_before_masked=True)
    victim, sender = ids[0], ids[2]
    tampered = dict(routed[victim])
    blob = bytearray(tampered[sender])
    blob[30] ^= 0x04
    tampered[sender] = bytes(blob)
    with pytest.raises(ShareDecryptionError, match=f"from client {sender} to client {victim}"):
        clients[victim].masked_input(updates[victim], tampered)
    misrouted = dict(routed[victim])
    misrouted[sender] = routed[ids[1]][sender]  # a bundle meant for someone else
    with pytest.raises(ShareDecryptionError, match=f"from client {sender}"):
        clients[victim].masked_input(updates[victim], misrouted)
    # The victim refused and so dropped; the round still completes without it.
    masked = {i: clients[i].masked_input(updates[i], routed[i]) for i in ids if i != victim}
    requests = server.collect_masked_inputs(masked)
    replies = {i: clients[i].unmask(r["survivors"], r["dropped"]) for i, r in requests.items()}
    result = server.unmask(replies)
    assert result.survivors == tuple(ids[1:]) and result.dropped == (victim,)
    assert np.max(np.abs(result.average - np.mean([updates[i] for i in ids[1:]], axis=0))) <= result.error_bound


def test_client_refuses_to_reveal_both_secrets_of_a_peer():
    cfg = SecAggConfig(num_clients=4, threshold=2, quant_bits=12)
    ids, updates, _, _ = _inputs(4, seed=4)
    _, clients, _, _ = _to_masked(cfg, updates)
    me, peer = clients[ids[0]], ids[1]
    with pytest.raises(SecAggProtocolError, match=f"both .* of \\[{peer}\\]"):
        me.unmask([peer, ids[2]], [peer, ids[3]])
    with pytest.raises(SecAggProtocolError, match="itself listed as dropped"):
        me.unmask(ids[1:], [ids[0]])
    with pytest.raises(SecAggProtocolError, match="holds no shares of \\[12345\\]"):
        me.unmask([12345], [])
    assert me.stage == "masked"  # nothing was revealed; a consistent request still works
    reply = me.unmask(ids[1:3], [ids[3]])
    assert sorted(reply["seed_shares"]) == sorted(ids[:3]) and list(reply["key_shares"]) == [ids[3]]
    with pytest.raises(SecAggProtocolError, match="needs stage 'masked'"):
        me.unmask([], [peer])  # at most one answer per round


def test_client_aborts_when_too_few_survivors_are_named():
    cfg = SecAggConfig(num_clients=4, threshold=3, quant_bits=12)
    ids, updates, _, _ = _inputs(4, seed=6)
    _, clients, _, _ = _to_masked(cfg, updates)
    with pytest.raises(SecAggAbort, match="only 2 survivors"):
        clients[ids[0]].unmask([ids[1]], [ids[2], ids[3]])


def test_stages_must_run_in_order():
    cfg = SecAggConfig(num_clients=3, threshold=2)
    client = SecAggClient(5, cfg, round_seed=b"s" * 16)
    with pytest.raises(SecAggProtocolError, match="needs stage 'shared'"):
        client.masked_input(np.zeros(3), {})
    server = SecAggServer(cfg)
    with pytest.raises(SecAggProtocolError, match="needs stage 'masked'"):
        server.unmask({})


def test_server_treats_malformed_replies_as_dropouts():
    cfg = SecAggConfig(num_clients=4, threshold=2, quant_bits=12)
    ids, updates, _, _ = _inputs(4, seed=8)
    server, clients, routed, _ = _to_masked(cfg, updates, stop_before_masked=True)
    masked = {i: clients[i].masked_input(updates[i], routed[i]) for i in ids}
    masked[ids[0]] = masked[ids[0]][:-1]  # wrong length
    masked[ids[1]] = masked[ids[1]].astype(np.float64)  # wrong type
    requests = server.collect_masked_inputs(masked)
    assert set(requests) == set(ids[2:])
    assert "entries" in server.excluded[ids[0]] and "integer" in server.excluded[ids[1]]
    replies = {i: clients[i].unmask(r["survivors"], r["dropped"]) for i, r in requests.items()}
    result = server.unmask(replies)
    assert result.survivors == tuple(ids[2:])
    assert np.max(np.abs(result.average - np.mean([updates[i] for i in ids[2:]], axis=0))) <= result.error_bound


def test_weight_outside_declared_range_is_refused():
    cfg = SecAggConfig(num_clients=3, threshold=2, max_weight=100)
    ids, updates, _, _ = _inputs(3, seed=9)
    _, clients, routed, _ = _to_masked(cfg, updates, stop_before_masked=True)
    with pytest.raises(ValueError, match=re.escape("weight=101 must be in [0, max_weight=100]")):
        clients[ids[0]].masked_input(updates[ids[0]], routed[ids[0]], 101)
    with pytest.raises(ValueError, match="weight=2.5"):
        clients[ids[0]].masked_input(updates[ids[0]], routed[ids[0]], 2.5)


# ----------------------------------------------------------- config and state


@pytest.mark.parametrize("kwargs, bad", [
    ({"num_clients": 1, "threshold": 2}, "num_clients=1"),
    ({"num_clients": 5.0, "threshold": 3}, "num_clients=5.0"),
    ({"num_clients": True, "threshold": 3}, "num_clients=True"),
    ({"num_clients": 5, "threshold": 1}, "threshold=1"),
    ({"num_clients": 5, "threshold": 6}, "threshold=6"),
    ({"num_clients": 10, "threshold": 6, "num_neighbours": 4}, "threshold=6"),
    ({"num_clients": 5, "threshold": 3, "num_neighbours": 0}, "num_neighbours=0"),
    ({"num_clients": 5, "threshold": 3, "clip_range": 0.0}, "clip_range=0.0"),
    ({"num_clients": 5, "threshold": 3, "clip_range": float("inf")}, "clip_range=inf"),
    ({"num_clients": 5, "threshold": 3, "quant_bits": 0}, "quant_bits=0"),
    ({"num_clients": 5, "threshold": 3, "quant_bits": 49}, "quant_bits=49"),
    ({"num_clients": 5, "threshold": 3, "max_weight": 0}, "max_weight=0"),
    ({"num_clients": 5, "threshold": 3, "max_weight": 1.5}, "max_weight=1.5"),
])
def test_config_errors_name_the_bad_value(kwargs, bad):
    with pytest.raises(ValueError, match=re.escape(bad)) as info:
        SecAggConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_config_round_trips_through_a_flat_dict():
    for cfg in (SecAggConfig(6, 4), SecAggConfig(20, 5, num_neighbours=8, clip_range=0.5, quant_bits=20,
                                                    max_weight=512)):
        assert SecAggConfig.from_dict(cfg.to_dict()) == cfg


def test_client_state_survives_a_flower_config_record_between_every_stage():
    flwr_app = pytest.importorskip("flwr.app")
    cfg = SecAggConfig(num_clients=5, threshold=3, num_neighbours=2, quant_bits=16, max_weight=50)
    ids, updates, weights, seeds = _inputs(5, seed=12)

    def hop(client):  # as if the next message were handled by a fresh process
        record = flwr_app.ConfigRecord(client.to_state())
        return SecAggClient.from_state(record)

    server = SecAggServer(cfg, round_id=3, vector_size=D)
    setup = flwr_app.ConfigRecord(server.setup_message())
    clients = {i: SecAggClient.from_setup(i, setup) for i in ids}
    adverts = {i: c.advertise() for i, c in clients.items()}
    clients = {i: hop(c) for i, c in clients.items()}
    keys = server.collect_advertisements(adverts)
    shares = {i: c.share_keys(keys) for i, c in clients.items()}
    clients = {i: hop(c) for i, c in clients.items()}
    routed = server.route_shares(shares)
    masked = {i: c.masked_input(updates[i], routed[i], weights[i], rng=np.random.default_rng(seeds[i]))
              for i, c in clients.items()}
    clients = {i: hop(c) for i, c in clients.items()}
    assert all(c.to_state()["s_sk"] == b"" and c.to_state()["seed"] == b"" for c in clients.values())
    requests = server.collect_masked_inputs(masked)
    result = server.unmask({i: clients[i].unmask(r["survivors"], r["dropped"]) for i, r in requests.items()})
    _check(result, cfg, updates, weights, seeds, ids)
