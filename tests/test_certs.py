"""`fedpriv certs`: CA, SuperLink certificate, SuperNode key pairs (no processes started)."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key, load_ssh_public_key

from fedpriv.cli import main
from fedpriv.deploy.certs import CertPaths, create_certs, normalize_hosts, parse_regions
from fedpriv.errors import FedprivError


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_certs_command_creates_everything_with_private_modes(tmp_path, capsys):
    d = tmp_path / "certs"
    assert main(["certs", str(d), "--host", "coord.example.com", "--host", "10.1.2.3", "--regions", "us-east,eu-west"]) == 0
    p = CertPaths(d)
    for f in (p.ca_cert, p.ca_key, p.server_cert, p.server_key, p.readme):
        assert f.is_file(), f
    for key in (p.ca_key, p.server_key, p.region_key("us-east"), p.region_key("eu-west")):
        assert _mode(key) == 0o600, key
    for pub in (p.ca_cert, p.server_cert, p.region_pub("us-east")):
        assert _mode(pub) & 0o077 != 0o077  # public files are not private-only, but never world-writable
        assert not _mode(pub) & 0o022
    assert sorted(p.regions_with(".key")) == ["eu-west", "us-east"]
    assert "server.key" in p.readme.read_text() and "ca.crt" in p.readme.read_text()
    assert "us-east" in capsys.readouterr().out


def test_server_cert_verifies_against_ca_and_has_sans(tmp_path):
    res = create_certs(tmp_path / "c", hosts=["coord.example.com", "10.1.2.3", "[2001:db8::1]"], regions=("r1",))
    p = res.paths
    ca = x509.load_pem_x509_certificate(p.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(p.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer does not match
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "coord.example.com"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"),
        ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("2001:db8::1"),
    }
    # The server key matches the certificate.
    key = load_pem_private_key(p.server_key.read_bytes(), None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()


def test_server_cert_passes_python_tls_verification(tmp_path):
    """The chain is accepted by Python's ssl (what uvicorn/httpx use), including strict X.509 checks."""
    import ssl

    p = create_certs(tmp_path / "c", regions=("r1",)).paths
    ctx = ssl.create_default_context(cafile=str(p.ca_cert))
    if hasattr(ssl, "VERIFY_X509_STRICT"):
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(str(p.server_cert), str(p.server_key))
    # In-memory TLS handshake: client verifies "127.0.0.1" against the server certificate.
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ctx.wrap_bio(c_in, c_out, server_hostname="127.0.0.1")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side in (client, server):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    client.do_handshake()  # completes without a verification error
    assert client.getpeercert()["subjectAltName"]


def test_region_keys_are_what_flower_loads(tmp_path):
    """Private key: OpenSSH EC (flower-supernode uses load_ssh_private_key); public: OpenSSH line on a NIST curve."""
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import bytes_to_public_key, public_key_to_bytes

    p = create_certs(tmp_path / "c", regions=("us-east",)).paths
    priv = load_ssh_private_key(p.region_key("us-east").read_bytes(), None)
    assert isinstance(priv, ec.EllipticCurvePrivateKey) and isinstance(priv.curve, ec.SECP384R1)
    line = p.region_pub("us-east").read_text()
    assert line.startswith("ecdsa-sha2-nistp384 ") and line.rstrip().endswith("fedpriv-us-east")
    pub = load_ssh_public_key(line.encode())
    assert pub.public_numbers() == priv.public_key().public_numbers()
    # Exactly the loader `flwr supernode register` uses accepts it.
    loaded = try_load_public_key(p.region_pub("us-east"))
    assert bytes_to_public_key(loaded).public_numbers() == pub.public_numbers()
    assert loaded == public_key_to_bytes(pub)


def test_refuses_to_overwrite_without_force(tmp_path, capsys):
    d = tmp_path / "c"
    assert main(["certs", str(d), "--regions", "a"]) == 0
    old_key = (d / "regions" / "a.key").read_bytes()
    old_ca = (d / "ca.key").read_bytes()
    capsys.readouterr()
    assert main(["certs", str(d), "--regions", "a"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "already exists" in err and "--force" in err
    assert (d / "regions" / "a.key").read_bytes() == old_key and (d / "ca.key").read_bytes() == old_ca

    # A region's key alone is enough to refuse, too (e.g. adding region b to a copy with a's key).
    c2 = create_certs(tmp_path / "c2", regions=("a",)).paths
    for f in (c2.ca_cert, c2.ca_key, c2.server_cert, c2.server_key):
        f.unlink()
    with pytest.raises(FedprivError, match=r"a\.key already exists"):
        create_certs(c2.root, regions=("b", "a"))
    assert not c2.region_key("b").exists()

    assert main(["certs", str(d), "--regions", "a", "--force"]) == 0
    assert (d / "regions" / "a.key").read_bytes() != old_key and (d / "ca.key").read_bytes() != old_ca
    assert _mode(d / "regions" / "a.key") == 0o600 and _mode(d / "ca.key") == 0o600


def test_private_key_mode_does_not_depend_on_umask(tmp_path):
    import os

    old = os.umask(0)
    try:
        p = create_certs(tmp_path / "c", regions=("a",)).paths
    finally:
        os.umask(old)
    assert _mode(p.server_key) == 0o600 and _mode(p.region_key("a")) == 0o600 and _mode(p.ca_key) == 0o600


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--regions", "us east"], "region name 'us east'"),
        (["--regions", "a,a"], "unique"),
        (["--regions", ","], "at least one"),
        (["--host", "0.0.0.0"], "wildcard"),
        (["--host", "bad host!"], "DNS name or an IP"),
    ],
)
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, args, needle):
    assert main(["certs", str(tmp_path / "c"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err
    assert not (tmp_path / "c" / "ca.key").exists()


def test_hosts_and_regions_parsing():
    assert normalize_hosts(None) == ("localhost", "127.0.0.1", "::1")
    assert normalize_hosts(["Coord.Example.COM.", "127.0.0.1", "[::1]"]) == ("localhost", "127.0.0.1", "::1", "coord.example.com")
    assert parse_regions(None) == ("us-east", "eu-west", "ap-south")
    assert parse_regions(" a , b_2 ") == ("a", "b_2")
