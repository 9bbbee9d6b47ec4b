"""A private, throw-away simulation SuperLink for one ``fedpriv simulate`` call.

``flwr run`` would start a shared local SuperLink that installs the app's
dependencies with ``uv sync`` at run time (here: a multi-GB CUDA torch). fedpriv
starts its own instead — simulation mode, runtime installation disabled, free
loopback ports, state in memory — and always stops it with everything it started
(its SuperExec, the simulation and Ray's processes: :func:`stop_process_tree`),
also on failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx

from fedpriv.deploy.ports import free_port
from fedpriv.deploy.processes import STOP_GRACE, child_env, flower_executable, stop_process_tree
from fedpriv.core.errors import FedprivError


class LocalSimulationSuperLink:
    def __init__(self, log_file: Path, host: str = "127.0.0.1"):
        self.host = host
        self.port = free_port(host)
        self.log_file = Path(log_file)
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [flower_executable("flower-superlink"), "--insecure", "--simulation", "--disable-runtime-dependency-installation",
                "--isolation", "subprocess", "--database", ":flwr-in-memory:",
                "--host", self.host, "--port", str(self.port)]

    def start(self, timeout: float = 60.0) -> "LocalSimulationSuperLink":
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        env = child_env({"FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_DEDUP_LOGS": "1"})
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        try:
            self._wait_ready(timeout)
        except BaseException:  # not ready, or stopped while starting: nothing may outlive this call
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise FedprivError(f"the simulation SuperLink exited with code {self.process.returncode}; see {self.log_file}")
            try:
                if httpx.get(f"http://{self.address}/health", timeout=1.0).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise FedprivError(f"the simulation SuperLink did not become ready in {timeout:.0f}s; see {self.log_file}")

    def stop(self, grace: float = STOP_GRACE) -> None:
        if self.process is not None:
            stop_process_tree(self.process, grace)

    def __enter__(self) -> "LocalSimulationSuperLink":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
