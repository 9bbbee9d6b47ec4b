"""Ports and addresses of a deployment: the defaults, free-port checks, ``HOST:PORT`` parsing, and
whether something answers ``/health`` there.

The three default ports: SuperNodes connect to :data:`FLEET_PORT` (the Fleet-only gateway,
:mod:`fedpriv.deploy.gateway`); ``flower-superlink`` itself listens on :data:`CONTROL_PORT`
on loopback only (Control, Runtime and Fleet APIs); each SuperNode's local ClientApp IO API
is on :data:`CLIENTAPPIO_PORT`.
"""

from __future__ import annotations

import errno
import http.client
import ipaddress
import re
import socket
import ssl

from fedpriv.core.errors import FedprivError

FLEET_PORT = 9092  # what SuperNodes connect to (the gateway)
CONTROL_PORT = 9093  # flower-superlink itself: Control + Runtime + Fleet APIs, loopback only
CLIENTAPPIO_PORT = 9094  # each SuperNode's local ClientApp IO (Runtime) API
DEFAULT_CONTROL = f"127.0.0.1:{CONTROL_PORT}"  # --superlink of `fedpriv register` / `fedpriv run`


def _family(host: str) -> socket.AddressFamily:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host.strip("[]")).version == 6 else socket.AF_INET
    except ValueError:
        return socket.AF_INET


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.bind((host.strip("[]"), 0))
        return int(s.getsockname()[1])


def check_port_free(host: str, port: int, flag: str = "--port") -> None:
    """Raise a one-line :class:`FedprivError` if ``host:port`` cannot be bound.

    Binds the way uvicorn/asyncio do (``SO_REUSEADDR``), so a port in TIME_WAIT
    is not reported as busy, but one with a listener is.
    """
    h = host.strip("[]")
    try:
        with socket.socket(_family(h), socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((h, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise FedprivError(f"port {port} on {h} is already in use: pass {flag} with a free port") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise FedprivError(f"address {h} is not an address of this machine: pass --host with a local address") from None
        if exc.errno == errno.EACCES:
            raise FedprivError(f"port {port} on {h} needs privileges to bind: pass {flag} with a port >= 1024") from None
        raise FedprivError(f"cannot bind {h}:{port}: {exc.strerror or exc}") from None


def is_loopback(host: str) -> bool:
    h = host.strip("[]")
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def format_address(host: str, port: int) -> str:
    h = host.strip("[]")
    return f"[{h}]:{port}" if ":" in h else f"{h}:{port}"


def parse_address(text: str, flag: str = "--superlink") -> tuple[str, int]:
    """``HOST:PORT`` / ``[v6]:PORT`` -> (host, port), with a one-line error."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]\s]+):(\d+)", text.strip())
    if not m:
        raise FedprivError(f"{flag} {text!r}: expected HOST:PORT (IPv6 as [ADDR]:PORT)")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 1 <= port <= 65535:
        raise FedprivError(f"{flag} {text!r}: port must be in 1..65535")
    return host, port


def probe_host(host: str) -> str:
    """The address to reach a listener bound to ``host`` from this machine (a wildcard bind -> loopback)."""
    h = host.strip("[]")
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(h, h)


def get_health(host: str, port: int, cafile: str | None = None, *, check_hostname: bool = True,
               timeout: float = 2.0) -> int:
    """Status of ``GET /health`` at ``host:port``: HTTPS verified against ``cafile``, plain HTTP without one.

    Raises :class:`OSError` (refused, TLS verification failed, ...) or :class:`http.client.HTTPException`;
    :func:`health_status` is the forgiving form.
    """
    h = host.strip("[]")
    if cafile is None:
        conn: http.client.HTTPConnection = http.client.HTTPConnection(h, port, timeout=timeout)
    else:
        ctx = ssl.create_default_context(cafile=str(cafile))
        ctx.check_hostname = check_hostname
        conn = http.client.HTTPSConnection(h, port, timeout=timeout, context=ctx)
    try:
        conn.request("GET", "/health")
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def health_status(host: str, port: int, cafile: str | None = None, timeout: float = 2.0) -> int | None:
    """:func:`get_health` for a readiness check: None if unreachable.

    With ``cafile`` the chain is verified, the host name is not (the probe may use 127.0.0.1
    for a wildcard bind), which is fine for a readiness check.
    """
    try:
        return get_health(host, port, cafile, check_hostname=False, timeout=timeout)
    except (OSError, http.client.HTTPException):
        return None
