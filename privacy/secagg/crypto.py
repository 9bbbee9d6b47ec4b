"""Cryptographic primitives: X25519 agreement, HKDF key separation, AES-GCM bundles, mask PRG.

All primitives come from ``cryptography`` (OpenSSL). Key hygiene:

* Every symmetric key is derived with HKDF-SHA256 from a full 32-byte secret,
  with a *salt* that binds the round (:func:`round_context`) and an *info* label
  that separates purposes (share encryption vs pairwise mask vs self mask) and
  names the parties. The same X25519 secret never keys two different things.
* Share bundles are sealed with AES-256-GCM; the associated data binds sender,
  receiver and round, so a bundle replayed to another client, attributed to another
  sender or carried into another round fails authentication.
* Masks come from AES-256-CTR keyed with a derived 256-bit key (all of it: no
  folding to 32 bits), read as little-endian unsigned words. Because ``2**k``
  divides the word size, reducing the words mod ``2**k`` is exactly uniform.
"""

from __future__ import annotations

import hashlib
import os
import threading

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from .errors import ShareDecryptionError

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
PROTOCOL_LABEL = b"fedpriv-secagg/v1"

_LABEL_SHARE_KEY = PROTOCOL_LABEL + b"/share-encryption"
_LABEL_PAIR_MASK = PROTOCOL_LABEL + b"/pairwise-mask"
_LABEL_SELF_MASK = PROTOCOL_LABEL + b"/self-mask"
_LABEL_BUNDLE_AAD = PROTOCOL_LABEL + b"/share-bundle"
_LABEL_COMMIT = PROTOCOL_LABEL + b"/seed-commitment"


def _u64(value: int) -> bytes:
    return int(value).to_bytes(8, "big", signed=False)


# --------------------------------------------------------------------------- keys


def generate_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as raw bytes ``(private32, public32)``."""
    sk = X25519PrivateKey.generate()
    return (
        sk.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()),
        sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw),
    )


def public_from_private(private_key: bytes) -> bytes:
    """The X25519 public key of a raw 32-byte private key."""
    sk = X25519PrivateKey.from_private_bytes(bytes(private_key))
    return sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def agree(private_key: bytes, peer_public_key: bytes) -> bytes:
    """Raw X25519 shared secret (32 bytes). Raises ``ValueError`` for a low-order peer key."""
    sk = X25519PrivateKey.from_private_bytes(bytes(private_key))
    return sk.exchange(X25519PublicKey.from_public_bytes(bytes(peer_public_key)))


def hkdf(ikm: bytes, *, salt: bytes, info: bytes, length: int = KEY_BYTES) -> bytes:
    """HKDF-SHA256 (RFC 5869)."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def round_context(round_id: int, round_seed: bytes) -> bytes:
    """32-byte digest naming one round; used as the HKDF salt of every derived key."""
    return hashlib.sha256(PROTOCOL_LABEL + b"/round" + _u64(round_id) + _u64(len(round_seed)) + round_seed).digest()


def _pair(a: int, b: int) -> bytes:
    lo, hi = (a, b) if a < b else (b, a)
    return _u64(lo) + _u64(hi)


def share_encryption_key(c_shared: bytes, context: bytes, a: int, b: int) -> bytes:
    """AES-GCM key for the share bundles between clients ``a`` and ``b`` (from the c-agreement)."""
    return hkdf(c_shared, salt=context, info=_LABEL_SHARE_KEY + _pair(a, b))


def pairwise_mask_key(s_shared: bytes, context: bytes, a: int, b: int) -> bytes:
    """PRG key of the pairwise mask between clients ``a`` and ``b`` (from the s-agreement)."""
    return hkdf(s_shared, salt=context, info=_LABEL_PAIR_MASK + _pair(a, b))


def self_mask_key(seed: bytes, context: bytes, owner: int) -> bytes:
    """PRG key of client ``owner``'s self mask, from its 32-byte seed ``b_u``."""
    return hkdf(seed, salt=context, info=_LABEL_SELF_MASK + _u64(owner))


