"""``fedpriv simulate``: the same app, many regions, one machine.

:class:`Simulation` resolves the run config (pyproject defaults ← preset ←
``--run-config``), checks it *before* anything starts (so a typo is a one-line
error, not a failed run), writes the region shards the config asks for, starts a
private simulation SuperLink, submits the app, streams its logs, and returns the
run's real outcome. The ServerApp writes the privacy report into the run dir.
"""

from __future__ import annotations

import math
import time
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from fedpriv.core.config import APP_DIR, FedprivConfig, resolve_config
from fedpriv.core.errors import ConfigError, DataError
from fedpriv.deploy.flwr_cli import FlowerRunClient, RunOutcome
from fedpriv.privacy.secagg.identity import write_simulation_identities
from fedpriv.simulations.local_superlink import LocalSimulationSuperLink
from fedpriv.task.data import load_corpus
from fedpriv.task.partition import PARTITION_FILE, check_prepared_regions, partition_corpus, partition_spec, write_shards


def load_presets() -> dict[str, dict[str, Any]]:
    with resources.files("fedpriv.simulations").joinpath("presets.toml").open("rb") as fh:
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
    check_prepared_regions(root, cfg.regions, cfg.batch_size,
                           "lower batch-size, use fewer regions, or raise max-examples-per-region")


def detect_gpus() -> int:
    """CUDA devices visible to this machine's simulation (``CUDA_VISIBLE_DEVICES`` is honoured); 0 without torch/CUDA."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0
    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def gpus_per_region(cfg: FedprivConfig, num_gpus: int) -> float:
    """The GPU share each region's ClientApp actor asks Ray for.

    Without GPUs: 0 (an actor asking for a GPU Ray does not have would never be
    scheduled). With ``sim-gpus-per-region`` set: that share, if the machine has it.
    Auto (0): the regions spread evenly over the GPUs -- ``k = ceil(regions / gpus)``
    regions per GPU, each asking for ``1/k`` (rounded down to Ray's 1e-4 resource
    unit, so ``k`` shares fit on one GPU) -- so all regions train at once.
    """
    if num_gpus <= 0:
        return 0.0
    if cfg.sim_gpus_per_region > 0:
        if cfg.sim_gpus_per_region > num_gpus:
            raise ConfigError(f"sim-gpus-per-region = {cfg.sim_gpus_per_region:g}: expected at most {num_gpus} "
                              f"(the GPUs this machine has), or 0 to share them evenly")
        return float(cfg.sim_gpus_per_region)
    per_gpu = math.ceil(cfg.num_regions / num_gpus)
    return 1.0 if per_gpu == 1 else math.floor(10_000 / per_gpu) / 10_000


def federation_options(cfg: FedprivConfig, num_gpus: int) -> dict[str, Any]:
    """Flower's simulation options (``flwr run --federation-config``): one SuperNode per region and
    each ClientApp actor's Ray resources (``client-resources-num-cpus`` / ``-num-gpus``)."""
    options: dict[str, Any] = {"num-supernodes": cfg.num_regions,
                               "client-resources-num-cpus": min(cfg.num_threads, 2)}
    gpus = gpus_per_region(cfg, num_gpus)
    if gpus > 0:
        options["client-resources-num-gpus"] = gpus
    return options


def check_region_policies(cfg: FedprivConfig) -> None:
    """Every simulated region's policy (``sim-region-policy``, "" = the built-in one) loads, before anything starts."""
    from fedpriv.privacy.policy import check_simulation_policy_regions, policy_for_node

    check_simulation_policy_regions(cfg.sim_region_policy, cfg.regions)
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
        if flat["resume-from"]:  # a simulation's regions keep no ledger between runs to resume against
            raise ConfigError(f"resume-from = {flat['resume-from']!r}: only `fedpriv run --resume RUN_DIR` continues a run "
                              "(a simulation starts fresh: leave resume-from unset)")
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
        # The operator owns every simulated region: each gets a fresh identity key, all share one roster
        # (RUN_DIR/secagg-identities, keys 0600, never logged), so secure aggregation authenticates its peers.
        write_simulation_identities(self.run_dir, self.cfg.regions)
        num_gpus = detect_gpus()
        federation = federation_options(self.cfg, num_gpus)
        if num_gpus == 0 and self.cfg.sim_gpus_per_region > 0:
            print(f"fedpriv: no CUDA GPU here: sim-gpus-per-region = {self.cfg.sim_gpus_per_region:g} is ignored, "
                  "regions train on the CPU", flush=True)
        started = time.time()
        with LocalSimulationSuperLink(self.run_dir / "superlink.log") as superlink:
            client = FlowerRunClient(self.run_dir / ".flwr", superlink.address)
            run_id = client.submit(APP_DIR, run_config, federation)
            gpu_note = (f", {federation['client-resources-num-gpus']:g} of {num_gpus} GPU(s) per region"
                        if "client-resources-num-gpus" in federation else "")
            print(f"fedpriv: simulation run {run_id} submitted ({self.cfg.num_regions} regions, "
                  f"{self.cfg.num_server_rounds} rounds{gpu_note}); logs follow", flush=True)
            outcome = client.wait(run_id, stream=stream)
        return SimulationResult(outcome=outcome, run_dir=self.run_dir, wall_time_s=time.time() - started)
