"""A region's half of secure aggregation: the ClientApp's secagg stage handlers, without Flower in the way.

With ``secure-aggregation = true`` a region never sends its model update in the
clear. The round runs as five message exchanges driven by
:class:`strategies.secure_fedavg.SecureFedAvg`; each message may be handled by a
fresh process (as in a deployment), so everything a region must remember between
them lives in ``context.state``:

* ``train`` (the usual train message, flagged ``secagg-round``) -- the region trains
  (DP-SGD), and :func:`keep_update` stores ``update = new values - received global
  values`` (flattened in the received parameter order), its example count and a
  rounding seed *locally*. The reply carries metrics, but no weights.
* ``query.secagg_advertise`` -- :func:`advertise`: build the
  :class:`~privacy.secagg.SecAggClient` from the coordinator's setup (checked
  against the run config), reply with two public keys and a seed commitment.
* ``query.secagg_share_keys`` -- :func:`share_keys`: Shamir-share the secrets among
  the neighbours, reply with the sealed share bundles (the coordinator cannot open them).
* ``query.secagg_masked_input`` -- :func:`masked_input`: open the bundles, clip to
  ``secagg-clip-range``, quantise and mask ``num_examples * update``, reply with the
  masked integer vector (and, in plaintext, how many coordinates were clipped).
  The stored update is deleted here.
* ``query.secagg_unmask`` -- :func:`unmask`: reply with the shares the coordinator
  needs to remove the masks of survivors and dropped peers (never both for one peer).
* ``query.secagg_reveal`` -- :func:`reveal`: only when a single region trained in a
  round (a sum of one hides nothing: the new global model *is* that update), hand
  the update over in the clear. Refused once the region has advertised keys.

Every function raises :class:`~privacy.secagg.SecAggError` or ``ValueError`` to
refuse; the ClientApp turns that into an error reply, which the coordinator treats
as a dropout. Only ``numpy``, Flower records and :mod:`privacy.secagg` are imported
here, so a secagg stage does not pay for loading torch.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from privacy.secagg import SecAggClient, SecAggConfig, SecAggProtocolError, pack_ids, unpack_ids

# Message types of the secagg stages (``<category>.<action>``, see ``flwr.clientapp.ClientApp``).
ADVERTISE = "query.secagg_advertise"
SHARE_KEYS = "query.secagg_share_keys"
MASKED_INPUT = "query.secagg_masked_input"
UNMASK = "query.secagg_unmask"
REVEAL = "query.secagg_reveal"

#: Key of the ConfigRecord every secagg message and reply carries.
RECORD = "secagg"
#: Train-config key: the (absolute) round id of the secure-aggregation round that follows.
TRAIN_FLAG = "secagg-round"

# context.state keys
STATE_ROUND = "fedpriv-secagg-round"     # ConfigRecord: round, region, num-examples, rounding seed, phase
STATE_UPDATE = "fedpriv-secagg-update"   # ArrayRecord: the flat update, until it is masked (or revealed)
STATE_CLIENT = "fedpriv-secagg-client"   # ConfigRecord: SecAggClient.to_state()


# ------------------------------------------------------------------ helpers


def flatten_update(global_arrays: Mapping[str, np.ndarray], new_values: Mapping[str, np.ndarray]) -> np.ndarray:
    """``new - global`` for every parameter, flattened in ``global_arrays``' order (float32)."""
    missing = sorted(set(global_arrays) - set(new_values))
    if missing or len(new_values) != len(global_arrays):
        raise ValueError(f"trained values do not match the global parameters (missing {missing[:3]})")
    parts = []
    for name, g in global_arrays.items():
        g = np.asarray(g)
        v = np.asarray(new_values[name])
        if v.shape != g.shape:
            raise ValueError(f"parameter {name!r} has shape {v.shape}, the global model's is {g.shape}")
        parts.append((v.astype(np.float64) - g.astype(np.float64)).ravel())
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)


def flatten_values(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """All parameters as one float64 vector, in the mapping's order."""
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays.values()])


