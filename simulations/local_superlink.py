"""A private, throw-away simulation SuperLink for one ``fedpriv simulate`` call.

``flwr run`` would start a shared local SuperLink that installs the app's
dependencies with ``uv sync`` at run time (here: a multi-GB CUDA torch). fedpriv
starts its own instead — simulation mode, runtime installation disabled, free
loopback ports, state in memory — with the deployment's process toolkit
(:class:`fedpriv.deploy.processes.ManagedProcess`: its own session, output pumped
to ``log_file``), and always stops it with everything it started (its SuperExec,
the simulation and Ray's processes: :func:`~fedpriv.deploy.processes.stop_process_tree`),
also on failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from fedpriv.core.errors import FedprivError
from fedpriv.deploy.ports import format_address, free_port, health_status
from fedpriv.deploy.processes import STOP_GRACE, LogSink, ManagedProcess, child_env, flower_executable


class LocalSimulationSuperLink:
    def __init__(self, log_file: Path, host: str = "127.0.0.1"):
        self.host = host
        self.port = free_port(host)
        self.log_file = Path(log_file)
        self.log = LogSink(self.log_file, echo=False)
        self.process: ManagedProcess | None = None

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)

    def command(self) -> list[str]:
        return [flower_executable("flower-superlink"), "--insecure", "--simulation", "--disable-runtime-dependency-installation",
                "--isolation", "subprocess", "--database", ":flwr-in-memory:",
                "--host", self.host, "--port", str(self.port)]

    def start(self, timeout: float = 60.0) -> "LocalSimulationSuperLink":
        self.log.open()
        env = child_env({"FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_DEDUP_LOGS": "1",
                         "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1",  # a ClientApp given no GPU sees none
                         "PYTHONWARNINGS": _quiet_ray_tip(os.environ.get("PYTHONWARNINGS", ""))})
        self.process = ManagedProcess("superlink", self.command(), self.log, env=env)
        try:
            self.process.start()
            self._wait_ready(timeout)
        except BaseException:  # not ready, or stopped while starting: nothing may outlive this call
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.process.running():
                raise FedprivError(f"the simulation SuperLink exited with code {self.process.returncode()}; see {self.log_file}")
            status = health_status(self.host, self.port, timeout=1.0)
            if status is not None and 200 <= status < 300:
                return
            time.sleep(0.3)
        raise FedprivError(f"the simulation SuperLink did not become ready in {timeout:.0f}s; see {self.log_file}")

    def stop(self, grace: float = STOP_GRACE) -> None:
        try:
            if self.process is not None:
                self.process.stop(grace)
        finally:
            self.log.close()

    def __enter__(self) -> "LocalSimulationSuperLink":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


RAY_TIP = "ignore::FutureWarning:ray._private.worker"
"""Ray's ``ray.init`` warns in every simulation that a future Ray will stop hiding GPUs from actors that asked
for none (``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO``). fedpriv keeps today's behaviour (a ClientApp given no GPU
sees none) by setting that variable to 1, so the tip is only noise to a user; only that warning, from that
module, is silenced."""


def _quiet_ray_tip(user_filters: str) -> str:
    """``PYTHONWARNINGS`` for the simulation's processes: the user's filters, then :data:`RAY_TIP`."""
    return ",".join(f for f in (user_filters, RAY_TIP) if f)
