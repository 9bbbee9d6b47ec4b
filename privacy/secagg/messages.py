"""The wire of a secure-aggregation round: stage names, record keys and stage-record encoding.

The one module both sides import -- the coordinator's workflow
(:mod:`fedpriv.server.secagg_workflow`) and the region's handlers
(:mod:`fedpriv.client.secure_aggregation`) -- so a stage name or a key cannot drift
apart between them (as Flower keeps ``secaggplus_constants`` apart from its workflow
and its client mod). Records are plain mappings of ``int``/``bytes`` that fit a Flower
``ConfigRecord`` as they are; nothing here imports Flower, and nothing here decides
anything: what a region may answer is :mod:`fedpriv.privacy.policy`'s, the protocol
:mod:`fedpriv.privacy.secagg.protocol`'s.

A round, stage by stage (message type -> what the reply carries):

=============================  =========================================================
``train`` + :data:`TRAIN_FLAG`  metrics only; the update stays in the region
:data:`ADVERTISE`               :data:`RECORD`: two public keys, a seed commitment, the region's name
                                and its identity signature over them (bound to job, round, setup)
:data:`SHARE_KEYS`              :data:`RECORD`: sealed share bundles by recipient id (after the region
                                checked every signed advertisement against its roster)
:data:`MASKED_INPUT`            :data:`MASKED`: the masked integer vector
:data:`CONSISTENCY`             :data:`RECORD`: ``signature`` over the region's view (key list + survivors)
:data:`UNMASK`                  :data:`RECORD`: ``seed/<id>`` and ``key/<id>`` shares (after the region
                                checked the survivors' view signatures)
:data:`REVEAL`                  :data:`UPDATE`: the update in the clear (one region only)
=============================  =========================================================
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .errors import SecAggProtocolError
from .identity import SIGNATURE_BYTES, Advertisement
from .protocol import pack_ids, unpack_ids

ADVERTISE = "query.secagg_advertise"
SHARE_KEYS = "query.secagg_share_keys"
MASKED_INPUT = "query.secagg_masked_input"
CONSISTENCY = "query.secagg_consistency"
UNMASK = "query.secagg_unmask"
REVEAL = "query.secagg_reveal"
STAGES = (ADVERTISE, SHARE_KEYS, MASKED_INPUT, CONSISTENCY, UNMASK, REVEAL)
"""Every stage message type, in round order (the plain-round :data:`REVEAL` last)."""

RECORD = "secagg"
"""Key of the ConfigRecord every secagg stage message and reply carries."""
TRAIN_FLAG = "secagg-round"
"""Train-config key: the (absolute) round id of the secure-aggregation round that follows."""
MASKED = "masked"
"""ArrayRecord (and its one array) of a masked-input reply."""
UPDATE = "update"
"""ArrayRecord (and its one array) of a reveal reply: the update in the clear."""

Record = dict[str, "int | bytes"]


def action(message_type: str) -> str:
    """The ClientApp query action of a stage message type (``query.secagg_advertise`` -> ``secagg_advertise``)."""
    return message_type.partition(".")[2]


# ----------------------------------------------------------------- coordinator -> region


def setup_record(setup: Mapping) -> Record:
    """Stage 1 request: ``SecAggServer.setup_message()`` as it is."""
    return dict(setup)


def keys_request(round_id: int, public_keys: Mapping[int, Mapping[str, bytes]],
                 adverts: Mapping[int, Mapping[str, object]]) -> Record:
    """Stage 2 request: the accepted keys (``SecAggServer.collect_advertisements()``) with each region's
    name, seed commitment and signature from its advertisement (``adverts``), packed."""
    ids = sorted(public_keys)
    return {"round_id": int(round_id), "ids": pack_ids(ids),
            "c_pks": b"".join(public_keys[i]["c_pk"] for i in ids),
            "s_pks": b"".join(public_keys[i]["s_pk"] for i in ids),
            "commitments": b"".join(bytes(adverts[i]["seed_commitment"]) for i in ids),  # type: ignore[arg-type]
            "signatures": b"".join(bytes(adverts[i].get("signature", b"")) for i in ids),  # type: ignore[arg-type]
            "regions": [str(adverts[i].get("region", "")) for i in ids]}


def _split(blob: bytes, size: int, count: int, what: str) -> list[bytes]:
    if len(blob) != size * count:
        raise SecAggProtocolError(f"the {what} list does not match the id list")
    return [blob[size * i:size * (i + 1)] for i in range(count)]


def read_keys_request(record: Mapping) -> dict[int, Advertisement]:
    """The region's reading of :func:`keys_request`: ``{node id: Advertisement}``."""
    ids = unpack_ids(bytes(record["ids"]))
    regions = [str(r) for r in record.get("regions", [])]
    if len(regions) != len(ids):
        raise SecAggProtocolError("the region-name list does not match the id list")
    c_pks = _split(bytes(record["c_pks"]), 32, len(ids), "c_pk")
    s_pks = _split(bytes(record["s_pks"]), 32, len(ids), "s_pk")
    commits = _split(bytes(record.get("commitments", b"")), 32, len(ids), "seed-commitment")
    sigs = _split(bytes(record.get("signatures", b"")), SIGNATURE_BYTES, len(ids), "signature")
    return {nid: Advertisement(regions[i], c_pks[i], s_pks[i], commits[i], sigs[i]) for i, nid in enumerate(ids)}


