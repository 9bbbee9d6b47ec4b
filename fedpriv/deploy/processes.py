"""Start, watch and stop the Flower processes of a deployment.

* :class:`SuperLinkProcess` - the coordinator: ``flower-superlink`` bound to
  **loopback only** (it serves the Fleet, Control and Runtime APIs on one HTTPS
  port in flwr 1.41, and the Control API is unauthenticated in open-source Flower)
  plus the Fleet-only TLS gateway (:mod:`fedpriv.deploy.ports`) on the address
  SuperNodes connect to.
* :class:`SuperNodeProcess` - one region: ``flower-supernode`` with TLS (our CA),
  SuperNode authentication (the region's key) and node config ``region`` /
  ``data-path``.
* ``flwr`` CLI helpers: :func:`write_flwr_home`, :func:`register_region`,
  :func:`list_supernodes`.

Every child runs in its own session (``start_new_session=True``) and is stopped by
:func:`stop_process_tree` - the one stopper every fedpriv command uses: SIGTERM to
the process group, then SIGKILL after a grace period, and also the descendants that
left the group (Flower starts ``flower-superexec`` in a new session, Ray its own
daemons). :func:`install_stop_handlers` turns SIGINT/SIGTERM/SIGHUP into
:class:`StopRequested` so that cleanup runs whichever way a command is stopped.
Output goes through a pipe to ``log_file`` (and the console with ``echo=True``);
readiness and failures are recognized from it.
"""

from __future__ import annotations

import collections
import http.client
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

from fedpriv.deploy.certs import CertPaths, check_region_name
from fedpriv.deploy.ports import check_port_free, format_address, free_port, is_loopback, parse_address
from fedpriv.core.errors import FedprivError

__all__ = [
    "SuperLinkProcess", "SuperNodeProcess", "free_port", "check_port_free", "resolve_region_data_dir",
    "write_flwr_home", "register_region", "list_supernodes", "FLEET_PORT", "CONTROL_PORT", "CLIENTAPPIO_PORT",
]

FLEET_PORT = 9092  # what SuperNodes connect to (the gateway)
CONTROL_PORT = 9093  # flower-superlink itself: Control + Runtime + Fleet APIs, loopback only
CLIENTAPPIO_PORT = 9094  # each SuperNode's local ClientApp IO (Runtime) API
STOP_GRACE = 10.0
FLWR_CONNECTION = "fedpriv"

# Children never phone home: no update check, no Flower telemetry (set them in the
# environment yourself to override).
CHILD_ENV_DEFAULTS = {"FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a Flower child: ours, no phoning home, and this interpreter's scripts first on PATH.

    Flower's processes start each other by name (``flower-superexec``, ``flwr-serverapp``,
    ``flwr-clientapp``...): with the scripts installed beside this interpreter first on the
    children's PATH they are found - and are the pinned ones - also when the virtualenv is not
    activated. Only the children's environment changes, never this process's.
    """
    env = dict(os.environ)
    for k, v in CHILD_ENV_DEFAULTS.items():
        env.setdefault(k, v)
    bindir = os.path.dirname(sys.executable)
    parts = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != bindir]
    env["PATH"] = os.pathsep.join([bindir, *parts])
    env.update(extra or {})
    return env


def flower_executable(name: str) -> str:
    """``flower-superlink`` etc.: next to this interpreter (venv) first, then PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if not found:
        raise FedprivError(f"{name} not found: install fedpriv's dependencies (flwr) in this environment")
    return found


def _require_file(path: Path, what: str, hint: str = "run `fedpriv certs DIR` first") -> Path:
    if not path.is_file():
        raise FedprivError(f"missing {what} {path}: {hint}")
    if not os.access(path, os.R_OK):
        raise FedprivError(f"cannot read {what} {path}: check its owner and permissions")
    return path


# ---------------------------------------------------------------------------
# One child process with a log pump
# ---------------------------------------------------------------------------


