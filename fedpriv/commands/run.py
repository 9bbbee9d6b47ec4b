"""``fedpriv run``: submit the app to a deployed SuperLink, stream its logs, wait, report.

Everything a user can get wrong is checked *before* submission and reported on one
line: the run config (defaults <- ``--preset`` <- ``--run-config``, as in
``fedpriv simulate``), the certificates, the server's held-out data, region names,
and whether the SuperLink's Control API answers over TLS. Registration of the
regions' SuperNode keys is **not** done here: ``fedpriv register`` does it
(explicit, idempotent), and must run before the SuperNodes start - an unregistered
SuperNode is refused when it connects, long before a run is submitted.

The submitted app bundle is signed by a publisher: either the publisher's own signed
bundle (``--bundle app.fab`` from ``fedpriv sign-bundle``: the operator never holds the
key) or built and signed here (``--sign-key``, when the operator is the publisher).
Every region runs only bundles signed by a key in its own trust file, so an unsigned
submission would be refused by all of them.

``--resume RUN_DIR`` continues a run whose coordinator died: same job id and
configuration (read from ``RUN_DIR/privacy_report.json``), ``resume-from`` =
RUN_DIR; the ServerApp continues after the last completed round
(:mod:`fedpriv.server.resume`) and every region composes ε over its ledger's releases for
the job id.

Exit status (:mod:`fedpriv.commands.outcome`, the same as ``fedpriv simulate``): 0 when the report says
``completed``; 1 when it says ``failed`` (no round updated the model, the run ended below
min-train-regions or early, the coordinator crashed) or ``stopped`` (also a timeout); 3 for ``completed
with failures`` (a region refused or failed in every round, or rounds left the model unchanged); 2 for
input errors, 130 on Ctrl-C and 143 on SIGTERM (the run is stopped on the SuperLink and its report says
``stopped``).
"""

from __future__ import annotations

import argparse
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpriv.commands.options import add_certs, add_control_superlink, add_quiet, add_run_config, add_run_dir
from fedpriv.commands.registry import command
from fedpriv.core.errors import ConfigError, FedprivError

# Keys a resumed run may change: operational only. Anything else (rounds, batch size,
# noise, data, model...) was part of the privacy plan the first rounds were run under.
RESUME_OVERRIDABLE = ("round-timeout", "min-train-regions", "num-threads", "secagg-timeout", "fraction-evaluate")


@dataclass
class RunPlan:
    """A fully resolved, validated submission."""

    superlink: str
    certs_dir: Path
    ca_cert: Path
    run_dir: Path
    data_dir: Path
    flat: dict[str, Any]
    resumed_from_round: int | None = None
    previous_run_id: str = ""
    notes: list[str] = field(default_factory=list)
    sign_key: Path | None = None
    bundle: Path | None = None  # a publisher's signed app.fab (instead of sign_key)

    @property
    def job_id(self) -> str:
        return str(self.flat["job-id"])

    @property
    def flwr_home(self) -> Path:
        return self.run_dir / ".flwr"


