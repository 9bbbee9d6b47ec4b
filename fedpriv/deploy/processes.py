"""Start, watch and stop a child process tree: the one process toolkit of every fedpriv command.

* :func:`child_env` / :func:`flower_executable` - how a Flower child is started (no phoning
  home, this interpreter's scripts first on PATH).
* :class:`ManagedProcess` - one child in its own session (``start_new_session=True``) whose
  output a thread pumps into a :class:`LogSink` (a log file and/or the console) and scans for
  markers (readiness, known failures); :class:`ProcessGroup` - children started and stopped together.
* :func:`stop_process_tree` - the one stopper: SIGTERM to the process group, SIGKILL after a
  grace period, and also the descendants that left the group (Flower starts
  ``flower-superexec`` in a new session, Ray its own daemons).
* :func:`exit_message` - one line saying why a child exited, from its last meaningful output.
* :func:`install_stop_handlers` turns SIGINT/SIGTERM/SIGHUP into :class:`StopRequested` so
  that cleanup runs whichever way a command is stopped; :func:`run_in_foreground` is the
  loop of ``fedpriv superlink`` / ``fedpriv supernode``.

What the children are lives elsewhere: :mod:`fedpriv.deploy.superlink`,
:mod:`fedpriv.deploy.supernode`, :mod:`fedpriv.deploy.flwr_cli` (the ``flwr`` CLI) and
:mod:`fedpriv.simulations.local_superlink`.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Callable

from fedpriv.core.errors import FedprivError

STOP_GRACE = 10.0

# Children never phone home: no update check, no Flower telemetry (set them in the
# environment yourself to override).
CHILD_ENV_DEFAULTS = {"FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


def child_path(path: str | None = None) -> str:
    """``PATH`` for a Flower child: this interpreter's scripts directory first, then ``path`` (default ours).

    Flower's processes start each other by name (``flower-superexec``, ``flwr-serverapp``,
    ``flwr-clientapp``...): with the scripts installed beside this interpreter first they are
    found - and are the pinned ones - also when the virtualenv is not activated.
    """
    bindir = os.path.dirname(sys.executable)
    parts = [p for p in (os.environ.get("PATH", "") if path is None else path).split(os.pathsep) if p and p != bindir]
    return os.pathsep.join([bindir, *parts])


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a Flower child: ours, no phoning home, and :func:`child_path` as ``PATH``.

    Only the children's environment changes, never this process's.
    """
    env = dict(os.environ)
    for k, v in CHILD_ENV_DEFAULTS.items():
        env.setdefault(k, v)
    env["PATH"] = child_path(env.get("PATH", ""))
    env.update(extra or {})
    return env


def flower_executable(name: str) -> str:
    """``flower-superlink``, ``flwr`` etc., found where a Flower child would find it (:func:`child_path`)."""
    found = shutil.which(name, path=child_path())
    if not found:
        raise FedprivError(f"{name} not found: install fedpriv's dependencies (flwr) in this environment")
    return found


# ---------------------------------------------------------------------------
# One child process with a log pump
# ---------------------------------------------------------------------------


class ManagedProcess:
    """A child in its own session whose output is pumped to a log and scanned."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log: "LogSink",
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

    def wait_exit(self, timeout: float | None = None) -> None:
        """Wait for the child to exit and its last output to be pumped (so :func:`exit_message` sees it)."""
        if self.proc is not None:
            self.proc.wait(timeout=timeout)
        if self._thread is not None:
            self._thread.join(timeout=5)

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
                _kill_hard(proc, pgid)
        _killpg(pgid, signal.SIGKILL)  # anything left in the group (no-op if empty)
        _terminate_all(strays, grace=min(grace, 5.0))
        return proc.returncode
    finally:
        if shield:
            _stop_requested.clear()


def _kill_hard(proc: subprocess.Popen, pgid: int) -> None:
    """SIGKILL the group, then wait. Seen once in the test suite on a loaded machine: a ``flower-superlink`` that
    outlived SIGTERM's grace was still not reaped 10 s after SIGKILL, and the stop ended in a traceback. A stop
    must never do that: a child still there is named in one line and left to the OS."""
    _killpg(pgid, signal.SIGKILL)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        name = Path(str(proc.args[0] if isinstance(proc.args, (list, tuple)) else proc.args)).name
        print(f"fedpriv: warning: {name} (pid {proc.pid}) did not exit 10 s after SIGKILL; left to the OS",
              file=sys.stderr, flush=True)


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


class LogSink:
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


class ProcessGroup:
    """Shared lifecycle of one or more :class:`ManagedProcess` (context manager)."""

    procs: list[ManagedProcess]
    log: LogSink

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
# Failure messages
# ---------------------------------------------------------------------------

_NOISE = ("INFO", "Shutting down", "Waiting for application", "Application shutdown", "Finished server process", "For more information")


def meaningful_line(lines: list[str]) -> str | None:
    for line in reversed(lines):
        s = line.strip()
        if s and not any(n in s for n in _NOISE) and not set(s) <= set("─│╭╮╰╯ "):
            return _strip_ansi(s)[:300]
    return None


def _strip_ansi(s: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", s)


def exit_message(p: ManagedProcess, port_flags: str = "--port/--control-port") -> str:
    """One line on why ``p`` exited; a port clash names ``port_flags``, the options of the command that can change it."""
    if p._thread is not None:
        p._thread.join(timeout=2)
    line = meaningful_line(p.last_lines())
    code = p.returncode()
    msg = f"{p.name} exited with status {code}"
    if line:
        msg += f": {line}"
    if any("address already in use" in x.lower() for x in p.last_lines()):
        msg += f" (a port is already in use: pass {port_flags} with free ports)"
    return msg


def last_line_hint(procs: list[ManagedProcess]) -> str:
    for p in procs:
        line = meaningful_line(p.last_lines(20))
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


def run_in_foreground(command: str, group: ProcessGroup, watch: Callable[[], None]) -> int:
    """Start ``group`` and run ``watch`` (which loops until a child fails) until a stop signal; then stop the tree.

    The loop of ``fedpriv superlink`` / ``fedpriv supernode``: SIGINT, SIGTERM or SIGHUP print one
    ``fedpriv COMMAND: SIGNAL: stopping`` line and return 0; a second signal cannot interrupt the
    cleanup; whatever ``watch`` raises (a one-line :class:`FedprivError`) propagates after the stop.
    """
    old = install_stop_handlers()
    try:
        group.start()
        watch()
        return 0
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGHUP as StopRequested
        print(f"fedpriv {command}: {exc if isinstance(exc, StopRequested) else 'SIGINT'}: stopping", flush=True)
        return 0
    finally:
        ignore_stop_signals()  # a second Ctrl-C must not interrupt the cleanup
        try:
            group.stop()
        finally:
            restore_handlers(old)
