"""The coordinator's side of a run: model, strategy, evaluation, checkpoints, report.

:class:`Coordinator` is what the ServerApp runs. It owns the run's
:class:`~fedpriv.privacy.report.RunReport` and writes it after every round, so a crash or
a lost region never loses what was already learned and spent.

Faults: every round is bounded by ``round-timeout``; a region that does not answer
(its process died, its SuperNode is gone) is recorded as failed for that round
(:class:`fedpriv.server.faults.WatchedGrid`) and the round goes on with the others, as
long as ``min-train-regions`` updates arrive. A coordinator that dies is continued
by a new one with ``resume-from`` = its run dir (``fedpriv run --resume``): the
last completed round's checkpoint, the report so far, and only the remaining
rounds (:mod:`fedpriv.server.resume`). One coordinator at a time writes a run dir.
"""

from __future__ import annotations

import time
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedpriv.task.device import peak_memory_mb, select_device
from fedpriv.core.config import FedprivConfig
from fedpriv.core.errors import FedprivError
from fedpriv.core.report_schema import FAILED, RUNNING, STOPPED
from fedpriv.privacy.report import RunReport
from fedpriv.privacy.report_view import one_line, run_verdict
from fedpriv.server.checkpoints import (export_model, latest_checkpoint, load_server_optimizer_state,
                                         prune_checkpoints, save_checkpoint, save_server_optimizer_state)
from fedpriv.server.evaluation import CentralEvaluator
from fedpriv.server.console import quiet_flower_results
from fedpriv.server.faults import WatchedGrid
from fedpriv.server.resume import (ResumePoint, continue_secure_aggregation, discard_later_checkpoints, find_resume_point,
                                   lock_run_dir, note_segment, restore_report, total_wall_time)
from fedpriv.server.secagg_workflow import SecAggWorkflow
from fedpriv.strategies.private_fedavg import PrivateFedAvg, RunAborted
from fedpriv.strategies.secure_fedavg import SecureFedAvg
from fedpriv.strategies.server_optimizer import ServerOptimizer, ServerOptimizerStrategy
from fedpriv.task.model import build_model, count_trainable, from_array_record, get_trainable, load_tokenizer, set_trainable_values, to_array_record
from fedpriv.task.features import SplitClassifier
from fedpriv.task.partition import read_partition_stats


