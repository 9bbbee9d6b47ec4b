"""The ``flwr`` CLI as fedpriv uses it: one private connection file, one runner, one JSON reader.

Every talk with a SuperLink's Control API goes through Flower's own CLI (``flwr supernode
register|list``, ``flwr run|log|ls|stop``) with ``FLWR_HOME`` set to a fedpriv-owned
directory whose ``config.toml`` (:func:`write_flwr_home`) holds one named connection, so a
user's own Flower config is never touched. ``flwr --format json`` answers are read by
:func:`parse_json_output`; failures become one line (:func:`flwr_error`).

Both ``fedpriv simulate`` (a local simulation SuperLink) and ``fedpriv run`` (a deployed
one, over TLS) submit through :class:`FlowerRunClient`. It exists because ``flwr run
--stream`` exits 0 even when the run failed: the run's final status is read back from the
SuperLink and turned into an exit code. ``fedpriv run`` submits a *signed* bundle
(``sign_key``): the FAB is built from the app directory with Flower's own builder, signed
with the publisher key (:mod:`fedpriv.deploy.app_signing`), and those exact bytes are
submitted (:mod:`fedpriv.deploy.signed_run`); regions refuse anything else. A simulation
has no SuperNodes and submits unsigned.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import tomli_w

from fedpriv.core.errors import FedprivError
from fedpriv.core.files import atomic_write_bytes, atomic_write_text
from fedpriv.deploy.certs import CertPaths, load_region_public_key
from fedpriv.deploy.ports import get_health, parse_address
from fedpriv.deploy.processes import child_env, flower_executable, meaningful_line, stop_process_tree

CONNECTION = "fedpriv"  # the one connection in a fedpriv FLWR_HOME (``flwr ... fedpriv``)


# ---------------------------------------------------------------------------
# FLWR_HOME, running flwr, reading its answers
# ---------------------------------------------------------------------------


def write_flwr_home(flwr_home: str | os.PathLike, address: str, root_certificates: str | os.PathLike | None = None) -> Path:
    """Write a fedpriv-owned ``$FLWR_HOME/config.toml`` with one SuperLink connection (atomically).

    TLS verified against ``root_certificates`` (made absolute: Flower requires it), or
    ``insecure`` without it (the loopback simulation SuperLink). Format (flwr 1.41
    ``flwr/cli/flower_config.py``)::

        [superlink]
        default = "fedpriv"
        [superlink.fedpriv]
        address = "127.0.0.1:9093"
        root-certificates = "/abs/path/ca.crt"

    Use it with ``FLWR_HOME=<dir> flwr supernode list`` / ``flwr run . fedpriv``.
    """
    parse_address(address, "--superlink")
    home = Path(flwr_home).expanduser().absolute()
    connection: dict[str, Any] = {"address": address}
    if root_certificates is None:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(Path(root_certificates).expanduser().absolute())
    text = tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: connection}})
    return atomic_write_text(home / "config.toml", "# Written by fedpriv; rewritten every time fedpriv uses it.\n" + text)


def flwr_env(flwr_home: str | os.PathLike) -> dict[str, str]:
    """The environment of a ``flwr`` CLI child: :func:`child_env` with the private ``FLWR_HOME``."""
    return child_env({"FLWR_HOME": str(flwr_home), "FLWR_DISABLE_UPDATE_CHECK": "1"})


def run_flwr(args: list[str], flwr_home: str | os.PathLike, timeout: float) -> subprocess.CompletedProcess:
    """``flwr ARGS`` with the private ``FLWR_HOME``, output captured (raises ``subprocess.TimeoutExpired``).

    It runs *in* ``FLWR_HOME``: flwr 1.41 reads a positional ``fedpriv`` (the connection name) as an app
    directory when the working directory has one of that name (a checkout called ``fedpriv``, say) and then
    fails on a "legacy usage" config migration; in FLWR_HOME no such directory exists.
    """
    Path(flwr_home).mkdir(mode=0o700, parents=True, exist_ok=True)
    return subprocess.run([flower_executable("flwr"), *args], env=flwr_env(flwr_home), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout, start_new_session=True, cwd=flwr_home)


def parse_json_output(text: str) -> dict[str, Any] | None:
    """The object ``flwr --format json`` printed (sometimes after warning lines); None if there is none."""
    start = text.find("{")
    if start < 0:
        return None
    try:
        data = json.loads(text[start:])
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def last_line(text: Any, default: str = "no message") -> str:
    """The last non-empty line of a ``flwr`` message (its "Using SuperLink ..." preamble skipped)."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip() and not ln.startswith("Using SuperLink")]
    return lines[-1] if lines else default


