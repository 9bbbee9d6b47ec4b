"""FedAvg over secure aggregation: the coordinator learns only the sum of the regions' updates.

See :class:`SecureFedAvg` for the round. The coordinator's stages are
:mod:`fedpriv.server.secagg_workflow`'s, the region's side is
:mod:`fedpriv.client.secure_aggregation`, the shared wire :mod:`fedpriv.privacy.secagg.messages`
and the protocol :mod:`fedpriv.privacy.secagg`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from fedpriv.core import contract
from fedpriv.privacy.report import RunReport
from fedpriv.privacy.secagg import messages as wire
from fedpriv.strategies.private_fedavg import PrivateFedAvg


class RoundResult(Protocol):
    """What a secure-sum workflow returns for a round (:class:`fedpriv.server.secagg_workflow.RoundOutcome`)."""

    update: np.ndarray | None
    entry: dict[str, Any]
    refusals: list[contract.RegionError]


class SecureSum(Protocol):
    """How the regions' average update is obtained without seeing one (:class:`fedpriv.server.secagg_workflow.SecAggWorkflow`)."""

    def describe(self) -> dict[str, Any]: ...

    def secure_round(self, grid: Any, rnd: int, weights: Mapping[int, int], size: int,
                     region_of: Callable[[int], str]) -> RoundResult: ...

    def plain_round(self, grid: Any, rnd: int, node_id: int, size: int,
                    region_of: Callable[[int], str]) -> RoundResult: ...


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
       round seed from :mod:`secrets`); regions reply with public keys and a commitment,
       signed with their identity key (bound to job, round, setup and region name).
    3. ``query.secagg_share_keys`` -- everyone's signed keys; each region checks them against
       its own roster of peer identity keys (refusing an unknown or forged peer), then replies
       with sealed Shamir share bundles for its neighbours, which the coordinator routes.
    4. ``query.secagg_masked_input`` -- the bundles for each region; regions reply with
       ``mask(quantise(clip((num_examples / max_weight) * update)))`` plus the example
       count as a last coordinate -- nothing else (how many coordinates a region clipped
       stays in its own log).
    5. ``query.secagg_consistency`` -- the survivor set; each survivor signs its view (the key
       list it authenticated and that set).
    6. ``query.secagg_unmask`` -- who survived and who dropped, with the survivors' view
       signatures; each region checks them (a split view is refused) and replies with the
       shares that strip the masks. The coordinator rebuilds ``sum(n_u * update_u)`` and
       ``sum(n_u)`` of the survivors, and the new global model is
       ``global + sum(n_u * update_u) / sum(n_u)`` -- FedAvg, up to the quantisation
       ``error_bound`` recorded per round.

    A region that does not answer a stage within ``secagg-timeout`` is a dropout; the
    round completes as long as ``threshold`` regions survive every stage, else it is
    aborted (:class:`~fedpriv.privacy.secagg.SecAggAbort`): the global model stays unchanged,
    the reason is recorded, and the next round starts afresh. If only one region
    trained, a sum would hide nothing (the new global model *is* its update), so that
    round falls back to plain FedAvg (``query.secagg_reveal``) with a warning, and is
    listed under ``rounds_plain`` in the report -- if the region's policy allows plain
    rounds; otherwise it refuses and the round aborts with the model unchanged.

    Regions enforce their own rules (:mod:`fedpriv.privacy.policy`): a Shamir threshold of half
    a secret's share holders or fewer is refused at setup, so is a round with fewer authenticated
    other regions than ``min-secagg-peers``, and a refusal is recorded as
    "refused by region policy: <rule>".

    The strategy only aggregates and records: the stages 2-6 are the ``workflow``'s
    (:class:`fedpriv.server.secagg_workflow.SecAggWorkflow`, which the coordinator
    builds from the validated run config), which returns the average update and the
    round's facts; this class applies the update to the global model and records the
    facts in ``report.secure_aggregation`` (the coordinator writes the report).

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
    workflow : SecureSum
        Runs the secure-aggregation stages of a round (threshold, graph, clip range,
        quantisation and stage timeout are its settings).
    **fedavg_kwargs
        Passed to FedAvg (``fraction_train``, ``fraction_evaluate``, ...).
    """

    def __init__(self, report: RunReport, min_train_regions: int, connect_timeout: float, round_offset: int = 0, *,
                 workflow: SecureSum, **fedavg_kwargs):
        super().__init__(report, min_train_regions, connect_timeout, round_offset, **fedavg_kwargs)
        self.workflow = workflow
        self._grid: Grid | None = None
        self._global: ArrayRecord | None = None

    # -- report ------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """The ``secure_aggregation`` section of the privacy report (rounds are appended as they finish)."""
        return self.workflow.describe()

    def _section(self) -> dict[str, Any]:
        section = self.report.secure_aggregation
        if not section.get("enabled"):
            section = self.report.secure_aggregation = self.describe()
        for key in ("rounds", "rounds_plain", "rounds_aborted"):
            section.setdefault(key, [])
        return section

    def _record(self, rnd: int, entry: dict[str, Any], refusals: Iterable[contract.RegionError]) -> None:
        for err in refusals:
            self.record_refusal(err, rnd, "refused")
            self._say(rnd, err, "refused")
        section = self._section()
        section["rounds"] = [r for r in section["rounds"] if r["round"] != entry["round"]] + [entry]
        section["rounds"].sort(key=lambda r: r["round"])
        for key, hit in (("rounds_plain", entry["mode"] == "plain"), ("rounds_aborted", entry.get("aborted", False))):
            rounds = [r for r in section[key] if r != entry["round"]]
            section[key] = sorted(rounds + [entry["round"]]) if hit else rounds
        self.report.record_round(entry["round"], secure_aggregation="aborted" if entry.get("aborted") else entry["mode"])

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
        if len(ok) < 2:
            outcome = self.workflow.plain_round(self._grid, rnd, ok[0].metadata.src_node_id, flat.size, self._region)
        else:
            weights = {m.metadata.src_node_id: int(m.content[contract.METRICS][self.weighted_by_key]) for m in ok}
            outcome = self.workflow.secure_round(self._grid, rnd, weights, flat.size, self._region)
        self._record(rnd, outcome.entry, outcome.refusals)
        if outcome.update is None:
            return None, None
        values = wire.unflatten_values(flat + outcome.update, global_values)
        return ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in values.items())), metrics
