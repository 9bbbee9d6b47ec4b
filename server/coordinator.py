"""The coordinator's side of a run: model, strategy, evaluation, checkpoints, report.

:class:`Coordinator` is what the ServerApp runs. It owns the run's
:class:`~privacy.report.RunReport` and writes it after every round, so a crash or
a lost region never loses what was already learned and spent.
"""

from __future__ import annotations

import time
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from client.device import select_device
from client.trainer import peak_memory_mb
from fedpriv.config import FedprivConfig
from privacy.report import RunReport
from server.checkpoints import export_model, latest_checkpoint, save_checkpoint
from server.evaluation import CentralEvaluator
from strategies.private_fedavg import PrivateFedAvg, RunAborted
from strategies.secure_fedavg import SecureFedAvg
from task.model import build_model, count_trainable, from_array_record, get_trainable, load_tokenizer, set_trainable_values, to_array_record
from task.features import SplitClassifier
from task.partition import read_partition_stats


class Coordinator:
    def __init__(self, cfg: FedprivConfig, flat_config: dict[str, Any], run_id: str = ""):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.device = select_device(cfg.num_threads)
        self.tokenizer = load_tokenizer()
        self.model = build_model(cfg.model, cfg.trainable, cfg.seed, cfg.pooling)
        self.evaluator = CentralEvaluator(SplitClassifier(self.model, cfg.trainable), self.tokenizer, cfg.data_dir,
                                          cfg.max_length, self.device)
        self.report = self._new_report(flat_config, run_id)

    def _new_report(self, flat_config: dict[str, Any], run_id: str) -> RunReport:
        report = RunReport(self.run_dir, flat_config, self.cfg.accountant, self.cfg.delta, list(self.cfg.regions))
        report.run_id = run_id
        report.partition = read_partition_stats(self.cfg.data_dir)
        for rec in report.regions.values():
            rec.target_epsilon = self.cfg.target_epsilon if self.cfg.dp and self.cfg.noise_multiplier == 0 else None
        report.run_info = {"model": self.cfg.model, "trainable": self.cfg.trainable, "pooling": self.cfg.pooling,
                           "trainable_params": count_trainable(self.model), "device": str(self.device),
                           "server_test_examples": self.evaluator.size, "dp": self.cfg.dp}
        return report

    def evaluate_round(self, server_round: int, arrays) -> MetricRecord:
        """Central evaluation + checkpoint + report, after every round (and once before round 1)."""
        values = from_array_record(arrays)
        loss, accuracy = self.evaluator(values)
        absolute = server_round + self.strategy.round_offset
        if server_round > 0:
            save_checkpoint(self.run_dir, absolute, values)
        if server_round > 0 or self.strategy.round_offset == 0:
            self.report.record_round(absolute, accuracy=accuracy, loss=loss)
        self.report.write()
        log(INFO, "round %d: global model on %d held-out posts: accuracy %.4f, loss %.4f",
            absolute, self.evaluator.size, accuracy, loss)
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    def run(self, grid: Grid) -> RunReport:
        started = time.time()
        initial = get_trainable(self.model)
        strategy_cls, secagg_kwargs = PrivateFedAvg, {}
        if self.cfg.secure_aggregation:  # the coordinator sees only sums of the regions' updates
            strategy_cls, secagg_kwargs = SecureFedAvg, dict(
                threshold=self.cfg.secagg_threshold, neighbours=self.cfg.secagg_neighbours,
                clip_range=self.cfg.secagg_clip_range, quant_bits=self.cfg.secagg_quant_bits,
                stage_timeout=self.cfg.secagg_timeout)
        self.strategy = strategy_cls(
            report=self.report, min_train_regions=self.cfg.min_train_regions, connect_timeout=self.cfg.round_timeout,
            fraction_train=self.cfg.fraction_train, fraction_evaluate=self.cfg.fraction_evaluate, **secagg_kwargs,
        )
        if self.cfg.secure_aggregation:
            self.report.secure_aggregation = self.strategy.describe()
        self.report.write()
        try:
            result = self.strategy.start(grid=grid, initial_arrays=to_array_record(initial),
                                         num_rounds=self.cfg.num_server_rounds, timeout=self.cfg.round_timeout,
                                         evaluate_fn=self.evaluate_round)
            self.report.status = "completed"
            final = from_array_record(result.arrays) if len(result.arrays) else initial
        except RunAborted as exc:
            self.report.status = f"stopped: {exc}"
            final = self._last_values(initial)
            log(INFO, "run stopped: %s", exc)
        set_trainable_values(self.model, final)
        export_model(self.run_dir, self.model, self.tokenizer)
        self.report.run_info.update(wall_time_s=round(time.time() - started, 1),
                                    coordinator_peak_memory_mb=round(peak_memory_mb(), 1),
                                    region_peak_memory_mb=max((r.peak_memory_mb or 0 for r in self.report.regions.values()), default=0))
        self.report.write()
        return self.report

    def _last_values(self, initial):
        found = latest_checkpoint(self.run_dir)
        return found[1] if found else initial