def _flwr_json(args: list[str], flwr_home: Path, timeout: float = 60.0) -> dict:
    """``flwr ARGS --format json`` as a dict; a one-line error when it printed no JSON answer."""
    try:
        cp = run_flwr([*args, "--format", "json"], flwr_home, timeout)
    except subprocess.TimeoutExpired:
        raise FedprivError(f"`flwr {' '.join(args[:2])}` did not finish within {timeout:.0f}s") from None
    data = parse_json_output(cp.stdout.strip())
    if data is None:
        detail = meaningful_line((cp.stderr or cp.stdout).splitlines()) or f"exit status {cp.returncode}"
        raise FedprivError(f"`flwr {' '.join(args[:2])}` failed: {detail}")
    return data


def diagnose_tls_endpoint(address: str, ca_cert: str | os.PathLike) -> str | None:
    """Why ``address`` cannot be used with ``ca_cert`` (None if ``/health`` answers over verified TLS)."""
    host, port = parse_address(address)
    try:
        get_health(host, port, str(ca_cert), timeout=5)
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


# The status code 403 as a word, not the digits inside an address such as "127.0.0.1:40365"
# (flwr's messages quote the address; a plain substring test read such a port as a 403).
_HTTP_403 = re.compile(r"(?<![\d:.])403(?!\d)")


def flwr_error(data: dict, control_address: str, ca_cert: str | os.PathLike | None = None) -> str:
    """One line for a failed ``flwr`` answer, naming the likely cause (wrong port, wrong CA, nothing there)."""
    text = str(data.get("error-message", "unknown error"))
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return f"TLS verification failed: the SuperLink's certificate is not signed by {ca_cert or 'the configured CA'}"
    if _HTTP_403.search(text) or "Forbidden" in text:
        return (
            f"{control_address} answered 403 Forbidden: that is the SuperLink's Fleet port (SuperNodes only); "
            "use its --control-port on 127.0.0.1 (default 9093)"
        )
    detail = last_line(text, text.strip())
    if "unavailable" in text and ca_cert is not None:
        # flwr reports refused connections and TLS failures alike; find out which.
        return diagnose_tls_endpoint(control_address, ca_cert) or detail
    return detail


# ---------------------------------------------------------------------------
# SuperNode registry (the operator's side of SuperNode authentication)
# ---------------------------------------------------------------------------


def register_region(
    region: str, public_key: str | os.PathLike, flwr_home: str | os.PathLike, control_address: str,
    ca_cert: str | os.PathLike | None = None,
) -> tuple[str, str | None]:
    """Register a region's ``.pub`` file; return ("registered", node_id) or ("already registered", None).

    ``public_key`` may also be a certs directory (then ``regions/<region>.pub`` in it is used).
    """
    pub = Path(public_key).expanduser().absolute()
    if pub.is_dir():
        certs = CertPaths(pub)
        pub, ca_cert = certs.region_pub(region), ca_cert or certs.ca_cert
    load_region_public_key(pub, region)
    data = _flwr_json(["supernode", "register", str(pub), CONNECTION, "--name", region], Path(flwr_home))
    if data.get("success"):
        return "registered", str(data.get("node-id"))
    if "already in use" in str(data.get("error-message", "")):
        return "already registered", None
    raise FedprivError(f"registering region {region!r} at {control_address} failed: {flwr_error(data, control_address, ca_cert)}")