class ManagedProcess:
    """A child in its own session whose output is pumped to a log and scanned."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log: "_LogSink",
        markers: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> None:
        self.name, self.argv, self.log, self.env, self.cwd = name, argv, log, env, cwd
        self.markers = dict(markers or {})  # key -> substring to watch for
        self.seen: dict[str, str] = {}  # key -> first line that matched
        self.tail: collections.deque[str] = collections.deque(maxlen=200)
        self.proc: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def start(self) -> None:
        if self.proc is not None:
            raise RuntimeError(f"{self.name} already started")
        try:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                start_new_session=True, env=self.env, cwd=self.cwd, close_fds=True,
            )
        except OSError as exc:
            raise FedprivError(f"cannot start {self.argv[0]}: {exc.strerror or exc}") from exc
        self._thread = threading.Thread(target=self._pump, name=f"log-{self.name}", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            self.log.write(self.name, line)
            with self._cond:
                self.tail.append(line)
                for key, needle in self.markers.items():
                    if key not in self.seen and needle in line:
                        self.seen[key] = line
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_marker(self, keys: tuple[str, ...], timeout: float) -> str | None:
        """Wait until one of ``keys`` was seen (return it), the process ended, or timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for k in keys:
                    if k in self.seen:
                        return k
                left = deadline - time.monotonic()
                if left <= 0 or not self.running():
                    return None
                self._cond.wait(min(left, 0.2))

    def last_lines(self, n: int = 200) -> list[str]:
        with self._cond:
            return list(self.tail)[-n:]

    def stop(self, grace: float = STOP_GRACE) -> int | None:
        """Stop the child and everything it started (:func:`stop_process_tree`); then the log pump."""
        if self.proc is None:
            return None
        stop_process_tree(self.proc, grace)
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


