"""Push messages, pull their replies until a deadline: the coordinator's one polling loop.

Both :class:`fedpriv.server.faults.WatchedGrid` (train/evaluate, polling every
``POLL_S`` like Flower's ``Grid.send_and_receive``) and the secure-aggregation
workflow (:mod:`fedpriv.server.secagg_workflow`, whose small stage messages come
back within tens of milliseconds) wait through :func:`push_and_pull`; they differ
only in the poll schedule. Given a :class:`WatchedGrid`, pulls are retried through
transient SuperLink errors. :func:`exchange` is the stage-shaped view: one message
per node, replies and reasons by node id.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from logging import INFO
from typing import Any

from flwr.app import Message, RecordDict
from flwr.common.logger import log

from fedpriv.core import contract

#: Secure-aggregation stages poll every ``FAST_S`` s for the first ``FAST_FOR_S`` s (their
#: replies usually come back within that), then back off to ``SLOW_S`` s (each poll is a
#: request to the SuperLink).
FAST_S, FAST_FOR_S, SLOW_S = 0.02, 2.0, 1.0


def every(seconds: float) -> Iterator[float]:
    """A fixed poll interval (Flower's ``send_and_receive`` waits 3 s between polls)."""
    while True:
        yield seconds


def fast_then_backoff(fast: float = FAST_S, fast_for: float = FAST_FOR_S, slow: float = SLOW_S) -> Iterator[float]:
    """``fast`` for ``fast_for`` seconds of waiting, then growing by half each poll up to ``slow``."""
    waited, delay = 0.0, fast
    while True:
        yield delay
        waited += delay
        if waited > fast_for:
            delay = min(delay * 1.5, slow)


def push_and_pull(grid: Any, messages: list[Message], timeout: float | None,
                  delays: Iterator[float] | None = None) -> list[Message]:
    """Push ``messages`` and pull replies until all came back or ``timeout`` seconds passed.

    Pushing is not retried (a push that failed may have been stored); pulling is as robust as
    ``grid.pull_messages`` (a :class:`~fedpriv.server.faults.WatchedGrid` retries transient errors).
    """
    delays = delays if delays is not None else fast_then_backoff()
    end = None if timeout is None else time.monotonic() + timeout
    pending = {mid for mid in grid.push_messages(messages) if mid}
    received: list[Message] = []
    while pending:
        got = list(grid.pull_messages(pending))
        received.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        now = time.monotonic()
        if not pending or (end is not None and now >= end):
            break
        delay = next(delays)
        time.sleep(delay if end is None else max(0.0, min(delay, end - now)))
    return received


@dataclass
class Replies:
    """One stage's outcome: the usable replies, and why every other node is missing."""

    ok: dict[int, Message] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    refusals: list[contract.RegionError] = field(default_factory=list)

    def read(self, decode: Callable[[Message], Any], errors: tuple[type[BaseException], ...]) -> dict[int, Any]:
        """``decode`` every reply; one that cannot be decoded becomes an error (a dropout)."""
        out: dict[int, Any] = {}
        for nid, msg in self.ok.items():
            try:
                out[nid] = decode(msg)
            except errors as exc:
                self.errors[nid] = f"malformed reply ({type(exc).__name__}: {exc})"
        return out


def exchange(grid: Any, message_type: str, contents: Mapping[int, Mapping[str, Any]], group_id: str,
             timeout: float, region_of: Callable[[int], str], delays: Iterator[float] | None = None) -> Replies:
    """Send one message per node (``contents[node_id]``), wait up to ``timeout`` s for the replies.

    Replies are matched by the message they answer: an error the SuperLink sends for an
    unreachable node comes from the SuperLink's node id, not the node's. An error reply is read
    with :func:`fedpriv.core.contract.read_error` (code and reason); a refusal is also listed in
    ``refusals`` so the caller can record it.
    """
    messages = [Message(content=RecordDict(dict(content)), message_type=message_type, dst_node_id=nid,
                        group_id=group_id, ttl=timeout) for nid, content in contents.items()]
    received = push_and_pull(grid, messages, timeout, delays)
    dst_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}  # ids are set on push
    out = Replies()
    for msg in received:
        nid = dst_of.get(msg.metadata.reply_to_message_id)
        if nid is None:
            continue
        if msg.has_error():
            err = contract.read_error(msg, region_of(nid))
            out.errors[nid] = str(err)[:300]
            if err.refused:
                out.refusals.append(err)
        elif msg.metadata.src_node_id != nid:
            out.errors[nid] = f"reply came from node {msg.metadata.src_node_id}, not from the region's node"
        else:
            out.ok[nid] = msg
    for nid in contents:
        if nid not in out.ok and nid not in out.errors:
            out.errors[nid] = f"no reply within secagg-timeout = {timeout:g}s"
    for nid, reason in sorted(out.errors.items()):
        log(INFO, "round %s: %s: region %s dropped out: %s", group_id, message_type, region_of(nid), reason)
    return out
