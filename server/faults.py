"""Lost regions become visible: a Grid wrapper that names every region that did not answer.

Flower's ``Grid.send_and_receive`` returns only the replies that arrived before the
round's timeout; a region whose process died is either simply absent, or - once
its SuperNode has missed its heartbeats - answered for by the SuperLink with a
``NODE_UNAVAILABLE`` error sent *from the SuperLink's node id*. Either way the
strategy cannot tell which region was lost. :class:`WatchedGrid` wraps the Grid
for train/evaluate messages and turns both cases into an error reply from the
lost node that reads ``"<region>|<reason>"`` - the format fedpriv ClientApps use
for their own errors (:mod:`fedpriv.core.contract`, which also owns the error codes
:data:`~fedpriv.core.contract.LOST` and :data:`~fedpriv.core.contract.UNREACHABLE`) - so :class:`~fedpriv.strategies.private_fedavg.PrivateFedAvg`
records the failed region, per round, in the report.

It also rides out *transient* SuperLink errors while waiting for replies (an HTTP
5xx such as SQLite's "database is locked" on a loaded coordinator, a dropped
connection): Flower's own ``send_and_receive`` lets one failed poll kill the
ServerApp, and with it the run. Pushing is not retried (a push that failed may
have been stored); polls are, with back-off, up to ``MAX_POLL_FAILURES`` in a row.
The waiting itself is :func:`fedpriv.server.transport.push_and_pull`, the loop the
secure-aggregation stages use too (through this grid, so they are retried alike).

Region names come from the SuperLink's node registry (``fedpriv register`` gives
each SuperNode key its region name), else from earlier replies, else
``node-<id>``. Messages of other types (e.g. a secure-aggregation stage) pass
through untouched.
"""

from __future__ import annotations

import re
import time
from logging import WARNING
from typing import Callable, Iterable

from flwr.app import Message, MessageType
from flwr.common.logger import log

from fedpriv.core import contract
from fedpriv.core.contract import LOST, UNREACHABLE
from fedpriv.server import transport

WATCHED_TYPES = (MessageType.TRAIN, MessageType.EVALUATE)
POLL_S = 3.0  # as Flower's Grid.send_and_receive
MAX_POLL_FAILURES = 10  # consecutive transient failures (~2 min with back-off) before giving up


def is_transient(exc: BaseException) -> bool:
    """A SuperLink hiccup worth retrying: HTTP 5xx, or the connection failed/timed out."""
    try:
        import httpx
    except ImportError:  # pragma: no cover - flwr depends on httpx
        return False
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response is not None and exc.response.status_code >= 500
    return isinstance(exc, httpx.TransportError)