def unflatten_values(flat: np.ndarray, like: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of :func:`flatten_values`, with ``like``'s names, shapes and dtypes."""
    out, pos = {}, 0
    for name, ref in like.items():
        ref = np.asarray(ref)
        out[name] = flat[pos:pos + ref.size].reshape(ref.shape).astype(ref.dtype)
        pos += ref.size
    if pos != flat.size:
        raise ValueError(f"flat vector has {flat.size} values, the parameters {pos}")
    return out


def clipped_count(update: np.ndarray, weight: int, max_weight: int, clip_range: float) -> int:
    """Coordinates of ``(weight / max_weight) * update`` outside ``[-clip_range, clip_range]`` (quantise clips them)."""
    scaled = np.abs(np.asarray(update, dtype=np.float64)) * (weight / max_weight)
    return int(np.count_nonzero(scaled > clip_range))


def _round_info(state: RecordDict, round_id: int, phase: str | tuple[str, ...]) -> ConfigRecord:
    info = state.config_records.get(STATE_ROUND)
    if info is None:
        raise SecAggProtocolError(f"no update kept for secure-aggregation round {round_id} (did this region train it?)")
    if int(info["round"]) != int(round_id):
        raise SecAggProtocolError(f"asked about round {round_id}, but the kept update is from round {int(info['round'])}")
    phases = (phase,) if isinstance(phase, str) else phase
    if str(info["phase"]) not in phases:
        raise SecAggProtocolError(f"round {round_id}: this stage needs phase {' or '.join(phases)}, "
                                  f"but the region is at {info['phase']!r}")
    return info


def _client(state: RecordDict) -> SecAggClient:
    saved = state.config_records.get(STATE_CLIENT)
    if saved is None:
        raise SecAggProtocolError("no secure-aggregation client state (advertise was not run here)")
    return SecAggClient.from_state(saved)


def _save(state: RecordDict, info: ConfigRecord, client: SecAggClient, phase: str) -> None:
    state[STATE_CLIENT] = ConfigRecord(client.to_state())
    info["phase"] = phase
    state[STATE_ROUND] = info


def _drop(state: RecordDict, *keys: str) -> None:
    for key in keys:
        if key in state:
            del state[key]


def forget(state: RecordDict) -> None:
    """Remove everything a secure-aggregation round kept (a new round starts from scratch)."""
    _drop(state, STATE_ROUND, STATE_UPDATE, STATE_CLIENT)


# ------------------------------------------------------------------- stages


def keep_update(state: RecordDict, round_id: int, region: str, global_arrays: Mapping[str, np.ndarray],
                new_values: Mapping[str, np.ndarray], num_examples: int, rounding_seed: int) -> None:
    """After training: keep the update (never sent in the clear) for the secagg stages of ``round_id``."""
    forget(state)
    update = flatten_update(global_arrays, new_values)
    state[STATE_UPDATE] = ArrayRecord({"update": Array(update)})
    state[STATE_ROUND] = ConfigRecord({"round": int(round_id), "region": str(region), "num-examples": int(num_examples),
                                       "rounding-seed": int(rounding_seed), "phase": "trained"})


def check_setup(setup: Mapping, expected: Mapping[str, float | int]) -> None:
    """Refuse a setup that weakens what the run config asked for (threshold, graph, encoding)."""
    want_t = int(expected.get("threshold", 0))
    if want_t and int(setup["threshold"]) < want_t:
        raise SecAggProtocolError(f"setup threshold {setup['threshold']} is below secagg-threshold = {want_t}")
    for key in ("num_neighbours", "quant_bits"):
        if key in expected and int(setup[key]) != int(expected[key]):
            raise SecAggProtocolError(f"setup {key} = {setup[key]} differs from the run config's {expected[key]}")
    if "clip_range" in expected and float(setup["clip_range"]) != float(expected["clip_range"]):
        raise SecAggProtocolError(f"setup clip_range = {setup['clip_range']} differs from the run config's {expected['clip_range']}")


def advertise(state: RecordDict, node_id: int, setup: ConfigRecord,
              expected: Mapping[str, float | int] | None = None) -> ConfigRecord:
    """Stage 1: public keys and seed commitment (``setup`` = ``SecAggServer.setup_message()``)."""
    info = _round_info(state, int(setup["round_id"]), "trained")
    check_setup(setup, expected or {})
    if int(info["num-examples"]) > int(setup["max_weight"]):
        raise SecAggProtocolError(f"this region has {info['num-examples']} examples, more than the declared "
                                  f"max_weight = {setup['max_weight']}")
    client = SecAggClient.from_setup(node_id, setup)
    reply = client.advertise()
    _save(state, info, client, "advertised")
    return ConfigRecord({k: bytes(v) for k, v in reply.items()})


def share_keys(state: RecordDict, request: ConfigRecord) -> ConfigRecord:
    """Stage 2: ``request`` holds everyone's public keys (``ids``, ``c_pks``, ``s_pks``, 32 bytes each)."""
    info = _round_info(state, int(request["round_id"]), "advertised")
    ids = unpack_ids(bytes(request["ids"]))
    c_blob, s_blob = bytes(request["c_pks"]), bytes(request["s_pks"])
    if len(c_blob) != 32 * len(ids) or len(s_blob) != 32 * len(ids):
        raise SecAggProtocolError("public-key lists do not match the id list")
    keys = {nid: {"c_pk": c_blob[32 * i:32 * (i + 1)], "s_pk": s_blob[32 * i:32 * (i + 1)]} for i, nid in enumerate(ids)}
    client = _client(state)
    bundles = client.share_keys(keys)
    _save(state, info, client, "shared")
    return ConfigRecord({str(dst): blob for dst, blob in bundles.items()})


def masked_input(state: RecordDict, request: ConfigRecord) -> tuple[ArrayRecord, MetricRecord]:
    """Stage 3: ``request`` holds the bundles routed to this region (``"<sender id>": bytes``)."""
    round_id = int(request["round_id"])
    info = _round_info(state, round_id, "shared")
    received = {int(k): bytes(v) for k, v in request.items() if k.isdigit()}
    client = _client(state)
    update = state.array_records[STATE_UPDATE]["update"].numpy()
    weight = int(info["num-examples"])
    cfg = client.config
    clipped = clipped_count(update, weight, cfg.max_weight, cfg.clip_range)
    rng = np.random.default_rng(np.random.SeedSequence([int(info["rounding-seed"]), round_id]))
    y = client.masked_input(update, received, weight, rng=rng)
    _drop(state, STATE_UPDATE)  # masked and sent: the plaintext update is no longer needed
    _save(state, info, client, "masked")
    return (ArrayRecord({"masked": Array(y)}),
            MetricRecord({"clipped-coordinates": clipped, "coordinates": int(update.size)}))


def unmask(state: RecordDict, request: ConfigRecord) -> ConfigRecord:
    """Stage 4: shares of the survivors' self-mask seeds and of the dropped peers' mask keys."""
    _round_info(state, int(request["round_id"]), "masked")
    client = _client(state)
    answer = client.unmask(unpack_ids(bytes(request["survivors"])), unpack_ids(bytes(request["dropped"])))
    forget(state)  # answered once; nothing of this round is needed any more
    reply = {f"seed/{v}": share for v, share in answer["seed_shares"].items()}
    reply.update({f"key/{v}": share for v, share in answer["key_shares"].items()})
    return ConfigRecord(reply)


def reveal(state: RecordDict, request: ConfigRecord) -> ArrayRecord:
    """Single-region fallback: the update in the clear -- only before any key was advertised."""
    _round_info(state, int(request["round_id"]), "trained")
    update = state.array_records[STATE_UPDATE]["update"].numpy()
    forget(state)
    return ArrayRecord({"update": Array(np.ascontiguousarray(update))})


# ----------------------------------------------------- server-side encoding


def keys_request(round_id: int, public_keys: Mapping[int, Mapping[str, bytes]]) -> ConfigRecord:
    """What :func:`share_keys` reads: ``SecAggServer.collect_advertisements()``'s output, packed."""
    ids = sorted(public_keys)
    return ConfigRecord({"round_id": int(round_id), "ids": pack_ids(ids),
                         "c_pks": b"".join(public_keys[i]["c_pk"] for i in ids),
                         "s_pks": b"".join(public_keys[i]["s_pk"] for i in ids)})


def shares_reply(record: ConfigRecord) -> dict[int, bytes]:
    return {int(k): bytes(v) for k, v in record.items()}


def routed_request(round_id: int, inbox: Mapping[int, bytes]) -> ConfigRecord:
    return ConfigRecord({"round_id": int(round_id), **{str(src): bytes(blob) for src, blob in inbox.items()}})


def unmask_request(round_id: int, survivors: list[int], dropped: list[int]) -> ConfigRecord:
    return ConfigRecord({"round_id": int(round_id), "survivors": pack_ids(survivors), "dropped": pack_ids(dropped)})


def unmask_reply(record: ConfigRecord) -> dict[str, dict[int, bytes]]:
    out: dict[str, dict[int, bytes]] = {"seed_shares": {}, "key_shares": {}}
    for key, value in record.items():
        kind, _, nid = key.partition("/")
        if kind not in ("seed", "key") or not nid.isdigit():
            raise SecAggProtocolError(f"unexpected key {key!r} in an unmask reply")
        out["seed_shares" if kind == "seed" else "key_shares"][int(nid)] = bytes(value)
    return out


def setup_record(setup: Mapping) -> ConfigRecord:
    return ConfigRecord(dict(setup))


def expected_setup(threshold: int, neighbours: int, clip_range: float, quant_bits: int) -> dict[str, float | int]:
    """The run config's secagg settings, in :class:`SecAggConfig` terms, for :func:`check_setup`."""
    return {"threshold": int(threshold), "num_neighbours": int(neighbours), "clip_range": float(clip_range),
            "quant_bits": int(quant_bits)}


__all__ = [
    "ADVERTISE", "MASKED_INPUT", "RECORD", "REVEAL", "SHARE_KEYS", "TRAIN_FLAG", "UNMASK",
    "SecAggConfig", "advertise", "check_setup", "clipped_count", "expected_setup", "flatten_update",
    "flatten_values", "forget", "keep_update", "keys_request", "masked_input", "reveal", "routed_request",
    "setup_record", "share_keys", "shares_reply", "unflatten_values", "unmask", "unmask_reply", "unmask_request",
]
