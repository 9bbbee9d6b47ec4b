"""The message contract between a region (ClientApp) and the coordinator (ServerApp).

One module that both sides import, so a key, an error code or a stage name cannot
drift apart between ``client/`` and ``strategies/``. It holds no logic beyond
encoding and decoding: what a region *may* send is decided by its policy
(:mod:`fedpriv.privacy.policy`), what the report makes of it by :mod:`fedpriv.privacy.report`.

Train reply (``RecordDict``)
    ``metrics`` (MetricRecord): the DP release's public facts, :data:`PUBLIC_TRAIN_METRICS`,
    plus :data:`NOT_PRIVATE_TRAIN_METRICS` only when the region's policy releases them.
    ``region`` (ConfigRecord): ``name``, ``history`` (this job's ``[σ, q, steps]`` triples, flat)
    and ``accountant``.
    ``arrays`` (ArrayRecord): the DP-noised trainable values -- only without secure aggregation.

Errors
    An error reply's reason reads ``"<region>|<kind>: <text>"`` (:func:`error_reason`) and is
    read back by the one parser :func:`parse_error`. ``kind`` is a :data:`REFUSAL_KINDS` entry for
    refusals (code :data:`REFUSED`) and free text for failures (code :data:`FAILED`).

Secure aggregation
    Stage message types (:data:`ADVERTISE` ... :data:`REVEAL`), the record key every stage
    message carries (:data:`RECORD`), the train-config flag (:data:`TRAIN_FLAG`) and the
    coordinator-side encoders/decoders of the stage records.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord

from fedpriv.privacy.secagg import SecAggProtocolError, pack_ids

# ------------------------------------------------------------------ train / evaluate replies

METRICS = "metrics"
REGION = "region"
ARRAYS = "arrays"
CONFIG = "config"

# metric keys of a train reply
NUM_EXAMPLES = "num-examples"
DP = "dp"
EPSILON = "epsilon"
DELTA = "delta"
STEPS = "steps"
NOISE_MULTIPLIER = "noise-multiplier"
SAMPLE_RATE = "sample-rate"
MAX_GRAD_NORM = "max-grad-norm"
MAX_EPSILON = "max-epsilon"
DETERMINISTIC_NOISE = "deterministic-noise"
LIFETIME_EPSILON = "lifetime-epsilon"
TRAIN_LOSS = "train-loss"
TRAIN_ACCURACY = "train-accuracy"
PEAK_MEMORY_MB = "peak-memory-mb"
# evaluate reply
EVAL_LOSS = "eval-loss"
EVAL_ACCURACY = "eval-accuracy"

PUBLIC_TRAIN_METRICS = (NUM_EXAMPLES, DP, EPSILON, DELTA, STEPS, NOISE_MULTIPLIER, SAMPLE_RATE, MAX_GRAD_NORM,
                        MAX_EPSILON, DETERMINISTIC_NOISE)
"""Always in a train reply: N as the region declares it, the mechanism (σ, q, C, steps, δ), ε of *this job*
(a function of those public parameters alone), the region's own cap and whether noise was deterministic."""

NOT_PRIVATE_TRAIN_METRICS = {
    TRAIN_LOSS: "release-train-metrics", TRAIN_ACCURACY: "release-train-metrics",
    PEAK_MEMORY_MB: "release-train-metrics", LIFETIME_EPSILON: "release-lifetime-epsilon",
}
"""Sent only when the region's policy key (the value) allows it; none is covered by ε."""

# ---------------------------------------------------------------------------- errors

REFUSED = 4001
FAILED = 4002

POLICY = "refused by region policy"
BUDGET = "privacy-budget"
REFUSAL_KINDS = (POLICY, BUDGET)


@dataclass(frozen=True)
class RegionError:
    """An error reply, read back: which region, whether it refused (and why), the text."""

    region: str
    kind: str | None   # one of REFUSAL_KINDS, or None for a failure
    text: str

    @property
    def refused(self) -> bool:
        return self.kind is not None

    def __str__(self) -> str:
        return f"{self.kind}: {self.text}" if self.kind else self.text


def error_reason(region: str, text: str, kind: str | None = None) -> str:
    """The reason string of an error reply: ``"<region>|<kind>: <text>"`` (kind omitted for a failure)."""
    if kind is not None and kind not in REFUSAL_KINDS:
        raise ValueError(f"refusal kind {kind!r}: expected one of {', '.join(REFUSAL_KINDS)}")
    return f"{region}|{kind}: {text}" if kind else f"{region}|{text}"


def parse_error(reason: str, default_region: str) -> RegionError:
    """The one parser of :func:`error_reason`; anything else (a traceback, a SuperLink error) is a failure."""
    region, text = default_region, reason
    if "|" in reason and not reason.startswith("Traceback"):
        head, _, rest = reason.partition("|")
        if head and " " not in head:
            region, text = head, rest
        else:
            text = _last_line(reason)
    else:
        text = _last_line(reason)
    for kind in REFUSAL_KINDS:
        if text.startswith(kind + ":"):
            return RegionError(region, kind, text[len(kind) + 1:].strip())
    return RegionError(region, None, text)


def _last_line(reason: str) -> str:
    return reason.strip().splitlines()[-1] if reason.strip() else "no reason given"


# ------------------------------------------------------------------ secure aggregation

ADVERTISE = "query.secagg_advertise"
SHARE_KEYS = "query.secagg_share_keys"
MASKED_INPUT = "query.secagg_masked_input"
UNMASK = "query.secagg_unmask"
REVEAL = "query.secagg_reveal"

RECORD = "secagg"
"""Key of the ConfigRecord every secagg stage message and reply carries."""
TRAIN_FLAG = "secagg-round"
"""Train-config key: the (absolute) round id of the secure-aggregation round that follows."""
MASKED = "masked"
"""ArrayRecord (and its one array) of a masked-input reply."""
UPDATE = "update"
"""ArrayRecord (and its one array) of a reveal reply: the update in the clear."""


def keys_request(round_id: int, public_keys: Mapping[int, Mapping[str, bytes]]) -> ConfigRecord:
    """Stage 2 request: ``SecAggServer.collect_advertisements()``'s output, packed."""
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
