"""Everything one region does in a round, without Flower in the way.

A region is identified by its node config: ``region`` and ``data-path`` in a real
deployment (``fedpriv supernode`` sets them), or ``partition-id`` in a simulation
(mapped to the run's ``regions`` list, data under ``data-dir``). The region only
ever reads its own shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from client.device import select_device
from client.trainer import LocalTrainer, TrainResult, choose_noise_multiplier
from fedpriv.config import FedprivConfig
from fedpriv.errors import ConfigError
from privacy.accountant import RegionAccountant
from task.encoding import encode, evaluate
from task.model import build_model, load_tokenizer, set_trainable_values
from task.partition import load_region


@dataclass(frozen=True)
class RegionIdentity:
    name: str
    index: int
    data_root: Path


def identify_region(node_config: Mapping[str, Any], cfg: FedprivConfig) -> RegionIdentity:
    """Which region this process serves, from the SuperNode's node config."""
    if "region" in node_config:
        name = str(node_config["region"])
        if name not in cfg.regions:
            raise ConfigError(f"region {name!r} is not in the run's regions {', '.join(cfg.regions)}")
        root = Path(str(node_config.get("data-path", cfg.data_dir)))
        return RegionIdentity(name=name, index=cfg.regions.index(name), data_root=root)
    pid = int(node_config.get("partition-id", -1))
    if not 0 <= pid < cfg.num_regions:
        raise ConfigError(f"partition-id {pid} has no region: the run names {cfg.num_regions} regions "
                          f"({', '.join(cfg.regions)}); start as many simulated nodes")
    return RegionIdentity(name=cfg.regions[pid], index=pid, data_root=cfg.data_dir)


class RegionRuntime:
    """Loads the region's shard and the shared model; trains and evaluates the global model."""

    def __init__(self, cfg: FedprivConfig, identity: RegionIdentity):
        self.cfg = cfg
        self.identity = identity
        self.device = select_device(cfg.num_threads)
        self.tokenizer = load_tokenizer()
        self.shard = load_region(identity.data_root, identity.name)
        self.model = build_model(cfg.model, cfg.trainable, cfg.seed)

    def round_seed(self, server_round: int) -> int:
        """Distinct, reproducible randomness per (run seed, region, round)."""
        return int(np.random.SeedSequence([self.cfg.seed, self.identity.index, server_round]).generate_state(1)[0])

    def train(self, global_values: dict[str, np.ndarray], server_round: int, accountant: RegionAccountant) -> tuple[TrainResult, float]:
        set_trainable_values(self.model, global_values)
        data = encode(self.shard.train, self.tokenizer, self.cfg.max_length)
        trainer = LocalTrainer(self.model, data, self.cfg, self.device)
        sigma = choose_noise_multiplier(trainer.schedule, self.cfg) if self.cfg.dp else 0.0
        result = trainer.train(accountant.history, sigma, seed=self.round_seed(server_round), label=self.identity.name)
        epsilon = accountant.close_round(server_round, result.history, self.cfg.delta) if self.cfg.dp else float("inf")
        return result, epsilon

    def evaluate(self, global_values: dict[str, np.ndarray]) -> tuple[float, float, int]:
        set_trainable_values(self.model, global_values)
        data = encode(self.shard.test, self.tokenizer, self.cfg.max_length)
        loss, accuracy = evaluate(self.model, data, self.device)
        return loss, accuracy, len(data)
