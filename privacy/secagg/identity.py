"""Who a secure-aggregation peer is: identity keys, a region's roster, signed advertisements and views.

Secure aggregation hides one region's update only inside a sum with *other regions*. A
coordinator that could announce share holders of its own making (the issue's "invented
peers": keys it generated, with real regions' names and ids) would hold every share and
unmask the victim alone. So, as in Bonawitz et al. 2017's actively secure variant:

* each region has an **identity key** it made itself (Ed25519, ``fedpriv keygen --region``:
  ``DIR/regions/NAME.id.key`` beside the SuperNode key, public half ``NAME.id.pub``);
* each region holds a **roster** -- the other regions' identity public keys, exchanged out of
  band like the publisher key, one line per region ``NAME ssh-ed25519 AAAA...`` -- which is its
  own trust, never the run config's;
* every key **advertisement** is signed, bound to the job, the round (id and public seed), the
  setup parameters, the node id and the region's name; a region checks every advertisement
  of the key list against its roster before it shares anything (:func:`verify_key_list`);
* after the masked inputs, every survivor signs its **view** -- the digest of the key list it
  saw and the survivor set -- and a region answers the unmask request only when at least the
  threshold's worth of survivors signed exactly its own view (:func:`verify_view_signatures`):
  split views of the key list or of the survivor set are detected before anything that lets
  the coordinator unmask leaves.

Why a dedicated Ed25519 key rather than the SuperNode's EC P-384 key: that key signs Flower's
node-authentication requests *to the coordinator* on every poll, and one key should never sign
for two protocols (key separation: no message of one can be replayed as the other's); it is
registered with the operator, while this one is trusted by the peers, so either can be
rotated alone; and Ed25519 signatures are deterministic (no per-signature nonce to get wrong)
and cheap enough for every stage.

This module is the whole identity layer, apart from the protocol's math
(:mod:`fedpriv.privacy.secagg.protocol`) and the stage handlers that call it: a later protocol
(pairwise keys agreed once per job) signs and checks its messages with the same pieces.
Only ``cryptography`` is used; nothing here imports Flower.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import SecAggProtocolError

SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32
ROSTER_PATH_KEY = "roster-path"
"""Node-config key naming the region's roster file (``fedpriv supernode --roster FILE``)."""
IDENTITY_KEY_PATH_KEY = "identity-key-path"
"""Node-config key naming the region's identity private key (``CERTS/regions/NAME.id.key``)."""
SIMULATION_DIR = "secagg-identities"
"""Under a simulation's run dir: every simulated region's identity key and the shared roster."""
ROSTER_FILE = "roster.txt"

_LABEL = b"fedpriv-secagg-identity/v1"
_LABEL_ADVERT = _LABEL + b"/advertisement"
_LABEL_VIEW = _LABEL + b"/view"
_LABEL_KEYLIST = _LABEL + b"/key-list"
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")  # as fedpriv.core.config and deploy accept region names


class PeerAuthenticationError(SecAggProtocolError):
    """A peer, its advertisement or a view failed authentication against the region's roster."""


class IdentityError(ValueError):
    """An identity key or roster file is missing or malformed (one line naming the file and what is expected)."""


# ------------------------------------------------------------------ keys and files


def identity_paths(directory: str | os.PathLike, region: str) -> tuple[Path, Path]:
    """``DIR/regions/NAME.id.key`` and ``.id.pub``: beside the SuperNode key ``fedpriv keygen --region`` writes."""
    base = Path(directory).expanduser().absolute() / "regions"
    return base / f"{region}.id.key", base / f"{region}.id.pub"


def public_line(public: Ed25519PublicKey, region: str) -> str:
    """The public key as one OpenSSH line ``ssh-ed25519 AAAA... fedpriv-id-NAME``."""
    raw = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return f"{raw} fedpriv-id-{region}"


def roster_line(region: str, public_text: str) -> str:
    """The roster line other regions add for ``region`` (``public_text``: its ``.id.pub`` contents)."""
    key = _parse_public(public_text.strip(), f"{region}'s identity public key")
    return f"{region} {_openssh(key)}\n"


