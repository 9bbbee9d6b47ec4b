"""Key agreement, key separation, authenticated share bundles, and the masking (``apply_mask``)."""

import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
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


# The production masking, ``crypto.apply_mask``, checked against AES-256-CTR computed here
# with `cryptography` directly (zero IV, one stream per key), and Python's own big integers.


def _keystream_words(key: bytes, count: int, word_bits: int) -> list[int]:
    """The reference PRG: AES-256-CTR keystream under ``key``, read as little-endian words."""
    size = word_bits // 8
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    stream = encryptor.update(bytes(count * size)) + encryptor.finalize()
    return [int.from_bytes(stream[i * size:(i + 1) * size], "little") for i in range(count)]


def _masked_zeros(key: bytes, count: int, dtype) -> np.ndarray:
    acc = np.zeros(count, dtype=dtype)
    crypto.apply_mask(acc, key, +1)
    return acc


@pytest.mark.parametrize("dtype, word_bits", [(np.uint32, 32), (np.uint64, 64)])
@pytest.mark.parametrize("sign", [+1, -1])
@pytest.mark.parametrize("count", [1, 3, 4097])
def test_apply_mask_adds_or_subtracts_the_aes_ctr_keystream_modulo_the_word(dtype, word_bits, sign, count):
    key = os.urandom(32)
    rng = np.random.default_rng(count)
    acc = rng.integers(0, 1 << word_bits, count, dtype=np.uint64, endpoint=False).astype(dtype)
    acc[0] = (1 << word_bits) - 1  # forces a wrap for any non-zero keystream word (sign +1)
    before = [int(a) for a in acc]
    crypto.apply_mask(acc, key, sign)
    stream = _keystream_words(key, count, word_bits)
    expected = [(a + sign * w) % (1 << word_bits) for a, w in zip(before, stream)]
    assert acc.dtype == dtype and [int(a) for a in acc] == expected


@pytest.mark.parametrize("dtype, mod_bits", [(np.uint32, 7), (np.uint32, 32), (np.uint64, 33), (np.uint64, 62)])
def test_apply_mask_round_trips_and_pairwise_masks_cancel_modulo_2k(dtype, mod_bits):
    """What the protocol relies on: +PRG then -PRG is the identity, and a pair's masks cancel in the sum mod 2**k."""
    rng = np.random.default_rng(mod_bits)
    limit = np.uint64((1 << mod_bits) - 1)
    x_a = (rng.integers(0, 1 << 62, 513, dtype=np.uint64) & limit).astype(dtype)
    x_b = (rng.integers(0, 1 << 62, 513, dtype=np.uint64) & limit).astype(dtype)
    pair_key, self_key = os.urandom(32), os.urandom(32)

    y = x_a.copy()
    crypto.apply_mask(y, self_key, +1)
    assert not np.array_equal(y, x_a)
    crypto.apply_mask(y, self_key, -1)
    assert np.array_equal(y, x_a)

    y_a, y_b = x_a.copy(), x_b.copy()
    crypto.apply_mask(y_a, pair_key, +1)  # the lower id adds
    crypto.apply_mask(y_b, pair_key, -1)  # the higher id subtracts
    for y_ in (y_a, y_b):
        np.bitwise_and(y_, dtype(int(limit)), out=y_)
        assert int(y_.max()) <= int(limit)
    total = (y_a.astype(object) + y_b.astype(object)) % (1 << mod_bits)
    assert list(total) == list((x_a.astype(object) + x_b.astype(object)) % (1 << mod_bits))


def test_apply_mask_reuses_its_buffer_without_leaking_one_stream_into_the_next():
    key_long, key_short = os.urandom(32), os.urandom(32)
    long_ = _masked_zeros(key_long, 5000, np.uint32)
    short = _masked_zeros(key_short, 7, np.uint32)  # same thread: the scratch buffer is reused
    assert [int(w) for w in short] == _keystream_words(key_short, 7, 32)
    assert [int(w) for w in long_[:7]] == _keystream_words(key_long, 7, 32)
    assert np.array_equal(_masked_zeros(key_long, 5000, np.uint32), long_)  # deterministic in the key


@pytest.mark.parametrize("mod_bits", [20, 32, 62])
def test_mask_is_uniform(mod_bits):
    dtype = np.uint32 if mod_bits <= 32 else np.uint64
    m = _masked_zeros(os.urandom(32), 1 << 16, dtype).astype(np.uint64) & np.uint64((1 << mod_bits) - 1)
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
    a = _masked_zeros(bytes(key), 1000, np.uint32)
    b = _masked_zeros(bytes(other), 1000, np.uint32)
    assert np.mean(a == b) < 0.01


def test_apply_mask_refuses_short_keys_and_other_word_sizes():
    with pytest.raises(ValueError, match="full 32-byte"):
        crypto.apply_mask(np.zeros(10, dtype=np.uint32), os.urandom(4), +1)
    with pytest.raises(ValueError, match="word_bits=16 must be 32 or 64"):
        crypto.apply_mask(np.zeros(10, dtype=np.uint16), os.urandom(32), +1)


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
    ours_a = _masked_zeros(bytes(seed), 100, np.uint32)
    ours_b = _masked_zeros(bytes(other), 100, np.uint32)
    assert not np.array_equal(ours_a, ours_b)
