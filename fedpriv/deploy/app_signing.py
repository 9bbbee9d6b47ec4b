"""Signed app bundles: a region runs only code signed by a publisher it chose to trust.

Why not Flower's own ``flower-supernode --trusted-entities``? In flwr 1.41 that
check (``flwr/supernode/start_client_internal.py``: ``_pull_and_store_message`` ->
``_verify_fab``) only accepts signatures that the SuperLink attaches to a FAB it
downloaded from Flower Hub (``flwr app review`` signs on the Hub; the SuperLink's
``control_handlers.start_run`` sets ``verifications = {}`` for a FAB submitted
with ``flwr run``). A locally submitted bundle therefore has no signature the
SuperNode could check, and every such run is refused ("App verification is not
supported by the connected SuperLink"). fedpriv keeps Flower's *formats* - an
Ed25519 publisher key in OpenSSH format (what ``flwr app review`` signs with) and
a trust file in the ``--trusted-entities`` YAML format (``label: 'ssh-ed25519
AAAA... comment'``) - and carries the signature inside the bundle:

* ``.info/FEDPRIV-SIGNATURE`` (JSON) signs a digest of *every other entry* of the
  FAB zip (name and SHA-256 of its bytes, sorted), so adding, removing or changing
  any file - not only those listed in Flower's ``.info/CONTENT`` - breaks it.
* The signed message also names the publisher's fedpriv version and the signing
  time. A region refuses a bundle whose version is not the fedpriv it runs, or
  signed longer ago than its policy's ``max-bundle-age-days`` (or in the future),
  so an old signed bundle - one with a known bug, say - cannot be sent again.
* The region verifies it with keys from its *own* trust file before anything of the
  bundle is used (:mod:`fedpriv.deploy.trusted_exec`). Even then the bundle's code
  never runs in a region: its ClientApp is always the region's installed fedpriv, and
  the bundle contributes only its run config (which that fedpriv checks against the
  region's policy). The signature decides *which run config defaults* a region
  accepts, not which code enforces its policy.

The coordinator cannot forge a signature, and the key id in the signature only
says which trusted key to try: the key itself always comes from the region's file.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import stat
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedpriv.core.errors import FedprivError
from fedpriv.deploy.paths import require_private_key

SIGNATURE_ENTRY = ".info/FEDPRIV-SIGNATURE"
SIGNATURE_FORMAT = "fedpriv-fab-signature/2"  # /1 (no fedpriv version in the signed message) is refused
_DOMAIN = SIGNATURE_FORMAT.encode("ascii") + b"\0"  # never valid as any other kind of signed message
CLIENTAPP_COMPONENT = "fedpriv.apps:clientapp"
"""The only ClientApp a region runs: its installed fedpriv's (a bundle naming another is refused)."""
FUTURE_SKEW_S = 600
"""A signature dated more than this many seconds after the region's clock is refused (it would outlive the age rule)."""


class AppNotTrusted(FedprivError):
    """The bundle is unsigned, modified, signed by a key the region does not trust, too old, or for another fedpriv."""


@dataclass(frozen=True)
class TrustedPublisher:
    label: str  # the region's own name for it (the trust file's key)
    key: ed25519.Ed25519PublicKey

    @property
    def key_id(self) -> str:
        return key_id(self.key)


# ---------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------


def key_id(public_key: ed25519.Ed25519PublicKey) -> str:
    """``fpk_`` + 32 hex digits of SHA-256 over the raw public key: names a key, cannot be chosen."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "fpk_" + hashlib.sha256(raw).hexdigest()[:32]


def make_publisher_keypair(comment: str) -> tuple[bytes, bytes]:
    """An Ed25519 publisher key pair: (OpenSSH private key, one OpenSSH public line)."""
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + b" " + comment.encode("ascii") + b"\n"


PUBLISHER_KEY = "publisher.key"
PUBLISHER_PUB = "publisher.pub"


def create_publisher_key(directory: str | os.PathLike, name: str, force: bool = False) -> tuple[Path, Path]:
    """Write ``DIR/publisher.key`` (0600, stays with whoever submits runs) and ``DIR/publisher.pub``."""
    from fedpriv.deploy.certs import check_region_name, write_new_keypair

    check_region_name(name)
    root = Path(directory).expanduser().absolute()
    return write_new_keypair(root / PUBLISHER_KEY, root / PUBLISHER_PUB,
                             lambda: make_publisher_keypair(f"fedpriv-publisher-{name}"), what="the publisher key",
                             replace_note="every region must then trust the new publisher.pub", force=force)


def trust_line(label: str, public_line: str) -> str:
    """One trust-file entry (YAML) for a publisher's ``publisher.pub`` line."""
    return f"{label}: {json.dumps(public_line.strip())}\n"