def _openssh(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def write_identity(directory: str | os.PathLike, region: str, force: bool = False) -> tuple[Path, Path]:
    """Make region ``region``'s identity key pair (private 0600, from OS entropy); never silently replace one."""
    if not _NAME_RE.match(region):
        raise IdentityError(f"region name {region!r}: expected letters, digits, '-' or '_'")
    key_path, pub_path = identity_paths(directory, region)
    existing = [p for p in (key_path, pub_path) if p.exists() or p.is_symlink()]
    if existing and not force:
        raise IdentityError(f"{existing[0]} already exists: refusing to overwrite region {region}'s identity key; "
                            "pass --force to replace it (every peer must then update its roster)")
    try:
        key_path.parent.mkdir(parents=True, exist_ok=True)
        for p in existing:
            p.unlink()
        private = Ed25519PrivateKey.generate()
        _write(key_path, private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()), 0o600)
        _write(pub_path, (public_line(private.public_key(), region) + "\n").encode(), 0o644)
    except OSError as exc:
        raise IdentityError(f"cannot write region {region}'s identity key to {key_path.parent}: "
                            f"{exc.strerror or exc}") from None
    return key_path, pub_path


def load_identity_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    """The region's own identity private key (PEM PKCS#8 Ed25519, from :func:`write_identity`)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise IdentityError(f"cannot read identity key {path}: {exc.strerror or exc} (expected the region's "
                            "CERTS/regions/NAME.id.key from `fedpriv keygen --region NAME CERTS`)") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"{path} is not an Ed25519 identity private key (PEM from `fedpriv keygen --region`)")
    return key


def _parse_public(text: str, what: str) -> Ed25519PublicKey:
    try:
        key = serialization.load_ssh_public_key(text.encode("utf-8"))
    except (ValueError, TypeError, UnicodeEncodeError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, Ed25519PublicKey):
        raise IdentityError(f"{what}: {text[:40]!r}... is not an OpenSSH Ed25519 public key "
                            "(expected 'ssh-ed25519 AAAA...', the contents of a NAME.id.pub)")
    return key


# -------------------------------------------------------------------------- roster


@dataclass(frozen=True)
class Roster:
    """The regions this region knows: name -> raw 32-byte Ed25519 public key. Its own trust, out of band."""

    keys: Mapping[str, bytes]
    source: str = ""

    def key_of(self, region: str) -> bytes:
        """``region``'s identity key; :class:`PeerAuthenticationError` if the roster does not list it."""
        try:
            return self.keys[region]
        except KeyError:
            raise PeerAuthenticationError(f"region {region!r} is not in this region's roster ({self.source}): an "
                                          "unknown peer is never a share holder") from None

    def verify(self, region: str, message: bytes, signature: bytes, what: str) -> None:
        """Check ``signature`` on ``message`` by ``region``'s roster key; raise naming ``what`` otherwise."""
        if not isinstance(signature, (bytes, bytearray)) or len(signature) != SIGNATURE_BYTES:
            raise PeerAuthenticationError(f"{what}: the signature of region {region!r} is missing or malformed")
        try:
            Ed25519PublicKey.from_public_bytes(self.key_of(region)).verify(bytes(signature), message)
        except InvalidSignature:
            raise PeerAuthenticationError(f"{what}: the signature of region {region!r} does not verify under its "
                                          "roster key (a key not the region's, or signed for another job, round "
                                          "or view)") from None