@command("run", "Submit the fedpriv app to a deployed SuperLink (TLS), stream its logs and wait for the privacy report.")
class RunCommand:
    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        add_control_superlink(p)
        add_certs(p, "ca.crt; regions/*.pub name the known regions")
        p.add_argument("--sign-key", default=None, metavar="FILE",
                       help="the publisher's private key (publisher.key from `fedpriv keygen --publisher`) that signs the "
                            "submitted app bundle; regions run only bundles signed by keys in their trust file")
        p.add_argument("--bundle", default=None, metavar="FILE",
                       help="submit the publisher's signed app bundle (app.fab from `fedpriv sign-bundle`) instead of "
                            "signing here: the operator then never holds the publisher key")
        p.add_argument("--data", default=None, metavar="DIR",
                       help="the directory `fedpriv prepare-data --out DIR` wrote: the coordinator reads DIR/server/test.jsonl "
                            "(default: data-dir of the run config, or of the resumed run)")
        add_run_dir(p, "runs/run-<time>")
        add_run_config(p, preset_default=None)
        p.add_argument("--resume", default=None, metavar="RUN_DIR",
                       help="continue the run in RUN_DIR after its last completed round (same job, same config)")
        p.add_argument("--timeout", type=float, default=None, metavar="S",
                       help="stop the run and fail if it has not finished after S seconds")
        add_quiet(p)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from fedpriv.core.config import APP_DIR
        from fedpriv.deploy.flwr_cli import FlowerRunClient

        plan = plan_run(args)
        client = FlowerRunClient(plan.flwr_home, plan.superlink, plan.ca_cert)
        online = check_superlink(plan)
        if plan.previous_run_id:
            check_previous_run_finished(client, plan)
        for note in plan.notes:
            print(f"fedpriv run: note: {note}", flush=True)
        cfg_rounds = int(plan.flat["num-server-rounds"])
        regions = str(plan.flat["regions"])
        started = time.time()
        run_id = client.submit(APP_DIR, plan.flat, sign_key=plan.sign_key, bundle=plan.bundle)
        what = (f"resuming job {plan.job_id} after round {plan.resumed_from_round} of {cfg_rounds}"
                if plan.resumed_from_round is not None else f"job {plan.job_id}, {cfg_rounds} round(s)")
        print(f"fedpriv run: run {run_id} submitted to {plan.superlink} ({what}; regions {regions}; "
              f"{online} SuperNode(s) online); run dir {plan.run_dir}", flush=True)
        try:
            outcome = client.wait(run_id, stream=not args.quiet, timeout_s=args.timeout, poll_s=5.0)
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGHUP as StopRequested
            settle_after_stop(plan.run_dir, f"fedpriv run was interrupted ({getattr(exc, 'signal_name', 'SIGINT')}); "
                                            f"run {run_id} was stopped on the SuperLink")
            print(f"\nfedpriv run: interrupted: run {run_id} stopped on the SuperLink. Continue it with:\n  "
                  f"{resume_command(plan)}", flush=True)
            return int(getattr(exc, "exit_status", 130))
        if outcome.status in ("finished:stopped", "finished:timeout"):  # stopped on the SuperLink (--timeout, flwr stop)
            settle_after_stop(plan.run_dir, f"run {run_id} was stopped on the SuperLink ({outcome.status}: "
                                            f"{outcome.details or 'no details'})")
        return finish(plan, outcome, time.time() - started)


# ---------------------------------------------------------------------------
# Planning (no network, no processes): every input error is a one-line FedprivError
# ---------------------------------------------------------------------------


def plan_run(args: argparse.Namespace) -> RunPlan:
    from fedpriv.core.config import parse_overrides
    from fedpriv.deploy.ports import parse_address

    parse_address(args.superlink, "--superlink")
    certs_dir, ca_cert = check_certs(args.certs)
    overrides = parse_overrides(args.run_config)
    if args.resume:
        plan = _plan_resume(args, overrides, certs_dir, ca_cert)
    else:
        plan = _plan_new(args, overrides, certs_dir, ca_cert)
    plan.sign_key, plan.bundle = check_signing(getattr(args, "sign_key", None), getattr(args, "bundle", None))
    cfg = _typed(plan.flat)
    check_regions_known(cfg.regions, certs_dir)
    check_server_data(plan.data_dir, cfg)
    if args.timeout is not None and not args.timeout > 0:
        raise ConfigError(f"--timeout = {args.timeout!r}: expected seconds > 0")
    return plan


def _plan_new(args, overrides: dict[str, Any], certs_dir: Path, ca_cert: Path) -> RunPlan:
    from fedpriv.core.config import resolve_config
    from fedpriv.simulations.runner import preset_overrides

    for key in ("run-dir", "data-dir", "resume-from"):
        if key in overrides:
            flag = {"run-dir": "--run-dir", "data-dir": "--data", "resume-from": "--resume"}[key]
            raise ConfigError(f"run config key {key!r} is set by fedpriv run: pass {flag} instead")
    flat, _ = resolve_config(overrides, preset_overrides(args.preset or "default"))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(args.run_dir).expanduser() if args.run_dir else Path("runs") / f"run-{stamp}"
    run_dir = run_dir.absolute()
    check_new_run_dir(run_dir)
    data_dir = _data_dir(args.data, flat.get("data-dir"))
    flat.update({"run-dir": str(run_dir), "data-dir": str(data_dir), "resume-from": "",
                 "job-id": str(flat.get("job-id") or uuid.uuid4().hex)})
    return RunPlan(args.superlink, certs_dir, ca_cert, run_dir, data_dir, flat)


