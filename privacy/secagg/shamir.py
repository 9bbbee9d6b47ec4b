"""Shamir secret sharing of 32-byte secrets over a 257-bit prime field.

A secret ``s`` (32 bytes, read as an integer ``< 2**256``) becomes the constant
term of a random polynomial ``f`` of degree ``threshold - 1`` over GF(p) with
``p = 2**256 + 297`` (the smallest prime above ``2**256``, so every 32-byte secret
is a field element). Share ``i`` is ``(i, f(i))`` for ``i = 1 .. num_shares``; any
``threshold`` shares recover ``s`` by Lagrange interpolation at 0, and any fewer
reveal nothing about it (information-theoretically). Any ``1 <= threshold <=
num_shares <= 65535`` works, odd or even.

Wire format of one share: 2-byte big-endian x coordinate, then 33-byte big-endian y.
The polynomial coefficients come from :mod:`secrets` (the OS CSPRNG).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

PRIME = (1 << 256) + 297
SECRET_BYTES = 32
_X_BYTES = 2
_Y_BYTES = 33
SHARE_BYTES = _X_BYTES + _Y_BYTES
MAX_SHARES = (1 << (8 * _X_BYTES)) - 1


def split(secret: bytes, threshold: int, num_shares: int) -> list[bytes]:
    """Split a 32-byte ``secret`` into ``num_shares`` shares, any ``threshold`` of which recover it."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secret is {len(secret)} bytes; Shamir sharing here takes exactly {SECRET_BYTES}")
    if not 1 <= num_shares <= MAX_SHARES:
        raise ValueError(f"num_shares={num_shares} is outside [1, {MAX_SHARES}]")
    if not 1 <= threshold <= num_shares:
        raise ValueError(f"threshold={threshold} is outside [1, num_shares={num_shares}]")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in range(1, num_shares + 1):
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares.append(x.to_bytes(_X_BYTES, "big") + y.to_bytes(_Y_BYTES, "big"))
    return shares


def share_index(share: bytes) -> int:
    """The x coordinate (1-based holder index) of a share."""
    _check_share(share)
    return int.from_bytes(share[:_X_BYTES], "big")


def combine(shares: Sequence[bytes], threshold: int) -> bytes:
    """Recover the secret from at least ``threshold`` shares (extra shares are ignored).

    Uses the ``threshold`` shares with the smallest x coordinates. Raises
    ``ValueError`` on too few shares, malformed shares, or duplicated x coordinates.
    Wrong-but-well-formed shares give a wrong secret (callers verify the result
    against a commitment).
    """
    if threshold < 1:
        raise ValueError(f"threshold={threshold} must be >= 1")
    points: dict[int, int] = {}
    for share in shares:
        _check_share(share)
        x = int.from_bytes(share[:_X_BYTES], "big")
        y = int.from_bytes(share[_X_BYTES:], "big")
        if x == 0 or y >= PRIME:
            raise ValueError(f"share with x={x} is not a valid field point")
        if x in points:
            raise ValueError(f"two shares have the same x coordinate {x}")
        points[x] = y
    if len(points) < threshold:
        raise ValueError(f"{len(points)} distinct shares given; {threshold} needed to reconstruct")
    xs = sorted(points)[:threshold]
    secret = 0
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        secret = (secret + points[xi] * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * SECRET_BYTES):
        raise ValueError("shares are inconsistent: the interpolated value is not a 32-byte secret")
    return secret.to_bytes(SECRET_BYTES, "big")


def _check_share(share: bytes) -> None:
    if not isinstance(share, (bytes, bytearray)) or len(share) != SHARE_BYTES:
        size = len(share) if isinstance(share, (bytes, bytearray)) else type(share).__name__
        raise ValueError(f"a share must be {SHARE_BYTES} bytes, got {size}")
