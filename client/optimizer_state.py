"""A region's local optimizer state (Adam's moments, SGD's momentum), kept between its rounds of one job.

Why: with a fresh optimizer every round (Flower's usual ClientApp, and ``local-optimizer-state = reset``), each
round's first Adam steps are scaled by moments estimated from one or two gradients -- Adam's first step is
``lr * sign(g)`` -- and under DP those gradients are mostly noise, so every round starts with a few random steps
of full size. Kept moments (``local-optimizer-state = keep``) scale the steps by the noise level the region has
already seen, as a centralized DP-Adam run does.

Privacy: the optimizer only ever sees the noised, clipped gradient (Opacus hands it the noisy mean), so its state
is post-processing of DP-SGD steps the accountant counts -- *if* every round it came from was recorded. So the
state is tied to the region's ledger: saved only after the round's release is reserved there, and loaded only
when it belongs to this job's last recorded release. A round that was refused after training, or crashed, leaves
nothing that a later release could carry; anything that does not match is dropped for fresh moments (always
safe). A retried round answered with its stored release (``client/release_store.py``) trains nothing and
touches no state: the next round loads the state saved after that round's first (and only) release, or -- if the
first attempt died between recording the release and saving the state -- finds none and starts fresh. The state
never leaves the region: one file per job beside the region's ledger, readable by its owner
only.

Why a file and not Flower's ``context.state``: with ``--isolation process`` (``fedpriv supernode``) the context
is shipped to every ClientApp process, each secure-aggregation stage included, and the whole encoder's Adam
moments are 180 MB; and a resumed job is a new Flower run, whose context starts empty.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save

from fedpriv.core.files import atomic_write_bytes

STATE_DIR = "optimizer-state"

STALE_AFTER_S = 7 * 24 * 3600
"""Another job's state untouched this long belongs to a job that ended or was abandoned: it is deleted (the whole
encoder's Adam moments are 180 MB a job). Deleting a state is always safe; a job resumed later starts with fresh
moments."""


def state_file(ledger_path: Path, region: str, job_id: str) -> Path:
    """Where ``region``'s optimizer state for ``job_id`` lives: beside its ledger (a hashed job id: any
    characters, fixed length)."""
    digest = hashlib.sha256(job_id.encode()).hexdigest()[:16]
    return Path(ledger_path).parent / STATE_DIR / f"{region}.{digest}.safetensors"


def export_state(optimizer: torch.optim.Optimizer, names: list[str]) -> dict[str, np.ndarray]:
    """The optimizer's per-parameter state as ``"<parameter name>/<key>"`` arrays (``names`` in the order the
    optimizer holds its parameters). Hyper-parameters are not kept: every round takes them from the run config."""
    state = optimizer.state_dict()["state"]
    return {f"{names[index]}/{key}": value.detach().cpu().numpy().copy() if torch.is_tensor(value) else np.asarray(value)
            for index, per_param in state.items() for key, value in per_param.items()}


def import_state(optimizer: torch.optim.Optimizer, names: list[str], arrays: dict[str, np.ndarray]) -> bool:
    """Load what :func:`export_state` wrote into a fresh optimizer over the same parameters. Returns False (and
    loads nothing) unless every parameter has state of its own shape: a partial or foreign state is dropped."""
    fresh = optimizer.state_dict()
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if len(params) != len(names):
        return False
    for index, (name, param) in enumerate(zip(names, params)):
        keys = {key: v for k, v in arrays.items() for owner, sep, key in [k.partition("/")] if sep and owner == name}
        if not keys or any(v.ndim and v.shape != tuple(param.shape) for v in keys.values()):
            return False
        per_param[index] = {k: torch.from_numpy(np.array(v)) for k, v in keys.items()}
    if sum(len(s) for s in per_param.values()) != len(arrays):
        return False
    optimizer.load_state_dict({"state": per_param, "param_groups": fresh["param_groups"]})
    return True


def save_state(path: Path, job_id: str, server_round: int, arrays: dict[str, np.ndarray]) -> None:
    """Write the state after ``server_round`` (atomic; owner-only: it is derived from the region's data)."""
    blob = save({k: v if v.flags.c_contiguous else np.ascontiguousarray(v) for k, v in arrays.items()},  # keeps 0-d
                metadata={"job-id": job_id, "round": str(int(server_round))})
    atomic_write_bytes(Path(path), blob, file_mode=0o600)


def load_state(path: Path, job_id: str, after_round: int | None) -> dict[str, np.ndarray] | None:
    """The state saved after ``after_round`` of ``job_id`` (this job's last release in the ledger), or None:
    no file, another job's or round's file, or one that cannot be read."""
    if after_round is None or not Path(path).is_file():
        return None
    try:
        with safe_open(str(path), framework="numpy") as fh:
            meta = fh.metadata() or {}
            if meta.get("job-id") != job_id or meta.get("round") != str(int(after_round)):
                return None
            return {k: fh.get_tensor(k) for k in fh.keys()}
    except (OSError, SafetensorError):  # a damaged file: fresh moments
        return None


def forget_state(path: Path) -> None:
    """Delete a job's state (its last round is done: nothing will load it). A file already gone is fine."""
    Path(path).unlink(missing_ok=True)


def prune_stale_states(directory: Path, region: str, keep: Path, now: float | None = None) -> list[Path]:
    """Delete ``region``'s states of other jobs last written more than :data:`STALE_AFTER_S` ago (and the
    partial files of interrupted writes, as old); returns what was deleted. ``keep`` (this job's) is never
    touched, nor another region's files."""
    now = time.time() if now is None else now
    removed = []
    candidates = [*Path(directory).glob(f"{region}.*.safetensors"), *Path(directory).glob(f".{region}.*.tmp")]
    for path in candidates:
        if path == Path(keep) or not path.is_file():
            continue
        try:
            if now - path.stat().st_mtime > STALE_AFTER_S:
                path.unlink()
                removed.append(path)
        except OSError:  # gone meanwhile, or not ours to delete: leave it
            continue
    return removed