def _plan_resume(args, overrides: dict[str, Any], certs_dir: Path, ca_cert: Path) -> RunPlan:
    from fedpriv.core.config import load_app_defaults, merge_config
    from fedpriv.server.resume import find_resume_point

    if args.preset:
        raise ConfigError("--preset cannot be combined with --resume: a resumed run keeps its configuration")
    point = find_resume_point(args.resume, load_values=False)
    run_dir = point.run_dir
    if args.run_dir and Path(args.run_dir).expanduser().absolute() != run_dir:
        raise ConfigError(f"--run-dir {args.run_dir} with --resume {run_dir}: a resumed run writes into its own run dir")
    fixed = sorted(set(overrides) - set(RESUME_OVERRIDABLE))
    if fixed:
        raise ConfigError(f"cannot change {fixed[0]!r} when resuming: the first rounds ran under it "
                          f"(a resumed run may only change {', '.join(RESUME_OVERRIDABLE)})")
    defaults = load_app_defaults()
    saved = point.config
    notes = []
    dropped = sorted(set(saved) - set(defaults))
    if dropped:
        notes.append(f"ignoring config key(s) this version does not know: {', '.join(dropped)}")
    flat = merge_config(defaults, {k: v for k, v in saved.items() if k in defaults})
    flat = merge_config(flat, overrides)
    status = str(point.report.get("status", ""))
    rounds = int(flat["num-server-rounds"])
    if status in ("completed", "completed with failures"):
        raise FedprivError(f"--resume {run_dir}: that run already completed ({rounds} rounds); nothing to resume")
    data_dir = _data_dir(args.data, saved.get("data-dir"))
    flat.update({"run-dir": str(run_dir), "data-dir": str(data_dir), "resume-from": str(run_dir),
                 "job-id": point.job_id})
    if status.startswith(("stopped", "failed")):
        notes.append(f"the run in {run_dir} had ended early ({status}); resuming it anyway")
    return RunPlan(args.superlink, certs_dir, ca_cert, run_dir, data_dir, flat,
                   resumed_from_round=point.completed_round, previous_run_id=str(point.report.get("run_id") or ""),
                   notes=notes)


def _typed(flat: dict[str, Any]):
    from fedpriv.core.config import FedprivConfig

    return FedprivConfig.from_run_config(flat)


def _data_dir(flag: str | None, configured: Any) -> Path:
    if flag:
        return Path(flag).expanduser().absolute()
    if configured:
        return Path(str(configured)).expanduser().absolute()
    raise FedprivError("no server data: pass --data DIR, the directory `fedpriv prepare-data --out DIR` wrote "
                       "(the coordinator reads DIR/server/test.jsonl)")


def check_certs(certs: str) -> tuple[Path, Path]:
    from fedpriv.deploy.certs import CertPaths
    from fedpriv.deploy.paths import require_file

    certs_dir = Path(certs).expanduser().absolute()
    if not certs_dir.is_dir():
        raise FedprivError(f"--certs {certs_dir}: no such directory (create it with `fedpriv certs {certs_dir}`)")
    ca = require_file(CertPaths(certs_dir).ca_cert, "CA certificate",
                      f"run `fedpriv certs {certs_dir}` first (or copy its ca.crt here)")
    return certs_dir, ca


def check_signing(sign_key: str | None, bundle: str | None) -> tuple[Path | None, Path | None]:
    """Exactly one of ``--sign-key`` (checked: private, Ed25519) and ``--bundle`` (checked: signed, this version)."""
    from fedpriv.deploy.app_signing import read_signed_bundle

    if sign_key and bundle:
        raise FedprivError("--sign-key and --bundle: pass one (--bundle submits a bundle the publisher already signed)")
    if bundle:
        path = Path(bundle).expanduser().absolute()
        read_signed_bundle(path)
        return None, path
    return check_sign_key(sign_key), None


