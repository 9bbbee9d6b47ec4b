"""The coordinator's stages of a secure-aggregation round, as Flower composes its ``SecAggPlusWorkflow``.

:class:`SecAggWorkflow` turns the regions that trained into the average of their
updates without ever seeing one: setup + advertise signed keys, share keys, collect masked
inputs, consistency (each survivor signs its view), unmask
(:mod:`fedpriv.privacy.secagg.protocol` does the math, the messages are
:mod:`fedpriv.privacy.secagg.messages`', the waiting :mod:`fedpriv.server.transport`'s; the
regions authenticate each other with :mod:`fedpriv.privacy.secagg.identity`, the coordinator
only carries the signatures).
It decides nothing about the model and writes nothing: it returns a
:class:`RoundOutcome` -- the average update (or ``None``), the round's facts for the
report, and the refusals it saw -- and :class:`~fedpriv.strategies.secure_fedavg.SecureFedAvg`
applies and records it. The region's side is :mod:`fedpriv.client.secure_aggregation`.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ConfigRecord
from flwr.common.logger import log

from fedpriv.core import contract
from fedpriv.core.config import SecAggSettings
from fedpriv.privacy.secagg import SecAggConfig, SecAggError, SecAggResult, SecAggServer
from fedpriv.privacy.secagg import messages as wire
from fedpriv.server.transport import Replies, exchange

_DECODE_ERRORS = (KeyError, TypeError, ValueError, SecAggError)


class _RoundAborted(Exception):
    """Internal: the secure round cannot complete; the message is the recorded reason."""


@dataclass
class RoundOutcome:
    """What one round gives the strategy: the average update (``None``: model unchanged), the report entry, refusals."""

    update: np.ndarray | None
    entry: dict[str, Any]
    refusals: list[contract.RegionError] = field(default_factory=list)


class SecAggWorkflow:
    """Secure aggregation's stages on the coordinator (SecAgg, or SecAgg+ with ``neighbours``).

    A region that does not answer a stage within ``settings.timeout`` is a dropout; the
    round completes as long as the threshold's worth of regions survive every stage, else
    it is aborted (the model stays unchanged, the reason is recorded). If only one region
    trained, a sum would hide nothing, so :meth:`plain_round` asks that region for its
    update in the clear (``query.secagg_reveal``) -- which the region gives only if its
    policy allows plain rounds.

    Parameters
    ----------
    settings : SecAggSettings
        The run's ``secagg-*`` keys, validated by :mod:`fedpriv.core.config`.
    """

    def __init__(self, settings: SecAggSettings):
        self.settings = settings

    def describe(self) -> dict[str, Any]:
        """The ``secure_aggregation`` section of the privacy report (rounds are appended as they finish)."""
        s = self.settings
        return {"enabled": True, "protocol": "SecAgg" if not s.neighbours else "SecAgg+",
                "threshold": s.threshold or "majority", "neighbours": s.neighbours or "complete",
                "quant_bits": s.quant_bits, "clip_range": s.clip_range, "stage_timeout_s": s.timeout,
                "rounds": [], "rounds_plain": [], "rounds_aborted": []}

    def threshold_for(self, num_regions: int) -> int:
        """The round's threshold when ``num_regions`` (>= 2) regions take part."""
        shares = self._shares(num_regions)
        return self.settings.threshold or min(shares, max(2, shares // 2 + 1))

    def _shares(self, num_regions: int) -> int:
        k = self.settings.neighbours
        return num_regions if not k else min(k, num_regions - 1) + 1

    # -- rounds -------------------------------------------------------------
    def plain_round(self, grid: Any, rnd: int, node_id: int, size: int, region_of: Callable[[int], str]) -> RoundOutcome:
        """One region trained: fetch its update in the clear (the aggregate would equal it anyway)."""
        region = region_of(node_id)
        log(WARNING, "round %d: only region %s trained; secure aggregation needs at least 2 regions, so this round "
                     "uses plain FedAvg (the coordinator sees the region's update)", rnd, region)
        entry: dict[str, Any] = {"round": rnd, "mode": "plain", "participants": [region],
                                 "reason": "only 1 region trained; a sum of one update hides nothing"}
        replies = self._stage(grid, wire.REVEAL, {node_id: wire.round_request(rnd)}, rnd, region_of)
        parsed = replies.read(lambda msg: msg.content[wire.UPDATE][wire.UPDATE].numpy().astype(np.float64),
                              _DECODE_ERRORS)
        errors = replies.errors
        if node_id not in parsed or parsed[node_id].size != size:
            errors.setdefault(node_id, f"the update has {parsed[node_id].size} values, expected {size}"
                              if node_id in parsed else "no reply")
            entry.update(aborted=True, reason=f"{entry['reason']}; the update could not be fetched: {errors.get(node_id)}")
            log(WARNING, "round %d: %s: global model unchanged", rnd, entry["reason"])
            return RoundOutcome(None, entry, replies.refusals)
        return RoundOutcome(parsed[node_id], entry, replies.refusals)

    def secure_round(self, grid: Any, rnd: int, weights: Mapping[int, int], size: int,
                     region_of: Callable[[int], str]) -> RoundOutcome:
        """The regions ``weights`` (node id -> example count) trained: their weighted average update, masked."""
        ids = list(weights)
        n = len(ids)
        t = self.threshold_for(n)
        entry: dict[str, Any] = {"round": rnd, "mode": "secure", "participants": sorted(region_of(i) for i in ids),
                                 "threshold": t, "aborted": False}
        dropped_at: dict[str, str] = {}
        unanswered: dict[str, str] = {}
        refusals: list[contract.RegionError] = []
        started = time.monotonic()
        s = self.settings
        try:
            if t > self._shares(n):
                raise _RoundAborted(f"only {n} regions trained: secagg-threshold = {t} needs {t} "
                                    f"{'regions' if not s.neighbours else 'shares per secret'}")
            config = SecAggConfig(num_clients=n, threshold=t, num_neighbours=s.neighbours or None,
                                  clip_range=s.clip_range, quant_bits=s.quant_bits,
                                  max_weight=max(1, max(weights.values())))
            entry["max_weight"] = config.max_weight
            server = SecAggServer(config, round_id=rnd, round_seed=secrets.token_bytes(32), vector_size=size)
            result = self._run_stages(grid, rnd, server, ids, region_of, dropped_at, unanswered, refusals)
        except (_RoundAborted, SecAggError, ValueError) as exc:
            entry.update(aborted=True, reason=str(exc), dropped_at=dropped_at,
                         dropped=sorted(dropped_at), seconds=round(time.monotonic() - started, 3))
            log(WARNING, "round %d: secure aggregation aborted (%s): global model unchanged", rnd, exc)
            return RoundOutcome(None, entry, refusals)
        survivors = [region_of(i) for i in result.survivors]
        declared = sum(weights[i] for i in result.survivors)
        entry.update(survivors=sorted(survivors), dropped=sorted(dropped_at), dropped_at=dropped_at,
                     error_bound=float(result.error_bound), total_weight=int(result.total_weight),
                     coordinates=int(size) * len(survivors), seconds=round(time.monotonic() - started, 3))
        if unanswered:
            entry["unmask_unanswered"] = unanswered
        if declared != result.total_weight:
            entry["declared_weight"] = declared
            log(WARNING, "round %d: the survivors' masked example counts sum to %d, their metrics to %d",
                rnd, result.total_weight, declared)
        log(INFO, "round %d: securely aggregated %d of %d regions (%s); per-coordinate error bound %.3g",
            rnd, len(survivors), n, ", ".join(sorted(survivors)), result.error_bound)
        return RoundOutcome(result.average, entry, refusals)

    # -- stages -------------------------------------------------------------
    def _run_stages(self, grid: Any, rnd: int, server: SecAggServer, ids: list[int], region_of: Callable[[int], str],
                    dropped_at: dict[str, str], unanswered: dict[str, str],
                    refusals: list[contract.RegionError]) -> SecAggResult:
        """Setup/advertise, share keys, masked inputs, consistency, unmask; returns the result."""

        def stage(message_type: str, requests: Mapping[int, Mapping[str, Any]]) -> Replies:
            replies = self._stage(grid, message_type, requests, rnd, region_of)
            refusals.extend(replies.refusals)
            return replies

        def note(name: str, asked: Iterable[int], answered: Mapping[int, Any], errors: Mapping[int, str]) -> None:
            for nid in asked:
                if nid not in answered:
                    dropped_at[region_of(nid)] = f"{name}: {errors.get(nid, 'no reply')}"

        setup = wire.setup_record(server.setup_message())
        replies = stage(wire.ADVERTISE, {nid: setup for nid in ids})
        adverts = replies.read(lambda msg: dict(msg.content[wire.RECORD]), _DECODE_ERRORS)
        note("advertise", ids, adverts, replies.errors)
        public_keys = server.collect_advertisements(adverts)
        note("advertise", adverts, public_keys, server.excluded)

        keys = wire.keys_request(rnd, public_keys, adverts)
        replies = stage(wire.SHARE_KEYS, {nid: keys for nid in public_keys})
        shares = replies.read(lambda msg: wire.shares_reply(msg.content[wire.RECORD]), _DECODE_ERRORS)
        note("share_keys", public_keys, shares, replies.errors)
        routed = server.route_shares(shares)
        note("share_keys", shares, routed, server.excluded)

        replies = stage(wire.MASKED_INPUT, {nid: wire.routed_request(rnd, inbox) for nid, inbox in routed.items()})
        masked = replies.read(lambda msg: msg.content[wire.MASKED][wire.MASKED].numpy(), _DECODE_ERRORS)
        note("masked_input", routed, masked, replies.errors)
        requests = server.collect_masked_inputs(masked)
        note("masked_input", masked, requests, server.excluded)

        # Consistency (Bonawitz et al.'s actively secure variant): every survivor signs its view -- the key
        # list it authenticated and the one survivor set -- and checks the others' signatures before unmasking.
        survivors = sorted(requests)
        replies = stage(wire.CONSISTENCY, {nid: wire.consistency_request(rnd, survivors) for nid in survivors})
        views = replies.read(lambda msg: wire.read_view_record(msg.content[wire.RECORD]), _DECODE_ERRORS)
        for nid in survivors:  # in the sum already: it did not confirm the view, so it is not asked to unmask
            if nid not in views:
                unanswered[region_of(nid)] = f"consistency: {replies.errors.get(nid, 'no reply')}"
        if len(views) < server.config.threshold:
            raise _RoundAborted(f"only {len(views)} regions signed the survivor set; threshold is "
                                f"{server.config.threshold}")
        replies = stage(wire.UNMASK, {nid: wire.unmask_request(rnd, requests[nid]["survivors"],
                                                               requests[nid]["dropped"], views)
                                      for nid in views})
        answers = replies.read(lambda msg: wire.unmask_reply(msg.content[wire.RECORD]), _DECODE_ERRORS)
        for nid in views:  # still in the sum; only its shares are missing
            if nid not in answers:
                unanswered[region_of(nid)] = replies.errors.get(nid, "no reply")
        return server.unmask(answers)

    def _stage(self, grid: Any, message_type: str, requests: Mapping[int, Mapping[str, Any]], rnd: int,
               region_of: Callable[[int], str]) -> Replies:
        """One stage: a :data:`~fedpriv.privacy.secagg.messages.RECORD` per node, ``settings.timeout`` to answer."""
        contents = {nid: {wire.RECORD: ConfigRecord(dict(record))} for nid, record in requests.items()}
        return exchange(grid, message_type, contents, str(rnd), self.settings.timeout, region_of)


__all__ = ["RoundOutcome", "SecAggWorkflow"]
