"""FedAvg that keeps the privacy books: Flower's FedAvg plus per-region accounting.

:class:`PrivateFedAvg` is ``flwr.serverapp.strategy.FedAvg`` with four changes a
real deployment needs:

* every region's reply (ε so far, steps, σ, q, its DP history) is recorded in the
  :class:`~fedpriv.privacy.report.RunReport` — FedAvg would only average the metrics;
* refusals (a region whose policy forbids the request, or whose budget would be
  exceeded: :mod:`fedpriv.privacy.policy`) and failures are recorded with their reasons, and a round with fewer than ``min_train_regions`` usable
  replies leaves the global model unchanged instead of averaging a handful;
* waiting for regions to connect is bounded by ``connect_timeout`` (Flower's
  sampler waits forever), so a run whose regions are gone ends with a message;
* replies are aggregated in region-name order, so a seeded run is bit-for-bit
  reproducible (arrival order would change floating-point sums).

Parameters
----------
report : RunReport
    Where per-region and per-round facts go.
min_train_regions : int
    Fewest successful regional updates a round needs to change the global model.
connect_timeout : float
    Seconds to wait for ``min_train_regions`` regions to be connected.
round_offset : int (default: 0)
    Rounds already completed before this process started (``--resume``).
**fedavg_kwargs
    Passed to FedAvg (``fraction_train``, ``fraction_evaluate``, ...).
"""

from __future__ import annotations

import time
from logging import INFO, WARNING
from typing import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedpriv.core import contract
from fedpriv.core.errors import FedprivError
from fedpriv.privacy.report import RegionRecord, RunReport
from fedpriv.privacy.report_view import one_line, redact_paths


class RunAborted(FedprivError):
    """The federation cannot continue (no regions, or none allowed to train)."""