def load_publisher_key(path: str | os.PathLike) -> ed25519.Ed25519PrivateKey:
    """The publisher's private key; refused if missing, readable by others, or not Ed25519 OpenSSH."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FedprivError(f"missing publisher key {p}: create it with `fedpriv keygen --publisher DIR`")
    require_private_key(p, "publisher key")
    try:
        key = serialization.load_ssh_private_key(p.read_bytes(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise FedprivError(f"{p} is not an OpenSSH private key ({exc}): use publisher.key from `fedpriv keygen --publisher`") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise FedprivError(f"{p} is not an Ed25519 key: app bundles are signed with `fedpriv keygen --publisher` keys")
    return key


def load_trust_file(path: str | os.PathLike) -> list[TrustedPublisher]:
    """The region's trust list: a YAML mapping ``label: 'ssh-ed25519 AAAA... [comment]'`` (Flower's format)."""
    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        raise FedprivError(f"missing trust file {p}: list the publisher keys this region trusts "
                           "(`label: 'ssh-ed25519 AAAA...'`, one per line; the publisher's publisher.pub)")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise FedprivError(f"trust file {p} is not readable YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict) or not data:
        raise FedprivError(f"trust file {p}: expected a mapping `label: 'ssh-ed25519 AAAA...'` with at least one publisher key")
    out: list[TrustedPublisher] = []
    for label, line in data.items():
        if not isinstance(line, str):
            raise FedprivError(f"trust file {p}: entry {label!r}: expected an OpenSSH public key line 'ssh-ed25519 AAAA...'")
        try:
            key = serialization.load_ssh_public_key(line.strip().encode("utf-8"))
        except (ValueError, TypeError, UnicodeEncodeError, UnsupportedAlgorithm):
            raise FedprivError(f"trust file {p}: entry {label!r} is not an OpenSSH public key line") from None
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise FedprivError(f"trust file {p}: entry {label!r} is not an Ed25519 key (expected 'ssh-ed25519 AAAA...')")
        out.append(TrustedPublisher(str(label), key))
    return out


# ---------------------------------------------------------------------------
# The signed digest: every zip entry but the signature itself
# ---------------------------------------------------------------------------


def bundle_digest(fab: bytes) -> bytes:
    """SHA-256 over ``name NUL sha256(content) LF`` of every entry except the signature, sorted by name.

    Entry names must be canonical (no ``..``, ``.``, empty or absolute parts, no
    backslashes), unique and not symlinks, so that what is extracted is exactly
    what was signed.
    """
    try:
        zf = zipfile.ZipFile(io.BytesIO(fab))
    except zipfile.BadZipFile:
        raise AppNotTrusted("the app bundle is not a FAB (zip) archive") from None
    lines: list[bytes] = []
    seen: set[str] = set()
    with zf:
        for info in zf.infolist():
            name = info.filename
            if name in seen:
                raise AppNotTrusted(f"the app bundle has two entries named {name!r}")
            seen.add(name)
            parts = name.rstrip("/").split("/")
            if name.startswith("/") or "\\" in name or any(part in ("", ".", "..") for part in parts):
                raise AppNotTrusted(f"the app bundle has a non-canonical entry name {name!r}")
            if stat.S_ISLNK(info.external_attr >> 16):
                raise AppNotTrusted(f"the app bundle has a symbolic link {name!r}")
            if name == SIGNATURE_ENTRY:
                continue
            lines.append(name.encode("utf-8") + b"\0" + hashlib.sha256(zf.read(info)).hexdigest().encode("ascii") + b"\n")
    return hashlib.sha256(b"".join(sorted(lines))).digest()


def _message(digest: bytes, signed_at: int, fedpriv_version: str) -> bytes:
    # Flower's layout (flwr.supercore.primitives.asymmetric_ed25519.create_message_to_sign:
    # 8-byte big-endian timestamp + digest), behind a fedpriv domain prefix, with the
    # publisher's fedpriv version (length-prefixed, so no two (version, digest) pairs collide).
    version = fedpriv_version.encode("utf-8")
    return _DOMAIN + signed_at.to_bytes(8, "big") + len(version).to_bytes(2, "big") + version + digest


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_bundle(fab: bytes, private_key: ed25519.Ed25519PrivateKey, signed_at: int | None = None,
                fedpriv_version: str | None = None) -> bytes:
    """Return ``fab`` with ``.info/FEDPRIV-SIGNATURE`` added (an existing one is replaced).

    The signature covers the bundle, the signing time (default: now) and the fedpriv
    version it is for (default: the signer's installed fedpriv).
    """
    import fedpriv

    signed_at = int(time.time()) if signed_at is None else int(signed_at)
    fedpriv_version = fedpriv.__version__ if fedpriv_version is None else str(fedpriv_version)
    src = zipfile.ZipFile(io.BytesIO(fab))
    out = io.BytesIO()
    with src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if info.filename != SIGNATURE_ENTRY:
                dst.writestr(info, src.read(info))
    digest = bundle_digest(out.getvalue())
    doc = {
        "format": SIGNATURE_FORMAT,
        "key-id": key_id(private_key.public_key()),
        "signed-at": signed_at,
        "fedpriv-version": fedpriv_version,
        "bundle-sha256": digest.hex(),
        "signature": _b64(private_key.sign(_message(digest, signed_at, fedpriv_version))),
    }
    with zipfile.ZipFile(out, "a", zipfile.ZIP_DEFLATED) as dst:
        dst.writestr(SIGNATURE_ENTRY, json.dumps(doc, indent=1, sort_keys=True))
    return out.getvalue()


@dataclass(frozen=True)
class VerifiedBundle:
    """What a region learned from a good signature: who signed, when, and for which fedpriv."""

    publisher: TrustedPublisher
    signed_at: int  # Unix seconds, as signed
    fedpriv_version: str

    @property
    def label(self) -> str:
        return self.publisher.label


def verify_bundle(fab: bytes, trusted: list[TrustedPublisher], *, fedpriv_version: str | None = None,
                  max_age_days: float | None = None, now: float | None = None) -> VerifiedBundle:
    """Who signed ``fab`` (a trusted publisher); :class:`AppNotTrusted` (one line) otherwise.

    ``fedpriv_version`` (default: the region's installed fedpriv) must be the version the
    signature names; with ``max_age_days`` the signature must be at most that old (and not
    dated more than :data:`FUTURE_SKEW_S` ahead of ``now``).
    """
    import fedpriv

    short = hashlib.sha256(fab).hexdigest()[:12]
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as zf:
            names = zf.namelist()
            raw = zf.read(SIGNATURE_ENTRY) if SIGNATURE_ENTRY in names else None
    except zipfile.BadZipFile:
        raise AppNotTrusted(f"app bundle {short} is not a FAB (zip) archive") from None
    if raw is None:
        raise AppNotTrusted(f"app bundle {short} is not signed: this region runs only bundles signed by a publisher in its trust file")
    try:
        doc = json.loads(raw)
        if doc.get("format") != SIGNATURE_FORMAT:
            raise ValueError(f"format {doc.get('format')!r}, expected {SIGNATURE_FORMAT!r}: re-sign it with this fedpriv")
        kid, signed_at, signature = str(doc["key-id"]), int(doc["signed-at"]), _unb64(str(doc["signature"]))
        version = doc["fedpriv-version"]
        if not isinstance(version, str):
            raise ValueError(f"fedpriv-version {version!r}")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise AppNotTrusted(f"app bundle {short} has an unreadable signature ({exc})") from None
    publisher = next((t for t in trusted if t.key_id == kid), None)
    if publisher is None:
        raise AppNotTrusted(f"app bundle {short} is signed by {kid}, which is not in this region's trust file")
    try:
        digest = bundle_digest(fab)
    except AppNotTrusted as exc:
        raise AppNotTrusted(f"app bundle {short}: {exc}") from None
    try:
        publisher.key.verify(signature, _message(digest, signed_at, version))
    except (InvalidSignature, OverflowError):
        raise AppNotTrusted(f"app bundle {short} does not match its signature by {publisher.label!r} "
                            "(modified after signing)") from None
    ours = fedpriv.__version__ if fedpriv_version is None else fedpriv_version
    if version != ours:
        raise AppNotTrusted(f"app bundle {short} is signed for fedpriv {version!r}; this region runs fedpriv {ours!r} "
                            "(the publisher must sign it with the version the regions run)")
    check_bundle_age(short, signed_at, max_age_days, time.time() if now is None else now)
    return VerifiedBundle(publisher, signed_at, version)


def check_bundle_age(short: str, signed_at: int, max_age_days: float | None, now: float) -> None:
    """Refuse a signature older than ``max_age_days`` (a replayed old bundle) or dated in the future."""
    if max_age_days is None:
        return
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(max(0, min(signed_at, 2**37))))
    if signed_at > now + FUTURE_SKEW_S:
        raise AppNotTrusted(f"app bundle {short} is signed at {when}, in the future by this region's clock "
                            f"(more than {FUTURE_SKEW_S} s ahead): expected a signature made now")
    age_days = (now - signed_at) / 86400.0
    if age_days > max_age_days:
        raise AppNotTrusted(f"app bundle {short} was signed at {when}, {age_days:.1f} days ago: this region's policy "
                            f"max-bundle-age-days = {max_age_days:g} (the publisher must sign it again)")


def bundle_components(fab: bytes) -> dict[str, str]:
    """The ``[tool.flwr.app.components]`` a bundle's ``pyproject.toml`` names (read, never imported)."""
    import tomllib

    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as zf:
            config = tomllib.loads(zf.read("pyproject.toml").decode("utf-8"))
        components = config["tool"]["flwr"]["app"]["components"]
        return {str(k): str(v) for k, v in components.items()}
    except (KeyError, TypeError, AttributeError, UnicodeDecodeError, tomllib.TOMLDecodeError, zipfile.BadZipFile):
        raise AppNotTrusted("the app bundle has no readable [tool.flwr.app.components] in pyproject.toml") from None


def check_clientapp_component(fab: bytes) -> None:
    """A bundle may only name the region's own ClientApp, :data:`CLIENTAPP_COMPONENT` (it runs from the install)."""
    named = bundle_components(fab).get("clientapp")
    if named != CLIENTAPP_COMPONENT:
        raise AppNotTrusted(f"the app bundle names ClientApp {named!r}: a fedpriv region runs only its installed "
                            f"{CLIENTAPP_COMPONENT!r}")


def build_signed_bundle(app_dir: str | os.PathLike, private_key: ed25519.Ed25519PrivateKey) -> bytes:
    """The FAB ``flwr run`` would build from ``app_dir``, signed (now, for the installed fedpriv)."""
    from flwr.cli.build import build_fab_from_disk

    return sign_bundle(build_fab_from_disk(Path(app_dir)), private_key)


def read_signed_bundle(path: str | os.PathLike) -> bytes:
    """A publisher's signed bundle as the operator submits it: readable, signed, for this fedpriv version.

    Only a sanity check on the operator's side (the signature is checked by each region against
    its own trust file); it catches a wrong file or a bundle for another release before submission.
    """
    import fedpriv

    p = Path(path).expanduser()
    try:
        fab = p.read_bytes()
    except OSError as exc:
        raise FedprivError(f"cannot read --bundle {p}: {exc.strerror or exc} (expected the publisher's signed "
                           "app.fab from `fedpriv sign-bundle`)") from None
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as zf:
            doc = json.loads(zf.read(SIGNATURE_ENTRY))
    except (zipfile.BadZipFile, KeyError, ValueError):
        raise FedprivError(f"--bundle {p} is not a signed app bundle: expected the app.fab from "
                           "`fedpriv sign-bundle`") from None
    if not isinstance(doc, dict) or doc.get("format") != SIGNATURE_FORMAT:
        raise FedprivError(f"--bundle {p} has a signature of format {doc.get('format') if isinstance(doc, dict) else None!r}: "
                           f"expected {SIGNATURE_FORMAT!r}; ask the publisher to sign it with this fedpriv")
    if doc.get("fedpriv-version") != fedpriv.__version__:
        raise FedprivError(f"--bundle {p} is signed for fedpriv {doc.get('fedpriv-version')!r}, this is fedpriv "
                           f"{fedpriv.__version__!r}: regions refuse a bundle for another version")
    return fab
