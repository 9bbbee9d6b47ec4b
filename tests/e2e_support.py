"""Helpers for the end-to-end deployment tests (tests/test_deployment_e2e.py, tests/test_faults.py).

* :func:`write_region_data` - a small, learnable synthetic corpus partitioned the way
  ``fedpriv prepare-data --out DIR`` does it (no network);
* :class:`Deployment` - a real SuperLink (TLS, SuperNode authentication, Fleet-only
  gateway) and one SuperNode per region, each a separate OS process group on
  127.0.0.1 with free ports; every pid it ever had is remembered and checked to be
  gone after :meth:`Deployment.stop`, which always runs (context manager);
* :class:`FedprivRun` - ``fedpriv run ...`` as a child process in its own session,
  output to a file, killed with its group on exit.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable

import psutil

REPO = Path(__file__).resolve().parents[1]
REGIONS = ("us-east", "eu-west", "ap-south")
# Each region's own policy file (the walk-through's format, examples/region-policy.toml), relaxed only
# where the e2e runs need it: TINY runs without secure aggregation, and a fault test may spend more ε.
REGION_POLICY = """[policy]
delta = 1e-5
max-lifetime-epsilon = 100.0
max-job-epsilon = 100.0
require-dp = true
require-secure-aggregation = false
min-secagg-threshold = 0.5
allow-plain-rounds = false
allow-deterministic-noise = false
release-train-metrics = false
release-lifetime-epsilon = false
release-local-evaluation = false
"""
READY_TIMEOUT = 120.0

# The tiny model on 128 posts per region, DP on, secure aggregation off (its extra
# message stages cost minutes per round on a shared 2-core machine).
TINY = ("model='tiny' trainable='all' max-examples-per-region=128 max-server-examples=128 "
        "batch-size=16 physical-batch-size=16 learning-rate=0.5 momentum=0.9 local-epochs=1.0 "
        "fraction-evaluate=0.0 secure-aggregation=false")

POSITIVE = ["great", "good", "love", "excellent", "happy", "wonderful", "best", "enjoyed"]
NEGATIVE = ["bad", "awful", "hate", "terrible", "sad", "horrible", "worst", "boring"]
FILLER = ["the", "a", "movie", "day", "food", "service", "it", "was", "this", "really", "phone", "show"]


def write_region_data(root: Path, regions: Iterable[str] = REGIONS, n: int = 1200, seed: int = 0) -> Path:
    """``fedpriv prepare-data --out root/data`` on a synthetic corpus: regions/<r>/, server/, partition.json."""
    from fedpriv.core.config import parse_overrides, resolve_config
    from fedpriv.task.data import DOMAINS, Example
    from fedpriv.task.partition import partition_corpus, partition_spec, write_shards

    rng = random.Random(seed)
    domains = list(DOMAINS)
    corpus = []
    for i in range(n):
        label = i % 2
        words = rng.sample(FILLER, 4) + [rng.choice(POSITIVE if label else NEGATIVE)]
        rng.shuffle(words)
        rating = rng.uniform(0.6, 3.5) * (1 if label else -1)
        corpus.append(Example(id=f"syn-{i}", text=" ".join(words), label=label, domain=domains[(i // 2) % 4], rating=rating))
    overrides = parse_overrides(f"regions='{','.join(regions)}' max-examples-per-region=128 max-server-examples=128")
    _, cfg = resolve_config(overrides)
    out = root / "data"
    write_shards(partition_corpus(corpus, partition_spec(cfg)), out)
    return out


def tree_pids(pid: int | None) -> set[int]:
    if pid is None:
        return set()
    try:
        p = psutil.Process(pid)
        return {pid, *(c.pid for c in p.children(recursive=True))}
    except psutil.Error:
        return set()


def alive(pids: Iterable[int]) -> list[str]:
    out = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{pid} {' '.join(p.cmdline())[:120]}")
        except psutil.Error:
            pass
    return out


def kill_tree(pid: int) -> list[int]:
    """SIGKILL a process and all its descendants at once (a crash, not a shutdown)."""
    procs = []
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return []
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)
    return [p.pid for p in procs]


class Deployment:
    """SuperLink + registered SuperNodes for ``regions`` on 127.0.0.1; stops everything on exit.

    ``state=False`` (default) keeps the SuperLink's state in memory: its SQLite state file
    can hit "database is locked" on a machine this loaded and fail a ServerApp poll.
    """

    def __init__(self, root: Path, regions: Iterable[str] = REGIONS, state: bool = False):
        self.root = Path(root)
        self.regions = tuple(regions)
        self.state = state
        self.pids: set[int] = set()
        self.nodes: dict[str, object] = {}
        self.superlink = None

    # -- lifecycle -----------------------------------------------------------
    def __enter__(self) -> "Deployment":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        from fedpriv.deploy.certs import create_certs, create_region_key
        from fedpriv.deploy.flwr_cli import register_region, write_flwr_home
        from fedpriv.deploy.ports import free_port
        from fedpriv.deploy.superlink import SuperLinkProcess

        from fedpriv.deploy.app_signing import create_publisher_key, trust_line

        # What the walk-through does: CA + server on the coordinator, each region's key made "in" the
        # region (its own directory), only .pub files registered, and one publisher every region trusts.
        self.certs = create_certs(self.root / "certs").paths
        self.region_dirs = {}
        for region in self.regions:
            self.region_dirs[region] = create_region_key(self.root / "regions" / region, region)[0].parents[1]
            shutil.copy(self.certs.ca_cert, self.region_dirs[region] / "ca.crt")
        from fedpriv.privacy.secagg.identity import roster_line, write_identity

        pubs = [write_identity(self.region_dirs[r], r)[1] for r in self.regions]  # each region's identity key
        self.roster = self.root / "roster.txt"  # exchanged out of band: every region's identity public key
        self.roster.write_text("".join(roster_line(r, p.read_text()) for r, p in zip(self.regions, pubs)))
        self.publisher_key, publisher_pub = create_publisher_key(self.root / "publisher", "tests")
        self.trust = self.root / "trust.yaml"
        self.trust.write_text(trust_line("tests", publisher_pub.read_text()))
        self.policy = self.root / "region-policy.toml"
        self.policy.write_text(REGION_POLICY)
        self.data = write_region_data(self.root, self.regions)
        self.superlink = SuperLinkProcess(
            self.certs.root, host="127.0.0.1", port=free_port(), control_port=free_port(),
            state_file=self.root / "state.db" if self.state else None, log_file=self.root / "superlink.log",
            flwr_home=self.root / "apps" / "superlink",
        )
        self.superlink.start()
        self.snapshot()
        self.superlink.wait_ready(READY_TIMEOUT)
        self.snapshot()
        self.flwr_home = self.root / "flwr-home"
        write_flwr_home(self.flwr_home, self.superlink.control_address, self.certs.ca_cert)
        for region in self.regions:  # what `fedpriv register` does
            register_region(region, self.region_dirs[region] / "regions" / f"{region}.pub", self.flwr_home,
                            self.superlink.control_address, self.certs.ca_cert)
        for region in self.regions:
            self.start_node(region, wait=False)
        for region in self.regions:
            self.nodes[region].wait_ready(READY_TIMEOUT)  # type: ignore[attr-defined]
        self.snapshot()

    def start_node(self, region: str, wait: bool = True) -> None:
        from fedpriv.deploy.ports import free_port
        from fedpriv.deploy.supernode import SuperNodeProcess

        node = SuperNodeProcess(
            region, self.data, self.region_dirs[region], self.superlink.fleet_address, free_port(),  # type: ignore[union-attr]
            log_file=self.root / f"supernode-{region}.log", flwr_home=self.root / "apps" / region, trust_file=self.trust,
            policy_file=self.policy, roster_file=self.roster,
        )
        self.nodes[region] = node
        node.start()
        self.snapshot()
        if wait:
            node.wait_ready(READY_TIMEOUT)

    def snapshot(self) -> None:
        for group in [self.superlink, *self.nodes.values()]:
            if group is None:
                continue
            for mp in group.procs:  # type: ignore[attr-defined]
                self.pids |= tree_pids(mp.pid)

    def node_pids(self, region: str) -> set[int]:
        """The region's SuperNode, its verifying SuperExec (which starts the ClientApps), and their children."""
        return set().union(*(tree_pids(p.pid) for p in self.nodes[region].procs))  # type: ignore[attr-defined]

    def crash_node(self, region: str) -> list[int]:
        """SIGKILL a region's SuperNode, its SuperExec and everything they started (its running ClientApp included)."""
        self.snapshot()
        return [pid for p in self.nodes[region].procs for pid in kill_tree(p.pid)]  # type: ignore[attr-defined]

    def stop(self) -> None:
        self.snapshot()
        errors = []
        for group in [*self.nodes.values(), self.superlink]:
            if group is None:
                continue
            try:
                group.stop(grace=5.0)  # type: ignore[attr-defined]
            except Exception as exc:  # noqa: BLE001 - keep stopping the others
                errors.append(exc)
        deadline = time.monotonic() + 15
        while alive(self.pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in self.pids:  # belt and braces: a test must never leave processes behind
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
        left = alive(self.pids)
        assert not left, f"leftover processes: {left}"
        if errors:
            raise errors[0]

    # -- conveniences --------------------------------------------------------
    @property
    def control(self) -> str:
        return self.superlink.control_address  # type: ignore[union-attr]

    def run_args(self, run_dir: Path, config: str, *extra: str) -> list[str]:
        return ["run", "--superlink", self.control, "--certs", str(self.certs.root), "--data", str(self.data),
                "--sign-key", str(self.publisher_key), "--run-dir", str(run_dir), "--run-config", config, *extra]


class FedprivRun:
    """``python -m fedpriv ARGS`` in its own session; output to ``log``; always killed with its group."""

    def __init__(self, args: list[str], log: Path):
        self.args, self.log = args, Path(log)
        self.proc: subprocess.Popen | None = None
        self.pids: set[int] = set()
        self.started = 0.0

    def __enter__(self) -> "FedprivRun":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.log, "w", encoding="utf-8")  # noqa: SIM115
        env = dict(os.environ, FLWR_DISABLE_UPDATE_CHECK="1", FLWR_TELEMETRY_ENABLED="0", PYTHONUNBUFFERED="1")
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "fedpriv", *self.args], cwd=str(REPO), env=env,
                                     stdin=subprocess.DEVNULL, stdout=self._fh, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.pids |= tree_pids(self.proc.pid)
        return self

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.pids |= tree_pids(self.proc.pid)
            time.sleep(1.0)
        if self.proc.poll() is None:
            raise TimeoutError(f"fedpriv {' '.join(self.args[:1])} did not finish within {timeout:.0f}s; "
                               f"last output:\n{self.tail()}")
        return self.proc.returncode

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.output().splitlines()[-n:])

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.pids |= tree_pids(self.proc.pid)
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait(timeout=10)
        for pid in self.pids - ({self.proc.pid} if self.proc else set()):
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
        self._fh.close()


def wait_for(predicate, timeout: float, what: str, poll: float = 1.0, run: FedprivRun | None = None):
    """Poll ``predicate``; give up after ``timeout`` or as soon as ``run`` has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if run is not None and run.proc is not None and run.proc.poll() is not None:
            raise AssertionError(f"fedpriv exited with status {run.proc.returncode} while waiting for {what}:\n{run.tail()}")
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