class Coordinator:
    def __init__(self, cfg: FedprivConfig, flat_config: dict[str, Any], run_id: str = ""):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.run_dir_lock = lock_run_dir(self.run_dir, timeout=min(cfg.round_timeout, 120.0))
        self.resume_point: ResumePoint | None = None
        if cfg.resume_from:
            if Path(cfg.resume_from).resolve() != self.run_dir.resolve():
                raise FedprivError(f"resume-from {cfg.resume_from} is not this run's run-dir {self.run_dir}: "
                                   "a resumed run continues in its own directory")
            self.resume_point = find_resume_point(cfg.resume_from)
            if self.resume_point.job_id != cfg.job_id:
                raise FedprivError(f"resume-from {cfg.resume_from}: it belongs to job {self.resume_point.job_id!r}, "
                                   f"this run is job {cfg.job_id!r}")
        self.start_round = self.resume_point.completed_round if self.resume_point else 0
        self.device = select_device(cfg.num_threads)
        self.tokenizer = load_tokenizer()
        self.model = build_model(cfg.model, cfg.trainable, cfg.seed, cfg.pooling, cfg.lora_rank)
        self.server_optimizer = ServerOptimizer(cfg.server_optimizer, cfg.server_learning_rate, cfg.server_momentum,
                                                cfg.server_beta2, cfg.server_tau)
        if self.start_round:
            self._restore_server_optimizer()
        self.evaluator = CentralEvaluator(SplitClassifier(self.model, cfg.trainable), self.tokenizer, cfg.data_dir,
                                          cfg.max_length, self.device)
        self.report = self._new_report(flat_config, run_id)
        if self.resume_point is not None:
            restore_report(self.report, self.resume_point.report, self.start_round)
            discard_later_checkpoints(self.resume_point)
            log(INFO, "resuming job %s from %s after round %d of %d", cfg.job_id, cfg.resume_from,
                self.start_round, cfg.num_server_rounds)
        self.segment = note_segment(self.report, run_id, self.start_round + 1, self.resume_point is not None)
        self.started = time.time()

    def _new_report(self, flat_config: dict[str, Any], run_id: str) -> RunReport:
        report = RunReport(self.run_dir, flat_config, self.cfg.accountant, self.cfg.delta, list(self.cfg.regions))
        report.run_id = run_id
        report.partition = read_partition_stats(self.cfg.data_dir)
        for rec in report.regions.values():
            rec.target_epsilon = self.cfg.target_epsilon if self.cfg.dp and self.cfg.noise_multiplier == 0 else None
        report.run_info = {"model": self.cfg.model, "trainable": self.cfg.trainable, "pooling": self.cfg.pooling, "lora_rank": self.cfg.lora_rank,
                           "trainable_params": count_trainable(self.model), "device": str(self.device),
                           "server_test_examples": self.evaluator.size, "dp": self.cfg.dp,
                           "server_optimizer": self.server_optimizer.describe()}
        return report

    def _restore_server_optimizer(self) -> None:
        """A resumed run continues with the moments of its last completed round (server/checkpoints.py)."""
        state = load_server_optimizer_state(self.run_dir, self.start_round)
        if state is None:
            if not self.server_optimizer.stateful:  # plain FedAvg: nothing to restore
                return
            raise FedprivError(f"resume-from {self.cfg.resume_from}: no server-optimizer state saved for round "
                               f"{self.start_round}; a {self.server_optimizer.name} run cannot continue without its moments")
        try:
            self.server_optimizer.load_state_dict(state)
        except ValueError as exc:
            raise FedprivError(f"resume-from {self.cfg.resume_from}: {exc}") from None

    def evaluate_round(self, server_round: int, arrays) -> MetricRecord:
        """Central evaluation + checkpoint + report, after every round (and once before round 1)."""
        values = from_array_record(arrays)
        loss, accuracy = self.evaluator(values)
        absolute = server_round + self.strategy.round_offset
        if server_round > 0:
            if self.server_optimizer.stateful:  # before the model: a completed round has both
                save_server_optimizer_state(self.run_dir, absolute, self.server_optimizer.state_dict())
            save_checkpoint(self.run_dir, absolute, values)
        if server_round > 0 or self.strategy.round_offset == 0:
            self.report.record_round(absolute, accuracy=accuracy, loss=loss)
        self._note_lost_regions(absolute)
        self.segment.update(last_round=absolute, wall_time_s=round(time.time() - self.started, 1))
        self.report.write()
        if server_round > 0:  # the round is complete on both sides now: older checkpoints can go
            prune_checkpoints(self.run_dir, self.cfg.keep_checkpoints, absolute)
        log(INFO, "round %d: global model on %d held-out posts: accuracy %.4f, loss %.4f",
            absolute, self.evaluator.size, accuracy, loss)
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    def run(self, grid: Grid) -> RunReport:
        try:
            return self._run(grid)
        except BaseException as exc:  # a crash or a stop must still leave an honest report behind
            if self.report.status == RUNNING:
                if isinstance(exc, (SystemExit, KeyboardInterrupt)):
                    self.report.status, self.report.status_reason = STOPPED, "the run was stopped or its ServerApp shut down"
                else:
                    self.report.status, self.report.status_reason = FAILED, one_line(f"{type(exc).__name__}: {exc}")
                self.report.write()
            raise
        finally:
            self.run_dir_lock.release()

    def _run(self, grid: Grid) -> RunReport:
        initial = get_trainable(self.model)
        if self.resume_point is not None and self.resume_point.values is not None:
            initial = self.resume_point.values
        strategy_cls, secagg_kwargs = PrivateFedAvg, {}
        if self.cfg.secure_aggregation:  # the coordinator sees only sums of the regions' updates
            strategy_cls, secagg_kwargs = SecureFedAvg, dict(workflow=SecAggWorkflow(self.cfg.secagg))
        inner = strategy_cls(
            report=self.report, min_train_regions=self.cfg.min_train_regions, connect_timeout=self.cfg.round_timeout,
            fraction_train=self.cfg.fraction_train, fraction_evaluate=self.cfg.fraction_evaluate, **secagg_kwargs,
        )
        if self.cfg.secure_aggregation:  # a resumed report keeps the earlier rounds' records
            self.report.secure_aggregation = continue_secure_aggregation(inner.describe(), self.report.secure_aggregation)
        inner.round_offset = self.start_round
        # The server optimizer steps on the aggregate of the DP releases: post-processing, no privacy cost.
        self.strategy = ServerOptimizerStrategy(inner, self.server_optimizer)
        self.grid = WatchedGrid(grid, self.cfg.regions, lookup=self.strategy.node_regions.get)
        self.report.write()
        try:
            with quiet_flower_results():  # each round's accuracy once (evaluate_round), no "Final results" dump
                result = self.strategy.start(grid=self.grid, initial_arrays=to_array_record(initial),
                                             num_rounds=self.cfg.num_server_rounds - self.start_round,
                                             timeout=self.cfg.round_timeout, evaluate_fn=self.evaluate_round)
            aborted = None
            final = from_array_record(result.arrays) if len(result.arrays) else initial
        except RunAborted as exc:
            aborted = str(exc)
            final = self._last_values(initial)
        set_trainable_values(self.model, final)
        export_model(self.run_dir, self.model, self.tokenizer)
        self.segment.update(wall_time_s=round(time.time() - self.started, 1))
        self.report.run_info.update(wall_time_s=total_wall_time(self.report),
                                    coordinator_peak_memory_mb=round(peak_memory_mb(), 1))
        released = [r.peak_memory_mb for r in self.report.regions.values() if r.peak_memory_mb]
        if released:  # a region sends its peak memory only when its policy releases train metrics
            self.report.run_info["region_peak_memory_mb"] = max(released)
        self.report.status, self.report.status_reason = run_verdict(self.report.to_dict(), aborted)
        log(INFO if not self.report.status_reason else WARNING, "run %s%s", self.report.status,
            f": {self.report.status_reason}" if self.report.status_reason else "")
        self.report.write()
        return self.report

    def _note_lost_regions(self, absolute: int) -> None:
        """Regions lost in this round (no answer within round-timeout, SuperNode gone), for the report."""
        lost = sorted({region for region, _ in self.grid.lost}) if hasattr(self, "grid") else []
        if lost:
            self.report.record_round(absolute, regions_lost=lost)
            self.grid.lost.clear()

    def _last_values(self, initial):
        found = latest_checkpoint(self.run_dir)
        return found[1] if found else initial
