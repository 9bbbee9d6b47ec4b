"""The coordinator: ``flower-superlink`` on loopback only, with the Fleet-only TLS gateway in front.

``flower-superlink`` serves the Fleet, Control and Runtime APIs on one HTTPS port in flwr
1.41, and the Control API is unauthenticated in open-source Flower; so it binds to loopback
and SuperNodes reach it through :mod:`fedpriv.deploy.gateway` on the address they connect
to. ``fedpriv superlink`` runs a :class:`SuperLinkProcess` in the foreground.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from fedpriv.core.errors import FedprivError
from fedpriv.deploy.certs import CertPaths, load_server_sans
from fedpriv.deploy.paths import prepare_state_file, require_file
from fedpriv.deploy.ports import (CONTROL_PORT, FLEET_PORT, check_port_free, format_address, health_status, is_loopback,
                                  probe_host)
from fedpriv.deploy.processes import (LogSink, ManagedProcess, ProcessGroup, child_env, exit_message, flower_executable,
                                      last_line_hint)


class SuperLinkProcess(ProcessGroup):
    """``flower-superlink`` on ``control_host:control_port`` + the Fleet gateway on ``host:port``.

    ``host``/``port`` is the address SuperNodes connect to (TLS, Fleet API only).
    ``control_host`` must be a loopback address: ``flwr`` / ``fedpriv register`` /
    ``fedpriv run`` talk to ``control_host:control_port`` on the coordinator (use
    an SSH tunnel from elsewhere). ``state_file`` (SQLite) keeps registrations and
    runs across restarts; None keeps state in memory. ``flwr_home`` sets the
    children's ``FLWR_HOME`` (where submitted apps are unpacked; default ``~/.flwr``).
    """

    def __init__(
        self,
        certs_dir: str | os.PathLike,
        host: str = "127.0.0.1",
        port: int = FLEET_PORT,
        state_file: str | os.PathLike | None = None,
        log_file: str | os.PathLike | None = None,
        control_host: str = "127.0.0.1",
        control_port: int = CONTROL_PORT,
        echo: bool = False,
        flwr_home: str | os.PathLike | None = None,
    ) -> None:
        self.certs = CertPaths(Path(certs_dir).expanduser().absolute())
        self.flwr_home = Path(flwr_home).expanduser().absolute() if flwr_home else None
        self.host, self.port = host.strip("[]"), int(port)
        self.control_host, self.control_port = control_host.strip("[]"), int(control_port)
        self.state_file = Path(state_file).expanduser().absolute() if state_file else None
        self.log = LogSink(log_file, echo)
        self.procs: list[ManagedProcess] = []
        self.warnings: list[str] = []

    # -- addresses -----------------------------------------------------------
    @property
    def fleet_address(self) -> str:
        """Where SuperNodes connect (``--superlink`` of ``fedpriv supernode``)."""
        return format_address(probe_host(self.host), self.port)

    @property
    def control_address(self) -> str:
        """Control API for ``flwr`` / ``fedpriv register`` / ``fedpriv run`` (loopback)."""
        return format_address(self.control_host, self.control_port)

    # -- command lines -------------------------------------------------------
    def superlink_command(self) -> list[str]:
        c = self.certs
        argv = [
            flower_executable("flower-superlink"),
            "--ssl-ca-certfile", str(c.ca_cert),
            "--ssl-certfile", str(c.server_cert),
            "--ssl-keyfile", str(c.server_key),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--isolation", "subprocess",
            "--host", self.control_host,
            "--port", str(self.control_port),
        ]
        if self.state_file is not None:
            argv += ["--database", str(self.state_file)]
        return argv

    def gateway_command(self) -> list[str]:
        c = self.certs
        return [
            sys.executable, "-m", "fedpriv.deploy.gateway",
            "--listen-host", self.host, "--listen-port", str(self.port),
            "--upstream-host", self.control_host, "--upstream-port", str(self.control_port),
            "--certfile", str(c.server_cert), "--keyfile", str(c.server_key), "--cafile", str(c.ca_cert),
            "--parent-pid", str(os.getpid()),
        ]

    # -- lifecycle -----------------------------------------------------------
    def preflight(self) -> None:
        c = self.certs
        for path, what in ((c.ca_cert, "CA certificate"), (c.server_cert, "server certificate"), (c.server_key, "server key")):
            require_file(path, what)
        if not is_loopback(self.control_host):
            raise FedprivError(
                f"control host {self.control_host} is not a loopback address: Flower's open-source SuperLink does not "
                "authenticate its Control API, so fedpriv only binds it to 127.0.0.1/::1 (reach it through an SSH tunnel)"
            )
        if self.port == self.control_port:
            raise FedprivError(f"--port and --control-port are both {self.port}: pass different ports")
        check_port_free(self.control_host, self.control_port, "--control-port")
        check_port_free(self.host, self.port, "--port")
        if self.state_file is not None:  # the SQLite state holds runs and messages: keep it private
            prepare_state_file(self.state_file)
        if self.host not in ("0.0.0.0", "::") and self.host not in load_server_sans(c.server_cert):
            self.warnings.append(
                f"{c.server_cert} is not valid for {self.host}: SuperNodes must connect with a name it lists "
                f"({', '.join(load_server_sans(c.server_cert))}) - re-run `fedpriv certs --host NAME --force` if needed"
            )
        flower_executable("flower-superlink")

    def start(self) -> None:
        if self.procs:
            raise RuntimeError("SuperLinkProcess already started")
        self.preflight()
        self.log.open()
        env = child_env({"FLWR_HOME": str(self.flwr_home)} if self.flwr_home else None)
        self.procs = [
            ManagedProcess("superlink", self.superlink_command(), self.log, env=env),
            ManagedProcess("gateway", self.gateway_command(), self.log, env=env),
        ]
        try:
            for p in self.procs:
                p.start()
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Return once both the SuperLink and the gateway answer ``/health`` over TLS."""
        deadline = time.monotonic() + timeout
        targets = [(self.control_host, self.control_port), (probe_host(self.host), self.port)]
        for host, port in targets:
            while True:
                dead = self.exited()
                if dead is not None:
                    raise FedprivError(exit_message(dead))
                if health_status(host, port, str(self.certs.ca_cert)) == 200:
                    break
                if time.monotonic() > deadline:
                    raise FedprivError(
                        f"the SuperLink did not answer https://{format_address(host, port)}/health within {timeout:.0f}s"
                        + last_line_hint(self.procs)
                    )
                time.sleep(0.25)