def seed_commitment(seed: bytes, context: bytes, owner: int) -> bytes:
    """SHA-256 commitment to a self-mask seed (lets the server check its reconstruction)."""
    return hashlib.sha256(_LABEL_COMMIT + context + _u64(owner) + seed).digest()


# ------------------------------------------------------------------ share bundles


def _bundle_aad(sender: int, receiver: int, round_id: int) -> bytes:
    return _LABEL_BUNDLE_AAD + _u64(sender) + _u64(receiver) + _u64(round_id)


def encrypt_bundle(key: bytes, plaintext: bytes, *, sender: int, receiver: int, round_id: int) -> bytes:
    """AES-256-GCM seal; output is ``nonce || ciphertext || tag``."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, _bundle_aad(sender, receiver, round_id))


def decrypt_bundle(key: bytes, blob: bytes, *, sender: int, receiver: int, round_id: int) -> bytes:
    """Open a bundle sealed by :func:`encrypt_bundle`; raises :class:`ShareDecryptionError` naming the sender."""
    if not isinstance(blob, (bytes, bytearray)) or len(blob) < NONCE_BYTES + TAG_BYTES:
        raise ShareDecryptionError(sender, receiver, round_id)
    try:
        return AESGCM(key).decrypt(
            bytes(blob[:NONCE_BYTES]), bytes(blob[NONCE_BYTES:]), _bundle_aad(sender, receiver, round_id)
        )
    except InvalidTag:
        raise ShareDecryptionError(sender, receiver, round_id) from None


# ------------------------------------------------------------------------- masks

_ZERO_LOCK = threading.Lock()
_ZEROS = b""
_ZERO_CACHE_LIMIT = 64 << 20
_CTR_IV = bytes(16)  # every PRG key is used for exactly one stream
_SCRATCH = threading.local()  # per-thread keystream buffer reused by apply_mask


def _zeros(nbytes: int) -> memoryview:
    global _ZEROS
    if nbytes > _ZERO_CACHE_LIMIT:
        return memoryview(bytes(nbytes))
    with _ZERO_LOCK:
        if len(_ZEROS) < nbytes:
            _ZEROS = bytes(max(nbytes, 2 * len(_ZEROS)))
        return memoryview(_ZEROS)[:nbytes]


def _keystream_into(key: bytes, out: np.ndarray, nbytes: int) -> None:
    if len(key) != KEY_BYTES:
        raise ValueError(f"PRG key is {len(key)} bytes; it must be a full {KEY_BYTES}-byte key")
    encryptor = Cipher(algorithms.AES(bytes(key)), modes.CTR(_CTR_IV)).encryptor()
    written = encryptor.update_into(_zeros(nbytes), out)
    if written != nbytes:
        raise RuntimeError(f"AES-CTR produced {written} bytes, expected {nbytes}")


def _word_dtype(word_bits: int) -> np.dtype:
    if word_bits not in (32, 64):
        raise ValueError(f"word_bits={word_bits} must be 32 or 64")
    return np.dtype("<u4") if word_bits == 32 else np.dtype("<u8")


def apply_mask(acc: np.ndarray, key: bytes, sign: int) -> None:
    """In place: ``acc += sign * PRG(key)`` modulo the word size (2**32 or 2**64).

    ``acc`` must be a 1-D uint32 or uint64 array. Reduction mod ``2**k`` is left to
    the caller (one ``&`` at the end), which is exact because ``2**k`` divides the
    word size. The keystream goes through a reused per-thread buffer.
    """
    dtype = _word_dtype(acc.dtype.itemsize * 8)
    nbytes = acc.shape[0] * dtype.itemsize
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.shape[0] < nbytes + 16:
        buf = _SCRATCH.buf = np.empty(nbytes + 16, dtype=np.uint8)
    _keystream_into(key, buf, nbytes)
    words = buf[:nbytes].view(dtype)
    if sign > 0:
        np.add(acc, words, out=acc)
    else:
        np.subtract(acc, words, out=acc)
