"""Key agreement, key separation, authenticated share bundles, and the mask PRG."""

import os

import numpy as np
import pytest
from scipy import stats

from fedpriv.privacy.secagg import ShareDecryptionError, crypto


def test_agreement_is_symmetric_and_keys_are_separated():
    a_sk, a_pk = crypto.generate_keypair()
    b_sk, b_pk = crypto.generate_keypair()
    assert crypto.public_from_private(a_sk) == a_pk
    shared = crypto.agree(a_sk, b_pk)
    assert shared == crypto.agree(b_sk, a_pk) and len(shared) == 32
    ctx = crypto.round_context(3, os.urandom(16))
    enc = crypto.share_encryption_key(shared, ctx, 5, 9)
    assert enc == crypto.share_encryption_key(shared, ctx, 9, 5)  # same for both parties
    mask = crypto.pairwise_mask_key(shared, ctx, 5, 9)
    assert len({enc, mask, shared}) == 3  # never reuse one secret for two purposes
    assert crypto.pairwise_mask_key(shared, crypto.round_context(4, b"x" * 16), 5, 9) != mask
    assert crypto.pairwise_mask_key(shared, ctx, 5, 10) != mask


def test_bundle_round_trip_and_binding():
    key = os.urandom(32)
    blob = crypto.encrypt_bundle(key, b"shares", sender=1, receiver=2, round_id=7)
    assert crypto.decrypt_bundle(key, blob, sender=1, receiver=2, round_id=7) == b"shares"
    for kwargs in ({"sender": 3, "receiver": 2, "round_id": 7},
                   {"sender": 1, "receiver": 3, "round_id": 7},
                   {"sender": 1, "receiver": 2, "round_id": 8}):
        with pytest.raises(ShareDecryptionError):
            crypto.decrypt_bundle(key, blob, **kwargs)


@pytest.mark.parametrize("position", [0, 11, 12, 40, -1])
def test_tampered_bundle_is_rejected_naming_the_sender(position):
    key = os.urandom(32)
    blob = bytearray(crypto.encrypt_bundle(key, b"x" * 70, sender=41, receiver=2, round_id=0))
    blob[position] ^= 0x01
    with pytest.raises(ShareDecryptionError, match="from client 41") as info:
        crypto.decrypt_bundle(key, bytes(blob), sender=41, receiver=2, round_id=0)
    assert info.value.sender == 41


@pytest.mark.parametrize("mod_bits", [1, 7, 20, 32, 33, 50, 62])
def test_mask_is_deterministic_and_in_range(mod_bits):
    key = os.urandom(32)
    m = crypto.mask_vector(key, 4097, mod_bits)
    assert m.dtype == (np.uint32 if mod_bits <= 32 else np.uint64)
    assert int(m.max()) < 1 << mod_bits
    assert np.array_equal(m, crypto.mask_vector(key, 4097, mod_bits))
    assert np.array_equal(m[:100], crypto.mask_vector(key, 100, mod_bits))  # a stream prefix


@pytest.mark.parametrize("mod_bits", [20, 32, 62])
def test_mask_is_uniform(mod_bits):
    m = crypto.mask_vector(os.urandom(32), 1 << 16, mod_bits).astype(np.uint64)
    top = (m >> np.uint64(mod_bits - 6)).astype(np.int64)  # 64 buckets on the high bits
    low = (m & np.uint64(63)).astype(np.int64)  # and on the low bits
    for buckets in (top, low):
        assert stats.chisquare(np.bincount(buckets, minlength=64)).pvalue > 1e-6


@pytest.mark.parametrize("byte", [4, 8, 15, 16, 31])
def test_mask_seed_uses_all_256_bits(byte):
    """Keys differing only outside their low 32 bits must give unrelated masks."""
    key = bytearray(os.urandom(32))
    other = bytearray(key)
    other[byte] ^= 0x80
    a = crypto.mask_vector(bytes(key), 1000, 32)
    b = crypto.mask_vector(bytes(other), 1000, 32)
    assert np.mean(a == b) < 0.01
    with pytest.raises(ValueError, match="full 32-byte"):
        crypto.mask_vector(bytes(key[:4]), 10, 32)


def test_flower_legacy_prg_collapses_seeds_to_32_bits():
    """The weakness this library avoids: Flower's SecAgg+ folds a seed to 32 bits."""
    utils = pytest.importorskip("flwr.common.secure_aggregation.secaggplus_utils")
    seed = bytearray(os.urandom(32))
    other = bytearray(seed)
    other[4] ^= 0xFF  # flip the same bits in two 32-bit words: the XOR fold is unchanged
    other[8] ^= 0xFF
    flwr_a = utils.pseudo_rand_gen(bytes(seed), 1 << 32, [(100,)])[0]
    flwr_b = utils.pseudo_rand_gen(bytes(other), 1 << 32, [(100,)])[0]
    assert np.array_equal(flwr_a, flwr_b)  # two different 256-bit seeds, one mask
    ours_a = crypto.mask_vector(bytes(seed), 100, 32)
    ours_b = crypto.mask_vector(bytes(other), 100, 32)
    assert not np.array_equal(ours_a, ours_b)
