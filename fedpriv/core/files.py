"""Writing a file so that a reader never sees half of it, whatever stops the writer.

Reports, checkpoints, shards, caches and Flower connection files are all read by
another process (a resumed coordinator, a region, ``fedpriv report``) that may start
while the writer is killed. Every fedpriv writer goes through this one helper: write a
uniquely named temporary file in the same folder, ``fsync`` it, then ``os.replace`` it
over the target (atomic on POSIX), so the target is either the old file or the new one.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", *, file_mode: int | None = None) -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; on success it replaces ``path``.

    ``mode`` is ``"w"`` (text, UTF-8) or ``"wb"``. Permissions are set before any byte is written:
    ``file_mode`` (e.g. ``0o600`` for secrets) if given; otherwise those of the file being replaced (an
    operator's ``chmod`` survives the rewrite), and for a new file what ``open()`` would give (0666 less
    the umask) -- not ``mkstemp``'s 0600, which would lock a report away from the privacy officer it is
    written for. If the block raises, the target is untouched and the temporary file is
    removed.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open mode must be 'w' or 'wb', not {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{secrets.token_hex(8)}.tmp"
    # Created with the secret's mode, or as open() would (0666 less the umask, applied by the kernel): a secret's
    # file is never, even empty, open to others (an fd opened then could read it later). O_EXCL: never another's file.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                 0o666 if file_mode is None else file_mode)
    try:
        mode_now = file_mode if file_mode is not None else _existing_mode(target)
        if mode_now is not None:
            os.fchmod(fd, mode_now)
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _existing_mode(target: Path) -> int | None:
    """The permission bits of the file being replaced, or None for a new file."""
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        return None


def atomic_write_text(path: str | Path, text: str, *, file_mode: int | None = None) -> Path:
    """Replace ``path`` with ``text`` (UTF-8) atomically; returns the path."""
    with atomic_open(path, "w", file_mode=file_mode) as fh:
        fh.write(text)
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes, *, file_mode: int | None = None) -> Path:
    """Replace ``path`` with ``data`` atomically; returns the path."""
    with atomic_open(path, "wb", file_mode=file_mode) as fh:
        fh.write(data)
    return Path(path)


__all__ = ["atomic_open", "atomic_write_bytes", "atomic_write_text"]
