"""The files and directories a deployment command is given: present, readable, private where they must be.

Every check raises a one-line :class:`~fedpriv.core.errors.FedprivError` naming the path and
what to do, before any process starts: a missing certificate, an unreadable data directory
or a group-readable key is the operator's to fix, not a Flower traceback to decode later.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedpriv.core.errors import FedprivError


def require_file(path: Path, what: str, hint: str = "run `fedpriv certs DIR` first") -> Path:
    """``path`` is a file this user can read (``what`` names it in the error, ``hint`` says how to get it)."""
    if not path.is_file():
        raise FedprivError(f"missing {what} {path}: {hint}")
    if not os.access(path, os.R_OK):
        raise FedprivError(f"cannot read {what} {path}: check its owner and permissions")
    return path


def require_data_dir(path: Path, hint: str) -> Path:
    """``path`` (given as ``--data``) is an existing directory this user can list; ``hint`` says what to pass."""
    if not path.exists():
        raise FedprivError(f"data directory {path} does not exist: pass --data with {hint}")
    if not path.is_dir():
        raise FedprivError(f"--data {path} is not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise FedprivError(f"cannot read data directory {path}: check its owner and permissions")
    return path


def resolve_region_data_dir(data_dir: str | os.PathLike, region: str) -> Path:
    """A region's data directory: ``DIR`` itself if it holds ``train.jsonl``, else ``DIR/regions/<region>/``."""
    from fedpriv.task.partition import TRAIN_FILE, holds_one_region, region_shard_dir

    base = require_data_dir(Path(data_dir).expanduser().absolute(), "the prepared data directory")
    if holds_one_region(base):
        chosen = base
    else:
        chosen = region_shard_dir(base, region)
        if not chosen.is_dir():
            raise FedprivError(
                f"no data for region {region!r}: expected {chosen}/ or a train.jsonl directly in {base} "
                "(see `fedpriv prepare-data`)"
            )
    require_data_dir(chosen, "the prepared data directory")
    train = chosen / TRAIN_FILE
    if not train.is_file():
        raise FedprivError(f"no train.jsonl in {chosen}: prepare the region's data there first (see `fedpriv prepare-data`)")
    require_file(train, "training posts")
    return chosen


def require_private_key(path: Path, what: str) -> None:
    """A private key file that other users cannot read (mode 0600 or stricter)."""
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o077:
        raise FedprivError(f"{what} {path} is readable by other users (mode {mode:o}): chmod 600 it")


def prepare_state_file(state_file: Path) -> None:
    """The SuperLink's SQLite state (runs, messages): readable and writable, created private (0600) if new."""
    parent = state_file.parent
    if not parent.is_dir():
        raise FedprivError(f"directory of --state {state_file} does not exist: create {parent} first")
    if state_file.exists():
        if not os.access(state_file, os.R_OK | os.W_OK):
            raise FedprivError(f"cannot read and write state file {state_file}: check its permissions")
        return
    try:
        os.close(os.open(state_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as exc:
        raise FedprivError(f"cannot create state file {state_file}: {exc.strerror or exc}") from exc


def check_node_config_path(what: str, path: Path | None) -> None:
    """A path that goes into Flower's ``--node-config`` string, which quotes values with ``'``."""
    if path is not None and any(ch in str(path) for ch in "'\"\n\r"):
        raise FedprivError(f"{what} {path}: quotes and newlines are not supported in the path")


def git_checkout_of(path: Path) -> Path | None:
    """The git work tree ``path`` would lie in (a parent holding ``.git``), or None."""
    for parent in [path, *path.parents]:
        if (parent / ".git").exists():
            return parent
    return None


def check_private_key_location(path: Path, what: str) -> None:
    """Refuse to write a private key where git would track it (inside a checkout, not ignored).

    A key committed by accident is published for good. Keys belong outside any checkout
    (e.g. under ``~/.fedpriv/``); inside one, only where ``.gitignore`` already ignores them.
    """
    import subprocess

    path = path.expanduser().absolute()
    tree = git_checkout_of(path.parent)
    if tree is None:
        return
    try:
        ignored = subprocess.run(["git", "-C", str(tree), "check-ignore", "-q", "--no-index", str(path)],
                                 capture_output=True, timeout=30, stdin=subprocess.DEVNULL).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ignored = False
    if not ignored:
        raise FedprivError(f"refusing to write {what} {path} inside the git checkout {tree}, where git would track it: "
                           "write keys outside any checkout (e.g. ~/.fedpriv/...) or git-ignore that directory")
