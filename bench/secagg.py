#!/usr/bin/env python
"""Cost of secure aggregation per round: plain FedAvg vs fedpriv SecAgg vs Flower's SecAgg+ math.

Runs every client and the server of one round in this process, on the same
vectors, and reports per-round compute time and payload bytes:

* ``plain``   -- FedAvg on float32 vectors: clients serialise their update, the
  server deserialises and forms the weighted mean.
* ``fedpriv`` -- :mod:`fedpriv.privacy.secagg` (X25519, HKDF, AES-GCM share bundles, AES-CTR
  masks, prime-field Shamir), including the client state round trip through
  ``to_state``/``from_state`` between stages that a process-per-message client pays.
* ``flower``  -- Flower 1.41's legacy SecAgg+ primitives from
  ``flwr.common.secure_aggregation`` (SECP384R1 ECDH, Fernet, pycryptodome Shamir,
  MT19937 masks via ``pseudo_rand_gen``), called in the order of ``secaggplus_mod``
  (client) and ``SecAggPlusWorkflow`` (server). The whole legacy workflow needs the
  deprecated Strategy/driver API, so its maths is driven directly.

Both secure schemes use the complete graph (every client shares with all others),
threshold ``n // 2 + 1``, clipping range 8, 2**22 quantisation levels and
``max_weight`` 1000 (Flower's defaults; fedpriv then picks a 25-27-bit modulus and
uint32 words, Flower uses a 2**32 modulus carried in int64). Client time is the
mean over clients of all four stages; bytes are protocol payloads (keys, ciphertexts,
vectors, shares, id lists), without message framing or the global-model broadcast.
With ``--dropout F`` a fraction of clients drops after sharing keys, exercising
the recovery path of both schemes.

Usage: ``python bench/secagg.py`` (full, writes bench/results/secagg.md, < 10 min
on 2 cores) or ``python bench/secagg.py --quick`` (small sizes, prints only).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedpriv.privacy.secagg import SecAggClient, SecAggConfig, SecAggServer  # noqa: E402

CLIP = 8.0
QUANT_BITS = 22
MAX_WEIGHT = 1000
FLWR_MOD_RANGE = 1 << 32


@dataclass
class Cost:
    client_s: float  # mean compute seconds per surviving client, whole round
    server_s: float  # server compute seconds, whole round
    client_bytes: float  # mean payload bytes sent per surviving client
    server_bytes: int  # payload bytes sent by the server (all clients)
    max_err: float  # max |aggregate - float64 weighted FedAvg|


class Clock:
    """Accumulates compute time per party."""

    def __init__(self) -> None:
        self.client: dict[int, float] = {}
        self.server = 0.0

    def run(self, who: int | None, fn, *args, **kwargs):
        start = time.process_time()  # CPU seconds: robust to other load on a shared machine
        out = fn(*args, **kwargs)
        spent = time.process_time() - start
        if who is None:
            self.server += spent
        else:
            self.client[who] = self.client.get(who, 0.0) + spent
        return out


def fedavg(updates, weights, ids):
    total = sum(weights[i] for i in ids)
    return sum(weights[i] * updates[i].astype(np.float64) for i in ids) / total


# ----------------------------------------------------------------------- plain


def run_plain(updates, weights, dropped) -> Cost:
    clock = Clock()
    ids = [i for i in updates if i not in dropped]
    payloads = {i: clock.run(i, lambda u: u.astype(np.float32).tobytes(), updates[i]) for i in ids}

    def aggregate():
        acc = np.zeros(next(iter(updates.values())).size, dtype=np.float64)
        for i in ids:
            acc += weights[i] * np.frombuffer(payloads[i], dtype=np.float32)
        return acc / sum(weights[i] for i in ids)

    avg = clock.run(None, aggregate)
    sent = {i: len(payloads[i]) + 8 for i in ids}  # vector + num_examples
    return Cost(
        client_s=statistics.mean(v for i, v in clock.client.items() if i not in dropped),
        server_s=clock.server,
        client_bytes=statistics.mean(v for i, v in sent.items() if i not in dropped),
        server_bytes=0,
        max_err=float(np.max(np.abs(avg - fedavg(updates, weights, ids)))),
    )


# --------------------------------------------------------------------- fedpriv


def run_fedpriv(updates, weights, dropped, threshold) -> Cost:
    n = len(updates)
    cfg = SecAggConfig(num_clients=n, threshold=threshold, clip_range=CLIP, quant_bits=QUANT_BITS,
                       max_weight=MAX_WEIGHT)
    clock = Clock()
    sent = {i: 0 for i in updates}
    server_sent = 0
    d = next(iter(updates.values())).size
    server = SecAggServer(cfg, round_id=1, vector_size=d)
    setup = server.setup_message()
    state: dict[int, dict] = {}

    def step(nid, method, *args, **kwargs):
        def body():
            client = SecAggClient.from_setup(nid, setup) if method == "advertise" else SecAggClient.from_state(state[nid])
            out = getattr(client, method)(*args, **kwargs)
            state[nid] = client.to_state()
            return out
        return clock.run(nid, body)

    adverts = {i: step(i, "advertise") for i in updates}
    for i, a in adverts.items():
        sent[i] += sum(len(v) for v in a.values())
    keys = clock.run(None, server.collect_advertisements, adverts)
    server_sent += len(keys) * sum(8 + len(e["c_pk"]) + len(e["s_pk"]) for e in keys.values())

    shares = {i: step(i, "share_keys", keys) for i in keys}
    for i, s in shares.items():
        sent[i] += sum(8 + len(c) for c in s.values())
    routed = clock.run(None, server.route_shares, shares)
    server_sent += sum(8 + len(c) for inbox in routed.values() for c in inbox.values())

    alive = [i for i in routed if i not in dropped]
    masked = {}
    for i in alive:
        y = step(i, "masked_input", updates[i], routed[i], weights[i])
        payload = clock.run(i, y.tobytes)
        sent[i] += len(payload)
        masked[i] = clock.run(None, np.frombuffer, payload, dtype=y.dtype)
    requests = clock.run(None, server.collect_masked_inputs, masked)
    server_sent += sum(8 * (len(r["survivors"]) + len(r["dropped"])) for r in requests.values())

    answers = {i: step(i, "unmask", r["survivors"], r["dropped"]) for i, r in requests.items()}
    for i, a in answers.items():
        sent[i] += sum(8 + len(s) for part in a.values() for s in part.values())
    result = clock.run(None, server.unmask, answers)
    err = float(np.max(np.abs(result.average - fedavg(updates, weights, alive))))
    assert err <= result.error_bound, (err, result.error_bound)
    return Cost(
        client_s=statistics.mean(v for i, v in clock.client.items() if i not in dropped),
        server_s=clock.server,
        client_bytes=statistics.mean(v for i, v in sent.items() if i not in dropped),
        server_bytes=server_sent,
        max_err=err,
    )


# ---------------------------------------------------------------------- flower


def run_flower(updates, weights, dropped, threshold) -> Cost:
    """Flower 1.41 legacy SecAgg+ maths, stage by stage as secaggplus_mod / SecAggPlusWorkflow do it."""
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        factor_combine,
        factor_extract,
        get_parameters_shape,
        parameters_addition,
        parameters_mod,
        parameters_multiply,
        parameters_subtraction,
    )
    from flwr.common.secure_aggregation.quantization import dequantize, quantize
    from flwr.common.secure_aggregation.secaggplus_utils import (
        pseudo_rand_gen,
        share_keys_plaintext_concat,
        share_keys_plaintext_separate,
    )
    from flwr.supercore.primitives.asymmetric import (
        bytes_to_private_key,
        bytes_to_public_key,
        generate_key_pairs,
        private_key_to_bytes,
        public_key_to_bytes,
    )

    clock = Clock()
    ids = list(updates)
    n = len(ids)
    num_shares, target_range, mod_range = n, 1 << QUANT_BITS, FLWR_MOD_RANGE
    sent = {i: 0 for i in ids}
    server_sent = 0
    st: dict[int, dict] = {i: {} for i in ids}

    # Server setup: neighbour ring (complete graph when num_shares == n).
    def server_setup():
        order = ids[:]
        random.shuffle(order)
        half = num_shares >> 1
        return {nid: {order[(k + off) % n] for off in range(-half, half + 1)} for k, nid in enumerate(order)}

    nbrs = clock.run(None, server_setup)

    # Stage 0 (client): two SECP384R1 key pairs.
    def setup(nid):
        sk1, pk1 = generate_key_pairs()
        sk2, pk2 = generate_key_pairs()
        s = st[nid]
        s["sk1"], s["pk1"] = private_key_to_bytes(sk1), public_key_to_bytes(pk1)
        s["sk2"], s["pk2"] = private_key_to_bytes(sk2), public_key_to_bytes(pk2)
        return s["pk1"], s["pk2"]

    pks = {i: clock.run(i, setup, i) for i in ids}
    for i, (p1, p2) in pks.items():
        sent[i] += len(p1) + len(p2)
    server_sent += sum(8 + len(pks[v][0]) + len(pks[v][1]) for i in ids for v in nbrs[i])

    # Stage 1 (client): Shamir-share the seed and sk1, Fernet-encrypt per neighbour.
    def share_keys(nid):
        s = st[nid]
        key_dict = {v: pks[v] for v in nbrs[nid]}
        s["rd_seed"] = os.urandom(32)
        b_shares = create_shares(s["rd_seed"], threshold, num_shares)
        sk1_shares = create_shares(s["sk1"], threshold, num_shares)
        s["b"], s["k"], s["ss2"], out = {}, {}, {}, []
        for idx, (v, (_, pk2)) in enumerate(key_dict.items()):
            if v == nid:
                s["b"][nid], s["k"][nid] = b_shares[idx], sk1_shares[idx]
                continue
            shared = generate_shared_key(bytes_to_private_key(s["sk2"]), bytes_to_public_key(pk2))
            s["ss2"][v] = shared
            out.append((v, encrypt(shared, share_keys_plaintext_concat(nid, v, b_shares[idx], sk1_shares[idx]))))
        return out

    outbox = {i: clock.run(i, share_keys, i) for i in ids}
    for i, msgs in outbox.items():
        sent[i] += sum(8 + len(c) for _, c in msgs)

    def route():
        fwd = {i: [] for i in ids}
        for src, msgs in outbox.items():
            for dst, ct in msgs:
                fwd[dst].append((src, ct))
        return fwd

    fwd = clock.run(None, route)
    server_sent += sum(8 + len(c) for msgs in fwd.values() for _, c in msgs)

    # Stage 2 (client): decrypt shares, weight, quantise, mask with MT19937 streams.
    def collect(nid):
        s = st[nid]
        available = []
        for src, ct in fwd[nid]:
            _, _, b_share, k_share = share_keys_plaintext_separate(decrypt(s["ss2"][src], ct))
            s["b"][src], s["k"][src] = b_share, k_share
            available.append(src)
        q_ratio = round(weights[nid] / MAX_WEIGHT * target_range)
        params = parameters_multiply([updates[nid]], q_ratio / target_range)
        quantized = factor_combine(q_ratio, quantize(params, CLIP, target_range))
        dims = [a.shape for a in quantized]
        quantized = parameters_addition(quantized, pseudo_rand_gen(s["rd_seed"], mod_range, dims))
        for v in available:
            shared = generate_shared_key(bytes_to_private_key(s["sk1"]), bytes_to_public_key(pks[v][0]))
            mask = pseudo_rand_gen(shared, mod_range, dims)
            quantized = (parameters_addition if nid > v else parameters_subtraction)(quantized, mask)
        quantized = parameters_mod(quantized, mod_range)
        return [a.tobytes() for a in quantized]

    active = [i for i in ids if i not in dropped]
    uploads = {}
    for i in active:
        uploads[i] = clock.run(i, collect, i)
        sent[i] += sum(len(b) for b in uploads[i])

    def sum_masked():
        total = None
        for i in active:
            vec = [np.frombuffer(b, dtype=np.int64) for b in uploads[i]]
            total = vec if total is None else parameters_addition(total, vec)
        return parameters_mod(total, mod_range)

    masked_sum = clock.run(None, sum_masked)
    dead = [i for i in ids if i in dropped]
    requests = {i: (sorted(nbrs[i] & set(active)), sorted(nbrs[i] & set(dead))) for i in active}
    server_sent += sum(8 * (len(a) + len(b)) for a, b in requests.values())

    # Stage 3 (client): seed shares of active, sk1 shares of dead neighbours.
    def unmask(nid):
        act, ded = requests[nid]
        s = st[nid]
        return act + ded, [s["b"][v] for v in act] + [s["k"][v] for v in ded]

    replies = {i: clock.run(i, unmask, i) for i in active}
    for i, (nids, shares) in replies.items():
        sent[i] += sum(8 + len(x) for x in shares)

    def server_unmask():
        collected = {i: [] for i in ids}
        for nids, shares in replies.values():
            for owner, share in zip(nids, shares):
                collected[owner].append(share)
        vec = masked_sum
        shape = get_parameters_shape(vec)
        for nid, share_list in collected.items():
            if len(share_list) < threshold:
                raise RuntimeError("Flower SecAgg+ would abort: not enough shares")
            secret = combine_shares(share_list)
            if nid in active:
                vec = parameters_subtraction(vec, pseudo_rand_gen(secret, mod_range, shape))
            else:
                for v in nbrs[nid] - {nid}:
                    shared = generate_shared_key(bytes_to_private_key(secret), bytes_to_public_key(pks[v][0]))
                    mask = pseudo_rand_gen(shared, mod_range, shape)
                    vec = (parameters_addition if nid > v else parameters_subtraction)(vec, mask)
        vec = parameters_mod(vec, mod_range)
        q_total, vec = factor_extract(vec)
        out = dequantize(vec, CLIP, target_range)[0]
        out += -(len(active) - 1) * CLIP
        out *= target_range / q_total
        return out

    avg = clock.run(None, server_unmask)
    return Cost(
        client_s=statistics.mean(v for i, v in clock.client.items() if i not in dropped),
        server_s=clock.server,
        client_bytes=statistics.mean(v for i, v in sent.items() if i not in dropped),
        server_bytes=server_sent,
        max_err=float(np.max(np.abs(avg - fedavg(updates, weights, active)))),
    )


# ------------------------------------------------------------------------ main


def fmt_bytes(b: float) -> str:
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if b >= size:
            return f"{b / size:.2f} {unit}"
    return f"{b:.0f} B"


def fmt_s(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def measure(scheme, n, d, reps, dropout, seed) -> Cost:
    rng = np.random.default_rng(seed)
    updates = {i + 1: rng.normal(0.0, 0.01, d).astype(np.float32) for i in range(n)}
    weights = {i: int(rng.integers(100, MAX_WEIGHT + 1)) for i in updates}
    dropped = set(random.Random(seed).sample(sorted(updates), math.floor(dropout * n)))
    threshold = n // 2 + 1
    runs = []
    for _ in range(reps):
        if scheme == "plain":
            runs.append(run_plain(updates, weights, dropped))
        elif scheme == "fedpriv":
            runs.append(run_fedpriv(updates, weights, dropped, threshold))
        else:
            runs.append(run_flower(updates, weights, dropped, threshold))
    best = min(runs, key=lambda c: c.client_s + c.server_s)
    return Cost(
        client_s=statistics.median(c.client_s for c in runs),
        server_s=statistics.median(c.server_s for c in runs),
        client_bytes=best.client_bytes,
        server_bytes=best.server_bytes,
        max_err=max(c.max_err for c in runs),
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (n=5,10; d=1e4,1e5), print only")
    parser.add_argument("--dropout", type=float, default=0.0, help="fraction of clients dropping after share-keys")
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown here "
                        "(default: bench/results/secagg.md for a full run, nothing for --quick)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0 <= args.dropout < 0.5:
        parser.error(f"--dropout={args.dropout} must be in [0, 0.5) so that n//2+1 clients survive")

    # (n, d, repetitions, dropout fraction); the last rows exercise dropout recovery.
    if args.quick:
        grid = [(n, d, 1, args.dropout) for n in (5, 10) for d in (10_000, 100_000)] + [(10, 100_000, 1, 0.2)]
    else:
        grid = [(n, d, 5 if d <= 100_000 else 3, args.dropout)
                for n in (5, 10, 20) for d in (100_000, 1_000_000, 1_800_000)]
        grid += [(n, 1_000_000, 3, 0.2) for n in (10, 20)]
    out = args.out if args.out is not None else (None if args.quick else ROOT / "bench/results/secagg.md")

    import cryptography
    import flwr

    for scheme in ("plain", "fedpriv", "flower"):  # warm caches, imports and OpenSSL once
        measure(scheme, 3, 1_000, 1, 0.0, args.seed)
    started = time.perf_counter()
    rows = []
    header = ("| n | dropped | d | scheme | client compute | server compute | client sent | server sent "
              "| client time vs plain | server time vs plain | upload vs plain | max abs err |")
    lines = [header, "|" + "---|" * 12]
    print(header, flush=True)
    print(lines[1], flush=True)
    for n, d, reps, dropout in grid:
        costs = {s: measure(s, n, d, reps, dropout, args.seed + n * 7 + d) for s in ("plain", "fedpriv", "flower")}
        base = costs["plain"]
        for scheme, c in costs.items():
            row = (f"| {n} | {math.floor(dropout * n)} | {d:,} | {scheme} | {fmt_s(c.client_s)} | {fmt_s(c.server_s)} "
                   f"| {fmt_bytes(c.client_bytes)} | {fmt_bytes(c.server_bytes)} "
                   f"| {c.client_s / base.client_s:.1f}x | {c.server_s / base.server_s:.1f}x "
                   f"| {c.client_bytes / base.client_bytes:.2f}x | {c.max_err:.1e} |")
            lines.append(row)
            print(row, flush=True)
        rows.append((n, math.floor(dropout * n), d, costs))
    elapsed = time.perf_counter() - started

    summary = ["", "fedpriv vs Flower SecAgg+ on the same vectors (Flower time / fedpriv time; >1 means fedpriv is faster):", ""]
    summary.append("| n | dropped | d | client speed-up | server speed-up | upload ratio (fedpriv / Flower) |")
    summary.append("|---|---|---|---|---|---|")
    for n, nd, d, costs in rows:
        fp, fl = costs["fedpriv"], costs["flower"]
        summary.append(f"| {n} | {nd} | {d:,} | {fl.client_s / fp.client_s:.1f}x | {fl.server_s / fp.server_s:.1f}x "
                       f"| {fp.client_bytes / fl.client_bytes:.2f} |")
    print("\n".join(summary))

    if out is not None:
        doc = [
            "# Secure aggregation cost per round",
            "",
            "Generated by `python bench/secagg.py" + (" --quick" if args.quick else "")
            + (f" --dropout {args.dropout}" if args.dropout else "") + "`; do not edit by hand.",
            "",
            f"Machine: {platform.machine()}, {os.cpu_count()} CPU(s), Python {platform.python_version()}, "
            f"numpy {np.__version__}, cryptography {cryptography.__version__}, flwr {flwr.__version__}. "
            f"Total run time {elapsed:.0f} s.",
            "",
            f"All clients and the server of one round run in one process, one after another. "
            f"Complete graph, threshold n//2+1, clip range {CLIP}, 2^{QUANT_BITS} quantisation levels, "
            f"max weight {MAX_WEIGHT}, weights drawn in [100, {MAX_WEIGHT}], "
            "`dropped` clients drop after share-keys (so both schemes must rebuild their mask keys "
            "from shares and strip their pairwise masks). "
            "Client compute and bytes = mean per surviving client over all stages (incl. serialising its upload; for fedpriv "
            "also its state round trip between stages); server compute = whole round. Bytes are protocol "
            "payloads sent (keys, ciphertexts, vectors, shares, ids), without message framing or the "
            "global-model broadcast. Compute is CPU time (`time.process_time`, all threads of the process), "
            f"median of {'1 run' if args.quick else '5 runs for d = 100,000 and 3 runs above'}. "
            "max abs err = largest coordinate error of the aggregate against float64 weighted FedAvg.",
            "",
            *lines,
            *summary,
            "",
            "Notes:",
            "",
            "- fedpriv draws masks with AES-256-CTR keyed by a full HKDF-derived 256-bit key and, because its "
            "modulus here is at most 2^27, works in uint32 words (4 bytes per coordinate, the same upload "
            "as float32). Flower seeds numpy's MT19937 from a 32-bit XOR fold of the key and ships int64 "
            "(8 bytes per coordinate).",
            "- Flower's server recomputes every survivor's self mask with MT19937; its Shamir (pycryptodome, "
            "GF(2^128) in pure Python, 16-byte chunks of a PEM-encoded SECP384R1 key) dominates at small d.",
        ]
        from fedpriv.core.files import atomic_write_text

        atomic_write_text(out, "\n".join(doc) + "\n")
        print(f"\nwrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
