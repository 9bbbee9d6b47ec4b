"""Client and server state machines of the secure-aggregation round.

One round has four request/reply stages. The server drives them; every reply
that does not come back (timeout, crash, error) is a dropout, which the protocol
tolerates at every stage as long as at least ``threshold`` clients and shares
survive. Stage by stage (``U1 ⊇ U2 ⊇ U3`` are the clients still alive):

0. *setup* -- ``SecAggServer.setup_message()`` (config, round id, public round
   seed) goes out with the first request; each client builds
   ``SecAggClient.from_setup(node_id, message)``.
1. *advertise keys* -- ``client.advertise()`` makes two X25519 key pairs (``c`` for
   share encryption, ``s`` for mask agreement) and a random 32-byte self-mask seed
   ``b_u``, and returns the public keys plus a hash commitment to ``b_u``.
   ``server.collect_advertisements(replies)`` fixes the participants ``U1`` and
   returns the public keys to broadcast to all of them.
2. *share keys* -- ``client.share_keys(public_keys)`` computes the neighbour graph
   (complete, or k-regular for SecAgg+) from the public round seed, Shamir-shares
   ``b_u`` and its ``s`` private key among itself and its neighbours (threshold
   ``t``), and seals each neighbour's pair of shares with AES-GCM under an HKDF key
   from the ``c`` agreement. ``server.route_shares(replies)`` forwards the sealed
   bundles (it cannot open them) to the clients ``U2`` that answered.
3. *masked input* -- ``client.masked_input(update, received, weight)`` opens its
   bundles, encodes ``(weight / max_weight) * update`` as integers mod ``2**k`` with
   the weight as an extra last coordinate, adds ``PRG(b_u)`` and, for every
   neighbour ``v`` whose bundle arrived, ``+PRG(k_uv)`` if ``u < v`` else
   ``-PRG(k_uv)``, and returns ``y_u``. ``server.collect_masked_inputs(replies)`` sums
   the ``y_u`` of ``U3`` and returns, for every survivor, which of its neighbours
   survived and which dropped after stage 2.
4. *unmask* -- ``client.unmask(survivors, dropped)`` returns its shares of ``b_v``
   for survivors and of ``s_v`` for dropped neighbours; it refuses (raises) if any
   peer is named in both lists, so the server can never hold both secrets of one
   client. ``server.unmask(replies)`` reconstructs the seeds, strips the self masks
   of survivors and the pairwise masks between survivors and dropped clients, and
   returns the dequantised weighted sum, the total weight and their ratio.

Messages are plain ``dict``s of ``bytes``/``int``/``list[int]``/``numpy`` arrays
(node ids as ``int`` keys; :func:`pack_ids`/:func:`unpack_ids` turn id lists into
``bytes`` where a transport cannot carry unsigned 64-bit integers). Client state
between stages is :meth:`SecAggClient.to_state`, a flat ``dict`` of ``str``,
``int``, ``float`` and ``bytes`` that fits a Flower ``ConfigRecord`` as is.

Weighted FedAvg: a client passes its number of examples as ``weight`` (an integer
bounded by the declared ``max_weight``). It encodes ``(weight / max_weight) * update``
and appends ``weight`` itself as one more coordinate of the masked vector, so the
server learns ``sum(w_u * x_u)`` and ``sum(w_u)`` -- only the total weight, never a
single client's -- and divides. Clipping to ``clip_range`` and quantisation happen
before masking, and the update is already DP-noised when it gets here, so none of
this changes the DP guarantee.

What the server learns: the sum of the survivors' encoded updates, their total
weight, who advertised, who dropped at which stage, and the (public) keys. Nothing
else about any single update unless ``threshold`` or more clients collude with it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import crypto, shamir
from .errors import SecAggAbort, SecAggError, SecAggProtocolError
from .graph import neighbour_graph, share_holders
from .quantize import (
    MAX_MOD_BITS,
    MAX_QUANT_BITS,
    average_error_bound,
    dequantize_sum,
    quantization_step,
    quantize,
    required_mod_bits,
    word_dtype,
)

STATE_VERSION = 1
_MAX_U64 = (1 << 64) - 1
_BUNDLE_PLAINTEXT_BYTES = 2 * shamir.SHARE_BYTES
_BUNDLE_BYTES = crypto.NONCE_BYTES + _BUNDLE_PLAINTEXT_BYTES + crypto.TAG_BYTES
_MIN_ROUND_SEED_BYTES = 16


# ------------------------------------------------------------------------ helpers


def pack_ids(ids: Iterable[int]) -> bytes:
    """Node ids as concatenated 8-byte big-endian unsigned integers (order kept)."""
    return b"".join(int(i).to_bytes(8, "big", signed=False) for i in ids)


def unpack_ids(blob: bytes) -> list[int]:
    """Inverse of :func:`pack_ids`."""
    if len(blob) % 8:
        raise ValueError(f"packed id list has {len(blob)} bytes, not a multiple of 8")
    return [int.from_bytes(blob[i : i + 8], "big") for i in range(0, len(blob), 8)]


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _node_id(value: Any, what: str = "node id") -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not _is_int(value) or not 0 <= int(value) <= _MAX_U64:
        raise SecAggProtocolError(f"{what} {value!r} is not an unsigned 64-bit integer")
    return int(value)


def _int_keyed(mapping: Any, what: str) -> dict[int, Any]:
    if not isinstance(mapping, Mapping):
        raise SecAggProtocolError(f"{what} must be a mapping from node id to value, got {type(mapping).__name__}")
    out: dict[int, Any] = {}
    for key, value in mapping.items():
        nid = _node_id(key, f"{what}: key")
        if nid in out:
            raise SecAggProtocolError(f"{what}: node id {nid} appears twice")
        out[nid] = value
    return out


def _bytes_of(value: Any, size: int, what: str) -> bytes:
    if not isinstance(value, (bytes, bytearray)) or len(value) != size:
        got = f"{len(value)} bytes" if isinstance(value, (bytes, bytearray)) else type(value).__name__
        raise SecAggProtocolError(f"{what} must be {size} bytes, got {got}")
    return bytes(value)


# ------------------------------------------------------------------------- config


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    if not _is_int(value):
        raise ValueError(f"{name}={value!r} must be an integer")
    if value < low or (high is not None and value > high):
        span = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}={value!r} must be {span}")
    return int(value)


@dataclass(frozen=True)
class SecAggConfig:
    """Public parameters of a secure-aggregation round (identical on server and clients).

    ``num_clients``: most clients that may take part (sets the modulus).
    ``threshold``: shares needed to rebuild a secret = least number of survivors;
    ``2 <= threshold <= neighbours + 1`` (a client holds one share of its own secrets).
    ``num_neighbours``: ``None`` for the complete graph (SecAgg), else the degree
    ``k`` of the sparse SecAgg+ graph (``>= num_clients - 1`` means complete).
    ``clip_range``: coordinates of ``(weight / max_weight) * update`` are clipped to
    ``[-clip_range, clip_range]`` before quantisation. ``quant_bits``: quantisation
    levels ``2**quant_bits``. ``max_weight``: the largest weight (e.g. example count)
    a client may declare; weights are integers in ``[0, max_weight]``.
    """

    num_clients: int
    threshold: int
    num_neighbours: int | None = None
    clip_range: float = 1.0
    quant_bits: int = 24
    max_weight: int = 1

    def __post_init__(self) -> None:
        n = _check_int("num_clients", self.num_clients, 2)
        if self.num_neighbours is not None:
            _check_int("num_neighbours", self.num_neighbours, 1)
        t = _check_int("threshold", self.threshold, 2)
        if t > self.shares_per_client:
            raise ValueError(
                f"threshold={t} must be <= {self.shares_per_client} "
                f"(neighbours per client + 1 with num_clients={n}, num_neighbours={self.num_neighbours})"
            )
        clip = self.clip_range
        if isinstance(clip, bool) or not isinstance(clip, (int, float, np.floating, np.integer)):
            raise ValueError(f"clip_range={clip!r} must be a number")
        if not (math.isfinite(float(clip)) and float(clip) > 0):
            raise ValueError(f"clip_range={clip!r} must be finite and > 0")
        b = _check_int("quant_bits", self.quant_bits, 1, MAX_QUANT_BITS)
        w = _check_int("max_weight", self.max_weight, 1)
        k = required_mod_bits(n, b, w)
        if k > MAX_MOD_BITS:
            raise ValueError(
                f"quant_bits={b} with num_clients={n} and max_weight={w} needs a {k}-bit modulus; "
                f"at most {MAX_MOD_BITS} bits fit (lower quant_bits or max_weight)"
            )

    @property
    def neighbours_per_client(self) -> int:
        """Guaranteed neighbour count when all ``num_clients`` take part."""
        if self.num_neighbours is None:
            return self.num_clients - 1
        return min(self.num_neighbours, self.num_clients - 1)

    @property
    def shares_per_client(self) -> int:
        """Shares of each secret: one per neighbour plus the owner's own."""
        return self.neighbours_per_client + 1

    @property
    def mod_bits(self) -> int:
        """``k``: vectors are summed modulo ``2**k`` (no wrap for ``num_clients`` summands)."""
        return required_mod_bits(self.num_clients, self.quant_bits, self.max_weight)

    @property
    def word_dtype(self) -> np.dtype:
        """uint32 when ``k <= 32``, else uint64."""
        return word_dtype(self.mod_bits)

    @property
    def step(self) -> float:
        """Quantisation step ``2 * clip_range / (2**quant_bits - 1)``."""
        return quantization_step(self.clip_range, self.quant_bits)

    def to_dict(self) -> dict[str, int | float]:
        """Flat scalars (``num_neighbours=None`` is written as 0)."""
        return {
            "num_clients": int(self.num_clients),
            "threshold": int(self.threshold),
            "num_neighbours": 0 if self.num_neighbours is None else int(self.num_neighbours),
            "clip_range": float(self.clip_range),
            "quant_bits": int(self.quant_bits),
            "max_weight": int(self.max_weight),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], prefix: str = "") -> SecAggConfig:
        """Inverse of :meth:`to_dict` (keys optionally prefixed)."""
        try:
            nbrs = data[prefix + "num_neighbours"]
            return cls(
                num_clients=data[prefix + "num_clients"],
                threshold=data[prefix + "threshold"],
                num_neighbours=None if nbrs in (0, None) else nbrs,
                clip_range=data[prefix + "clip_range"],
                quant_bits=data[prefix + "quant_bits"],
                max_weight=data[prefix + "max_weight"],
            )
        except KeyError as err:
            raise ValueError(f"secure-aggregation config lacks key {err.args[0]!r}") from None


