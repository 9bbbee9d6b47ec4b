"""Progress of a long step, readable in a log file as well as on a terminal.

A region's first round can spend minutes extracting features of its whole shard before the
first DP-SGD step (8.5 silent minutes for 14 886 posts on 2 CPU cores). :class:`Progress` shows
it: a tqdm bar on a terminal, and in a log file (a SuperNode's ``--log``, a simulation's stream)
one line at most every ``every_s`` seconds plus the last one -- ``us-east: feature extraction
(train): 4096/14886 posts (28%), 141s, about 6 min left`` -- instead of tqdm's carriage returns.
"""

from __future__ import annotations

import sys
import time
from typing import IO


class Progress:
    """Counts ``total`` units of ``what``; call it with each batch's size, then :meth:`close`."""

    def __init__(self, what: str, total: int, unit: str = "posts", every_s: float = 30.0,
                 stream: IO[str] | None = None):
        self.what, self.total, self.unit, self.every_s = what, max(0, int(total)), unit, every_s
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.started = self.last = time.monotonic()
        self.bar = None

    def __call__(self, n: int) -> None:
        if self.done == 0 and self.stream.isatty():  # a bar only once there is work (a cache hit shows nothing)
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc=self.what, unit=self.unit, file=self.stream, leave=False)
        self.done += int(n)
        if self.bar is not None:
            self.bar.update(int(n))
            return
        now = time.monotonic()
        if now - self.last >= self.every_s and self.done < self.total:
            self.last = now
            self._line(now)

    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        elapsed = now - self.started
        pct = 100.0 * self.done / self.total if self.total else 100.0
        text = f"{self.what}: {self.done}/{self.total} {self.unit} ({pct:.0f}%), {elapsed:.0f}s"
        if 0 < self.done < self.total:
            text += f", about {max(1, round(elapsed * (self.total - self.done) / self.done / 60))} min left"
        return text

    def _line(self, now: float) -> None:
        print(self.line(now), file=self.stream, flush=True)

    def close(self) -> None:
        """The last line (also when the step took less than ``every_s``: the log shows it ran)."""
        if self.bar is not None:
            self.bar.close()
        else:
            self._line(time.monotonic())