def stop_process_tree(proc: subprocess.Popen, grace: float = STOP_GRACE) -> int | None:
    """Stop a child started with ``start_new_session=True`` and every process under it.

    SIGTERM to its process group, SIGKILL after ``grace``; then the descendants that left the
    group (seen before the first signal: Flower starts ``flower-superexec`` in a new session,
    which starts the ServerApp or ``flwr-simulation`` and its Ray daemons) get SIGTERM, and
    SIGKILL if they outlive a shorter grace. Safe to call twice or after the child exited.
    A stop signal arriving meanwhile does not cut it short (see :func:`install_stop_handlers`).
    """
    shield = threading.current_thread() is threading.main_thread() and not _stop_requested.is_set()
    if shield:
        _stop_requested.set()  # the handler ignores signals while the tree is being stopped
    try:
        strays = _descendants(proc.pid)
        pgid = proc.pid  # session leader: its pid is its process-group id
        if proc.poll() is None:
            _killpg(pgid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _killpg(pgid, signal.SIGKILL)
                proc.wait(timeout=10)
        _killpg(pgid, signal.SIGKILL)  # anything left in the group (no-op if empty)
        _terminate_all(strays, grace=min(grace, 5.0))
        return proc.returncode
    finally:
        if shield:
            _stop_requested.clear()


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _descendants(pid: int) -> list:
    try:
        import psutil

        return psutil.Process(pid).children(recursive=True)
    except Exception:  # noqa: BLE001 - psutil missing or process gone
        return []


def _terminate_all(procs: list, grace: float) -> None:
    if not procs:
        return
    import psutil

    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                p.terminate()
                alive.append(p)
        except psutil.Error:
            pass
    _, still = psutil.wait_procs(alive, timeout=grace)
    for p in still:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(still, timeout=5)


class _LogSink:
    """Thread-safe line sink: a log file (appended) and/or the console."""

    def __init__(self, log_file: str | os.PathLike | None, echo: bool) -> None:
        self.path = Path(log_file).expanduser().absolute() if log_file else None
        self.echo = echo
        self._lock = threading.Lock()
        self._fh: IO[str] | None = None

    def open(self) -> None:
        if self.path is not None and self._fh is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fh = open(self.path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
            except OSError as exc:
                raise FedprivError(f"cannot write log file {self.path}: {exc.strerror or exc}") from exc

    def write(self, source: str, line: str) -> None:
        with self._lock:
            if self._fh is not None:
                try:
                    self._fh.write(f"[{source}] {line}\n")
                except (OSError, ValueError):
                    pass
            if self.echo:
                try:
                    print(f"[{source}] {line}", file=sys.stderr, flush=True)
                except (OSError, ValueError):
                    pass

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


def _https_health(host: str, port: int, cafile: Path, timeout: float = 2.0) -> int | None:
    """Status of ``GET /health`` over TLS verified against ``cafile`` (None if unreachable).

    The chain is verified; the host name is not (the probe may use 127.0.0.1 for a
    wildcard bind), which is fine for a readiness check.
    """
    ctx = ssl.create_default_context(cafile=str(cafile))
    ctx.check_hostname = False
    conn = http.client.HTTPSConnection(host.strip("[]"), port, timeout=timeout, context=ctx)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def _probe_host(host: str) -> str:
    h = host.strip("[]")
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(h, h)


class _Group:
    """Shared lifecycle of one or more :class:`ManagedProcess` (context manager)."""

    procs: list[ManagedProcess]
    log: _LogSink

    def __enter__(self):  # noqa: ANN204
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def stop(self, grace: float = STOP_GRACE) -> None:
        """Stop every child (reverse start order); safe to call twice or before start."""
        try:
            for p in reversed(self.procs):
                p.stop(grace)
        finally:
            self.log.close()

    def running(self) -> bool:
        return bool(self.procs) and all(p.running() for p in self.procs)

    def exited(self) -> ManagedProcess | None:
        """The first child that has exited, if any."""
        for p in self.procs:
            if p.proc is not None and p.proc.poll() is not None:
                return p
        return None


# ---------------------------------------------------------------------------
# SuperLink
# ---------------------------------------------------------------------------


class SuperLinkProcess(_Group):
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
        self.log = _LogSink(log_file, echo)
        self.procs: list[ManagedProcess] = []
        self.warnings: list[str] = []

    # -- addresses -----------------------------------------------------------
    @property
    def fleet_address(self) -> str:
        """Where SuperNodes connect (``--superlink`` of ``fedpriv supernode``)."""
        return format_address(_probe_host(self.host), self.port)

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
            sys.executable, "-m", "fedpriv.deploy.ports", "gateway",
            "--listen-host", self.host, "--listen-port", str(self.port),
            "--upstream-host", self.control_host, "--upstream-port", str(self.control_port),
            "--certfile", str(c.server_cert), "--keyfile", str(c.server_key), "--cafile", str(c.ca_cert),
            "--parent-pid", str(os.getpid()),
        ]

    # -- lifecycle -----------------------------------------------------------
    def preflight(self) -> None:
        c = self.certs
        for path, what in ((c.ca_cert, "CA certificate"), (c.server_cert, "server certificate"), (c.server_key, "server key")):
            _require_file(path, what)
        if not is_loopback(self.control_host):
            raise FedprivError(
                f"control host {self.control_host} is not a loopback address: Flower's open-source SuperLink does not "
                "authenticate its Control API, so fedpriv only binds it to 127.0.0.1/::1 (reach it through an SSH tunnel)"
            )
        if self.port == self.control_port:
            raise FedprivError(f"--port and --control-port are both {self.port}: pass different ports")
        check_port_free(self.control_host, self.control_port, "--control-port")
        check_port_free(self.host, self.port, "--port")
        if self.state_file is not None:
            parent = self.state_file.parent
            if not parent.is_dir():
                raise FedprivError(f"directory of --state {self.state_file} does not exist: create {parent} first")
            if self.state_file.exists():
                if not os.access(self.state_file, os.R_OK | os.W_OK):
                    raise FedprivError(f"cannot read and write state file {self.state_file}: check its permissions")
            else:
                try:  # the SQLite state holds runs and messages: keep it private
                    os.close(os.open(self.state_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                except OSError as exc:
                    raise FedprivError(f"cannot create state file {self.state_file}: {exc.strerror or exc}") from exc
        from fedpriv.deploy.certs import load_server_sans

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
        targets = [(self.control_host, self.control_port), (_probe_host(self.host), self.port)]
        for host, port in targets:
            while True:
                dead = self.exited()
                if dead is not None:
                    raise FedprivError(_exit_message(dead))
                if _https_health(host, port, self.certs.ca_cert) == 200:
                    break
                if time.monotonic() > deadline:
                    raise FedprivError(
                        f"the SuperLink did not answer https://{format_address(host, port)}/health within {timeout:.0f}s"
                        + _last_line_hint(self.procs)
                    )
                time.sleep(0.25)


# ---------------------------------------------------------------------------
# SuperNode
# ---------------------------------------------------------------------------


def resolve_region_data_dir(data_dir: str | os.PathLike, region: str) -> Path:
    """A region's data directory: ``DIR`` itself if it holds ``train.jsonl``, else ``DIR/regions/<region>/``."""
    base = Path(data_dir).expanduser().absolute()
    if not base.exists():
        raise FedprivError(f"data directory {base} does not exist: pass --data with the prepared data directory")
    if not base.is_dir():
        raise FedprivError(f"--data {base} is not a directory")
    if not os.access(base, os.R_OK | os.X_OK):
        raise FedprivError(f"cannot read data directory {base}: check its owner and permissions")
    if (base / "train.jsonl").is_file():
        chosen = base
    else:
        chosen = base / "regions" / region
        if not chosen.is_dir():
            raise FedprivError(
                f"no data for region {region!r}: expected {chosen}/ or a train.jsonl directly in {base} "
                "(see `fedpriv prepare-data`)"
            )
    if not os.access(chosen, os.R_OK | os.X_OK):
        raise FedprivError(f"cannot read data directory {chosen}: check its owner and permissions")
    train = chosen / "train.jsonl"
    if not train.is_file():
        raise FedprivError(f"no train.jsonl in {chosen}: prepare the region's data there first (see `fedpriv prepare-data`)")
    if not os.access(train, os.R_OK):
        raise FedprivError(f"cannot read {train}: check its owner and permissions")
    return chosen


def check_policy_file(path: Path) -> None:
    """Fail fast on the region's privacy policy: parsed by ``fedpriv.privacy.policy`` when available, else readable."""
    if not path.is_file():
        raise FedprivError(f"missing policy file {path}: the region's privacy policy (see examples/region-policy.toml)")
    if not os.access(path, os.R_OK):
        raise FedprivError(f"cannot read policy file {path}: check its owner and permissions")
    try:
        from fedpriv.privacy.policy import load_policy
    except ImportError:
        import tomllib

        try:
            tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise FedprivError(f"policy file {path} is not valid TOML: {exc}") from None
        return
    load_policy(path)  # raises fedpriv.core.errors.ConfigError (a FedprivError) with one line


class SuperNodeProcess(_Group):
    """``flower-supernode`` for one region (TLS + SuperNode authentication) and its verifying SuperExec.

    ``data_dir`` is resolved with :func:`resolve_region_data_dir` and passed as node
    config ``data-path`` (with ``region``). ``clientappio_port`` is the SuperNode's
    local ClientApp IO (Runtime) API on 127.0.0.1; every SuperNode on a machine needs
    its own. ``flwr_home`` sets ``FLWR_HOME`` (where apps are unpacked).

    ``trust_file`` (required) lists the publisher keys whose signed bundles this
    region runs: the SuperNode runs with ``--isolation process`` and its only
    SuperExec is :mod:`fedpriv.deploy.trusted_exec`, which verifies every bundle
    against that file before installing it. ``policy_file`` (the region's privacy
    policy) is passed as node config ``policy-path`` (absolute) and validated here.
    """

    READY = "SuperNode ID:"
    FAILURES = ("refused", "tls", "badkey", "superexec")

    def __init__(
        self,
        region: str,
        data_dir: str | os.PathLike,
        certs_dir: str | os.PathLike,
        superlink_address: str,
        clientappio_port: int = CLIENTAPPIO_PORT,
        log_file: str | os.PathLike | None = None,
        echo: bool = False,
        max_retries: int | None = None,
        flwr_home: str | os.PathLike | None = None,
        ledger_path: str | os.PathLike | None = None,
        trust_file: str | os.PathLike | None = None,
        policy_file: str | os.PathLike | None = None,
    ) -> None:
        self.region = region
        self.ledger_path = Path(ledger_path).expanduser().absolute() if ledger_path else None
        self.trust_file = Path(trust_file).expanduser().absolute() if trust_file else None
        self.policy_file = Path(policy_file).expanduser().absolute() if policy_file else None
        self.flwr_home = Path(flwr_home).expanduser().absolute() if flwr_home else None
        self.data_dir_arg = data_dir
        self.data_dir: Path | None = None
        self.certs = CertPaths(Path(certs_dir).expanduser().absolute())
        self.superlink_address = superlink_address
        self.clientappio_port = int(clientappio_port)
        self.max_retries = max_retries
        self.log = _LogSink(log_file, echo)
        self.procs: list[ManagedProcess] = []
        self.warnings: list[str] = []
        self.node_id: str | None = None
        self.trusted: list[str] = []  # labels of the trusted publishers (after preflight)

    @property
    def key_file(self) -> Path:
        return self.certs.region_key(self.region)

    def node_config(self) -> str:
        """Region identity and the region's *own* settings: the coordinator cannot change these."""
        assert self.data_dir is not None
        config = f"region='{self.region}' data-path='{self.data_dir}'"
        if self.ledger_path is not None:
            config += f" ledger-path='{self.ledger_path}'"
        if self.policy_file is not None:
            config += f" policy-path='{self.policy_file}'"
        return config

    def command(self) -> list[str]:
        if self.data_dir is None:
            self.data_dir = resolve_region_data_dir(self.data_dir_arg, self.region)
        argv = [
            flower_executable("flower-supernode"),
            "--superlink", self.superlink_address,
            "--root-certificates", str(self.certs.ca_cert),
            "--auth-supernode-private-key", str(self.key_file),
            "--node-config", self.node_config(),
            "--isolation", "process",  # the ClientApp is started only by our verifying SuperExec
            "--host", "127.0.0.1",
            "--port", str(self.clientappio_port),
        ]
        if self.max_retries is not None:
            argv += ["--max-retries", str(self.max_retries)]
        return argv

    def superexec_command(self, supernode_pid: int | None = None) -> list[str]:
        """The region's SuperExec: verifies each bundle with ``trust_file`` before it is installed."""
        assert self.trust_file is not None
        argv = [
            sys.executable, "-m", "fedpriv.deploy.trusted_exec", "superexec", "--trust", str(self.trust_file),
            "--runtime-api-address", f"127.0.0.1:{self.clientappio_port}", "--insecure",
        ]
        if supernode_pid is not None:
            argv += ["--parent-pid", str(supernode_pid)]
        return argv

    def preflight(self) -> None:
        from fedpriv.deploy.app_signing import load_trust_file

        check_region_name(self.region)
        parse_address(self.superlink_address, "--superlink")
        _require_file(self.certs.ca_cert, "CA certificate", "copy ca.crt from the operator's `fedpriv certs` directory into it")
        if not self.key_file.is_file():
            known = self.certs.regions_with(".key")
            if known:
                raise FedprivError(
                    f"unknown region {self.region!r}: {self.certs.regions_dir} has keys for {', '.join(known)} "
                    f"(check --region, or run `fedpriv keygen --region {self.region} {self.certs.root}`)"
                )
            raise FedprivError(
                f"missing key {self.key_file} for region {self.region!r}: run `fedpriv keygen --region {self.region} "
                f"{self.certs.root}` here and send regions/{self.region}.pub to the operator"
            )
        _require_file(self.key_file, "SuperNode key")
        mode = os.stat(self.key_file).st_mode & 0o777
        if mode & 0o077:
            raise FedprivError(f"SuperNode key {self.key_file} is readable by other users (mode {mode:o}): chmod 600 it")
        if self.trust_file is None:
            raise FedprivError("missing --trust FILE: the publisher keys whose signed app bundles this region runs "
                               "(a region never runs unsigned code)")
        self.trusted = [t.label for t in load_trust_file(self.trust_file)]
        if self.policy_file is not None:
            check_policy_file(self.policy_file)
        self.data_dir = resolve_region_data_dir(self.data_dir_arg, self.region)
        for what, path in (("data directory", self.data_dir), ("policy file", self.policy_file)):
            if path is not None and any(ch in str(path) for ch in "'\"\n\r"):
                raise FedprivError(f"{what} {path}: quotes and newlines are not supported in the path")
        check_port_free("127.0.0.1", self.clientappio_port, "--port")
        flower_executable("flower-supernode")

    def start(self) -> None:
        if self.procs:
            raise RuntimeError("SuperNodeProcess already started")
        self.preflight()
        self.log.open()
        markers = {
            "ready": self.READY,
            "refused": "Failed to activate SuperNode",
            "tls": "CERTIFICATE_VERIFY_FAILED",
            "badkey": "Unable to parse the private key file",
        }
        env = child_env({"FLWR_HOME": str(self.flwr_home)} if self.flwr_home else None)
        node = ManagedProcess(f"supernode-{self.region}", self.command(), self.log, markers=markers, env=env)
        self.procs = [node]
        try:
            node.start()
            exec_markers = {"refused_app": "fedpriv: REFUSED app bundle:", "verified_app": "fedpriv: app bundle verified:"}
            self.procs.append(ManagedProcess(f"superexec-{self.region}", self.superexec_command(node.pid), self.log,
                                             markers=exec_markers, env=env))
            self.procs[1].start()
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, timeout: float = 60.0) -> str:
        """Return the node id once the SuperLink accepted this SuperNode; raise a one-line error otherwise."""
        p = self.procs[0]
        seen = p.wait_marker(("ready", *self.FAILURES), timeout)
        if seen == "ready":
            self.node_id = p.seen["ready"].split(self.READY, 1)[1].strip()
            return self.node_id
        if seen is not None:  # a fatal error was printed; the SuperNode is exiting
            raise FedprivError(self.failure_message())
        if not p.running():
            p.proc.wait(timeout=10)  # type: ignore[union-attr]
            if p._thread is not None:
                p._thread.join(timeout=5)
            raise FedprivError(self.failure_message())
        raise FedprivError(
            f"SuperNode {self.region} did not connect to {self.superlink_address} within {timeout:.0f}s" + _last_line_hint(self.procs)
        )

    def failure_message(self) -> str:
        """A one-line explanation of why the SuperNode exited."""
        p = self.procs[0]
        if "refused" in p.seen:
            return (
                f"the SuperLink at {self.superlink_address} refused region {self.region!r}: its public key is not registered "
                f"(on the coordinator run `fedpriv register --regions {self.region} ...`)"
            )
        if "tls" in p.seen:
            return (
                f"TLS verification of the SuperLink at {self.superlink_address} failed: its certificate is not signed by "
                f"{self.certs.ca_cert} (or not issued for that host) - use the ca.crt of the same `fedpriv certs` run"
            )
        if "badkey" in p.seen:
            return f"{self.key_file} is not a SuperNode private key (OpenSSH EC key from `fedpriv keygen --region`)"
        if len(self.procs) > 1 and self.procs[1].proc is not None and not self.procs[1].running() and p.running():
            return f"the region's verifying SuperExec stopped: {_exit_message(self.procs[1])}"
        return _exit_message(p)


# ---------------------------------------------------------------------------
# Failure messages
# ---------------------------------------------------------------------------

_NOISE = ("INFO", "Shutting down", "Waiting for application", "Application shutdown", "Finished server process", "For more information")


def _meaningful(lines: list[str]) -> str | None:
    for line in reversed(lines):
        s = line.strip()
        if s and not any(n in s for n in _NOISE) and not set(s) <= set("─│╭╮╰╯ "):
            return _strip_ansi(s)[:300]
    return None


def _strip_ansi(s: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", s)


def _exit_message(p: ManagedProcess) -> str:
    if p._thread is not None:
        p._thread.join(timeout=2)
    line = _meaningful(p.last_lines())
    code = p.returncode()
    msg = f"{p.name} exited with status {code}"
    if line:
        msg += f": {line}"
    if any("address already in use" in x.lower() for x in p.last_lines()):
        msg += " (a port is already in use: pass --port/--control-port with free ports)"
    return msg


def _last_line_hint(procs: list[ManagedProcess]) -> str:
    for p in procs:
        line = _meaningful(p.last_lines(20))
        if line:
            return f" (last {p.name} output: {line})"
    return ""


# ---------------------------------------------------------------------------
# Signals of the foreground commands
# ---------------------------------------------------------------------------


class StopRequested(KeyboardInterrupt):
    """SIGINT/SIGTERM/SIGHUP received by a foreground fedpriv command.

    A :class:`KeyboardInterrupt`, so every ``except KeyboardInterrupt`` cleanup (stop the run
    on the SuperLink, stop the process tree) handles SIGTERM as it handles Ctrl-C, and no
    ``except Exception`` swallows it. ``exit_status`` is the shell's 128 + signal number.
    """

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        super().__init__(signal.Signals(self.signum).name)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


_stop_requested = threading.Event()


def _raise_stop(signum: int, _frame: object) -> None:
    if _stop_requested.is_set():
        return  # a second signal must not interrupt the cleanup the first one started
    _stop_requested.set()
    raise StopRequested(signum)


def install_stop_handlers() -> dict:
    """Turn SIGINT/SIGTERM/SIGHUP into :class:`StopRequested` (once) and return the old handlers.

    SIGTERM is how ``timeout``, systemd, CI runners and container runtimes stop a program;
    without a handler Python dies at once and the children (in their own sessions) are left
    running. SIGINT is handled explicitly so that Ctrl-C stops the children even when the
    command was started with SIGINT ignored (e.g. as a background job of a script). The
    children run in their own sessions, so a terminal's Ctrl-C reaches only fedpriv, which
    then stops them (:func:`stop_process_tree`). Only the first signal raises: later ones are
    ignored until the handlers are installed again, so they cannot cut the cleanup short.
    Outside the main thread (where Python cannot set handlers) nothing changes and {} is returned.
    """
    if threading.current_thread() is not threading.main_thread():
        return {}
    _stop_requested.clear()
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        old[sig] = signal.signal(sig, _raise_stop)
    return old


def ignore_stop_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


def restore_handlers(old: dict) -> None:
    for sig, handler in old.items():
        if handler is not None:  # None: a handler not set from Python, which cannot be put back
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------
# flwr CLI (Control API) helpers
# ---------------------------------------------------------------------------


def write_flwr_home(flwr_home: str | os.PathLike, control_address: str, ca_cert: str | os.PathLike) -> Path:
    """Write a fedpriv-owned ``$FLWR_HOME/config.toml`` with one TLS SuperLink connection.

    Format (flwr 1.41 ``flwr/cli/flower_config.py``)::

        [superlink]
        default = "fedpriv"
        [superlink.fedpriv]
        address = "127.0.0.1:9093"
        root-certificates = "/abs/path/ca.crt"   # must be absolute

    Use it with ``FLWR_HOME=<dir> flwr supernode list`` / ``flwr run . fedpriv``.
    """
    parse_address(control_address, "--superlink")
    home = Path(flwr_home).expanduser().absolute()
    ca = Path(ca_cert).expanduser().absolute()
    home.mkdir(parents=True, exist_ok=True)
    text = (
        "# Written by fedpriv; rewritten on every `fedpriv register`.\n"
        "[superlink]\n"
        f'default = "{FLWR_CONNECTION}"\n\n'
        f"[superlink.{FLWR_CONNECTION}]\n"
        f"address = {json.dumps(control_address)}\n"
        f"root-certificates = {json.dumps(str(ca))}\n"
    )
    cfg = home / "config.toml"
    tmp = home / "config.toml.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, cfg)
    return cfg


def _run_flwr(args: list[str], flwr_home: Path, timeout: float = 60.0) -> dict:
    argv = [flower_executable("flwr"), *args, "--format", "json"]
    try:
        cp = subprocess.run(
            argv, env=child_env({"FLWR_HOME": str(flwr_home)}), stdin=subprocess.DEVNULL,
            capture_output=True, text=True, timeout=timeout, start_new_session=True,
        )
    except subprocess.TimeoutExpired:
        raise FedprivError(f"`flwr {' '.join(args[:2])}` did not finish within {timeout:.0f}s") from None
    out = cp.stdout.strip()
    start = out.find("{")
    try:
        data = json.loads(out[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        detail = _meaningful((cp.stderr or cp.stdout).splitlines()) or f"exit status {cp.returncode}"
        raise FedprivError(f"`flwr {' '.join(args[:2])}` failed: {detail}")
    return data


def diagnose_tls_endpoint(address: str, ca_cert: str | os.PathLike) -> str | None:
    """Why ``address`` cannot be used with ``ca_cert`` (None if ``/health`` answers over verified TLS)."""
    host, port = parse_address(address)
    ctx = ssl.create_default_context(cafile=str(ca_cert))
    conn = http.client.HTTPSConnection(host, port, timeout=5, context=ctx)
    try:
        conn.request("GET", "/health")
        conn.getresponse().read()
        return None
    except ssl.SSLCertVerificationError as exc:
        return (
            f"TLS verification failed ({exc.verify_message}): the SuperLink's certificate is not signed by {ca_cert} "
            "or not issued for that host"
        )
    except ConnectionRefusedError:
        return f"nothing is listening on {address}: is `fedpriv superlink` running, and is this its --control-port?"
    except (OSError, http.client.HTTPException) as exc:
        return f"cannot reach {address}: {exc}"
    finally:
        conn.close()


def _flwr_error(data: dict, control_address: str, ca_cert: str | os.PathLike | None = None) -> str:
    text = str(data.get("error-message", "unknown error"))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("Using SuperLink")]
    detail = lines[-1] if lines else text.strip()
    if "403" in text or "Forbidden" in text:
        return (
            f"{control_address} answered 403 Forbidden: that is the SuperLink's Fleet port (SuperNodes only); "
            "use its --control-port on 127.0.0.1 (default 9093)"
        )
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return f"TLS verification failed: the SuperLink's certificate is not signed by {ca_cert or 'the configured CA'}"
    if "unavailable" in text and ca_cert is not None:
        # flwr reports refused connections and TLS failures alike; find out which.
        return diagnose_tls_endpoint(control_address, ca_cert) or detail
    return detail


def register_region(
    region: str, public_key: str | os.PathLike, flwr_home: str | os.PathLike, control_address: str,
    ca_cert: str | os.PathLike | None = None,
) -> tuple[str, str | None]:
    """Register a region's ``.pub`` file; return ("registered", node_id) or ("already registered", None).

    ``public_key`` may also be a certs directory (then ``regions/<region>.pub`` in it is used).
    """
    from fedpriv.deploy.certs import load_region_public_key

    pub = Path(public_key).expanduser().absolute()
    if pub.is_dir():
        certs = CertPaths(pub)
        pub, ca_cert = certs.region_pub(region), ca_cert or certs.ca_cert
    load_region_public_key(pub, region)
    data = _run_flwr(["supernode", "register", str(pub), FLWR_CONNECTION, "--name", region], Path(flwr_home))
    if data.get("success"):
        return "registered", str(data.get("node-id"))
    if "already in use" in str(data.get("error-message", "")):
        return "already registered", None
    raise FedprivError(f"registering region {region!r} at {control_address} failed: {_flwr_error(data, control_address, ca_cert)}")


def list_supernodes(flwr_home: str | os.PathLike, control_address: str, ca_cert: str | os.PathLike | None = None) -> list[dict]:
    """``flwr supernode list`` as a list of dicts (``node-id``, ``status``: registered/online/offline/...).

    ``flwr_home`` must hold a config from :func:`write_flwr_home` for ``control_address``;
    ``ca_cert`` (that config's root certificate) is only used to explain failures.
    """
    data = _run_flwr(["supernode", "list", FLWR_CONNECTION], Path(flwr_home))
    if not data.get("success"):
        raise FedprivError(f"listing SuperNodes at {control_address} failed: {_flwr_error(data, control_address, ca_cert)}")
    return list(data.get("nodes", []))
