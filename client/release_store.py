"""A region's paid releases, kept so that a retried round is answered with the same release, never a second one.

A round's DP release costs ε once, when the ledger records it (``privacy/ledger.py``). The coordinator may ask
for the same round again: a resumed job (``fedpriv run --resume``: a new Flower run), a lost reply, a restarted
coordinator. Training again would be a second release of the round (fresh noise, fresh sample: the two together
reveal more than one), and refusing would lose a round already paid for. So the region stores what it released,
beside its ledger, with the file's sha256 in the ledger row (:attr:`fedpriv.privacy.ledger.Release.digest`), and
answers a retry with it: the same values (the same bytes), or under secure aggregation the same update masked
afresh -- at no new ε and with no new training.

What is stored: the trained values (what a plain round sends), the global values they were trained from (a secure
round masks ``values - base``), N and the not-private train metrics a policy may release, so the reply is the first
one's. A retry that sends *other* global weights still gets the stored release: it is the one that was paid for.

A file is written (atomic, owner-only: it is derived from the region's data) *before* the ledger records its
digest; a file no row names is never used, and one whose bytes do not match its row's digest is refused (the round
is then not released again at all). Bounded: a job keeps its newest :data:`KEEP_ROUNDS_PER_JOB` releases (a retry
is of the round the coordinator was at when it lost the reply; an older round is answered "released once"), and
any job's files untouched for :data:`fedpriv.client.optimizer_state.STALE_AFTER_S` (7 days) are deleted.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save

from fedpriv.client.optimizer_state import STALE_AFTER_S
from fedpriv.core.files import atomic_write_bytes

RELEASE_DIR = "releases"
KEEP_ROUNDS_PER_JOB = 2


@dataclass(frozen=True)
class StoredRelease:
    values: "OrderedDict[str, np.ndarray]"
    base: "OrderedDict[str, np.ndarray]"
    num_examples: int
    loss: float
    accuracy: float
    peak_memory_mb: float


def _job_tag(job_id: str) -> str:
    return hashlib.sha256(job_id.encode()).hexdigest()[:16]


def release_dir(ledger_path: Path) -> Path:
    return Path(ledger_path).parent / RELEASE_DIR


def release_path(ledger_path: Path, region: str, job_id: str, server_round: int, digest: str) -> Path:
    """One file per release: region, hashed job id, round and the file's own digest (two processes that trained
    the same round write different files; the ledger names the one it recorded)."""
    return release_dir(ledger_path) / f"{region}.{_job_tag(job_id)}.r{int(server_round):06d}.{digest[:16]}.safetensors"


def save_release(ledger_path: Path, region: str, job_id: str, server_round: int, values: Mapping[str, np.ndarray],
                 base: Mapping[str, np.ndarray], num_examples: int, loss: float, accuracy: float,
                 peak_memory_mb: float) -> tuple[Path, str]:
    """Store a release (before the ledger records it); returns its path and digest."""
    arrays = {f"values/{k}": np.ascontiguousarray(v) for k, v in values.items()}
    arrays |= {f"base/{k}": np.ascontiguousarray(v) for k, v in base.items()}
    meta = {"job-id": job_id, "round": str(int(server_round)), "num-examples": str(int(num_examples)),
            "loss": repr(float(loss)), "accuracy": repr(float(accuracy)), "peak-memory-mb": repr(float(peak_memory_mb)),
            "values-order": json.dumps(list(values)), "base-order": json.dumps(list(base))}
    blob = save(arrays, metadata=meta)
    digest = hashlib.sha256(blob).hexdigest()
    path = release_path(ledger_path, region, job_id, server_round, digest)
    atomic_write_bytes(path, blob, file_mode=0o600)
    return path, digest


def load_release(ledger_path: Path, region: str, job_id: str, server_round: int, digest: str) -> StoredRelease | None:
    """The stored release whose bytes hash to ``digest`` (the ledger row's), or None: missing, altered, foreign."""
    if not digest:
        return None
    path = release_path(ledger_path, region, job_id, server_round, digest)
    try:
        blob = path.read_bytes()
    except OSError:
        return None
    if hashlib.sha256(blob).hexdigest() != digest:
        return None
    try:
        arrays = load(blob)
        meta = json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")]).get("__metadata__", {})
        if meta.get("job-id") != job_id or meta.get("round") != str(int(server_round)):
            return None
        values = OrderedDict((k, arrays[f"values/{k}"]) for k in json.loads(meta["values-order"]))
        base = OrderedDict((k, arrays[f"base/{k}"]) for k in json.loads(meta["base-order"]))
        return StoredRelease(values, base, int(meta["num-examples"]), float(meta["loss"]), float(meta["accuracy"]),
                             float(meta["peak-memory-mb"]))
    except (SafetensorError, ValueError, KeyError, TypeError):
        return None


def discard(path: Path) -> None:
    """Delete a stored release the ledger did not record (refused after training)."""
    Path(path).unlink(missing_ok=True)


_NAME = re.compile(r"^(?P<region>.+)\.(?P<job>[0-9a-f]{16})\.r(?P<round>\d{6})\.[0-9a-f]{16}\.safetensors$")


def prune(ledger_path: Path, region: str, job_id: str, now: float | None = None) -> list[Path]:
    """Keep this job's newest :data:`KEEP_ROUNDS_PER_JOB` rounds; delete ``region``'s files of any job untouched for
    :data:`STALE_AFTER_S` (and partial files of interrupted writes, as old). Returns what was deleted."""
    now = time.time() if now is None else now
    directory = release_dir(ledger_path)
    removed: list[Path] = []
    mine: list[tuple[int, Path]] = []
    for path in [*directory.glob(f"{region}.*.safetensors"), *directory.glob(f".{region}.*.tmp")]:
        match = _NAME.match(path.name)
        if match is None or match["region"] != region:
            if path.name.endswith(".tmp"):
                _remove_if_stale(path, now, removed)
            continue
        if match["job"] == _job_tag(job_id):
            mine.append((int(match["round"]), path))
        else:
            _remove_if_stale(path, now, removed)
    keep = sorted({rnd for rnd, _ in mine})[-KEEP_ROUNDS_PER_JOB:]
    for rnd, path in mine:
        if rnd not in keep:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _remove_if_stale(path: Path, now: float, removed: list[Path]) -> None:
    try:
        if now - path.stat().st_mtime > STALE_AFTER_S:
            path.unlink()
            removed.append(path)
    except OSError:
        pass
