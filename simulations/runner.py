"""``fedpriv simulate``: the same app, many regions, one machine.

:class:`Simulation` resolves the run config (pyproject defaults ← preset ←
``--run-config``), checks it *before* anything starts (so a typo is a one-line
error, not a failed run), writes the region shards the config asks for, starts a
private simulation SuperLink, submits the app, streams its logs, and returns the
run's real outcome. The ServerApp writes the privacy report into the run dir.
"""

from __future__ import annotations

import time
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from fedpriv.config import APP_DIR, FedprivConfig, partition_spec, resolve_config
from fedpriv.errors import ConfigError, DataError
from fedpriv.submission import FlowerRunClient, RunOutcome
from simulations.local_superlink import LocalSimulationSuperLink
from task.data import load_corpus
from task.partition import PARTITION_FILE, partition_corpus, write_shards


def load_presets() -> dict[str, dict[str, Any]]:
    with resources.files("simulations").joinpath("presets.toml").open("rb") as fh:
        return tomllib.load(fh)


def preset_overrides(name: str) -> dict[str, Any]:
    presets = load_presets()
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}: expected one of {', '.join(presets)}")
    return dict(presets[name])


def prepare_shards(cfg: FedprivConfig, corpus_dir: Path) -> Path:
    """Write (once) the shards this config's partition asks for; returns their root."""
    corpus = load_corpus(corpus_dir)
    spec = partition_spec(cfg)
    root = corpus_dir / "partitions" / spec.fingerprint(len(corpus))
    if not (root / PARTITION_FILE).exists():
        write_shards(partition_corpus(corpus, spec), root)
    check_region_sizes(root, cfg)
    return root


def check_region_sizes(root: Path, cfg: FedprivConfig) -> None:
    import json

    stats = json.loads((root / PARTITION_FILE).read_text())["stats"]
    for region in cfg.regions:
        n = stats[region]["train"]
        if n < cfg.batch_size:
            raise DataError(f"region {region!r} has {n} training posts, fewer than batch-size = {cfg.batch_size}: "
                            f"expected batch-size <= {n} (lower batch-size, use fewer regions, or raise max-examples-per-region)")


def check_region_policies(cfg: FedprivConfig) -> None:
    """Every simulated region's policy (``sim-region-policy``, "" = the built-in one) loads, before anything starts."""
    from privacy.policy import policy_for_node

    for region in cfg.regions:
        policy_for_node({}, region, cfg.sim_region_policy, cfg.sim_max_epsilon)


@dataclass
class SimulationResult:
    outcome: RunOutcome
    run_dir: Path
    wall_time_s: float


class Simulation:
    def __init__(self, overrides: Mapping[str, Any] | None = None, preset: str = "default", run_dir: Path | None = None):
        flat, cfg = resolve_config(overrides, preset_overrides(preset))
        self.corpus_dir = cfg.data_dir
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.run_dir = Path(run_dir or (Path(flat["run-dir"]) if flat["run-dir"] else Path("runs") / f"sim-{stamp}")).resolve()
        self.flat = flat
        self.cfg = cfg
        check_region_policies(cfg)

    def run(self, stream: bool = True) -> SimulationResult:
        shards = prepare_shards(self.cfg, self.corpus_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        run_config = {**self.flat, "data-dir": str(shards), "run-dir": str(self.run_dir)}
        if self.flat["sim-region-policy"]:  # the ClientApps may run elsewhere: give them an absolute path
            run_config["sim-region-policy"] = str(Path(self.flat["sim-region-policy"]).expanduser().resolve())
        FedprivConfig.from_run_config(run_config)  # the apps will accept it
        federation = {"num-supernodes": self.cfg.num_regions,
                      "client-resources-num-cpus": min(self.cfg.num_threads, 2)}
        started = time.time()
        with LocalSimulationSuperLink(self.run_dir / "superlink.log") as superlink:
            client = FlowerRunClient(self.run_dir / ".flwr", superlink.address)
            run_id = client.submit(APP_DIR, run_config, federation)
            print(f"fedpriv: simulation run {run_id} submitted ({self.cfg.num_regions} regions, "
                  f"{self.cfg.num_server_rounds} rounds); logs follow", flush=True)
            outcome = client.wait(run_id, stream=stream)
        return SimulationResult(outcome=outcome, run_dir=self.run_dir, wall_time_s=time.time() - started)