# ------------------------------------------------------------------------- client

_CLIENT_STAGES = ("new", "advertised", "shared", "masked", "done")


class SecAggClient:
    """One client's side of a round. Create per round; persist with :meth:`to_state` between stages."""

    def __init__(self, node_id: int, config: SecAggConfig, round_id: int = 0, round_seed: bytes = bytes(16)):
        if not isinstance(config, SecAggConfig):
            raise TypeError(f"config must be a SecAggConfig, got {type(config).__name__}")
        self.node_id = _node_id(node_id)
        self.config = config
        if not _is_int(round_id) or not 0 <= round_id < 1 << 63:
            raise ValueError(f"round_id={round_id!r} must be an integer in [0, 2**63)")
        self.round_id = int(round_id)
        if not isinstance(round_seed, (bytes, bytearray)) or len(round_seed) < _MIN_ROUND_SEED_BYTES:
            raise ValueError(f"round_seed must be at least {_MIN_ROUND_SEED_BYTES} bytes")
        self.round_seed = bytes(round_seed)
        self._ctx = crypto.round_context(self.round_id, self.round_seed)
        self._stage = "new"
        self._c_sk = self._c_pk = self._s_sk = self._s_pk = self._seed = b""
        self._participants: list[int] = []
        self._peer_c_pk: dict[int, bytes] = {}
        self._peer_s_pk: dict[int, bytes] = {}
        self._held: dict[int, tuple[bytes, bytes]] = {}  # owner -> (seed share, key share)
        self._masked_with: list[int] = []

    @classmethod
    def from_setup(cls, node_id: int, setup: Mapping[str, Any]) -> SecAggClient:
        """Build the client from :meth:`SecAggServer.setup_message`."""
        try:
            return cls(node_id, SecAggConfig.from_dict(setup), setup["round_id"], setup["round_seed"])
        except KeyError as err:
            raise ValueError(f"secure-aggregation setup message lacks key {err.args[0]!r}") from None

    @property
    def stage(self) -> str:
        """Last completed stage: new, advertised, shared, masked or done."""
        return self._stage

    def _expect(self, stage: str, call: str) -> None:
        if self._stage != stage:
            raise SecAggProtocolError(
                f"client {self.node_id}: {call}() needs stage {stage!r} but the client is at {self._stage!r}"
            )

    def _graph(self) -> dict[int, frozenset[int]]:
        return neighbour_graph(self._participants, self.config.num_neighbours, self.round_seed)

    # ---- stage 1
    def advertise(self) -> dict[str, bytes]:
        """New key pairs and self-mask seed; returns ``{"c_pk", "s_pk", "seed_commitment"}``."""
        self._expect("new", "advertise")
        self._c_sk, self._c_pk = crypto.generate_keypair()
        self._s_sk, self._s_pk = crypto.generate_keypair()
        self._seed = os.urandom(shamir.SECRET_BYTES)
        self._stage = "advertised"
        return {
            "c_pk": self._c_pk,
            "s_pk": self._s_pk,
            "seed_commitment": crypto.seed_commitment(self._seed, self._ctx, self.node_id),
        }

    def advertised_keys(self) -> dict[str, bytes]:
        """What :meth:`advertise` returned (public keys, seed commitment), for checking the broadcast against it."""
        self._expect("advertised", "advertised_keys")
        return {"c_pk": self._c_pk, "s_pk": self._s_pk,
                "seed_commitment": crypto.seed_commitment(self._seed, self._ctx, self.node_id)}

    # ---- stage 2
    def share_keys(self, public_keys: Mapping[int, Mapping[str, bytes]]) -> dict[int, bytes]:
        """Shamir-share ``b_u`` and the ``s`` private key; returns ``{neighbour id: sealed bundle}``.

        ``public_keys`` is the server's broadcast: every participant's ``c_pk`` and ``s_pk``.
        """
        self._expect("advertised", "share_keys")
        keys = _int_keyed(public_keys, "public_keys")
        c_pks: dict[int, bytes] = {}
        s_pks: dict[int, bytes] = {}
        for nid, entry in keys.items():
            if not isinstance(entry, Mapping):
                raise SecAggProtocolError(f"public_keys[{nid}] must be a mapping with c_pk and s_pk")
            c_pks[nid] = _bytes_of(entry.get("c_pk"), crypto.KEY_BYTES, f"c_pk of client {nid}")
            s_pks[nid] = _bytes_of(entry.get("s_pk"), crypto.KEY_BYTES, f"s_pk of client {nid}")
        if c_pks.get(self.node_id) != self._c_pk or s_pks.get(self.node_id) != self._s_pk:
            raise SecAggProtocolError(f"client {self.node_id}: its own public keys are missing or altered in the broadcast")
        every_key = list(c_pks.values()) + list(s_pks.values())
        if len(set(every_key)) != len(every_key):
            raise SecAggProtocolError("the broadcast repeats a public key")
        if len(keys) > self.config.num_clients:
            raise SecAggProtocolError(
                f"{len(keys)} participants exceed num_clients={self.config.num_clients} (the modulus would overflow)"
            )
        t = self.config.threshold
        if len(keys) < t:
            raise SecAggAbort(f"only {len(keys)} clients advertised keys; threshold is {t}")

        self._participants = sorted(keys)
        graph = self._graph()
        holders = share_holders(graph, self.node_id)
        if len(holders) < t:
            raise SecAggAbort(f"client {self.node_id} has {len(holders) - 1} neighbours; threshold {t} needs {t - 1}")
        seed_shares = shamir.split(self._seed, t, len(holders))
        key_shares = shamir.split(self._s_sk, t, len(holders))
        out: dict[int, bytes] = {}
        for idx, holder in enumerate(holders):
            if holder == self.node_id:
                self._held[holder] = (seed_shares[idx], key_shares[idx])
                continue
            key = crypto.share_encryption_key(
                crypto.agree(self._c_sk, c_pks[holder]), self._ctx, self.node_id, holder
            )
            out[holder] = crypto.encrypt_bundle(
                key, seed_shares[idx] + key_shares[idx],
                sender=self.node_id, receiver=holder, round_id=self.round_id,
            )
        self._peer_c_pk = {v: c_pks[v] for v in graph[self.node_id]}
        self._peer_s_pk = {v: s_pks[v] for v in graph[self.node_id]}
        self._stage = "shared"
        return out

    # ---- stage 3
    def masked_input(
        self,
        update: np.ndarray,
        received: Mapping[int, bytes],
        weight: int = 1,
        *,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        """Encode and mask ``update``; returns ``y_u`` (length ``update.size + 1``, uint32 or uint64).

        ``update`` must already be DP-clipped and noised (this is post-processing).
        ``received`` maps neighbour id -> sealed bundle as routed by the server.
        ``weight`` (e.g. the number of local examples, an integer in
        ``[0, max_weight]``) scales the update and travels as the last coordinate,
        so the server learns only the total weight. ``rng`` drives stochastic rounding.
        """
        self._expect("shared", "masked_input")
        cfg = self.config
        bundles = _int_keyed(received, "received ciphertexts")
        strangers = sorted(set(bundles) - set(self._peer_c_pk))
        if strangers:
            raise SecAggProtocolError(
                f"client {self.node_id} got share bundles from {strangers}, which are not its neighbours"
            )
        if len(bundles) + 1 < cfg.threshold:
            raise SecAggAbort(
                f"client {self.node_id}: only {len(bundles)} neighbours remain after share-keys; "
                f"threshold {cfg.threshold} needs {cfg.threshold - 1}"
            )
        if not _is_int(weight) and not (isinstance(weight, (float, np.floating)) and float(weight).is_integer()):
            raise ValueError(f"weight={weight!r} must be an integer (e.g. the number of local examples)")
        if not 0 <= weight <= cfg.max_weight:
            raise ValueError(f"weight={weight!r} must be in [0, max_weight={cfg.max_weight}]")
        weight = int(weight)

        graph = self._graph()
        opened: dict[int, tuple[bytes, bytes]] = {}
        for src in sorted(bundles):
            key = crypto.share_encryption_key(
                crypto.agree(self._c_sk, self._peer_c_pk[src]), self._ctx, self.node_id, src
            )
            plain = crypto.decrypt_bundle(key, bundles[src], sender=src, receiver=self.node_id, round_id=self.round_id)
            if len(plain) != _BUNDLE_PLAINTEXT_BYTES:
                raise SecAggProtocolError(f"share bundle from client {src} has the wrong length")
            seed_share, key_share = plain[: shamir.SHARE_BYTES], plain[shamir.SHARE_BYTES :]
            expected_x = share_holders(graph, src).index(self.node_id) + 1
            if shamir.share_index(seed_share) != expected_x or shamir.share_index(key_share) != expected_x:
                raise SecAggProtocolError(f"share bundle from client {src} carries the wrong share index")
            opened[src] = (seed_share, key_share)

        vec = np.asarray(update)
        if vec.dtype.kind not in "fiu":
            raise ValueError(f"update must be a numeric array, got dtype {vec.dtype}")
        words = cfg.word_dtype
        y = np.empty(vec.size + 1, dtype=words)
        y[:-1] = quantize(vec, cfg.clip_range, cfg.quant_bits, scale=weight / cfg.max_weight, rng=rng, dtype=words)
        y[-1] = weight
        crypto.apply_mask(y, crypto.self_mask_key(self._seed, self._ctx, self.node_id), +1)
        for v in sorted(opened):
            shared = crypto.agree(self._s_sk, self._peer_s_pk[v])
            crypto.apply_mask(y, crypto.pairwise_mask_key(shared, self._ctx, self.node_id, v),
                              +1 if self.node_id < v else -1)
        np.bitwise_and(y, words.type((1 << cfg.mod_bits) - 1), out=y)

        self._held.update(opened)
        self._masked_with = sorted(opened)
        # The secrets are shared and used; forget them (only the shares are needed now).
        self._c_sk = self._s_sk = self._seed = b""
        self._stage = "masked"
        return y

    # ---- stage 4
    def unmask(self, survivors: Iterable[int], dropped: Iterable[int]) -> dict[str, dict[int, bytes]]:
        """Shares of ``b_v`` for surviving and of ``s_v`` for dropped neighbours.

        Returns ``{"seed_shares": {v: share}, "key_shares": {v: share}}``. Raises
        :class:`SecAggProtocolError` -- revealing nothing -- if a peer is named both
        survivor and dropped, if this client is called dropped, or if a peer is not
        one whose shares it holds; :class:`SecAggAbort` if fewer than ``threshold``
        survivors (itself included) are named. Answers at most once per round.
        """
        self._expect("masked", "unmask")
        alive = {_node_id(v, "survivor id") for v in survivors}
        dead = {_node_id(v, "dropped id") for v in dropped}
        both = sorted(alive & dead)
        if both:
            raise SecAggProtocolError(
                f"client {self.node_id} refuses: asked for both the self-mask share and the key share of {both}"
            )
        if self.node_id in dead:
            raise SecAggProtocolError(f"client {self.node_id} refuses: it is itself listed as dropped")
        alive.add(self.node_id)
        unknown = sorted((alive | dead) - set(self._held))
        if unknown:
            raise SecAggProtocolError(
                f"client {self.node_id} refuses: it holds no shares of {unknown} (not neighbours that shared keys)"
            )
        if len(alive) < self.config.threshold:
            raise SecAggAbort(
                f"client {self.node_id}: only {len(alive)} survivors named; threshold is {self.config.threshold}"
            )
        reply = {
            "seed_shares": {v: self._held[v][0] for v in sorted(alive)},
            "key_shares": {v: self._held[v][1] for v in sorted(dead)},
        }
        self._held = {}
        self._stage = "done"
        return reply

    # ---- persistence
    def to_state(self) -> dict[str, int | float | str | bytes]:
        """Everything needed to resume in a fresh process; flat, ``ConfigRecord``-compatible."""
        held_ids = sorted(self._held)
        peer_ids = sorted(self._peer_c_pk)
        state: dict[str, int | float | str | bytes] = {
            "version": STATE_VERSION,
            "stage": self._stage,
            "node_id": pack_ids([self.node_id]),
            "round_id": self.round_id,
            "round_seed": self.round_seed,
            "c_sk": self._c_sk,
            "c_pk": self._c_pk,
            "s_sk": self._s_sk,
            "s_pk": self._s_pk,
            "seed": self._seed,
            "participants": pack_ids(self._participants),
            "peer_ids": pack_ids(peer_ids),
            "peer_c_pks": b"".join(self._peer_c_pk[v] for v in peer_ids),
            "peer_s_pks": b"".join(self._peer_s_pk[v] for v in peer_ids),
            "held_ids": pack_ids(held_ids),
            "held_seed_shares": b"".join(self._held[v][0] for v in held_ids),
            "held_key_shares": b"".join(self._held[v][1] for v in held_ids),
            "masked_with": pack_ids(self._masked_with),
        }
        state.update({f"cfg_{k}": v for k, v in self.config.to_dict().items()})
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> SecAggClient:
        """Inverse of :meth:`to_state` (accepts a Flower ``ConfigRecord`` directly)."""
        try:
            if state["version"] != STATE_VERSION:
                raise ValueError(f"client state version {state['version']!r} is not {STATE_VERSION}")
            if state["stage"] not in _CLIENT_STAGES:
                raise ValueError(f"client state has unknown stage {state['stage']!r}")
            (node_id,) = unpack_ids(state["node_id"])
            client = cls(node_id, SecAggConfig.from_dict(state, "cfg_"), state["round_id"], state["round_seed"])
            client._stage = state["stage"]
            for name in ("c_sk", "c_pk", "s_sk", "s_pk", "seed"):
                setattr(client, f"_{name}", bytes(state[name]))
            client._participants = unpack_ids(state["participants"])
            peers = unpack_ids(state["peer_ids"])
            kb, sb = crypto.KEY_BYTES, shamir.SHARE_BYTES
            c_blob, s_blob = bytes(state["peer_c_pks"]), bytes(state["peer_s_pks"])
            client._peer_c_pk = {v: c_blob[i * kb : (i + 1) * kb] for i, v in enumerate(peers)}
            client._peer_s_pk = {v: s_blob[i * kb : (i + 1) * kb] for i, v in enumerate(peers)}
            held = unpack_ids(state["held_ids"])
            seeds, keys = bytes(state["held_seed_shares"]), bytes(state["held_key_shares"])
            if len(seeds) != sb * len(held) or len(keys) != sb * len(held) or len(c_blob) != kb * len(peers):
                raise ValueError("client state is truncated")
            client._held = {v: (seeds[i * sb : (i + 1) * sb], keys[i * sb : (i + 1) * sb]) for i, v in enumerate(held)}
            client._masked_with = unpack_ids(state["masked_with"])
        except KeyError as err:
            raise ValueError(f"client state lacks key {err.args[0]!r}") from None
        return client


# ------------------------------------------------------------------------- server


@dataclass(frozen=True)
class SecAggResult:
    """Outcome of a completed round.

    ``average`` is the weighted mean ``sum(w_u * x_u) / sum(w_u)`` of the survivors'
    clipped updates, within ``error_bound`` per coordinate; ``weighted_sum`` is the
    numerator (within ``error_bound * total_weight``). ``quantized_sum`` is the exact
    integer sum of the survivors' encoded vectors, the weight coordinate last.
    """

    average: np.ndarray
    weighted_sum: np.ndarray
    total_weight: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    error_bound: float
    quantized_sum: np.ndarray


class SecAggServer:
    """The coordinator's side of one round. Feed it each stage's replies (missing = dropped).

    ``vector_size`` is the length of the update vectors (without the weight
    coordinate); if ``None`` it is taken from the lowest-id masked input. Malformed
    replies are treated as dropouts and listed in :attr:`excluded` with the reason.
    """

    def __init__(
        self,
        config: SecAggConfig,
        round_id: int = 0,
        round_seed: bytes | None = None,
        vector_size: int | None = None,
    ):
        if not isinstance(config, SecAggConfig):
            raise TypeError(f"config must be a SecAggConfig, got {type(config).__name__}")
        if not _is_int(round_id) or not 0 <= round_id < 1 << 63:
            raise ValueError(f"round_id={round_id!r} must be an integer in [0, 2**63)")
        if round_seed is None:
            round_seed = os.urandom(32)
        if not isinstance(round_seed, (bytes, bytearray)) or len(round_seed) < _MIN_ROUND_SEED_BYTES:
            raise ValueError(f"round_seed must be at least {_MIN_ROUND_SEED_BYTES} bytes")
        if vector_size is not None:
            _check_int("vector_size", vector_size, 1)
        self.config = config
        self.round_id = int(round_id)
        self.round_seed = bytes(round_seed)
        self.vector_size = vector_size
        self._ctx = crypto.round_context(self.round_id, self.round_seed)
        self._stage = "new"
        #: node id -> why the server left that client out of the round.
        self.excluded: dict[int, str] = {}
        self._keys: dict[int, tuple[bytes, bytes, bytes]] = {}  # c_pk, s_pk, seed commitment
        self._graph: dict[int, frozenset[int]] = {}
        self._u2: frozenset[int] = frozenset()
        self._routed: dict[int, frozenset[int]] = {}  # w -> whose bundles w received (= w's pairwise peers)
        self._u3: tuple[int, ...] = ()
        self._requests: dict[int, dict[str, list[int]]] = {}
        self._to_recover: tuple[int, ...] = ()  # dropped clients whose pairwise masks must be removed
        self._sum: np.ndarray | None = None

    @property
    def stage(self) -> str:
        return self._stage

    @property
    def participants(self) -> tuple[int, ...]:
        """Clients that advertised keys (``U1``)."""
        return tuple(sorted(self._keys))

    @property
    def graph(self) -> dict[int, frozenset[int]]:
        return dict(self._graph)

    def _expect(self, stage: str, call: str) -> None:
        if self._stage != stage:
            raise SecAggProtocolError(f"server: {call}() needs stage {stage!r} but the server is at {self._stage!r}")

    def setup_message(self) -> dict[str, int | float | bytes]:
        """What every sampled client needs first: the config, round id and public round seed."""
        return {**self.config.to_dict(), "round_id": self.round_id, "round_seed": self.round_seed}

    # ---- stage 1
    def collect_advertisements(self, replies: Mapping[int, Mapping[str, bytes]]) -> dict[int, dict[str, bytes]]:
        """Fix the participants; returns the public keys to broadcast to every one of them."""
        self._expect("new", "collect_advertisements")
        seen: set[bytes] = set()
        for nid, msg in sorted(_int_keyed(replies, "advertisements").items()):
            try:
                if not isinstance(msg, Mapping):
                    raise SecAggProtocolError("advertisement is not a mapping")
                c_pk = _bytes_of(msg.get("c_pk"), crypto.KEY_BYTES, "c_pk")
                s_pk = _bytes_of(msg.get("s_pk"), crypto.KEY_BYTES, "s_pk")
                commit = _bytes_of(msg.get("seed_commitment"), 32, "seed_commitment")
                if c_pk == s_pk or c_pk in seen or s_pk in seen:
                    raise SecAggProtocolError("public key reused")
            except SecAggProtocolError as err:
                self.excluded[nid] = f"advertise: {err}"
                continue
            seen.update((c_pk, s_pk))
            self._keys[nid] = (c_pk, s_pk, commit)
        n1, t = len(self._keys), self.config.threshold
        if n1 > self.config.num_clients:
            raise SecAggError(
                f"{n1} clients advertised keys but num_clients={self.config.num_clients}: "
                "sample at most num_clients clients (the modulus is sized for them)"
            )
        if n1 < t:
            self._stage = "aborted"
            raise SecAggAbort(f"only {n1} clients advertised keys; threshold is {t}")
        self._graph = neighbour_graph(self._keys, self.config.num_neighbours, self.round_seed)
        self._stage = "advertised"
        return {nid: {"c_pk": c, "s_pk": s} for nid, (c, s, _) in sorted(self._keys.items())}

    # ---- stage 2
    def route_shares(self, replies: Mapping[int, Mapping[int, bytes]]) -> dict[int, dict[int, bytes]]:
        """Forward sealed share bundles; returns ``{receiver: {sender: bundle}}`` for clients still in."""
        self._expect("advertised", "route_shares")
        bundles: dict[int, dict[int, bytes]] = {}
        for nid, msg in sorted(_int_keyed(replies, "share replies").items()):
            try:
                if nid not in self._keys:
                    raise SecAggProtocolError("not a participant")
                sent = _int_keyed(msg, "bundles")
                if set(sent) != self._graph[nid]:
                    raise SecAggProtocolError(
                        f"bundles addressed to {sorted(sent)}, expected its neighbours {sorted(self._graph[nid])}"
                    )
                for dst, blob in sent.items():
                    _bytes_of(blob, _BUNDLE_BYTES, f"bundle for {dst}")
            except SecAggProtocolError as err:
                self.excluded[nid] = f"share_keys: {err}"
                continue
            bundles[nid] = {dst: bytes(blob) for dst, blob in sent.items()}
        # A client whose secrets cannot reach `threshold` live holders could never be
        # unmasked: leave it out now (as if it had dropped) instead of failing later.
        t = self.config.threshold
        alive = set(bundles)
        pruned = True
        while pruned:
            pruned = False
            for u in sorted(alive):
                if len(self._graph[u] & alive) + 1 < t:
                    alive.discard(u)
                    self.excluded[u] = f"share_keys: fewer than threshold-1={t - 1} neighbours left"
                    pruned = True
        if len(alive) < t:
            self._stage = "aborted"
            raise SecAggAbort(f"only {len(alive)} clients completed share-keys; threshold is {t}")
        self._u2 = frozenset(alive)
        routed = {w: {v: bundles[v][w] for v in sorted(self._graph[w] & alive)} for w in sorted(alive)}
        self._routed = {w: frozenset(srcs) for w, srcs in routed.items()}
        self._stage = "shared"
        return routed

    # ---- stage 3
    def collect_masked_inputs(self, replies: Mapping[int, np.ndarray]) -> dict[int, dict[str, list[int]]]:
        """Sum the masked vectors; returns each survivor's unmask request ``{"survivors", "dropped"}``."""
        self._expect("shared", "collect_masked_inputs")
        cfg = self.config
        words = cfg.word_dtype
        limit = (1 << cfg.mod_bits) - 1
        arrays = {nid: np.asarray(y) for nid, y in sorted(_int_keyed(replies, "masked inputs").items())}
        if self.vector_size is not None:
            length = self.vector_size + 1
        else:  # the length most replies agree on (ties: the lowest id's)
            lengths = [a.shape[0] for nid, a in arrays.items() if nid in self._u2 and a.ndim == 1]
            length = max(lengths, key=lengths.count) if lengths else 0
        total: np.ndarray | None = None
        survivors: list[int] = []
        for nid, arr in arrays.items():
            try:
                if nid not in self._u2:
                    raise SecAggProtocolError("was not asked for a masked input")
                if arr.ndim != 1 or arr.dtype.kind not in "iu":
                    raise SecAggProtocolError(f"masked input must be a 1-D integer array, got {arr.dtype}{arr.shape}")
                if arr.shape[0] != length or length < 2:
                    raise SecAggProtocolError(f"masked input has {arr.shape[0]} entries, expected {length}")
                if (arr.dtype.kind == "i" and int(arr.min()) < 0) or int(arr.max()) > limit:
                    raise SecAggProtocolError(f"masked input has entries outside [0, 2**{cfg.mod_bits})")
            except SecAggProtocolError as err:
                self.excluded[nid] = f"masked_input: {err}"
                continue
            if total is None:
                total = np.zeros(length, dtype=words)
            np.add(total, arr.astype(words, copy=False), out=total)
            survivors.append(nid)
        t = cfg.threshold
        if len(survivors) < t:
            self._stage = "aborted"
            raise SecAggAbort(f"only {len(survivors)} clients sent masked inputs; threshold is {t}")
        u3 = frozenset(survivors)
        for u in survivors:
            holders = len(self._routed[u] & u3) + 1
            if holders < t:
                self._stage = "aborted"
                raise SecAggAbort(
                    f"client {u}'s self-mask seed has {holders} live share holders; threshold is {t}"
                )
        to_recover = sorted(v for v in self._u2 - u3 if self._routed[v] & u3)
        for v in to_recover:
            holders = len(self._routed[v] & u3)
            if holders < t:
                self._stage = "aborted"
                raise SecAggAbort(
                    f"dropped client {v}'s mask key has {holders} live share holders; threshold is {t}"
                )
        assert total is not None
        self._sum = total
        self._u3 = tuple(survivors)
        self._to_recover = tuple(to_recover)
        self._requests = {
            u: {"survivors": sorted((self._routed[u] & u3) | {u}), "dropped": sorted(self._routed[u] - u3)}
            for u in survivors
        }
        self._stage = "masked"
        return {u: {k: list(v) for k, v in req.items()} for u, req in self._requests.items()}

    # ---- stage 4
    def unmask(self, replies: Mapping[int, Mapping[str, Mapping[int, bytes]]]) -> SecAggResult:
        """Rebuild the secrets, strip the masks, dequantise. Raises :class:`SecAggAbort` if it cannot."""
        self._expect("masked", "unmask")
        cfg, t = self.config, self.config.threshold
        seed_shares: dict[int, list[bytes]] = {v: [] for v in self._u3}
        key_shares: dict[int, list[bytes]] = {v: [] for v in self._to_recover}
        holder_lists: dict[int, list[int]] = {}

        def expected_x(owner: int, holder: int) -> int:
            if owner not in holder_lists:
                holder_lists[owner] = share_holders(self._graph, owner)
            return holder_lists[owner].index(holder) + 1

        for holder, msg in sorted(_int_keyed(replies, "unmask replies").items()):
            try:
                if holder not in self._requests:
                    raise SecAggProtocolError("was not asked to unmask")
                if not isinstance(msg, Mapping):
                    raise SecAggProtocolError("unmask reply is not a mapping")
                request = self._requests[holder]
                got = {}
                for kind, asked in (("seed_shares", request["survivors"]), ("key_shares", request["dropped"])):
                    part = _int_keyed(msg.get(kind, {}), kind)
                    if sorted(part) != asked:
                        raise SecAggProtocolError(f"{kind} for {sorted(part)}, asked for {asked}")
                    for owner, share in part.items():
                        share = _bytes_of(share, shamir.SHARE_BYTES, f"{kind}[{owner}]")
                        if shamir.share_index(share) != expected_x(owner, holder):
                            raise SecAggProtocolError(f"{kind}[{owner}] has the wrong share index")
                    got[kind] = part
            except SecAggProtocolError as err:
                self.excluded[holder] = f"unmask: {err}"
                continue
            for owner, share in got["seed_shares"].items():
                seed_shares[owner].append(bytes(share))
            for owner, share in got["key_shares"].items():
                key_shares[owner].append(bytes(share))

        for what, table in (("self-mask seed of client", seed_shares), ("mask key of dropped client", key_shares)):
            for owner, shares in table.items():
                if len(shares) < t:
                    self._stage = "aborted"
                    raise SecAggAbort(
                        f"only {len(shares)} shares of the {what} {owner} came back; threshold is {t}"
                    )

        acc = self._sum
        assert acc is not None
        self._sum = None
        for v in self._u3:
            seed = shamir.combine(seed_shares[v], t)
            if crypto.seed_commitment(seed, self._ctx, v) != self._keys[v][2]:
                self._stage = "aborted"
                raise SecAggAbort(f"the self-mask seed rebuilt for client {v} does not match its commitment")
            crypto.apply_mask(acc, crypto.self_mask_key(seed, self._ctx, v), -1)
        u3 = frozenset(self._u3)
        for v in self._to_recover:
            s_sk = shamir.combine(key_shares[v], t)
            if crypto.public_from_private(s_sk) != self._keys[v][1]:
                self._stage = "aborted"
                raise SecAggAbort(f"the mask key rebuilt for dropped client {v} does not match its public key")
            for w in sorted(self._routed[v] & u3):
                key = crypto.pairwise_mask_key(crypto.agree(s_sk, self._keys[w][1]), self._ctx, v, w)
                # w added +PRG if w < v, else -PRG; take it back out.
                crypto.apply_mask(acc, key, -1 if w < v else +1)
        np.bitwise_and(acc, acc.dtype.type((1 << cfg.mod_bits) - 1), out=acc)

        quantized_sum = acc.astype(np.uint64)
        total_weight = int(quantized_sum[-1])
        n3 = len(self._u3)
        self._stage = "done"
        if total_weight == 0:
            raise SecAggAbort("the survivors' total weight is 0; there is nothing to average")
        weighted_sum = dequantize_sum(quantized_sum[:-1], n3, cfg.clip_range, cfg.quant_bits)
        weighted_sum *= cfg.max_weight
        return SecAggResult(
            average=weighted_sum / total_weight,
            weighted_sum=weighted_sum,
            total_weight=total_weight,
            survivors=self._u3,
            dropped=tuple(sorted(set(self._keys) - u3)),
            error_bound=average_error_bound(n3, total_weight, cfg.max_weight, cfg.clip_range, cfg.quant_bits),
            quantized_sum=quantized_sum,
        )
