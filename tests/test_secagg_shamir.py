"""Shamir sharing of 32-byte secrets: any threshold, any share count."""

import itertools
import os
import random

import pytest

from fedpriv.privacy.secagg import shamir


def _is_probable_prime(n: int) -> bool:
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53):
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def test_field_holds_every_32_byte_secret():
    assert shamir.PRIME > (1 << 256) and _is_probable_prime(shamir.PRIME)


@pytest.mark.parametrize("num", range(1, 8))
def test_every_threshold_and_every_subset_reconstructs(num):
    for t in range(1, num + 1):
        for secret in (os.urandom(32), b"\x00" * 32, b"\xff" * 32):
            shares = shamir.split(secret, t, num)
            assert len(shares) == num and all(len(s) == shamir.SHARE_BYTES for s in shares)
            assert [shamir.share_index(s) for s in shares] == list(range(1, num + 1))
            for subset in itertools.combinations(shares, t):
                assert shamir.combine(list(subset), t) == secret
            assert shamir.combine(shares, t) == secret  # extra shares are fine


@pytest.mark.parametrize("t, num", [(2, 2), (4, 4), (6, 10), (10, 20), (21, 40)])
def test_larger_even_and_odd_share_counts(t, num):
    secret = os.urandom(32)
    shares = shamir.split(secret, t, num)
    random.Random(t).shuffle(shares)
    assert shamir.combine(shares[:t], t) == secret


def test_too_few_duplicate_or_malformed_shares_raise():
    shares = shamir.split(os.urandom(32), 3, 5)
    with pytest.raises(ValueError, match="3 needed"):
        shamir.combine(shares[:2], 3)
    with pytest.raises(ValueError, match="same x"):
        shamir.combine([shares[0], shares[0], shares[1]], 3)
    with pytest.raises(ValueError, match="35 bytes"):
        shamir.combine([shares[0][:-1]] + shares[1:], 3)
    with pytest.raises(ValueError, match="exactly 32"):
        shamir.split(b"short", 2, 3)
    with pytest.raises(ValueError, match="threshold"):
        shamir.split(os.urandom(32), 4, 3)


def test_tampered_share_changes_the_secret():
    secret = os.urandom(32)
    shares = shamir.split(secret, 3, 3)
    bad = bytearray(shares[1])
    bad[-1] ^= 1
    try:
        assert shamir.combine([shares[0], bytes(bad), shares[2]], 3) != secret
    except ValueError:
        pass  # or it interpolates to a value outside 32 bytes

