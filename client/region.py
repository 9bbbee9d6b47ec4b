"""Everything one region does in a round, without Flower in the way.

A region is identified by its node config: ``region`` and ``data-path`` in a real
deployment (``fedpriv supernode`` sets them, with the region's own ``max-epsilon``
and ledger), or ``partition-id`` in a simulation (mapped to the run's ``regions``
list, data under ``data-dir``). The region only ever reads its own shard.

Privacy bookkeeping lives in the region's durable ledger (``privacy/ledger.py``),
not in Flower's per-run state: the run's history (for composing ε across rounds,
also across a coordinator restart) is the ledger's releases for this job, and the
budget cap is checked against the whole ledger — every run that ever used this
data. A release is recorded *before* the update leaves the region.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from client.device import select_device
from client.trainer import LocalTrainer, TrainResult, choose_noise_multiplier, region_schedule
from fedpriv.config import FedprivConfig
from fedpriv.errors import BudgetExhausted, ConfigError
from privacy.accountant import epsilon_of
from privacy.ledger import PrivacyLedger, Release, default_ledger_path
from task.encoding import encode
from task.features import FeatureDataset, SplitClassifier, cache_key, evaluate_top
from task.model import build_model, load_tokenizer, set_trainable_values
from task.partition import load_region, region_dir


@dataclass(frozen=True)
class RegionIdentity:
    name: str
    index: int
    data_root: Path
    ledger_path: Path
    max_epsilon: float  # 0 = no cap


def identify_region(node_config: Mapping[str, Any], cfg: FedprivConfig) -> RegionIdentity:
    """Which region this process serves, and its own budget settings, from the SuperNode's node config.

    In a deployment the cap and the ledger location come *only* from the region's
    node config: the coordinator's run config cannot raise a region's budget.
    """
    if "region" in node_config:
        name = str(node_config["region"])
        if name not in cfg.regions:
            raise ConfigError(f"region {name!r} is not in the run's regions {', '.join(cfg.regions)}")
        root = Path(str(node_config.get("data-path", cfg.data_dir)))
        ledger = Path(str(node_config["ledger-path"])) if node_config.get("ledger-path") else default_ledger_path(region_dir(root, name))
        return RegionIdentity(name, cfg.regions.index(name), root, ledger, float(node_config.get("max-epsilon", 0.0)))
    pid = int(node_config.get("partition-id", -1))
    if not 0 <= pid < cfg.num_regions:
        raise ConfigError(f"partition-id {pid} has no region: the run names {cfg.num_regions} regions "
                          f"({', '.join(cfg.regions)}); start as many simulated nodes")
    name = cfg.regions[pid]
    ledger_dir = Path(cfg.sim_ledger_dir) if cfg.sim_ledger_dir else Path(cfg.run_dir) / "ledgers"
    return RegionIdentity(name, pid, cfg.data_dir, ledger_dir / f"{name}.sqlite", cfg.sim_max_epsilon)


@dataclass
class RoundOutcome:
    result: TrainResult
    epsilon: float            # cumulative over this job's rounds
    lifetime_epsilon: float   # over every release in the region's ledger
    history: list[tuple[float, float, int]]
    steps: int


class RegionRuntime:
    """Loads the region's shard and the shared model; trains and evaluates the global model."""

    def __init__(self, cfg: FedprivConfig, identity: RegionIdentity):
        self.cfg = cfg
        self.identity = identity
        self.device = select_device(cfg.num_threads)
        self.tokenizer = load_tokenizer()
        self.shard = load_region(identity.data_root, identity.name)
        self.split = SplitClassifier(build_model(cfg.model, cfg.trainable, cfg.seed, cfg.pooling, cfg.lora_rank), cfg.trainable)

    def round_seed(self, server_round: int) -> int:
        """Distinct, reproducible randomness per (run seed, region, round)."""
        return int(np.random.SeedSequence([self.cfg.seed, self.identity.index, server_round]).generate_state(1)[0])

    def _features(self, split_name: str) -> FeatureDataset:
        examples = self.shard.train if split_name == "train" else self.shard.test
        data = encode(examples, self.tokenizer, self.cfg.max_length)
        shard_file = region_dir(self.identity.data_root, self.identity.name) / f"{split_name}.jsonl"
        key = cache_key(self.cfg.model, self.cfg.trainable, self.cfg.pooling, self.cfg.max_length, self.cfg.seed, shard_file)
        cache_dir = shard_file.parent / ".fedpriv-cache"
        try:
            return self.split.features(data, self.device, (cache_dir, key))
        except OSError:  # a read-only data dir: compute without caching
            return self.split.features(data, self.device)

    def train(self, global_values: dict[str, np.ndarray], server_round: int, job_id: str, attempt_id: str) -> RoundOutcome:
        """Check the budget, train, record the release, and only then hand the update back."""
        schedule = region_schedule(len(self.shard.train), self.cfg)
        with PrivacyLedger(self.identity.ledger_path) as ledger:
            sigma = self._noise_multiplier(ledger, schedule, job_id)
        release = Release(run_id=f"{job_id}/{attempt_id}", round=server_round, steps=schedule.steps_per_round,
                          sample_rate=schedule.sample_rate, noise_multiplier=sigma,
                          max_grad_norm=self.cfg.max_grad_norm, delta=self.cfg.delta, accountant=self.cfg.accountant)
        with PrivacyLedger(self.identity.ledger_path) as ledger:
            if ledger.get(release.run_id, server_round) is not None:
                raise BudgetExhausted(f"round {server_round} of this run was already released once; "
                                      "training it again would be a second, unaccounted release")
            self._check_budget(ledger, release)
            job_history = [r.history_entry for r in ledger.releases() if r.run_id.split("/")[0] == job_id]
            set_trainable_values(self.split.model, global_values)
            trainer = LocalTrainer(self.split, self._features("train"), self.cfg, self.device)
            result = trainer.train(job_history, sigma, seed=self.round_seed(server_round), label=self.identity.name)
            decision = ledger.reserve(release, self._cap(), self.cfg.delta, self.cfg.accountant)
            if not decision.allowed:  # another process spent the budget meanwhile: do not release
                raise BudgetExhausted(decision.reason)
            history = job_history + [release.history_entry]
            lifetime = ledger.epsilon(self.cfg.delta, self.cfg.accountant) if self.cfg.dp else math.inf
        epsilon = epsilon_of(history, self.cfg.delta, self.cfg.accountant) if self.cfg.dp else math.inf
        return RoundOutcome(result, epsilon, lifetime, history, sum(h[2] for h in history))

    def _noise_multiplier(self, ledger: PrivacyLedger, schedule, job_id: str) -> float:
        """σ is fixed for a job: planned once for the whole schedule, then read back from the ledger."""
        if not self.cfg.dp:
            return 0.0
        for release in ledger.releases():
            if release.run_id.split("/")[0] == job_id and release.sample_rate == schedule.sample_rate \
                    and release.steps == schedule.steps_per_round:
                return release.noise_multiplier
        return choose_noise_multiplier(schedule, self.cfg)

    def _cap(self) -> float:
        return self.identity.max_epsilon if self.identity.max_epsilon > 0 else math.inf

    def _check_budget(self, ledger: PrivacyLedger, release: Release) -> None:
        if not self.cfg.dp or self.identity.max_epsilon <= 0:
            return
        decision = ledger.check_budget(self._cap(), release, self.cfg.delta, self.cfg.accountant)
        if not decision.allowed:
            raise BudgetExhausted(decision.reason)

    def evaluate(self, global_values: dict[str, np.ndarray]) -> tuple[float, float, int]:
        set_trainable_values(self.split.model, global_values)
        data = self._features("test")
        loss, accuracy = evaluate_top(self.split.top, data, self.device)
        return loss, accuracy, len(data)
