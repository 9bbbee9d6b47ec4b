"""FedAvg over secure aggregation: the coordinator learns only the sum of the regions' updates.

See :class:`SecureFedAvg` for the round; the region's side is :mod:`fedpriv.client.secure_aggregation`,
the protocol itself :mod:`fedpriv.privacy.secagg`.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedpriv.core import contract as wire
from fedpriv.core.errors import ConfigError
from fedpriv.privacy.report import RunReport
from fedpriv.privacy.secagg import SecAggConfig, SecAggError, SecAggResult, SecAggServer
from fedpriv.strategies.private_fedavg import PrivateFedAvg

#: Polling while waiting for a stage's replies: every ``_POLL_FAST`` s for the first
#: ``_FAST_FOR`` s (replies to these small messages usually come back within that),
#: then backing off to ``_POLL_MAX`` s (each poll is a request to the SuperLink).
_POLL_FAST, _FAST_FOR, _POLL_MAX = 0.02, 2.0, 1.0


class _RoundAborted(Exception):
    """Internal: the secure round cannot complete; the message is the recorded reason."""


class SecureFedAvg(PrivateFedAvg):
    """FedAvg over secure aggregation: the coordinator learns only the sum of the regions' updates.

    :class:`~fedpriv.strategies.private_fedavg.PrivateFedAvg` (same privacy books, refusals,
    ``min_train_regions``, region-order determinism) whose regions never send a model
    update in the clear. One round:

    1. ``train`` -- the usual train message (global arrays + config, with
       ``secagg-round`` set). Each region trains with DP-SGD, keeps
       ``update = new - global`` in its own ``context.state`` and replies with its
       metrics and privacy history only.
    2. ``query.secagg_advertise`` -- the setup (``SecAggServer.setup_message()``: the
       regions that trained, threshold, neighbours, clip range, quantisation bits,
       ``max_weight`` = the largest reported example count, round id, a fresh public
       round seed from :mod:`secrets`); regions reply with public keys and a commitment.
    3. ``query.secagg_share_keys`` -- everyone's public keys; regions reply with sealed
       Shamir share bundles for their neighbours, which the coordinator routes.
    4. ``query.secagg_masked_input`` -- the bundles for each region; regions reply with
       ``mask(quantise(clip((num_examples / max_weight) * update)))`` plus the example
       count as a last coordinate -- nothing else (how many coordinates a region clipped
       stays in its own log).
    5. ``query.secagg_unmask`` -- who survived and who dropped; regions reply with the
       shares that strip the masks. The coordinator rebuilds ``sum(n_u * update_u)`` and
       ``sum(n_u)`` of the survivors, and the new global model is
       ``global + sum(n_u * update_u) / sum(n_u)`` -- FedAvg, up to the quantisation
       ``error_bound`` recorded per round.

    A region that does not answer a stage within ``stage_timeout`` is a dropout; the
    round completes as long as ``threshold`` regions survive every stage, else it is
    aborted (:class:`~fedpriv.privacy.secagg.SecAggAbort`): the global model stays unchanged,
    the reason is recorded, and the next round starts afresh. If only one region
    trained, a sum would hide nothing (the new global model *is* its update), so that
    round falls back to plain FedAvg (``query.secagg_reveal``) with a warning, and is
    listed under ``rounds_plain`` in the report -- if the region's policy allows plain
    rounds; otherwise it refuses and the round aborts with the model unchanged.

    Regions enforce their own rules (:mod:`fedpriv.privacy.policy`): a Shamir threshold of half
    a secret's share holders or fewer is refused at setup, and a refusal is recorded as
    "refused by region policy: <rule>".

    The stages poll the Grid themselves (``push_messages``/``pull_messages``, every
    20 ms for 2 s, then backing off to 1 s) instead of ``Grid.send_and_receive``,
    which sleeps 3 s between polls in a deployment -- at least 12 s per round for
    four small messages.

    Parameters
    ----------
    report : RunReport
        Where per-region, per-round and secure-aggregation facts go
        (``report.secure_aggregation``).
    min_train_regions : int
        Fewest successful regional updates a round needs to change the global model.
    connect_timeout : float
        Seconds to wait for ``min_train_regions`` regions to be connected.
    round_offset : int (default: 0)
        Rounds already completed before this process started (``--resume``).
    threshold : int (default: 0)
        Least number of regions that must survive every stage (and of shares needed to
        rebuild a secret); ``0`` means a majority of each region's share group:
        ``max(2, floor(m / 2) + 1)`` with ``m`` = regions that trained (complete graph) or
        ``neighbours + 1``.
    neighbours : int (default: 0)
        ``0`` for the complete graph (SecAgg); ``k`` for SecAgg+ with ``k`` neighbours.
    clip_range : float (default: 8.0)
        Coordinates of ``(num_examples / max_weight) * update`` are clipped to
        ``[-clip_range, clip_range]`` before quantisation.
    quant_bits : int (default: 22)
        Quantisation levels ``2**quant_bits`` over ``[-clip_range, clip_range]``.
    stage_timeout : float (default: 300.0)
        Seconds each secure-aggregation stage waits for replies.
    **fedavg_kwargs
        Passed to FedAvg (``fraction_train``, ``fraction_evaluate``, ...).
    """

    def __init__(self, report: RunReport, min_train_regions: int, connect_timeout: float, round_offset: int = 0, *,
                 threshold: int = 0, neighbours: int = 0, clip_range: float = 8.0, quant_bits: int = 22,
                 stage_timeout: float = 300.0, **fedavg_kwargs):
        super().__init__(report, min_train_regions, connect_timeout, round_offset, **fedavg_kwargs)
        if threshold != 0 and threshold < 2:
            raise ConfigError(f"secagg-threshold = {threshold!r}: expected 0 (majority) or an integer >= 2")
        if neighbours < 0:
            raise ConfigError(f"secagg-neighbours = {neighbours!r}: expected 0 (complete graph) or a count >= 1")
        if neighbours and threshold > neighbours + 1:
            raise ConfigError(f"secagg-threshold = {threshold}: with secagg-neighbours = {neighbours} a secret has "
                              f"{neighbours + 1} shares, so expected a threshold <= {neighbours + 1}")
        if not (np.isfinite(clip_range) and clip_range > 0):
            raise ConfigError(f"secagg-clip-range = {clip_range!r}: expected a coordinate bound > 0")
        if not 1 <= quant_bits <= 48:
            raise ConfigError(f"secagg-quant-bits = {quant_bits!r}: expected an integer in [1, 48]")
        if not stage_timeout > 0:
            raise ConfigError(f"secagg-timeout = {stage_timeout!r}: expected seconds > 0")
        self.threshold = int(threshold)
        self.neighbours = int(neighbours)
        self.clip_range = float(clip_range)
        self.quant_bits = int(quant_bits)
        self.stage_timeout = float(stage_timeout)
        self._grid: Grid | None = None
        self._global: ArrayRecord | None = None

    # -- report ------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """The ``secure_aggregation`` section of the privacy report (rounds are appended as they finish)."""
        return {"enabled": True, "protocol": "SecAgg" if not self.neighbours else "SecAgg+",
                "threshold": self.threshold or "majority", "neighbours": self.neighbours or "complete",
                "quant_bits": self.quant_bits, "clip_range": self.clip_range, "stage_timeout_s": self.stage_timeout,
                "rounds": [], "rounds_plain": [], "rounds_aborted": []}

    def _section(self) -> dict[str, Any]:
        section = self.report.secure_aggregation
        if not section.get("enabled"):
            section = self.report.secure_aggregation = self.describe()
        for key in ("rounds", "rounds_plain", "rounds_aborted"):
            section.setdefault(key, [])
        return section

    def _record(self, entry: dict[str, Any]) -> None:
        section = self._section()
        section["rounds"] = [r for r in section["rounds"] if r["round"] != entry["round"]] + [entry]
        section["rounds"].sort(key=lambda r: r["round"])
        for key, hit in (("rounds_plain", entry["mode"] == "plain"), ("rounds_aborted", entry.get("aborted", False))):
            rounds = [r for r in section[key] if r != entry["round"]]
            section[key] = sorted(rounds + [entry["round"]]) if hit else rounds
        self.report.record_round(entry["round"], secure_aggregation="aborted" if entry.get("aborted") else entry["mode"])

    def threshold_for(self, num_regions: int) -> int:
        """The round's threshold when ``num_regions`` (>= 2) regions take part."""
        shares = num_regions if not self.neighbours else min(self.neighbours, num_regions - 1) + 1
        return self.threshold or min(shares, max(2, shares // 2 + 1))

    # -- sending -----------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._grid = grid
        self._global = arrays
        self._section()
        config[wire.TRAIN_FLAG] = self.absolute_round(server_round)
        return super().configure_train(server_round, arrays, config, grid)

    # -- aggregating -------------------------------------------------------
    def _aggregate_updates(self, server_round: int, ok: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._grid is None or self._global is None:
            raise RuntimeError("SecureFedAvg.aggregate_train needs configure_train first (it keeps the grid and global model)")
        rnd = self.absolute_round(server_round)
        metrics = self.train_metrics_aggr_fn([m.content for m in ok], self.weighted_by_key)
        global_values = OrderedDict((k, v.numpy()) for k, v in self._global.items())
        flat = wire.flatten_values(global_values)
        update = self._plain_round(rnd, ok, flat.size) if len(ok) < 2 else self._secure_round(rnd, ok, flat.size)
        if update is None:
            return None, None
        values = wire.unflatten_values(flat + update, global_values)
        return ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in values.items())), metrics

    def _region(self, node_id: int) -> str:
        return self.node_regions.get(node_id, f"node-{node_id}")

    def _plain_round(self, rnd: int, ok: list[Message], size: int) -> np.ndarray | None:
        """One region trained: fetch its update in the clear (the aggregate would equal it anyway)."""
        nid = ok[0].metadata.src_node_id
        region = self._region(nid)
        log(WARNING, "round %d: only region %s trained; secure aggregation needs at least 2 regions, so this round "
                     "uses plain FedAvg (the coordinator sees the region's update)", rnd, region)
        entry: dict[str, Any] = {"round": rnd, "mode": "plain", "participants": [region],
                                 "reason": "only 1 region trained; a sum of one update hides nothing"}
        replies, errors = self._exchange(wire.REVEAL, {nid: {wire.RECORD: ConfigRecord({"round_id": rnd})}}, rnd)
        parsed = _parse(replies, errors, lambda msg: msg.content[wire.UPDATE][wire.UPDATE].numpy().astype(np.float64))
        if nid not in parsed or parsed[nid].size != size:
            errors.setdefault(nid, f"the update has {parsed[nid].size} values, expected {size}" if nid in parsed else "no reply")
            entry.update(aborted=True, reason=f"{entry['reason']}; the update could not be fetched: {errors.get(nid)}")
            log(WARNING, "round %d: %s: global model unchanged", rnd, entry["reason"])
            self._record(entry)
            return None
        self._record(entry)
        return parsed[nid]

    def _secure_round(self, rnd: int, ok: list[Message], size: int) -> np.ndarray | None:
        ids = [m.metadata.src_node_id for m in ok]
        weights = {m.metadata.src_node_id: int(m.content["metrics"][self.weighted_by_key]) for m in ok}
        n = len(ids)
        t = self.threshold_for(n)
        entry: dict[str, Any] = {"round": rnd, "mode": "secure", "participants": sorted(self._region(i) for i in ids),
                                 "threshold": t, "aborted": False}
        dropped_at: dict[str, str] = {}
        unanswered: dict[str, str] = {}
        started = time.monotonic()
        try:
            shares = n if not self.neighbours else min(self.neighbours, n - 1) + 1
            if t > shares:
                raise _RoundAborted(f"only {n} regions trained: secagg-threshold = {t} needs {t} "
                                    f"{'regions' if not self.neighbours else 'shares per secret'}")
            config = SecAggConfig(num_clients=n, threshold=t, num_neighbours=self.neighbours or None,
                                  clip_range=self.clip_range, quant_bits=self.quant_bits,
                                  max_weight=max(1, max(weights.values())))
            entry["max_weight"] = config.max_weight
            server = SecAggServer(config, round_id=rnd, round_seed=secrets.token_bytes(32), vector_size=size)
            result = self._run_stages(rnd, server, ids, dropped_at, unanswered)
        except (_RoundAborted, SecAggError, ValueError) as exc:
            entry.update(aborted=True, reason=str(exc), dropped_at=dropped_at,
                         dropped=sorted(dropped_at), seconds=round(time.monotonic() - started, 3))
            log(WARNING, "round %d: secure aggregation aborted (%s): global model unchanged", rnd, exc)
            self._record(entry)
            return None
        survivors = [self._region(i) for i in result.survivors]
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
        self._record(entry)
        return result.average

    def _run_stages(self, rnd: int, server: SecAggServer, ids: list[int], dropped_at: dict[str, str],
                    unanswered: dict[str, str]) -> SecAggResult:
        """Stages 1-4; returns the result."""

        def note(stage: str, asked: Iterable[int], answered: Mapping[int, Any], errors: Mapping[int, str]) -> None:
            for nid in asked:
                if nid not in answered:
                    dropped_at[self._region(nid)] = f"{stage}: {errors.get(nid, 'no reply')}"

        setup = wire.setup_record(server.setup_message())
        replies, errors = self._exchange(wire.ADVERTISE, {nid: {wire.RECORD: setup} for nid in ids}, rnd)
        adverts = _parse(replies, errors, lambda msg: dict(msg.content[wire.RECORD]))
        note("advertise", ids, adverts, errors)
        public_keys = server.collect_advertisements(adverts)
        note("advertise", adverts, public_keys, server.excluded)

        keys = wire.keys_request(rnd, public_keys)
        replies, errors = self._exchange(wire.SHARE_KEYS, {nid: {wire.RECORD: keys} for nid in public_keys}, rnd)
        shares = _parse(replies, errors, lambda msg: wire.shares_reply(msg.content[wire.RECORD]))
        note("share_keys", public_keys, shares, errors)
        routed = server.route_shares(shares)
        note("share_keys", shares, routed, server.excluded)

        replies, errors = self._exchange(
            wire.MASKED_INPUT, {nid: {wire.RECORD: wire.routed_request(rnd, inbox)} for nid, inbox in routed.items()}, rnd)
        masked = _parse(replies, errors, lambda msg: msg.content[wire.MASKED][wire.MASKED].numpy())
        note("masked_input", routed, masked, errors)
        requests = server.collect_masked_inputs(masked)
        note("masked_input", masked, requests, server.excluded)

        replies, errors = self._exchange(
            wire.UNMASK, {nid: {wire.RECORD: wire.unmask_request(rnd, req["survivors"], req["dropped"])}
                          for nid, req in requests.items()}, rnd)
        answers = _parse(replies, errors, lambda msg: wire.unmask_reply(msg.content[wire.RECORD]))
        for nid in requests:  # still in the sum; only its shares are missing
            if nid not in answers:
                unanswered[self._region(nid)] = errors.get(nid, "no reply")
        return server.unmask(answers)

    # -- transport ---------------------------------------------------------
    def _exchange(self, message_type: str, contents: Mapping[int, Mapping[str, Any]],
                  rnd: int) -> tuple[dict[int, Message], dict[int, str]]:
        """Send one message per node and wait up to ``stage_timeout`` for the replies.

        Returns ``(replies, errors)``: successful replies by node id, and why every
        other node is missing (an error reply's reason, or no reply in time).
        """
        grid = self._grid
        assert grid is not None
        messages = [Message(content=RecordDict(dict(content)), message_type=message_type, dst_node_id=nid, group_id=str(rnd),
                            ttl=self.stage_timeout) for nid, content in contents.items()]
        deadline = time.monotonic() + self.stage_timeout
        pending = {mid for mid in grid.push_messages(messages) if mid}
        # Replies are matched by the message they answer: an error the SuperLink sends
        # for an unreachable node comes from the SuperLink's node id, not the node's.
        dst_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        received: list[Message] = []
        started, delay = time.monotonic(), _POLL_FAST
        while pending:
            got = list(grid.pull_messages(pending))
            received.extend(got)
            pending -= {m.metadata.reply_to_message_id for m in got}
            now = time.monotonic()
            if not pending or now >= deadline:
                break
            if now - started > _FAST_FOR:
                delay = min(delay * 1.5, _POLL_MAX)
            time.sleep(min(delay, deadline - now))
        replies: dict[int, Message] = {}
        errors: dict[int, str] = {}
        for msg in received:
            nid = dst_of.get(msg.metadata.reply_to_message_id)
            if nid is None:
                continue
            if msg.has_error():
                err = wire.parse_error(msg.error.reason, self._region(nid))
                errors[nid] = str(err)[:300]
                if err.refused:
                    self.record_refusal(err, rnd, "refused")
            elif msg.metadata.src_node_id != nid:
                errors[nid] = f"reply came from node {msg.metadata.src_node_id}, not from the region's node"
            else:
                replies[nid] = msg
        for nid in contents:
            if nid not in replies and nid not in errors:
                errors[nid] = f"no reply within secagg-timeout = {self.stage_timeout:g}s"
        for nid, reason in sorted(errors.items()):
            log(INFO, "round %d: %s: region %s dropped out: %s", rnd, message_type, self._region(nid), reason)
        return replies, errors


def _parse(replies: Mapping[int, Message], errors: dict[int, str], read) -> dict[int, Any]:
    """``read`` every reply; a reply that cannot be read is a dropout (its reason goes to ``errors``)."""
    out: dict[int, Any] = {}
    for nid, msg in replies.items():
        try:
            out[nid] = read(msg)
        except (KeyError, TypeError, ValueError, SecAggError) as exc:
            errors[nid] = f"malformed reply ({type(exc).__name__}: {exc})"
    return out
