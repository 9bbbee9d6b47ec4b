"""`fedpriv certs` (CA, SuperLink certificate), `fedpriv keygen` (keys born where they are used),
`fedpriv register`'s key checks (no processes started)."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key, load_ssh_public_key

from fedpriv.cli import main
from fedpriv.deploy.certs import CertPaths, create_certs, create_region_key, normalize_hosts, parse_regions
from fedpriv.core.errors import FedprivError


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_certs_command_makes_only_the_coordinator_side(tmp_path, capsys):
    """Before: `fedpriv certs` wrote every regions/<r>.key on the operator's machine. Now: CA + server only."""
    d = tmp_path / "certs"
    assert main(["certs", str(d), "--host", "coord.example.com", "--host", "10.1.2.3"]) == 0
    p = CertPaths(d)
    for f in (p.ca_cert, p.ca_key, p.server_cert, p.server_key, p.readme):
        assert f.is_file(), f
    for key in (p.ca_key, p.server_key):
        assert _mode(key) == 0o600, key
    for pub in (p.ca_cert, p.server_cert):
        assert not _mode(pub) & 0o022
    assert not p.regions_dir.exists() and not list(d.rglob("*.pub"))  # no region key was made here
    readme = p.readme.read_text()
    assert "server.key" in readme and "fedpriv keygen --region" in readme and "DEMO" not in readme
    assert "fedpriv keygen --region" in capsys.readouterr().out