class PrivateFedAvg(FedAvg):
    def __init__(self, report: RunReport, min_train_regions: int, connect_timeout: float,
                 round_offset: int = 0, **fedavg_kwargs):
        super().__init__(min_train_nodes=min_train_regions, min_evaluate_nodes=1,
                         min_available_nodes=min_train_regions, **fedavg_kwargs)
        self.report = report
        self.min_train_regions = min_train_regions
        self.connect_timeout = connect_timeout
        self.round_offset = round_offset
        self.node_regions: dict[int, str] = {}
        self.exhausted_regions: set[str] = set()

    def absolute_round(self, server_round: int) -> int:
        return server_round + self.round_offset

    # -- sending -----------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._wait_for_regions(grid)
        messages = self._with_absolute_round(super().configure_train(server_round, arrays, config, grid), server_round)
        return sorted(messages, key=lambda m: m.metadata.dst_node_id)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self._with_absolute_round(super().configure_evaluate(server_round, arrays, config, grid), server_round)

    def _with_absolute_round(self, messages: Iterable[Message], server_round: int) -> list[Message]:
        """Regions key ledger releases and seed noise by ``server-round``: after a resume it must
        continue (3, 4, ...), not restart at 1. FedAvg writes this process's round number into the
        config, so the absolute one is set on the outgoing messages, after FedAvg built them."""
        messages = list(messages)
        for msg in messages:
            if msg.has_content() and self.configrecord_key in msg.content:
                msg.content[self.configrecord_key]["server-round"] = self.absolute_round(server_round)
        return messages

    def _wait_for_regions(self, grid: Grid) -> None:
        deadline = time.monotonic() + self.connect_timeout
        while len(list(grid.get_node_ids())) < self.min_train_regions:
            if time.monotonic() > deadline:
                raise RunAborted(f"only {len(list(grid.get_node_ids()))} region(s) connected after "
                                 f"{self.connect_timeout:.0f}s; min-train-regions = {self.min_train_regions}")
            time.sleep(1.0)

    # -- receiving ---------------------------------------------------------
    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = self.absolute_round(server_round)
        replies = list(replies)
        ok, trained, refused, failed = self._record_replies(rnd, replies)
        if len(ok) < self.min_train_regions:
            log(WARNING, "round %d: %d usable update(s) < min-train-regions %d: global model unchanged",
                rnd, len(ok), self.min_train_regions)
            self.report.record_round(rnd, model_updated=False)  # the coordinator writes the report every round
            if not ok and refused and len(refused) + len(failed) == len(replies):
                raise RunAborted(f"round {rnd}: no region may train any more (refused by their privacy budgets "
                                 f"or policies: {', '.join(sorted(refused))})")
            return None, None
        arrays, metrics = self._aggregate_updates(server_round, ok)
        self.report.record_round(rnd, model_updated=arrays is not None)
        if arrays is not None:
            log(INFO, "round %d: aggregated %d regional update(s): %s", rnd, len(ok), ", ".join(sorted(trained)))
        return arrays, metrics

    def _record_replies(self, rnd: int, replies: list[Message]) -> tuple[list[Message], list[str], list[str], list[str]]:
        """Book every train reply (ε, history, refusals, failures); returns the usable replies in region order."""
        ok: list[Message] = []
        trained, refused, failed = [], [], []
        for msg in replies:
            if msg.has_error():
                err = contract.read_error(msg, self._region(msg.metadata.src_node_id))
                if err.refused:
                    refused.append(err.region)
                    self.exhausted_regions.add(err.region)
                    self.record_refusal(err, rnd, "refused to train")
                else:
                    failed.append(err.region)
                    self.report.record_enforcement(err.region, rnd, "failed", err.text[:300])
                self._say(rnd, err, "refused to train" if err.refused else "failed")
                continue
            region = str(msg.content[contract.REGION]["name"])
            self.node_regions[msg.metadata.src_node_id] = region
            history = list(msg.content[contract.REGION]["history"])
            triples = [tuple(history[i:i + 3]) for i in range(0, len(history) - 2, 3) if history[i] > 0]
            record = msg.content[contract.REGION]
            unit = str(record["privacy-unit"]) if "privacy-unit" in record else None
            self.report.record_training(region, rnd, dict(msg.content[contract.METRICS]), triples, unit)
            trained.append(region)
            ok.append(msg)
        ok.sort(key=lambda m: str(m.content[contract.REGION]["name"]))
        self.report.record_round(rnd, regions_trained=sorted(trained), regions_refused=sorted(refused),
                                 regions_failed=sorted(failed))
        return ok, trained, refused, failed

    def _aggregate_updates(self, server_round: int, ok: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Combine the usable replies (at least ``min_train_regions``) into the next global model: FedAvg."""
        return super().aggregate_train(server_round, ok)

    def _say(self, rnd: int, err: contract.RegionError, what: str) -> None:
        """One console line per region and round: who, what (refused / failed), the rule and the reason."""
        log(WARNING, "round %d: region %s %s: %s", rnd, err.region, what, one_line(redact_paths(str(err))))

    def _region(self, node_id: int) -> str:
        return self.node_regions.get(node_id, f"node-{node_id}")

    def record_refusal(self, err: contract.RegionError, rnd: int, budget_action: str) -> None:
        """A region's refusal, in the report: "refused by region policy: <rule>" or the budget's reason."""
        if err.kind == contract.POLICY:
            self.report.record_enforcement(err.region, rnd, contract.POLICY, err.text)
        else:
            self.report.record_enforcement(err.region, rnd, budget_action, err.text)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        rnd = self.absolute_round(server_round)
        for msg in replies:
            if msg.has_error():  # a region that does not release local evaluation: noted once
                err = contract.read_error(msg, self._region(msg.metadata.src_node_id))
                rec = self.report.regions.setdefault(err.region, RegionRecord())
                if err.refused and not any(e["reason"] == one_line(redact_paths(err.text)) for e in rec.enforcement):
                    self.record_refusal(err, rnd, "refused to evaluate")
                    self._say(rnd, err, "refused to evaluate")
            elif contract.REGION in msg.content:
                region = str(msg.content[contract.REGION]["name"])
                acc = float(msg.content[contract.METRICS][contract.EVAL_ACCURACY])
                self.report.record_local_evaluation(region, acc)  # labelled "not private" in the report
        return super().aggregate_evaluate(server_round, [m for m in replies if not m.has_error()])