def check_sign_key(path: str | None) -> Path:
    """The publisher key exists, is private to its owner and is an Ed25519 OpenSSH key."""
    from fedpriv.deploy.app_signing import load_publisher_key

    if not path:
        raise FedprivError("missing --sign-key FILE: regions run only app bundles signed by a publisher they trust (pass "
                           "--bundle with the app.fab the publisher made with `fedpriv sign-bundle`, or its publisher.key)")
    key = Path(path).expanduser().absolute()
    if is_public_key(key):  # before the private-key checks: "chmod 600" would be the wrong advice
        raise FedprivError(f"--sign-key {key} is a public key: pass the publisher's private key "
                           f"{key.with_suffix('.key') if key.suffix == '.pub' else 'publisher.key'} (the .pub file "
                           "goes into each region's trust file)")
    load_publisher_key(key)
    return key


def is_public_key(path: Path) -> bool:
    """An OpenSSH public key line (``ssh-ed25519 AAAA...``), as ``publisher.pub`` holds."""
    try:
        with path.open("rb") as fh:
            head = fh.read(64)
    except OSError:
        return False
    return head.lstrip().startswith((b"ssh-", b"ecdsa-sha2-", b"sk-ssh-"))


def check_regions_known(regions: tuple[str, ...], certs_dir: Path) -> None:
    """Every region of the run must have a SuperNode key pair in the certs dir (if it lists any)."""
    from fedpriv.deploy.certs import CertPaths

    certs = CertPaths(certs_dir)
    keys_dir, known = certs.regions_dir, certs.regions_with(".pub")
    if not known:
        return  # a coordinator given only ca.crt: the SuperLink's registry is the authority
    unknown = [r for r in regions if r not in known]
    if unknown:
        raise FedprivError(f"unknown region {unknown[0]!r}: {keys_dir} has keys for {', '.join(known)} "
                           "(check regions=..., or run `fedpriv certs` with this region)")


def check_server_data(data_dir: Path, cfg) -> None:
    """The coordinator's held-out set exists and is readable; the run's regions were prepared."""
    from fedpriv.deploy.paths import require_data_dir
    from fedpriv.task.partition import check_prepared_regions, server_test_path

    require_data_dir(data_dir, "the directory `fedpriv prepare-data --out DIR` wrote")
    test = server_test_path(data_dir)
    if not test.is_file():
        raise FedprivError(f"no server held-out set {test}: pass --data with the directory "
                           "`fedpriv prepare-data --out DIR` wrote (it holds server/test.jsonl)")
    if not os.access(test, os.R_OK) or not os.access(test.parent, os.R_OK | os.X_OK):
        raise FedprivError(f"cannot read {test}: check its owner and permissions")
    check_prepared_regions(data_dir, cfg.regions, cfg.batch_size, "lower batch-size or prepare more data")


def check_new_run_dir(run_dir: Path) -> None:
    from fedpriv.core.report_schema import JSON_NAME, peek

    if (run_dir / JSON_NAME).exists():
        status = (peek(run_dir) or {}).get("status", "unknown")
        raise FedprivError(f"--run-dir {run_dir} already holds a run (status: {status}): continue it with "
                           f"--resume {run_dir}, or pick a new --run-dir")
    if run_dir.exists() and not run_dir.is_dir():
        raise FedprivError(f"--run-dir {run_dir} is not a directory")
    parent = run_dir if run_dir.exists() else next((p for p in run_dir.parents if p.exists()), None)
    if parent is None or not os.access(parent, os.W_OK | os.X_OK):
        raise FedprivError(f"cannot create --run-dir {run_dir}: {parent} is not writable")


# ---------------------------------------------------------------------------
# Talking to the SuperLink
# ---------------------------------------------------------------------------


def check_superlink(plan: RunPlan) -> int:
    """The Control API answers over TLS with our CA; returns how many SuperNodes are online."""
    import socket

    from fedpriv.deploy.ports import parse_address
    from fedpriv.deploy.flwr_cli import list_supernodes

    host, port = parse_address(plan.superlink, "--superlink")
    try:  # fail fast: flwr itself retries a refused connection for ~25 s
        socket.create_connection((host.strip("[]"), port), timeout=10).close()
    except OSError as exc:
        reason = "nothing is listening there" if isinstance(exc, ConnectionRefusedError) else (exc.strerror or str(exc))
        raise FedprivError(f"cannot reach the SuperLink's Control API at {plan.superlink}: {reason} "
                           "(is `fedpriv superlink` running, and is this its --control-port?)") from None
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    nodes = list_supernodes(plan.flwr_home, plan.superlink, plan.ca_cert)
    online = sum(1 for n in nodes if n.get("status") == "online")
    need = int(plan.flat["min-train-regions"])
    if online < need:
        plan.notes.append(f"{online} SuperNode(s) online, fewer than min-train-regions = {need}: the coordinator waits "
                          f"up to round-timeout = {plan.flat['round-timeout']}s for them, then ends the run")
    return online


