"""Certificates and SuperNode keys for a fedpriv deployment.

Each private key is made on the machine that uses it, and only public parts travel:

    coordinator (``fedpriv certs DIR``)
      DIR/ca.crt                 CA certificate: copied to every region (trust anchor)
      DIR/ca.key                 CA private key: offline / operator only
      DIR/server.crt             SuperLink TLS certificate (signed by the CA)
      DIR/server.key             SuperLink TLS private key: coordinator only
    region (``fedpriv keygen --region NAME DIR``, run in that region)
      DIR/regions/NAME.key       SuperNode authentication key: never leaves the region
      DIR/regions/NAME.pub       its public half: sent to the operator, who registers it

``fedpriv certs --demo-region-keys`` also writes every ``regions/<r>.key`` on the
operator's machine: a one-machine quick path for demos only, since the operator
then holds every region's private key and can impersonate any region.

Formats (as flwr 1.41 reads them):

* TLS: PEM certificates, PEM (PKCS#8) EC P-256 private keys, read by
  ``flower-superlink --ssl-certfile/--ssl-keyfile/--ssl-ca-certfile`` (uvicorn /
  Python ``ssl``) and ``flower-supernode --root-certificates``.
* SuperNode authentication: an EC **SECP384R1** key pair (Flower's own key
  generator uses this curve; any NIST curve is accepted). The private key in
  **OpenSSH** format (``flower-supernode --auth-supernode-private-key`` loads it with
  ``load_ssh_private_key``); the public key as one OpenSSH line
  (``ecdsa-sha2-nistp384 AAAA... fedpriv-<region>``), which ``flwr supernode
  register`` loads with ``load_ssh_public_key``.

Private keys are created with mode 0600 at ``open`` time (never chmod'ed after
being written), and existing files are never overwritten without ``force``.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedpriv.core.errors import FedprivError
from fedpriv.deploy.paths import check_private_key_location

DEFAULT_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
DEFAULT_REGIONS: tuple[str, ...] = ("us-east", "eu-west", "ap-south")

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
REGIONS_DIR = "regions"
README = "README.txt"

CA_DAYS = 3650
SERVER_DAYS = 825

_REGION_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_DNS_RE = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_*]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$")


@dataclass(frozen=True)
class CertPaths:
    """Where every file of a certificates directory lives."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / CA_CERT

    @property
    def ca_key(self) -> Path:
        return self.root / CA_KEY

    @property
    def server_cert(self) -> Path:
        return self.root / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.root / SERVER_KEY

    @property
    def regions_dir(self) -> Path:
        return self.root / REGIONS_DIR

    @property
    def readme(self) -> Path:
        return self.root / README

    def region_key(self, region: str) -> Path:
        return self.regions_dir / f"{region}.key"

    def region_pub(self, region: str) -> Path:
        return self.regions_dir / f"{region}.pub"

    def regions_with(self, suffix: str) -> list[str]:
        """Region names that have a ``regions/<name><suffix>`` file, sorted."""
        if not self.regions_dir.is_dir():
            return []
        return sorted(p.name[: -len(suffix)] for p in self.regions_dir.glob(f"*{suffix}") if p.is_file())


@dataclass
class CertsResult:
    """What :func:`create_certs` wrote."""

    paths: CertPaths
    hosts: tuple[str, ...]
    regions: tuple[str, ...]
    written: list[Path] = field(default_factory=list)


# ---------------------------------------------------------------------------
# Validation helpers (also used by the process pre-flight checks)
# ---------------------------------------------------------------------------


def parse_regions(text: str | None) -> tuple[str, ...]:
    """Parse ``"us-east,eu-west"`` into unique, validated region names."""
    if text is None:
        return DEFAULT_REGIONS
    regions = tuple(r.strip() for r in text.split(",") if r.strip())
    if not regions:
        raise FedprivError(f"--regions {text!r}: expected a comma-separated list of at least one region name")
    if len(set(regions)) != len(regions):
        raise FedprivError(f"--regions {text!r}: region names must be unique")
    for name in regions:
        check_region_name(name)
    return regions


def check_region_name(name: str) -> str:
    if not _REGION_RE.match(name):
        raise FedprivError(f"region name {name!r}: expected letters, digits, '-' or '_'")
    return name


