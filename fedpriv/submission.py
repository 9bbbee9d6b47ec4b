"""Submitting the fedpriv app to a SuperLink and waiting for the *real* outcome.

Both ``fedpriv simulate`` (a local simulation SuperLink) and ``fedpriv run`` (a
deployed one, over TLS) go through :class:`FlowerRunClient`, a thin wrapper
over Flower's own ``flwr run`` / ``flwr log`` / ``flwr ls`` / ``flwr stop``.
It exists because ``flwr run --stream`` exits 0 even when the run failed: the
run's final status is read back from the SuperLink and turned into an exit code.

The SuperLink connection lives in a fedpriv-owned ``FLWR_HOME`` (a
``config.toml`` with one named connection) so a user's own Flower config is never
touched.

``fedpriv run`` submits a *signed* bundle (``sign_key``): the FAB is built from the
app directory with Flower's own builder, signed with the publisher key
(:mod:`fedpriv.deploy.app_signing`), and those exact bytes are submitted
(:mod:`fedpriv.deploy.signed_run`); regions refuse anything else. A simulation has
no SuperNodes and submits unsigned.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import tomli_w

from fedpriv.deploy.processes import child_env, flower_executable, stop_process_tree
from fedpriv.core.errors import FedprivError

CONNECTION = "fedpriv"


@dataclass(frozen=True)
class RunOutcome:
    run_id: int
    status: str
    details: str

    @property
    def succeeded(self) -> bool:
        return self.status == "finished:completed"


class FlowerRunClient:
    """Talks to one SuperLink through the ``flwr`` CLI with a private FLWR_HOME."""

    def __init__(self, flwr_home: Path, address: str, root_certificates: Path | None = None):
        self.flwr_home = Path(flwr_home).resolve()
        self.address = address
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        connection: dict[str, Any] = {"address": address}
        if root_certificates is None:
            connection["insecure"] = True
        else:
            connection["root-certificates"] = str(Path(root_certificates).resolve())
        config = {"superlink": {"default": CONNECTION, CONNECTION: connection}}
        (self.flwr_home / "config.toml").write_text(tomli_w.dumps(config))

    @property
    def env(self) -> dict[str, str]:
        return child_env({"FLWR_HOME": str(self.flwr_home), "FLWR_DISABLE_UPDATE_CHECK": "1"})

    def _flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([flower_executable("flwr"), *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def submit(self, app_dir: Path, run_config: Mapping[str, Any], federation_config: Mapping[str, Any] | None = None,
               sign_key: Path | None = None) -> int:
        """Submit the app with a full run config (written as TOML, so any string value is safe).

        With ``sign_key`` (a publisher's Ed25519 key) the bundle is signed first.
        """
        config_file = self.flwr_home / "run_config.toml"
        config_file.write_text(tomli_w.dumps(dict(run_config)))
        args = ["run", str(app_dir), CONNECTION, "--run-config", str(config_file), "--format", "json"]
        if federation_config:
            args += ["--federation-config", " ".join(f"{k}={_toml_value(v)}" for k, v in federation_config.items())]
        try:
            if sign_key is not None:
                fab = self.write_signed_bundle(app_dir, sign_key)
                proc = subprocess.run([sys.executable, "-m", "fedpriv.deploy.signed_run", str(fab), *args], env=self.env,
                                      capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
            else:
                proc = self._flwr(*args, timeout=300)
        except subprocess.TimeoutExpired:
            raise FedprivError(f"submitting the run to the SuperLink at {self.address} did not finish within 300s") from None
        payload = _json_tail(proc.stdout)
        if not payload.get("success") or "run-id" not in payload:
            message = payload.get("error-message") or proc.stderr.strip() or proc.stdout.strip()
            raise FedprivError(f"the SuperLink at {self.address} refused the run: {_last_line(message)}")
        return int(payload["run-id"])

    def write_signed_bundle(self, app_dir: Path, sign_key: Path) -> Path:
        """Build the FAB of ``app_dir`` as ``flwr run`` would, sign it, write it to FLWR_HOME/signed-app.fab."""
        from flwr.cli.build import build_fab_from_disk

        from fedpriv.deploy.app_signing import load_publisher_key, sign_bundle

        key = load_publisher_key(sign_key)
        fab = self.flwr_home / "signed-app.fab"
        fab.write_bytes(sign_bundle(build_fab_from_disk(Path(app_dir)), key))
        return fab

    def status(self, run_id: int) -> RunOutcome:
        try:
            proc = self._flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json", timeout=60)
        except subprocess.TimeoutExpired:
            return RunOutcome(run_id, "unknown", "`flwr ls` did not answer within 60s")
        payload = _json_tail(proc.stdout)
        runs = payload.get("runs") or []
        if not payload.get("success") or not runs:
            return RunOutcome(run_id, "unknown", _last_line(payload.get("error-message", proc.stderr)))
        return RunOutcome(run_id, str(runs[0].get("status")), str(runs[0].get("status-details", "")))

    def wait(self, run_id: int, stream: bool = True, poll_s: float = 5.0, timeout_s: float | None = None,
             unreachable_s: float = 90.0) -> RunOutcome:
        """Stream the run's logs until it finishes; Ctrl-C or SIGTERM (``StopRequested``, a
        ``KeyboardInterrupt``) stops the run on the SuperLink too.

        Returns ``finished:timeout`` (after stopping the run) once ``timeout_s`` has passed, and
        status ``unknown`` when the SuperLink has not answered for ``unreachable_s`` (it died).
        """
        log_proc = None
        if stream:
            log_proc = subprocess.Popen([flower_executable("flwr"), "log", str(run_id), CONNECTION, "--stream"], env=self.env,
                                        stdin=subprocess.DEVNULL, stdout=sys.stdout, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        started = time.monotonic()
        last_answer = started
        try:
            while True:
                outcome = self.status(run_id)
                if outcome.status.startswith("finished"):
                    time.sleep(poll_s)  # let the log stream print the run's last lines
                    return outcome
                now = time.monotonic()
                if outcome.status != "unknown":
                    last_answer = now
                elif now - last_answer > unreachable_s:
                    return RunOutcome(run_id, "unknown", f"the SuperLink at {self.address} stopped answering "
                                                         f"({outcome.details})")
                if timeout_s is not None and now - started > timeout_s:
                    self.stop(run_id)
                    return RunOutcome(run_id, "finished:timeout", f"no result after {timeout_s:.0f}s (--timeout)")
                time.sleep(poll_s)
        except KeyboardInterrupt:
            self.stop(run_id)
            raise
        finally:
            if log_proc is not None:
                stop_process_tree(log_proc)

    def stop(self, run_id: int) -> None:
        try:
            self._flwr("stop", str(run_id), CONNECTION, timeout=60)
        except subprocess.TimeoutExpired:
            pass


def _toml_value(value: Any) -> str:
    return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()


def _json_tail(text: str) -> dict[str, Any]:
    """``flwr --format json`` prints one JSON object, sometimes after warning lines."""
    start = text.find("{")
    if start < 0:
        return {}
    try:
        return json.loads(text[start:])
    except json.JSONDecodeError:
        return {}


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no message"