def check_previous_run_finished(client, plan: RunPlan) -> None:
    """A resumed job must not run twice at once: the dead coordinator's Flower run must be over."""
    try:
        previous = int(plan.previous_run_id)
    except ValueError:
        return
    outcome = client.status(previous)
    if outcome.status in ("unknown",) or outcome.status.startswith("finished"):
        return
    raise FedprivError(f"run {previous} of job {plan.job_id} is still {outcome.status} on the SuperLink: stop it first "
                       f"(FLWR_HOME={plan.flwr_home} flwr stop {previous}) or wait for it to end")


def resume_command(plan: RunPlan) -> str:
    sign = f" --bundle {plan.bundle}" if plan.bundle else f" --sign-key {plan.sign_key}" if plan.sign_key else ""
    return f"fedpriv run --superlink {plan.superlink} --certs {plan.certs_dir}{sign} --resume {plan.run_dir}"


def settle_after_stop(run_dir: Path, why: str, grace_s: float = 15.0) -> None:
    """After ``flwr stop``: give the ServerApp ``grace_s`` to write its own end (it records ``stopped``), then
    settle a report still saying ``running`` (its process was killed before it could)."""
    from fedpriv.commands.outcome import settle_interrupted
    from fedpriv.core.report_schema import RUNNING, peek

    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and (peek(run_dir) or {}).get("status") == RUNNING:
        time.sleep(1.0)
    settle_interrupted(run_dir, why)


def finish(plan: RunPlan, outcome, wall_s: float) -> int:
    """Print the verdict and a short summary; the exit code is the report's (:mod:`fedpriv.commands.outcome`)."""
    import sys

    from fedpriv.commands.outcome import judge
    from fedpriv.core.report_schema import COMPLETED, MD_NAME, peek
    from fedpriv.privacy.report_view import epsilon_text  # light: no torch

    verdict = judge(plan.run_dir, outcome)
    report: dict[str, Any] = peek(plan.run_dir) or {}
    ok = verdict.exit_code == 0
    rounds = [r for r in report.get("rounds", []) if int(r.get("round", 0)) > 0]
    last = rounds[-1] if rounds else {}
    head = "finished" if ok else "FAILED" if verdict.status != "completed with failures" else "finished with failures"
    print(f"\nfedpriv run: run {outcome.run_id} {head}: Flower status {outcome.status}"
          + (f" ({outcome.details})" if outcome.details and outcome.details != "N/A" else "")
          + f"; report status {verdict.status}; {wall_s:.0f}s", flush=True)
    if report:
        eps = ", ".join(f"{name} {epsilon_text(r)}" for name, r in report.get("regions", {}).items())
        print(f"  rounds completed: {last.get('round', 0)} of {plan.flat['num-server-rounds']}"
              + (f"; global accuracy {last['accuracy']:.4f}" if isinstance(last.get("accuracy"), float) else ""), flush=True)
        print(f"  ε per region (δ = {report.get('delta')}): {eps}", flush=True)
        lost = sorted({reg for r in rounds for reg in r.get("regions_failed", []) + r.get("regions_lost", [])})
        if lost:
            print(f"  regions that failed in some round: {', '.join(lost)} (see the report's rounds)", flush=True)
        print(f"  privacy report: {plan.run_dir / MD_NAME}", flush=True)
    if verdict.status not in (COMPLETED, "completed with failures") and rounds:
        print(f"  continue it with: {resume_command(plan)}", flush=True)
    if not ok:  # the last line: why
        print(f"fedpriv run: run {outcome.run_id} {verdict.line}", file=sys.stderr, flush=True)
    return verdict.exit_code
