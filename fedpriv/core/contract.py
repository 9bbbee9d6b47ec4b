"""The message contract between a region (ClientApp) and the coordinator (ServerApp).

One module that both sides import, so a key or an error code cannot drift apart
between ``client/`` and ``strategies/``/``server/``. It holds no logic beyond
encoding and decoding: what a region *may* send is decided by its policy
(:mod:`fedpriv.privacy.policy`), what the report makes of it by :mod:`fedpriv.privacy.report`.

Train reply (``RecordDict``)
    ``metrics`` (MetricRecord): the DP release's public facts, :data:`PUBLIC_TRAIN_METRICS`,
    plus :data:`NOT_PRIVATE_TRAIN_METRICS` only when the region's policy releases them.
    ``region`` (ConfigRecord): ``name``, ``history`` (this job's ``[σ, q, steps]`` triples, flat)
    and ``accountant``.
    ``arrays`` (ArrayRecord): the DP-noised trainable values -- only without secure aggregation.

Errors
    An error reply's reason reads ``"<region>|<kind>: <text>"`` (:func:`error_reason`, sent by
    :func:`error_reply`) and is read back by the one parser :func:`parse_error` (the reason) /
    :func:`read_error` (a reply's ``Error``: code and reason). ``kind`` is a :data:`REFUSAL_KINDS`
    entry for refusals (code :data:`REFUSED`) and absent for failures (code :data:`FAILED`). The
    coordinator's fault-tolerant grid writes the same format for regions it lost (:data:`LOST`,
    :data:`UNREACHABLE`). A reply counts as a refusal only with code :data:`REFUSED` *and* a refusal
    kind: a crashed ClientApp's traceback cannot pass for one.

Secure aggregation's stage names and records are :mod:`fedpriv.privacy.secagg.messages`'s
(they need the protocol's id packing, which lives above this layer).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from flwr.app import Error, Message

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

REFUSED = 4001      # a region's policy or privacy budget forbids the request
FAILED = 4002       # the region tried and failed (bad data, a protocol violation, ...)
LOST = 4100         # written by the coordinator: no answer within the round timeout
UNREACHABLE = 4101  # written by the coordinator: the SuperLink reported the region's SuperNode offline

POLICY = "refused by region policy"
BUDGET = "privacy-budget"
REFUSAL_KINDS = (POLICY, BUDGET)

_REGION = re.compile(r"[A-Za-z0-9_-]+")  # a region name (core.config) or "node-<id>"


@dataclass(frozen=True)
class RegionError:
    """An error reply, read back: which region, whether it refused (and why), the text, the code."""

    region: str
    kind: str | None   # one of REFUSAL_KINDS, or None for a failure
    text: str
    code: int | None = None  # None: read from the reason alone (parse_error)

    @property
    def refused(self) -> bool:
        return self.kind is not None

    @property
    def lost(self) -> bool:
        """No answer at all (the coordinator gave up waiting, or the SuperNode is gone)."""
        return self.code in (LOST, UNREACHABLE)

    def __str__(self) -> str:
        return f"{self.kind}: {self.text}" if self.kind else self.text


def error_reason(region: str, text: str, kind: str | None = None) -> str:
    """The reason string of an error reply: ``"<region>|<kind>: <text>"`` (kind omitted for a failure)."""
    if kind is not None and kind not in REFUSAL_KINDS:
        raise ValueError(f"refusal kind {kind!r}: expected one of {', '.join(REFUSAL_KINDS)}")
    return f"{region}|{kind}: {text}" if kind else f"{region}|{text}"


def error_reply(msg: Message, region: str, text: str, kind: str | None = None, code: int | None = None) -> Message:
    """The error reply to ``msg``: code :data:`REFUSED` for a refusal ``kind``, else ``code`` or :data:`FAILED`."""
    code = REFUSED if kind is not None else (FAILED if code is None else code)
    return Message(Error(code=code, reason=error_reason(region, text, kind)), reply_to=msg)


def split_reason(reason: str) -> tuple[str | None, str]:
    """``(region, text)`` of a ``"<region>|<text>"`` reason; ``(None, last line)`` for anything else.

    The head must be a region name (letters, digits, ``-``, ``_``) on the first line, so a
    traceback or a SuperLink message that happens to contain ``|`` is not mistaken for one.
    """
    head, sep, rest = reason.partition("|")
    if sep and _REGION.fullmatch(head) and not head.startswith("Traceback"):
        return head, rest
    return None, _last_line(reason)


def parse_error(reason: str, default_region: str, code: int | None = None) -> RegionError:
    """The one parser of :func:`error_reason`; anything else (a traceback, a SuperLink error) is a failure.

    With ``code`` (a reply's error code) a refusal needs :data:`REFUSED` as well as a refusal kind.
    """
    region, text = split_reason(reason)
    region = region or default_region
    if code is None or code == REFUSED:
        for kind in REFUSAL_KINDS:
            if text.startswith(kind + ":"):
                return RegionError(region, kind, text[len(kind) + 1:].strip(), code)
    return RegionError(region, None, text, code)


def read_error(msg: Message, default_region: str) -> RegionError:
    """An error reply, read as the coordinator reads it: reason *and* code."""
    return parse_error(str(msg.error.reason or ""), default_region, int(msg.error.code))


def _last_line(reason: str) -> str:
    lines = [ln.strip() for ln in reason.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no reason given"