class WatchedGrid:
    """Delegates everything to ``grid``; completes ``send_and_receive`` with named errors for lost regions."""

    def __init__(self, grid, regions: Iterable[str], lookup: Callable[[int], str | None] | None = None):
        self._grid = grid
        self._regions = set(regions)
        self._lookup = lookup
        self.node_names: dict[int, str] = {}
        self.lost: list[tuple[str, str]] = []  # (region, reason), in the order seen

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def refresh_names(self) -> None:
        """Learn node id -> region from the SuperLink's registry (names given by `fedpriv register`)."""
        try:
            nodes = list(self._grid.get_nodes())
        except Exception:  # noqa: BLE001 - simulation grids may not list names; names are a nicety
            return
        for node in nodes:
            name = str(getattr(node, "name", "") or "")
            if name in self._regions:
                self.node_names[int(node.node_id)] = name

    def region_of(self, node_id: int) -> str:
        if node_id in self.node_names:
            return self.node_names[node_id]
        if self._lookup is not None:
            found = self._lookup(node_id)
            if found:
                return found
        return f"node-{node_id}"

    def get_node_ids(self) -> Iterable[int]:
        return self._retry(lambda: list(self._grid.get_node_ids()), "listing nodes")

    def _retry(self, call: Callable, what: str):
        failures = 0
        while True:
            try:
                return call()
            except Exception as exc:  # noqa: BLE001 - only transient ones are retried
                failures += 1
                if not is_transient(exc) or failures > MAX_POLL_FAILURES:
                    raise
                log(WARNING, "SuperLink error while %s (%s); retrying (%d/%d)", what, _last_line(str(exc)),
                    failures, MAX_POLL_FAILURES)
                time.sleep(min(POLL_S * failures, 15.0))

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """Pulling is idempotent, so a transient SuperLink error is retried (also for the secagg stages' polling).
        Pushes are not retried: a failed push may still have been stored."""
        ids = list(message_ids)
        return self._retry(lambda: list(self._grid.pull_messages(ids)), "waiting for replies")

    def _send_and_receive(self, sent: list[Message], timeout: float | None) -> list[Message]:
        """Flower's push-then-poll loop (every ``POLL_S``), with transient poll failures retried."""
        if not hasattr(self._grid, "push_messages") or not hasattr(self._grid, "pull_messages"):
            return list(self._grid.send_and_receive(sent, timeout=timeout))
        return transport.push_and_pull(self, sent, timeout, transport.every(POLL_S))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        sent = list(messages)
        if not any(m.metadata.message_type in WATCHED_TYPES for m in sent):
            return self._send_and_receive(sent, timeout)
        self.refresh_names()
        started = time.monotonic()
        replies = self._send_and_receive(sent, timeout)
        by_id = {m.metadata.message_id: m for m in sent if m.metadata.message_id}
        out: list[Message] = []
        answered: set[str] = set()
        for reply in replies:
            original = by_id.get(reply.metadata.reply_to_message_id)
            if original is not None:
                answered.add(original.metadata.message_id)
            if original is None or not reply.has_error():
                out.append(reply)
                continue
            region = self.region_of(original.metadata.dst_node_id)
            reason = str(reply.error.reason or "")
            if reply.metadata.src_node_id != original.metadata.dst_node_id:  # answered by the SuperLink itself
                out.append(self._lost(original, region, UNREACHABLE,
                                      f"its SuperNode stopped answering (missed heartbeats): {_last_line(reason)}"))
            elif contract.split_reason(reason)[0] is not None:
                out.append(reply)  # already "<region>|<reason>" from a fedpriv ClientApp
            else:  # the ClientApp raised: "<Error>: <message>" on one line, never a repr or a traceback
                out.append(contract.error_reply(original, region, clientapp_error(reason), code=int(reply.error.code)))
        waited = time.monotonic() - started
        for original in sent:
            if original.metadata.message_id and original.metadata.message_id not in answered:
                region = self.region_of(original.metadata.dst_node_id)
                out.append(self._lost(original, region, LOST,
                                      f"no reply within round-timeout ({waited:.0f}s): its process died or is too slow"))
        return out

    def _lost(self, original: Message, region: str, code: int, reason: str) -> Message:
        self.lost.append((region, reason))
        if original.metadata.message_type != MessageType.TRAIN:  # a train reply gets the strategy's one line
            log(WARNING, "region %s lost in this round: %s", region, reason)
        return contract.error_reply(original, region, reason, code=code)


_FLOWER_REASON = re.compile(r"^<class '(?:[\w.]*\.)?(\w+)'>:<'(.*)'>$", re.DOTALL)


def clientapp_error(reason: str) -> str:
    """The one line of an exception a region's ClientApp process raised, as Flower reports it.

    Flower writes ``"<class 'pkg.FedprivError'>:<'app bundle ... is not signed ...'>"`` (the exception's
    repr-like form) for anything a ClientApp -- or fedpriv's bundle gate in front of it -- raised; that
    becomes ``"FedprivError: app bundle ... is not signed ..."``; a traceback becomes its last line.
    """
    text = str(reason).strip()
    found = _FLOWER_REASON.match(text)
    if found:
        name, message = found.group(1), " ".join(found.group(2).split())
        return f"{name}: {message}"[:300] if message else name
    return _last_line(text)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "no reason given")[:300]