def test_demo_region_keys_are_labelled_demo_only(tmp_path, capsys):
    d = tmp_path / "certs"
    assert main(["certs", str(d), "--demo-region-keys", "--regions", "us-east,eu-west"]) == 0
    p = CertPaths(d)
    assert sorted(p.regions_with(".key")) == ["eu-west", "us-east"]
    for r in ("us-east", "eu-west"):
        assert _mode(p.region_key(r)) == 0o600 and not _mode(p.region_pub(r)) & 0o022
    out = capsys.readouterr().out
    assert "demo only" in out.lower() and "every region's private key" in out
    assert "DEMO ONLY" in p.readme.read_text() and "every region's private key" in p.readme.read_text()
    # --regions without the demo flag would make region keys centrally: refused in one line.
    assert main(["certs", str(tmp_path / "c2"), "--regions", "a"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fedpriv keygen --region" in err and "--demo-region-keys" in err
    assert not (tmp_path / "c2").exists()


def test_certs_help_labels_the_demo_path():
    from fedpriv.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    text = " ".join(sub.choices["certs"].format_help().split())
    assert "DEMO ONLY" in text and "impersonate any region" in text


def test_keygen_region_writes_the_key_pair_in_the_region(tmp_path, capsys):
    d = tmp_path / "us-east-creds"
    assert main(["keygen", "--region", "us-east", str(d)]) == 0
    key, pub = d / "regions" / "us-east.key", d / "regions" / "us-east.pub"
    assert _mode(key) == 0o600 and not _mode(pub) & 0o022
    out = capsys.readouterr().out
    assert pub.read_text().strip() in out  # what travels is printed
    assert "PRIVATE" not in out and key.read_text() not in out  # the private key is never printed
    priv = load_ssh_private_key(key.read_bytes(), None)
    assert isinstance(priv, ec.EllipticCurvePrivateKey) and isinstance(priv.curve, ec.SECP384R1)
    assert load_ssh_public_key(pub.read_bytes()).public_numbers() == priv.public_key().public_numbers()


def test_keygen_never_overwrites_without_force(tmp_path, capsys):
    d = tmp_path / "r"
    assert main(["keygen", "--region", "a", str(d)]) == 0
    old = (d / "regions" / "a.key").read_bytes()
    capsys.readouterr()
    assert main(["keygen", "--region", "a", str(d)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already exists" in err and "--force" in err
    assert (d / "regions" / "a.key").read_bytes() == old
    assert main(["keygen", "--region", "a", str(d), "--force"]) == 0
    assert (d / "regions" / "a.key").read_bytes() != old and _mode(d / "regions" / "a.key") == 0o600

    assert main(["keygen", "--publisher", "acme", str(d)]) == 0
    old = (d / "publisher.key").read_bytes()
    capsys.readouterr()
    assert main(["keygen", "--publisher", "acme", str(d)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "publisher.key already exists" in err
    assert (d / "publisher.key").read_bytes() == old


def test_keygen_publisher_prints_the_trust_line(tmp_path, capsys):
    import yaml
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from fedpriv.deploy.app_signing import key_id, load_trust_file

    d = tmp_path / "pub"
    assert main(["keygen", "--publisher", "acme", str(d)]) == 0
    out = capsys.readouterr().out
    assert _mode(d / "publisher.key") == 0o600
    priv = load_ssh_private_key((d / "publisher.key").read_bytes(), None)
    assert isinstance(priv, ed25519.Ed25519PrivateKey)
    trust_line = next(line for line in out.splitlines() if line.startswith("acme: "))
    (tmp_path / "trust.yaml").write_text(trust_line + "\n")
    assert list(yaml.safe_load(trust_line)) == ["acme"]
    [trusted] = load_trust_file(tmp_path / "trust.yaml")
    assert trusted.label == "acme" and trusted.key_id == key_id(priv.public_key())


def test_register_accepts_only_public_region_keys(tmp_path):
    from fedpriv.commands.register import collect_public_keys

    certs = create_certs(tmp_path / "c").paths
    key, pub = create_region_key(tmp_path / "us", "us-east")
    _, pub2 = create_region_key(tmp_path / "eu", "eu-west")
    keys = collect_public_keys([f"us-east={pub}"], str(pub2.parent), certs)
    assert keys == {"us-east": pub, "eu-west": pub2}
    with pytest.raises(FedprivError, match="PRIVATE key"):
        collect_public_keys([f"us-east={key}"], None, certs)
    with pytest.raises(FedprivError, match="missing public key"):
        collect_public_keys([f"us-east={tmp_path / 'nope.pub'}"], None, certs)
    (tmp_path / "junk.pub").write_text("not a key\n")
    with pytest.raises(FedprivError, match="not an OpenSSH public key"):
        collect_public_keys([f"us-east={tmp_path / 'junk.pub'}"], None, certs)
    with pytest.raises(FedprivError, match="NAME=FILE"):
        collect_public_keys(["us-east"], None, certs)
    with pytest.raises(FedprivError, match="no public keys given"):
        collect_public_keys([], None, certs)


def test_server_cert_verifies_against_ca_and_has_sans(tmp_path):
    res = create_certs(tmp_path / "c", hosts=["coord.example.com", "10.1.2.3", "[2001:db8::1]"])
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

    p = create_certs(tmp_path / "c").paths
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

    p = CertPaths(create_region_key(tmp_path / "c", "us-east")[0].parents[1])
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
    assert main(["certs", str(d)]) == 0
    old_ca = (d / "ca.key").read_bytes()
    capsys.readouterr()
    assert main(["certs", str(d)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "already exists" in err and "--force" in err
    assert (d / "ca.key").read_bytes() == old_ca

    # A demo region's key alone is enough to refuse, too.
    c2 = create_certs(tmp_path / "c2", demo_regions=("a",)).paths
    for f in (c2.ca_cert, c2.ca_key, c2.server_cert, c2.server_key):
        f.unlink()
    with pytest.raises(FedprivError, match=r"a\.key already exists"):
        create_certs(c2.root, demo_regions=("b", "a"))
    assert not c2.region_key("b").exists()

    assert main(["certs", str(d), "--force"]) == 0
    assert (d / "ca.key").read_bytes() != old_ca and _mode(d / "ca.key") == 0o600


def test_private_key_mode_does_not_depend_on_umask(tmp_path):
    import os

    old = os.umask(0)
    try:
        p = create_certs(tmp_path / "c").paths
        key, _ = create_region_key(tmp_path / "r", "a")
    finally:
        os.umask(old)
    assert _mode(p.server_key) == 0o600 and _mode(key) == 0o600 and _mode(p.ca_key) == 0o600


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--demo-region-keys", "--regions", "us east"], "region name 'us east'"),
        (["--demo-region-keys", "--regions", "a,a"], "unique"),
        (["--demo-region-keys", "--regions", ","], "at least one"),
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


def test_private_keys_are_never_written_where_git_would_track_them(tmp_path, capsys):
    """`fedpriv certs` / `keygen` inside a git checkout refuse (one line) unless .gitignore ignores the keys."""
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "checkout"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    for argv, key in ((["certs", str(repo / "deploy" / "certs")], repo / "deploy" / "certs" / "ca.key"),
                      (["keygen", "--publisher", "acme", str(repo / "pub")], repo / "pub" / "publisher.key"),
                      (["keygen", "--region", "us-east", str(repo / "creds")], repo / "creds" / "regions" / "us-east.key")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "inside the git checkout" in err[0] and str(key) in err[0], err
        assert not key.exists()
    # Outside any checkout, and inside one where git ignores them (this repository's .gitignore), they are written.
    assert main(["certs", str(tmp_path / "outside")]) == 0 and (tmp_path / "outside" / "ca.key").is_file()
    shutil.copy(Path(__file__).resolve().parents[1] / ".gitignore", repo / ".gitignore")
    assert main(["certs", str(repo / "deploy" / "certs")]) == 0
    assert main(["keygen", "--publisher", "acme", str(repo / "pub")]) == 0
    tracked = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=all"],
                             capture_output=True, text=True, check=True).stdout
    assert ".key" not in tracked and "publisher.key" not in tracked, tracked