def list_supernodes(flwr_home: str | os.PathLike, control_address: str, ca_cert: str | os.PathLike | None = None) -> list[dict]:
    """``flwr supernode list`` as a list of dicts (``node-id``, ``status``: registered/online/offline/...).

    ``flwr_home`` must hold a config from :func:`write_flwr_home` for ``control_address``;
    ``ca_cert`` (that config's root certificate) is only used to explain failures.
    """
    data = _flwr_json(["supernode", "list", CONNECTION], Path(flwr_home))
    if not data.get("success"):
        raise FedprivError(f"listing SuperNodes at {control_address} failed: {flwr_error(data, control_address, ca_cert)}")
    return list(data.get("nodes", []))


# ---------------------------------------------------------------------------
# Runs: submit, follow, stop
# ---------------------------------------------------------------------------


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
        write_flwr_home(self.flwr_home, address, root_certificates)

    @property
    def env(self) -> dict[str, str]:
        return flwr_env(self.flwr_home)

    def _flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return run_flwr(list(args), self.flwr_home, timeout)

    def submit(self, app_dir: Path, run_config: Mapping[str, Any], federation_config: Mapping[str, Any] | None = None,
               sign_key: Path | None = None, bundle: Path | None = None) -> int:
        """Submit the app with a full run config (written as TOML, so any string value is safe).

        With ``sign_key`` (a publisher's Ed25519 key) the bundle is built and signed here; with
        ``bundle`` (a publisher's signed FAB, :func:`fedpriv.deploy.app_signing.read_signed_bundle`)
        exactly those bytes are submitted.
        """
        config_file = atomic_write_text(self.flwr_home / "run_config.toml", tomli_w.dumps(dict(run_config)))
        args = ["run", str(Path(app_dir).resolve()), CONNECTION, "--run-config", str(config_file), "--format", "json"]
        if federation_config:
            args += ["--federation-config", " ".join(f"{k}={_toml_value(v)}" for k, v in federation_config.items())]
        try:
            if sign_key is not None or bundle is not None:
                fab = self.write_signed_bundle(app_dir, sign_key, bundle)
                proc = subprocess.run([sys.executable, "-m", "fedpriv.deploy.signed_run", str(fab), *args], env=self.env,
                                      cwd=self.flwr_home,
                                      capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                                      start_new_session=True)
            else:
                proc = self._flwr(*args, timeout=300)
        except subprocess.TimeoutExpired:
            raise FedprivError(f"submitting the run to the SuperLink at {self.address} did not finish within 300s") from None
        payload = parse_json_output(proc.stdout) or {}
        if not payload.get("success") or "run-id" not in payload:
            message = payload.get("error-message") or proc.stderr.strip() or proc.stdout.strip()
            raise FedprivError(f"the SuperLink at {self.address} refused the run: {last_line(message)}")
        return int(payload["run-id"])

    def write_signed_bundle(self, app_dir: Path, sign_key: Path | None, bundle: Path | None = None) -> Path:
        """FLWR_HOME/signed-app.fab: the publisher's ``bundle``, or the FAB of ``app_dir`` signed with ``sign_key``."""
        from fedpriv.deploy.app_signing import build_signed_bundle, load_publisher_key, read_signed_bundle

        fab = read_signed_bundle(bundle) if bundle is not None else build_signed_bundle(app_dir, load_publisher_key(sign_key))
        return atomic_write_bytes(self.flwr_home / "signed-app.fab", fab)

    def status(self, run_id: int) -> RunOutcome:
        try:
            proc = self._flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json", timeout=60)
        except subprocess.TimeoutExpired:
            return RunOutcome(run_id, "unknown", "`flwr ls` did not answer within 60s")
        payload = parse_json_output(proc.stdout) or {}
        runs = payload.get("runs") or []
        if not payload.get("success") or not runs:
            return RunOutcome(run_id, "unknown", last_line(payload.get("error-message", proc.stderr)))
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
                                        cwd=self.flwr_home,
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