def public_keys_of(entries: Mapping[int, Advertisement]) -> dict[int, dict[str, bytes]]:
    """The ``{node id: {"c_pk", "s_pk"}}`` the protocol's ``share_keys`` takes."""
    return {nid: {"c_pk": ad.c_pk, "s_pk": ad.s_pk} for nid, ad in entries.items()}


def routed_request(round_id: int, inbox: Mapping[int, bytes]) -> Record:
    """Stage 3 request: the sealed bundles routed to one region, by sender id."""
    return {"round_id": int(round_id), **{str(src): bytes(blob) for src, blob in inbox.items()}}


def read_routed_request(record: Mapping) -> dict[int, bytes]:
    return {int(k): bytes(v) for k, v in record.items() if k.isdigit()}


def consistency_request(round_id: int, survivors: list[int]) -> Record:
    """Consistency stage request: the survivor set (whose masked inputs are in the sum), the same for everyone."""
    return {"round_id": int(round_id), "survivors": pack_ids(sorted(survivors))}


def read_consistency_request(record: Mapping) -> list[int]:
    return unpack_ids(bytes(record["survivors"]))


def unmask_request(round_id: int, survivors: list[int], dropped: list[int],
                   signatures: Mapping[int, bytes] | None = None) -> Record:
    """Stage 4 request: who survived and who dropped (never both for one peer: the region checks), and
    the survivors' signatures on their view from the consistency stage."""
    sigs = dict(sorted((signatures or {}).items()))
    return {"round_id": int(round_id), "survivors": pack_ids(survivors), "dropped": pack_ids(dropped),
            "signers": pack_ids(sigs), "signatures": b"".join(bytes(s) for s in sigs.values())}


def read_unmask_request(record: Mapping) -> tuple[list[int], list[int]]:
    return unpack_ids(bytes(record["survivors"])), unpack_ids(bytes(record["dropped"]))


def read_view_signatures(record: Mapping) -> dict[int, bytes]:
    """The survivors' view signatures an unmask request carries, by signer id."""
    signers = unpack_ids(bytes(record.get("signers", b"")))
    sigs = _split(bytes(record.get("signatures", b"")), SIGNATURE_BYTES, len(signers), "signature")
    if len(set(signers)) != len(signers):
        raise SecAggProtocolError("the view signatures name a signer twice")
    return dict(zip(signers, sigs))


def round_request(round_id: int) -> Record:
    """The plain round's :data:`REVEAL` request."""
    return {"round_id": int(round_id)}


# ----------------------------------------------------------------- region -> coordinator


def advertise_reply(reply: Mapping[str, bytes], region: str, signature: bytes) -> Record:
    """Stage 1 reply: the protocol's keys and commitment, the region's name and its signature over them."""
    return {**{k: bytes(v) for k, v in reply.items()}, "region": str(region), "signature": bytes(signature)}


def view_record(signature: bytes) -> Record:
    """Consistency stage reply: the region's signature on its view."""
    return {"signature": bytes(signature)}


def read_view_record(record: Mapping) -> bytes:
    sig = bytes(record["signature"])
    if len(sig) != SIGNATURE_BYTES:
        raise SecAggProtocolError(f"a view signature has {len(sig)} bytes, expected {SIGNATURE_BYTES}")
    return sig


def shares_record(bundles: Mapping[int, bytes]) -> Record:
    """Stage 2 reply: sealed bundles by recipient id."""
    return {str(dst): bytes(blob) for dst, blob in bundles.items()}


def shares_reply(record: Mapping) -> dict[int, bytes]:
    """The coordinator's reading of :func:`shares_record`."""
    return {int(k): bytes(v) for k, v in record.items()}


def unmask_record(answer: Mapping[str, Mapping[int, bytes]]) -> Record:
    """Stage 4 reply: ``SecAggClient.unmask()``'s shares, as ``seed/<id>`` and ``key/<id>``."""
    reply: Record = {f"seed/{v}": share for v, share in answer["seed_shares"].items()}
    reply.update({f"key/{v}": share for v, share in answer["key_shares"].items()})
    return reply


def unmask_reply(record: Mapping) -> dict[str, dict[int, bytes]]:
    """The coordinator's reading of :func:`unmask_record`."""
    out: dict[str, dict[int, bytes]] = {"seed_shares": {}, "key_shares": {}}
    for key, value in record.items():
        kind, _, nid = key.partition("/")
        if kind not in ("seed", "key") or not nid.isdigit():
            raise SecAggProtocolError(f"unexpected key {key!r} in an unmask reply")
        out["seed_shares" if kind == "seed" else "key_shares"][int(nid)] = bytes(value)
    return out


# ------------------------------------------------------------------- vector layout


def flatten_values(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """All parameters as one float64 vector, in the mapping's order (the layout of a masked update)."""
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