def parse_roster(text: str, source: str) -> Roster:
    """One line per region, ``NAME ssh-ed25519 AAAA... [comment]``; blank lines and ``#`` comments are skipped.

    A bad line, a name listed twice or one key under two names is one error naming the line.
    """
    keys: dict[str, bytes] = {}
    owners: dict[bytes, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, key_text = line.partition(" ")
        where = f"roster {source} line {number}"
        if not _NAME_RE.match(name) or not key_text.strip():
            raise IdentityError(f"{where}: {line[:60]!r}: expected 'NAME ssh-ed25519 AAAA...' (a region name, then "
                                "the contents of its NAME.id.pub)")
        raw = _parse_public(key_text.strip(), where).public_bytes(serialization.Encoding.Raw,
                                                                  serialization.PublicFormat.Raw)
        if name in keys:
            raise IdentityError(f"{where}: region {name!r} is listed twice: expected one key per region")
        if raw in owners:
            raise IdentityError(f"{where}: region {name!r} has the same key as {owners[raw]!r}: expected one key "
                                "per region")
        keys[name], owners[raw] = raw, name
    if not keys:
        raise IdentityError(f"roster {source} lists no region: expected one line 'NAME ssh-ed25519 AAAA...' per peer")
    return Roster(keys, source)


def load_roster(path: str | os.PathLike) -> Roster:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise IdentityError(f"cannot read roster {path}: {getattr(exc, 'strerror', None) or exc} (expected a file "
                            "with one line 'NAME ssh-ed25519 AAAA...' per peer region)") from None
    return parse_roster(text, str(path))


# ------------------------------------------------------------------ the identity


@dataclass(frozen=True)
class Identity:
    """A region's own name, identity private key and roster: everything it authenticates peers with."""

    name: str
    key: Ed25519PrivateKey
    roster: Roster

    @property
    def public_key(self) -> bytes:
        return self.key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def sign(self, message: bytes) -> bytes:
        return self.key.sign(message)

    def check_own_entry(self) -> None:
        """A roster that lists this region under another key is a misconfiguration, not a peer to trust."""
        listed = self.roster.keys.get(self.name)
        if listed is not None and listed != self.public_key:
            raise IdentityError(f"roster {self.roster.source} lists region {self.name!r} with a key that is not this "
                                "region's identity key")


def load_identity(name: str, key_path: str | os.PathLike, roster_path: str | os.PathLike) -> Identity:
    """The region's identity; its roster, as the region wrote it, lists the *other* regions, so its own public key
    (which it holds) is added: the region checks its own signatures (its view, among the survivors') with it."""
    identity = Identity(name, load_identity_key(key_path), load_roster(roster_path))
    identity.check_own_entry()
    roster = identity.roster
    other = next((region for region, key in roster.keys.items() if key == identity.public_key and region != name), None)
    if other is not None:
        raise IdentityError(f"roster {roster.source} lists this region's own identity key as region {other!r}")
    return replace(identity, roster=Roster({**roster.keys, name: identity.public_key}, roster.source))


def write_simulation_identities(run_dir: str | os.PathLike, regions: Iterable[str]) -> Path:
    """A simulation's regions (the operator owns them all): a fresh identity each and one shared roster.

    Written under ``RUN_DIR/secagg-identities`` (private keys 0600, replaced every run); returns the directory.
    """
    root = Path(run_dir) / SIMULATION_DIR
    lines = []
    for region in regions:
        _, pub = write_identity(root, region, force=True)
        lines.append(roster_line(region, pub.read_text()))
    roster = root / ROSTER_FILE
    tmp = roster.with_suffix(".tmp")
    tmp.write_text("".join(lines))
    tmp.replace(roster)
    return root


def simulation_identity(run_dir: str | os.PathLike, region: str) -> Identity:
    """A simulated region's identity, as :func:`write_simulation_identities` left it."""
    root = Path(run_dir) / SIMULATION_DIR
    if not (root / ROSTER_FILE).is_file():
        raise IdentityError(f"simulated region {region} has no identity key: {root} is missing (`fedpriv simulate` "
                            "makes every simulated region's key and the roster there before the run starts)")
    return load_identity(region, identity_paths(root, region)[0], root / ROSTER_FILE)


# --------------------------------------------------------------- signed messages


def _field(value: bytes | str | int) -> bytes:
    if isinstance(value, int):
        value = int(value).to_bytes(8, "big", signed=False)
    elif isinstance(value, str):
        value = value.encode("utf-8")
    return len(value).to_bytes(4, "big") + bytes(value)


def _encode(*values: bytes | str | int) -> bytes:
    return b"".join(_field(v) for v in values)


@dataclass(frozen=True)
class RoundBinding:
    """What every signature of a round is bound to: the job, the round (id and public seed) and the setup."""

    job: str
    round_id: int
    round_seed: bytes
    setup: Mapping[str, int | float]

    def digest(self) -> bytes:
        setup = b"".join(_encode(k, repr(self.setup[k])) for k in sorted(self.setup))
        return hashlib.sha256(_encode(_LABEL + b"/round", self.job, self.round_id, self.round_seed, setup)).digest()


@dataclass(frozen=True)
class Advertisement:
    """One region's key advertisement, as broadcast in the key list."""

    region: str
    c_pk: bytes
    s_pk: bytes
    seed_commitment: bytes
    signature: bytes = b""


def advertisement_message(binding: RoundBinding, node_id: int, ad: Advertisement) -> bytes:
    """The bytes a region signs when it advertises its round keys."""
    return _encode(_LABEL_ADVERT, binding.digest(), node_id, ad.region, ad.c_pk, ad.s_pk, ad.seed_commitment)


def sign_advertisement(identity: Identity, binding: RoundBinding, node_id: int, ad: Advertisement) -> bytes:
    return identity.sign(advertisement_message(binding, node_id, ad))


def key_list_digest(binding: RoundBinding, entries: Mapping[int, Advertisement]) -> bytes:
    """A digest of the whole key list a region saw (ids, names, keys): the first half of its signed view."""
    body = b"".join(_encode(nid, ad.region, ad.c_pk, ad.s_pk, ad.seed_commitment) for nid, ad in sorted(entries.items()))
    return hashlib.sha256(_encode(_LABEL_KEYLIST, binding.digest(), body)).digest()


def verify_key_list(identity: Identity, binding: RoundBinding, node_id: int, entries: Mapping[int, Advertisement],
                    own: Advertisement) -> list[str]:
    """Check every advertisement of the broadcast key list against the roster; returns the other regions' names.

    Refuses (:class:`PeerAuthenticationError`) an unknown name, a signature that does not verify
    (a coordinator-made key, another job's or round's advertisement, another setup), a name or a
    key listed twice, and a list in which this region's own entry is missing or altered.
    """
    mine = entries.get(node_id)
    if mine is None or (mine.region, mine.c_pk, mine.s_pk, mine.seed_commitment) != (
            own.region, own.c_pk, own.s_pk, own.seed_commitment):
        raise PeerAuthenticationError(f"the key list lacks or alters this region's own advertisement (node {node_id})")
    names: dict[str, int] = {}
    keys: set[bytes] = set()
    for nid, ad in sorted(entries.items()):
        if ad.region in names:
            raise PeerAuthenticationError(f"the key list names region {ad.region!r} twice (nodes {names[ad.region]} "
                                          f"and {nid}): one region is one share holder")
        names[ad.region] = nid
        if ad.c_pk in keys or ad.s_pk in keys:
            raise PeerAuthenticationError(f"the key list repeats a public key (node {nid}, region {ad.region!r})")
        keys.update((ad.c_pk, ad.s_pk))
        if nid != node_id:
            identity.roster.verify(ad.region, advertisement_message(binding, nid, ad), ad.signature,
                                   f"round {binding.round_id}: the advertisement of node {nid}")
    return sorted(n for n in names if n != own.region)


def view_message(binding: RoundBinding, key_digest: bytes, survivors: Iterable[int]) -> bytes:
    """The bytes a survivor signs in the consistency stage: the key list it saw and the survivor set."""
    return _encode(_LABEL_VIEW, binding.digest(), key_digest, *sorted(int(s) for s in survivors))


def verify_view_signatures(identity: Identity, binding: RoundBinding, key_digest: bytes, survivors: Iterable[int],
                           names: Mapping[int, str], signatures: Mapping[int, bytes], threshold: int) -> None:
    """Check the survivors' signatures on this region's own view before it answers the unmask request.

    Every signature must come from a survivor and verify on exactly the view this region signed
    (same key list, same survivor set): one that does not means the coordinator showed different
    views to different regions, and the region refuses. Fewer than ``threshold`` signers is refused too.
    """
    alive = {int(s) for s in survivors}
    for nid, signature in sorted(signatures.items()):
        if nid not in alive:
            raise PeerAuthenticationError(f"round {binding.round_id}: a view signature from node {nid}, which is not "
                                          "in the survivor set this region signed")
        identity.roster.verify(names[nid], view_message(binding, key_digest, alive), signature,
                               f"round {binding.round_id}: the survivor-set view of node {nid}")
    if len(signatures) < threshold:
        raise PeerAuthenticationError(f"round {binding.round_id}: only {len(signatures)} survivors confirmed the "
                                      f"view this region signed; threshold is {threshold}")


__all__ = [
    "Advertisement", "IDENTITY_KEY_PATH_KEY", "Identity", "IdentityError", "PeerAuthenticationError",
    "ROSTER_PATH_KEY", "RoundBinding", "Roster", "SIGNATURE_BYTES", "advertisement_message", "identity_paths",
    "key_list_digest", "load_identity", "load_identity_key", "load_roster", "parse_roster", "roster_line",
    "sign_advertisement", "simulation_identity", "verify_key_list", "verify_view_signatures", "view_message",
    "write_identity", "write_simulation_identities",
]
