"""Continuing a run after its coordinator died: ``fedpriv run --resume RUN_DIR``.

A run directory holds everything needed to go on: ``privacy_report.json`` (the
run config, with its ``job-id``, and every round's facts so far) and the checkpoints
of the newest completed rounds (``checkpoints/round-NNN.safetensors``; ``keep-checkpoints``
of them). A resumed coordinator

* takes the last round that is *complete on both sides* - its checkpoint was saved
  and the report recorded its central evaluation, with every earlier round evaluated
  too (a coordinator killed between the two writes leaves one without the other;
  that round is re-run);
* restores the report up to that round through the one report schema
  (``fedpriv.core.report_schema.load`` / ``truncate``, then ``RunReport.restore``: every saved
  per-region field, rounds, secure-aggregation records; nothing is reset) and drops anything
  recorded for later rounds;
* moves checkpoints of later rounds aside (``*.safetensors.discarded``) so they can
  never be mistaken for progress;
* runs only the remaining rounds, with absolute round numbers continuing.

The regions' side needs nothing from here: a region composes ε over its own
durable ledger's releases for the job id (``privacy/ledger.py``), which the resumed
run keeps. A round a region already released for the dead coordinator (its reply lost)
is answered with that same stored release, at no new ε and with no new training
(``client/release_store.py``): the ledger holds one release per (job, round), so a
resumed job pays exactly its rounds.

Only one coordinator may write a run directory at a time: :func:`lock_run_dir`
holds an exclusive ``flock`` on ``RUN_DIR/.coordinator.lock`` for the life of the
ServerApp process (the kernel releases it when the process dies, however it dies).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from fedpriv.core.errors import FedprivError
from fedpriv.core.report_schema import JSON_NAME, RESUME_REQUIRED, load, truncate_history  # noqa: F401 (re-exported)

if TYPE_CHECKING:  # torch/opacus load lazily: `fedpriv run` plans a resume without them
    import numpy as np

    from fedpriv.privacy.report import RunReport

CHECKPOINT_DIR = "checkpoints"  # == fedpriv.server.checkpoints.CHECKPOINT_DIR
LOCK_NAME = ".coordinator.lock"
DISCARDED_SUFFIX = ".discarded"


@dataclass
class ResumePoint:
    """Where a run stands: the last fully completed round and what to start from."""

    run_dir: Path
    report: dict[str, Any]
    completed_round: int
    values: "OrderedDict[str, np.ndarray] | None"  # None: no round completed, start from the initial model
    later_checkpoints: list[Path] = field(default_factory=list)

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.report.get("config") or {})

    @property
    def job_id(self) -> str:
        return str(self.config.get("job-id") or "")


def checkpoint_path(run_dir: Path, server_round: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"round-{server_round:03d}.safetensors"


def checkpoint_rounds(run_dir: Path) -> list[int]:
    rounds = []
    for p in (Path(run_dir) / CHECKPOINT_DIR).glob("round-*.safetensors"):
        digits = p.name[len("round-"):-len(".safetensors")]
        if digits.isdigit():
            rounds.append(int(digits))
    return sorted(rounds)


def load_checkpoint(run_dir: Path, server_round: int) -> "OrderedDict[str, np.ndarray]":
    from safetensors import safe_open
    from safetensors.numpy import load_file

    path = checkpoint_path(run_dir, server_round)
    with safe_open(str(path), framework="numpy") as fh:
        names = list(fh.keys())
    values = load_file(str(path))
    return OrderedDict((n, values[n]) for n in names)


def read_report(run_dir: Path) -> dict[str, Any]:
    """The run's report as the schema loads it (checked, older forms normalised), enough of it to resume."""
    return load(run_dir, RESUME_REQUIRED)


def evaluated_rounds(report: dict[str, Any]) -> set[int]:
    """Rounds >= 1 whose central evaluation the report recorded (the round's last write)."""
    return {int(r["round"]) for r in report.get("rounds", []) if int(r.get("round", 0)) > 0 and "accuracy" in r}


