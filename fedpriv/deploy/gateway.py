"""The Fleet-only TLS gateway in front of the coordinator's loopback SuperLink.

Why a gateway: in flwr 1.41 ``flower-superlink`` serves the Fleet API (SuperNodes),
the Control API (``flwr run``/``flwr supernode register``/...) *and* the Runtime
API (the ServerApp's task queue) on one HTTPS port (``--host``/``--port``); the old
``--control-api-address`` / ``--fleet-api-address`` flags are deprecated no-ops for
the HTTP APIs. Flower's open-source SuperLink does not authenticate the Control API,
and the Runtime API's ``acquire-task`` is unauthenticated in ``--isolation
subprocess``. Exposing that port to the network would let anyone who reaches it
register their own SuperNode key (defeating SuperNode authentication), submit a run
(code execution on the coordinator) or grab a ServerApp task.

So fedpriv binds ``flower-superlink`` to loopback only and exposes just this gateway:
it terminates TLS with the SuperLink's own certificate, forwards ``POST
/v1/fleet/<method>`` and ``GET|HEAD /health`` to the loopback SuperLink over TLS
(verifying it against the deployment CA), and answers everything else with 403.
SuperNode authentication is end to end: SuperNodes sign each request and the
SuperLink verifies it; the gateway never sees a key.

Run as ``python -m fedpriv.deploy.gateway ...`` (see :func:`main`);
:class:`fedpriv.deploy.superlink.SuperLinkProcess` starts it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import ssl
import sys
from dataclasses import dataclass

from fedpriv.deploy.ports import format_address

_FLEET_PATH = re.compile(rb"^/v1/fleet/[a-z0-9-]{1,64}$")
_HOP_HEADERS = {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded", b"x-real-ip"}
MAX_HEAD = 64 * 1024
IO_TIMEOUT = 120.0  # seconds without progress before a connection is dropped
CHUNK = 256 * 1024


class _Reject(Exception):
    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.reason, self.detail = status, reason, detail


@dataclass
class _Request:
    head: bytes
    length: int | None  # Content-Length, or None when chunked
    chunked: bool
    desc: str


def _parse_head(head: bytes, client_ip: str) -> _Request:
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise _Reject(400, "Bad Request", "malformed request line")
    method, target, version = parts
    desc = f"{method.decode('latin-1')} {target[:80].decode('latin-1')}"
    allowed = (method == b"POST" and _FLEET_PATH.match(target)) or (method in (b"GET", b"HEAD") and target == b"/health")
    if not allowed:
        raise _Reject(403, "Forbidden", desc)
    out = [lines[0]]
    length: int | None = None
    chunked = False
    for line in lines[1:]:
        if not line or line[:1] in (b" ", b"\t") or b":" not in line:
            raise _Reject(400, "Bad Request", "malformed header")
        name, _, value = line.partition(b":")
        lname, value = name.strip().lower(), value.strip()
        if name != name.strip() or not lname:
            raise _Reject(400, "Bad Request", "malformed header name")
        if lname in _HOP_HEADERS:
            continue  # never trust client-supplied forwarding headers
        if lname == b"upgrade":
            raise _Reject(400, "Bad Request", "protocol upgrade not allowed")
        if lname == b"content-length":
            if not value.isdigit() or (length is not None and int(value) != length):
                raise _Reject(400, "Bad Request", "bad Content-Length")
            length = int(value)
        if lname == b"transfer-encoding":
            if value.lower() != b"chunked" or chunked:
                raise _Reject(501, "Not Implemented", "unsupported Transfer-Encoding")
            chunked = True
        out.append(line)
    if chunked and length is not None:
        raise _Reject(400, "Bad Request", "both Content-Length and Transfer-Encoding")
    out.append(b"X-Forwarded-For: " + client_ip.encode("ascii"))
    out.append(b"X-Forwarded-Proto: https")
    del version
    return _Request(b"\r\n".join(out) + b"\r\n\r\n", 0 if (length is None and not chunked) else length, chunked, desc)


class FleetGateway:
    """Accept TLS on ``listen``; forward Fleet API requests to the loopback SuperLink."""

    def __init__(
        self,
        listen_host: str,
        listen_port: int,
        upstream_host: str,
        upstream_port: int,
        certfile: str,
        keyfile: str,
        cafile: str,
        max_connections: int = 512,
        parent_pid: int | None = None,
    ) -> None:
        self.listen_host, self.listen_port = listen_host.strip("[]"), listen_port
        self.upstream_host, self.upstream_port = upstream_host.strip("[]"), upstream_port
        self.server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server_ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self.server_ctx.load_cert_chain(certfile, keyfile)
        self.server_ctx.set_alpn_protocols(["http/1.1"])
        self.client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
        self.client_ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self.slots = asyncio.Semaphore(max_connections)
        self.parent_pid = parent_pid

    def log(self, msg: str) -> None:
        print(f"fedpriv-gateway: {msg}", file=sys.stderr, flush=True)

    async def serve(self) -> None:
        server = await asyncio.start_server(
            self._handle, self.listen_host, self.listen_port, ssl=self.server_ctx,
            ssl_handshake_timeout=30.0, limit=MAX_HEAD, reuse_address=True,
        )
        self.log(
            f"serving the Fleet API only on https://{format_address(self.listen_host, self.listen_port)} "
            f"-> https://{format_address(self.upstream_host, self.upstream_port)} (Control and Runtime APIs blocked)"
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, stop.set)
        watcher = asyncio.create_task(self._watch_parent(stop))
        async with server:
            await stop.wait()
        watcher.cancel()
        self.log("stopped")

    async def _watch_parent(self, stop: asyncio.Event) -> None:
        if self.parent_pid is None:
            return
        while True:
            await asyncio.sleep(1.0)
            if os.getppid() != self.parent_pid:
                self.log(f"parent process {self.parent_pid} is gone; stopping")
                stop.set()
                return

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        if self.slots.locked():
            cwriter.close()
            return
        async with self.slots:
            peer = cwriter.get_extra_info("peername") or ("?", 0)
            try:
                await self._requests(creader, cwriter, str(peer[0]))
            finally:
                cwriter.close()

    async def _requests(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter, client_ip: str) -> None:
        """Read requests from the client, check each, and forward the allowed ones.

        Responses flow back through :meth:`_pump`, which copies the upstream byte
        stream unchanged (HTTP/1.1 keeps responses in request order).
        """
        ureader = uwriter = None
        pump: asyncio.Task | None = None
        forwarded = 0
        try:
            while True:
                try:
                    head = await asyncio.wait_for(creader.readuntil(b"\r\n\r\n"), IO_TIMEOUT)
                except asyncio.IncompleteReadError as exc:
                    if exc.partial.strip():
                        raise _Reject(400, "Bad Request", "truncated request head") from None
                    return
                except asyncio.LimitOverrunError:
                    raise _Reject(431, "Request Header Fields Too Large", "request head too large") from None
                except (asyncio.TimeoutError, ConnectionError, ssl.SSLError):
                    return
                req = _parse_head(head, client_ip)
                if uwriter is None:
                    try:
                        ureader, uwriter = await asyncio.wait_for(
                            asyncio.open_connection(
                                self.upstream_host, self.upstream_port, ssl=self.client_ctx,
                                server_hostname=self.upstream_host, limit=CHUNK,
                            ),
                            30.0,
                        )
                    except (OSError, asyncio.TimeoutError) as exc:
                        self.log(f"cannot reach the SuperLink at {format_address(self.upstream_host, self.upstream_port)}: {exc}")
                        raise _Reject(502, "Bad Gateway", "SuperLink unreachable") from None
                    pump = asyncio.create_task(self._pump(ureader, cwriter))
                if pump is not None and pump.done():
                    return
                uwriter.write(req.head)
                if req.chunked:
                    await self._copy_chunked(creader, uwriter)
                elif req.length:
                    await self._copy_exact(creader, uwriter, req.length)
                await uwriter.drain()
                forwarded += 1
        except _Reject as rej:
            self.log(f"rejected {rej.detail!r} from {client_ip}: {rej.status} {rej.reason}")
            if forwarded == 0:
                body = (
                    f"{rej.status} {rej.reason}: this port serves only the Flower Fleet API for SuperNodes; "
                    "the Control API listens on the coordinator's loopback interface.\n"
                ).encode()
                cwriter.write(
                    f"HTTP/1.1 {rej.status} {rej.reason}\r\nContent-Type: text/plain\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
                )
                try:
                    await asyncio.wait_for(cwriter.drain(), 10)
                except (OSError, asyncio.TimeoutError):
                    pass
        except (ConnectionError, asyncio.TimeoutError, asyncio.IncompleteReadError, ssl.SSLError):
            return
        finally:
            if pump is not None:
                pump.cancel()
                try:
                    await pump
                except BaseException:  # noqa: BLE001 - teardown
                    pass
            if uwriter is not None:
                uwriter.close()

    async def _pump(self, ureader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        """Copy upstream responses to the client until either side closes."""
        try:
            while True:
                data = await ureader.read(CHUNK)
                if not data:
                    return
                cwriter.write(data)
                await asyncio.wait_for(cwriter.drain(), IO_TIMEOUT)
        except (ConnectionError, asyncio.TimeoutError, ssl.SSLError):
            return
        finally:
            cwriter.close()

    @staticmethod
    async def _copy_exact(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while n > 0:
            data = await asyncio.wait_for(reader.read(min(n, CHUNK)), IO_TIMEOUT)
            if not data:
                raise asyncio.IncompleteReadError(b"", n)
            writer.write(data)
            n -= len(data)
            await asyncio.wait_for(writer.drain(), IO_TIMEOUT)

    async def _copy_chunked(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            line = await asyncio.wait_for(reader.readuntil(b"\r\n"), IO_TIMEOUT)
            writer.write(line)
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise _Reject(400, "Bad Request", "bad chunk size") from None
            if size == 0:
                while True:  # trailers, then the empty line
                    trailer = await asyncio.wait_for(reader.readuntil(b"\r\n"), IO_TIMEOUT)
                    writer.write(trailer)
                    if trailer == b"\r\n":
                        return
            await self._copy_exact(reader, writer, size)
            crlf = await asyncio.wait_for(reader.readexactly(2), IO_TIMEOUT)
            if crlf != b"\r\n":
                raise _Reject(400, "Bad Request", "bad chunk framing")
            writer.write(crlf)


def main(argv: list[str] | None = None) -> int:
    """``python -m fedpriv.deploy.gateway --listen-host H --listen-port P --upstream-port C ...`` (what SuperLinkProcess runs)."""
    g = argparse.ArgumentParser(prog="python -m fedpriv.deploy.gateway",
                                description="Serve only the Fleet API of a loopback SuperLink on HOST:PORT (TLS).")
    g.add_argument("--listen-host", required=True)
    g.add_argument("--listen-port", type=int, required=True)
    g.add_argument("--upstream-host", default="127.0.0.1")
    g.add_argument("--upstream-port", type=int, required=True)
    g.add_argument("--certfile", required=True)
    g.add_argument("--keyfile", required=True)
    g.add_argument("--cafile", required=True)
    g.add_argument("--parent-pid", type=int, default=None)
    args = g.parse_args(argv)
    try:
        gw = FleetGateway(
            args.listen_host, args.listen_port, args.upstream_host, args.upstream_port,
            args.certfile, args.keyfile, args.cafile, parent_pid=args.parent_pid,
        )
        asyncio.run(gw.serve())
    except (OSError, ssl.SSLError) as exc:
        print(f"fedpriv-gateway: error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
