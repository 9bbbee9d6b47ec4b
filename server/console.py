"""The coordinator's console: each round's result printed once, no dump of Flower's result history.

Flower's ``Strategy.start`` logs the centralized evaluation itself ("Initial global evaluation
results: {...}", "Global evaluation └──> MetricRecord: {...}") and, at the end, a "Final results:"
block with every round's metrics again (40 lines for a short run). The coordinator already logs one
line per round ("round N: global model on ... posts: accuracy ..., loss ...") and the privacy report
holds the history, so :class:`QuietResults` -- a standard :class:`logging.Filter` on Flower's public
``FLOWER_LOGGER`` -- drops exactly those lines while :meth:`Coordinator.run` runs the strategy.
Everything else Flower logs (rounds, sampling, warnings, errors) is left alone.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

from flwr.common.logger import FLOWER_LOGGER

#: Message templates of flwr.serverapp.strategy.Strategy.start (flwr 1.41) that repeat the coordinator's lines.
_REPEATS = frozenset({"Initial global evaluation results: %s", "Global evaluation", "\t└──> MetricRecord: %s"})
_FINAL = "Final results:"


class QuietResults(logging.Filter):
    """Drops Flower's repeated evaluation lines and its "Final results:" block (the lines after it, up to the
    next line of another kind)."""

    def __init__(self) -> None:
        super().__init__()
        self.in_final_block = False

    def filter(self, record: logging.LogRecord) -> bool:
        template = str(record.msg)
        if template == _FINAL:
            self.in_final_block = True
            return False
        if self.in_final_block:
            if template in ("", "\t%s"):
                return False
            self.in_final_block = False
        return template not in _REPEATS


@contextlib.contextmanager
def quiet_flower_results() -> Iterator[QuietResults]:
    """:class:`QuietResults` on Flower's logger for the duration of the block."""
    quiet = QuietResults()
    FLOWER_LOGGER.addFilter(quiet)
    try:
        yield quiet
    finally:
        FLOWER_LOGGER.removeFilter(quiet)