def find_resume_point(run_dir: str | os.PathLike, load_values: bool = True) -> ResumePoint:
    """Read ``RUN_DIR`` and decide where a resumed run starts; one-line errors for unusable dirs."""
    run_dir = Path(run_dir).expanduser().absolute()
    if not run_dir.is_dir():
        raise FedprivError(f"--resume {run_dir}: not a directory (expected the --run-dir of an earlier `fedpriv run`)")
    if not os.access(run_dir, os.R_OK | os.W_OK | os.X_OK):
        raise FedprivError(f"--resume {run_dir}: cannot read and write it; check its owner and permissions")
    if not (run_dir / JSON_NAME).is_file():
        raise FedprivError(f"--resume {run_dir}: no {JSON_NAME} in it (expected the --run-dir of an earlier `fedpriv run`)")
    report = read_report(run_dir)
    config = report.get("config") or {}
    if not isinstance(config, dict) or not config.get("job-id"):
        raise FedprivError(f"--resume {run_dir}: its {JSON_NAME} has no job-id in its config, so the regions' privacy "
                           "ledgers cannot be matched to it (only runs started by `fedpriv run` can be resumed)")
    done = evaluated_rounds(report)
    ckpts = checkpoint_rounds(run_dir)
    # The report's evaluated rounds must be a prefix 1..p (anything after a gap is redone); the run resumes from
    # the newest checkpoint within it. Older checkpoints may have been pruned (keep-checkpoints).
    prefix = 0
    while prefix + 1 in done:
        prefix += 1
    completed = max((r for r in ckpts if r <= prefix), default=0)
    values = load_checkpoint(run_dir, completed) if (completed and load_values) else None
    later = [checkpoint_path(run_dir, r) for r in ckpts if r > completed]
    return ResumePoint(run_dir, report, completed, values, later)


def discard_later_checkpoints(point: ResumePoint) -> list[Path]:
    """Move checkpoints after the resume round aside (kept for forensics, ignored by ``latest_checkpoint``)."""
    moved = []
    for path in point.later_checkpoints:
        if path.exists():
            target = path.with_name(path.name + DISCARDED_SUFFIX)
            os.replace(path, target)
            moved.append(target)
    return moved


def restore_report(report: RunReport, data: dict[str, Any], upto_round: int) -> None:
    """Fill a fresh :class:`RunReport` with ``data`` (a loaded report) for rounds <= ``upto_round``.

    Per-region ε/steps/rounds stay aligned (they are indexed by participation), later
    enforcement records, round entries and secure-aggregation records are dropped, and extra
    top-level keys (e.g. the list of Flower runs) are kept -- except an earlier ``audit``: it
    attacked the model as it was then, and the resumed run trains it further (re-run
    ``fedpriv audit``). See ``fedpriv.core.report_schema.truncate`` and ``RunReport.restore``.
    """
    report.restore(data, upto_round)


def continue_secure_aggregation(fresh: dict[str, Any], restored: dict[str, Any]) -> dict[str, Any]:
    """The ``secure_aggregation`` section of a (resumed) run: this run's settings (``fresh``, the workflow's
    ``describe()``), with every earlier round's record from the restored report kept -- a resumed report must not
    lose round 1's secure-aggregation row because the new coordinator describes its workflow afresh."""
    section = dict(fresh)
    if restored.get("enabled"):
        for key in ("rounds", "rounds_plain", "rounds_aborted"):
            if isinstance(restored.get(key), list):
                section[key] = list(restored[key])
    return section


def note_segment(report: RunReport, flower_run_id: str, first_round: int, resumed: bool) -> dict[str, Any]:
    """Append this Flower run to the report's ``runs`` list (one entry per coordinator start) and return it."""
    segment = {"run_id": flower_run_id, "first_round": first_round, "last_round": first_round - 1,
               "resumed": resumed, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "wall_time_s": 0.0}
    report.extra["runs"] = [*list(report.extra.get("runs") or []), segment]
    return segment


def total_wall_time(report: RunReport) -> float:
    """Seconds spent over all coordinator starts (a killed one counts up to its last completed round)."""
    return round(sum(float(s.get("wall_time_s") or 0.0) for s in report.extra.get("runs") or []), 1)


# ---------------------------------------------------------------------------
# One coordinator per run directory
# ---------------------------------------------------------------------------


class RunDirLock:
    """Exclusive ``flock`` on ``RUN_DIR/.coordinator.lock``; released on :meth:`release` or process death."""

    def __init__(self, run_dir: Path, fh: IO[str]):
        self.run_dir, self._fh = run_dir, fh

    def release(self) -> None:
        if self._fh is not None:
            try:
                fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            finally:
                self._fh.close()
                self._fh = None


def lock_run_dir(run_dir: str | os.PathLike, timeout: float = 120.0) -> RunDirLock:
    """Wait up to ``timeout`` s for the run directory; a coordinator still finishing (a stopped run
    whose ServerApp has not exited yet) must not interleave its writes with ours."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fh = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the life of the coordinator
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                fh.close()
                raise FedprivError(f"run directory {run_dir} is still in use by another coordinator ({holder}) after "
                                   f"{timeout:.0f}s: stop that run first (`flwr stop RUN_ID`) or use another --run-dir")
            time.sleep(0.5)
    fh.seek(0)
    fh.truncate()
    fh.write(json.dumps({"pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
    fh.flush()
    return RunDirLock(run_dir, fh)