def normalize_hosts(hosts: list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """The default loopback names plus ``hosts`` (deduplicated, order kept).

    Loopback names are always included: the SuperLink's own ServerApp process and
    the local Fleet gateway connect to it over 127.0.0.1 and verify this certificate.
    """
    out: list[str] = []
    for h in (*DEFAULT_HOSTS, *(hosts or ())):
        h = h.strip()
        if h.startswith("[") and h.endswith("]"):
            h = h[1:-1]
        if not h:
            continue
        try:
            h = str(ipaddress.ip_address(h))
        except ValueError:
            if not _DNS_RE.match(h):
                raise FedprivError(f"--host {h!r}: expected a DNS name or an IP address") from None
            h = h.lower().rstrip(".")
        if h in ("0.0.0.0", "::"):
            raise FedprivError(f"--host {h!r}: a wildcard bind address is not a name clients connect to; pass the coordinator's DNS name or IP")
        if h not in out:
            out.append(h)
    return tuple(out)


# ---------------------------------------------------------------------------
# File writing
# ---------------------------------------------------------------------------


def write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 from the start (O_EXCL: never reuse a file)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_public(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _make_ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedpriv"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _make_server(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts: tuple[str, ...]
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    first_dns = next((h for h in hosts if not _is_ip(h)), hosts[0])
    now = _now()
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedpriv"), x509.NameAttribute(NameOID.COMMON_NAME, first_dns)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=True, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _is_ip(h: str) -> bool:
    try:
        ipaddress.ip_address(h)
        return True
    except ValueError:
        return False


def make_node_keypair(comment: str) -> tuple[bytes, bytes]:
    """A SuperNode authentication key pair: (OpenSSH private key, OpenSSH public line)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + b" " + comment.encode("ascii") + b"\n"


def create_certs(
    directory: str | os.PathLike,
    hosts: list[str] | tuple[str, ...] | None = None,
    demo_regions: tuple[str, ...] = (),
    force: bool = False,
) -> CertsResult:
    """Create the CA and the SuperLink certificate in ``directory``.

    ``demo_regions`` (demo only) also creates those regions' SuperNode key pairs here,
    on the operator's machine; a real region runs ``fedpriv keygen --region`` itself.
    """
    paths = CertPaths(Path(directory).expanduser().absolute())
    all_hosts = normalize_hosts(hosts)
    regions = tuple(check_region_name(r) for r in demo_regions)

    targets = [paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key]
    for r in regions:
        targets += [paths.region_key(r), paths.region_pub(r)]
    existing = [p for p in targets if p.exists() or p.is_symlink()]
    if existing and not force:
        raise FedprivError(
            f"{existing[0]} already exists: refusing to overwrite keys; pass --force to replace them "
            "(every region must then get the new ca.crt)"
        )
    if paths.root.exists() and not paths.root.is_dir():
        raise FedprivError(f"{paths.root} exists and is not a directory")
    check_private_key_location(paths.ca_key, "the CA key")

    try:
        paths.root.mkdir(parents=True, exist_ok=True)
        for p in existing:
            p.unlink()

        ca_key, ca_cert = _make_ca("fedpriv deployment CA")
        server_key, server_cert = _make_server(ca_key, ca_cert, all_hosts)

        result = CertsResult(paths=paths, hosts=all_hosts, regions=regions)
        write_private(paths.ca_key, _pem_private(ca_key))
        write_public(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
        write_private(paths.server_key, _pem_private(server_key))
        write_public(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
        result.written += [paths.ca_key, paths.ca_cert, paths.server_key, paths.server_cert]
        if regions:
            paths.regions_dir.mkdir(exist_ok=True)
        for r in regions:
            private, public = make_node_keypair(f"fedpriv-{r}")
            write_private(paths.region_key(r), private)
            write_public(paths.region_pub(r), public)
            result.written += [paths.region_key(r), paths.region_pub(r)]
        if paths.readme.exists():
            paths.readme.unlink()
        write_public(paths.readme, readme_text(all_hosts, regions).encode("utf-8"))
        result.written.append(paths.readme)
    except OSError as exc:
        raise FedprivError(f"cannot write certificates to {paths.root}: {exc.strerror or exc}") from exc
    return result


def write_new_keypair(private_path: Path, public_path: Path, make, *, what: str, replace_note: str,
                      force: bool = False) -> tuple[Path, Path]:
    """Write a freshly made key pair (private key 0600) without ever silently replacing one.

    ``make()`` returns (private bytes, public bytes). A key that exists is kept unless ``force``:
    replacing it means redistributing its public half (``replace_note`` says to whom).
    """
    existing = [p for p in (private_path, public_path) if p.exists() or p.is_symlink()]
    if existing and not force:
        raise FedprivError(f"{existing[0]} already exists: refusing to overwrite {what}; pass --force to replace it "
                           f"({replace_note})")
    for parent in private_path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise FedprivError(f"{parent} exists and is not a directory")
            break
    check_private_key_location(private_path, what)
    try:
        private_path.parent.mkdir(parents=True, exist_ok=True)
        for p in existing:
            p.unlink()
        private, public = make()
        write_private(private_path, private)
        write_public(public_path, public)
    except OSError as exc:
        raise FedprivError(f"cannot write {what} to {private_path.parent}: {exc.strerror or exc}") from exc
    return private_path, public_path


def create_region_key(directory: str | os.PathLike, region: str, force: bool = False) -> tuple[Path, Path]:
    """Run in the region: its SuperNode key pair as ``DIR/regions/<region>.key`` (0600) and ``.pub``.

    Returns (private key path, public key path); only the ``.pub`` is sent to the operator.
    """
    paths = CertPaths(Path(directory).expanduser().absolute())
    check_region_name(region)
    return write_new_keypair(paths.region_key(region), paths.region_pub(region),
                             lambda: make_node_keypair(f"fedpriv-{region}"), what=f"region {region}'s key",
                             replace_note="the operator must then register the new .pub", force=force)


def load_region_public_key(path: Path, region: str) -> str:
    """Check that ``path`` is a SuperNode *public* key (one OpenSSH EC line); return the line."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    if not path.is_file():
        raise FedprivError(f"missing public key {path} for region {region!r}: "
                           f"the region creates it with `fedpriv keygen --region {region} DIR` and sends DIR/regions/{region}.pub")
    if not os.access(path, os.R_OK):
        raise FedprivError(f"cannot read public key {path}: check its owner and permissions")
    text = path.read_text(encoding="utf-8", errors="replace").strip()
    if "PRIVATE KEY" in text:
        raise FedprivError(f"{path} is a PRIVATE key: only the region's .pub file travels to the operator; "
                           f"the region should delete this copy and run `fedpriv keygen --region {region} DIR --force`")
    try:
        key = load_ssh_public_key(text.encode("utf-8"))
    except (ValueError, TypeError, UnicodeEncodeError, UnsupportedAlgorithm):
        raise FedprivError(f"{path} is not an OpenSSH public key line (expected 'ecdsa-sha2-nistp384 AAAA... fedpriv-{region}')") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise FedprivError(f"{path} is not an EC key: SuperNode keys are EC P-384 (`fedpriv keygen --region`)")
    return text


def readme_text(hosts: tuple[str, ...], demo_regions: tuple[str, ...] = ()) -> str:
    demo = ""
    if demo_regions:
        demo = "\n".join(
            ["", "DEMO ONLY (--demo-region-keys): the operator holds every region's private key", *(
                f"  regions/{r}.key   {r}'s SuperNode key, made HERE: copy it to {r} only for a demo" for r in demo_regions
            ), "  regions/*.pub     their public halves, ready for `fedpriv register`", ""])
    return f"""fedpriv deployment credentials
==============================

Created by `fedpriv certs`. Which file goes where:

  ca.crt            everywhere (coordinator and every region): the trust anchor
                    SuperNodes and the `flwr` CLI use to verify the SuperLink.
  ca.key            nowhere: keep offline with the operator. Whoever has it can
                    impersonate the coordinator. Only needed to issue a new server.crt.
  server.crt        coordinator only (public, but only the SuperLink uses it).
  server.key        coordinator only, never copied elsewhere (mode 0600).
{demo}
server.crt is valid for: {", ".join(hosts)}
(SuperNodes must connect to one of these names; re-run `fedpriv certs --host NAME --force`
to add one, which also replaces the CA: every region then needs the new ca.crt.)

Each region makes its own SuperNode key, in the region:
  fedpriv keygen --region NAME REGION_DIR     -> REGION_DIR/regions/NAME.key (stays there)
                                                 REGION_DIR/regions/NAME.pub (send to the operator)
and copies ca.crt from here into REGION_DIR. The operator registers the .pub files:
  fedpriv register --certs DIR --public-key NAME=PATH/NAME.pub ...

Private keys (*.key) are unencrypted and created with mode 0600; they never leave
the machine that made them.
"""


def load_server_sans(cert_path: Path) -> list[str]:
    """DNS names and IPs in a certificate's subjectAltName (empty if none)."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName), *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]
