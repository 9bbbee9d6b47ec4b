"""The identity layer of secure aggregation (:mod:`fedpriv.privacy.secagg.identity`) and how a region is given it.

Identity keys made where they are used (``fedpriv keygen --region``), a roster whose every bad line is
one clear error, signatures bound to job, round, setup, node and name, and the deployment's
``fedpriv supernode --roster`` checked before anything starts.
"""

from __future__ import annotations

import os
import stat

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedpriv.cli import main
from fedpriv.core.errors import FedprivError
from fedpriv.privacy.secagg import identity as ident
from fedpriv.privacy.secagg.identity import (Advertisement, IdentityError, PeerAuthenticationError, RoundBinding,
                                             load_identity, load_roster, parse_roster, roster_line, write_identity)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _pub(tmp_path, name):
    return write_identity(tmp_path / name, name)[1].read_text()


def test_write_identity_makes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path):
    key, pub = write_identity(tmp_path, "us-east")
    assert key == tmp_path / "regions" / "us-east.id.key" and _mode(key) == 0o600 and not _mode(pub) & 0o022
    assert pub.read_text().startswith("ssh-ed25519 ") and "PRIVATE" not in pub.read_text()
    first = key.read_bytes()
    with pytest.raises(IdentityError, match="already exists.*--force"):
        write_identity(tmp_path, "us-east")
    write_identity(tmp_path, "us-east", force=True)
    assert key.read_bytes() != first  # a fresh key from OS entropy


def test_a_roster_round_trips_and_signatures_bind_everything(tmp_path):
    roster_file = tmp_path / "roster.txt"
    roster_file.write_text("# peers\n\n" + "".join(roster_line(n, _pub(tmp_path, n)) for n in ("a", "b")))
    me = load_identity("a", ident.identity_paths(tmp_path / "a", "a")[0], roster_file)
    other = load_identity("b", ident.identity_paths(tmp_path / "b", "b")[0], roster_file)
    assert set(me.roster.keys) == {"a", "b"}
    binding = RoundBinding("job", 3, b"s" * 32, {"threshold": 2, "num_clients": 3})
    ad = Advertisement("b", b"c" * 32, b"d" * 32, b"m" * 32)
    ad_signed = Advertisement("b", ad.c_pk, ad.s_pk, ad.seed_commitment,
                              ident.sign_advertisement(other, binding, 7, ad))
    own = Advertisement("a", b"C" * 32, b"D" * 32, b"M" * 32)
    assert ident.verify_key_list(me, binding, 5, {5: own, 7: ad_signed}, own) == ["b"]
    changed = [RoundBinding("job2", 3, b"s" * 32, binding.setup), RoundBinding("job", 4, b"s" * 32, binding.setup),
               RoundBinding("job", 3, b"t" * 32, binding.setup), RoundBinding("job", 3, b"s" * 32, {"threshold": 3,
                                                                                                      "num_clients": 3})]
    for other_binding in changed:  # another job, round, round seed or setup: the same signature no longer verifies
        with pytest.raises(PeerAuthenticationError, match="does not verify"):
            ident.verify_key_list(me, other_binding, 5, {5: own, 7: ad_signed}, own)
    with pytest.raises(PeerAuthenticationError, match="does not verify"):  # another node id
        ident.verify_key_list(me, binding, 5, {5: own, 8: ad_signed}, own)
    with pytest.raises(PeerAuthenticationError, match="own advertisement"):
        ident.verify_key_list(me, binding, 5, {5: Advertisement("a", b"X" * 32, own.s_pk, own.seed_commitment),
                                               7: ad_signed}, own)


@pytest.mark.parametrize("body, words", [
    ("us-east\n", ["line 1", "expected 'NAME ssh-ed25519 AAAA...'"]),
    ("us-east ssh-rsa AAAAB3NzaC1yc2E\n", ["line 1", "not an OpenSSH Ed25519 public key"]),
    ("bad/name {a}\n", ["line 1", "'bad/name"]),
    ("a {a}\na {b}\n", ["line 2", "'a' is listed twice"]),
    ("a {a}\nb {a}\n", ["line 2", "same key as 'a'"]),
    ("# nothing\n", ["lists no region"]),
])
def test_a_bad_roster_is_one_line_naming_the_line(tmp_path, body, words):
    keys = {"a": _pub(tmp_path, "a").strip(), "b": _pub(tmp_path, "b").strip()}
    path = tmp_path / "roster.txt"
    path.write_text(body.format(**keys))
    with pytest.raises(IdentityError) as info:
        load_roster(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_an_unreadable_or_wrong_identity_key_is_one_line(tmp_path):
    with pytest.raises(IdentityError, match="cannot read identity key .*nope.id.key"):
        ident.load_identity_key(tmp_path / "nope.id.key")
    _, pub = write_identity(tmp_path, "a")
    with pytest.raises(IdentityError, match="not an Ed25519 identity private key"):
        ident.load_identity_key(pub)


def test_a_roster_listing_this_region_under_another_key_is_refused(tmp_path):
    write_identity(tmp_path / "a", "a")
    (tmp_path / "roster.txt").write_text(roster_line("a", _pub(tmp_path, "b")))
    with pytest.raises(IdentityError, match="not this region's identity key"):
        load_identity("a", ident.identity_paths(tmp_path / "a", "a")[0], tmp_path / "roster.txt")


def test_a_roster_of_the_other_regions_still_knows_this_region_and_refuses_its_key_under_another_name(tmp_path):
    a_pub, b_pub = _pub(tmp_path, "a"), _pub(tmp_path, "b")
    (tmp_path / "roster.txt").write_text(roster_line("b", b_pub))
    me = load_identity("a", ident.identity_paths(tmp_path / "a", "a")[0], tmp_path / "roster.txt")
    me.roster.verify("a", b"view", me.sign(b"view"), "own view")  # its own signature checks out
    (tmp_path / "roster.txt").write_text(roster_line("b", a_pub))
    with pytest.raises(IdentityError, match="own identity key as region 'b'"):
        load_identity("a", ident.identity_paths(tmp_path / "a", "a")[0], tmp_path / "roster.txt")


def test_the_simulation_makes_fresh_identities_and_one_roster_per_run(tmp_path):
    root = ident.write_simulation_identities(tmp_path, ["r0", "r1"])
    first = ident.simulation_identity(tmp_path, "r0").public_key
    assert set(parse_roster((root / "roster.txt").read_text(), "x").keys) == {"r0", "r1"}
    assert _mode(ident.identity_paths(root, "r1")[0]) == 0o600
    ident.write_simulation_identities(tmp_path, ["r0", "r1"])
    assert ident.simulation_identity(tmp_path, "r0").public_key != first  # fresh every run


def test_a_view_signature_over_another_view_is_refused(tmp_path):
    roster_file = tmp_path / "roster.txt"
    roster_file.write_text("".join(roster_line(n, _pub(tmp_path, n)) for n in ("a", "b")))
    a = load_identity("a", ident.identity_paths(tmp_path / "a", "a")[0], roster_file)
    b = load_identity("b", ident.identity_paths(tmp_path / "b", "b")[0], roster_file)
    binding = RoundBinding("job", 1, b"s" * 32, {"threshold": 2})
    digest = b"k" * 32
    sigs = {1: a.sign(ident.view_message(binding, digest, [1, 2])), 2: b.sign(ident.view_message(binding, digest, [1, 2]))}
    ident.verify_view_signatures(a, binding, digest, [1, 2], {1: "a", 2: "b"}, sigs, 2)
    with pytest.raises(PeerAuthenticationError, match="node 2 does not verify|of node 2"):
        ident.verify_view_signatures(a, binding, b"K" * 32, [1, 2], {1: "a", 2: "b"},
                                     {1: a.sign(ident.view_message(binding, b"K" * 32, [1, 2])), 2: sigs[2]}, 2)
    forged = Ed25519PrivateKey.generate().sign(ident.view_message(binding, digest, [1, 2]))
    with pytest.raises(PeerAuthenticationError, match="region 'b' does not verify"):
        ident.verify_view_signatures(a, binding, digest, [1, 2], {1: "a", 2: "b"}, {1: sigs[1], 2: forged}, 2)


# ------------------------------------------------------------------ the commands


def test_keygen_region_adds_the_identity_key_and_prints_the_roster_line(tmp_path, capsys):
    d = tmp_path / "us-east-creds"
    assert main(["keygen", "--region", "us-east", str(d)]) == 0
    out = capsys.readouterr().out
    key, pub = ident.identity_paths(d, "us-east")
    assert (d / "regions" / "us-east.key").is_file() and _mode(key) == 0o600
    assert roster_line("us-east", pub.read_text()) in out and key.read_text() not in out
    # an older region (SuperNode key only) gets just the identity key: its registered key stays
    node_key = (d / "regions" / "us-east.key").read_bytes()
    key.unlink()
    pub.unlink()
    assert main(["keygen", "--region", "us-east", str(d)]) == 0
    assert (d / "regions" / "us-east.key").read_bytes() == node_key and key.is_file()
    assert "send this file to the operator" not in capsys.readouterr().out


def test_supernode_roster_is_checked_before_anything_starts_and_reaches_node_config(tmp_path):
    from fedpriv.deploy.certs import create_region_key
    from fedpriv.deploy.ports import free_port
    from fedpriv.deploy.supernode import SuperNodeProcess

    certs = tmp_path / "certs"
    create_region_key(certs, "us-east")
    (certs / "ca.crt").write_text("x")
    data = tmp_path / "data"
    (data / "regions" / "us-east").mkdir(parents=True)
    (data / "regions" / "us-east" / "train.jsonl").write_text("{}\n")
    trust = tmp_path / "trust.yaml"
    from fedpriv.deploy.app_signing import create_publisher_key, trust_line

    _, publisher = create_publisher_key(tmp_path / "pub", "acme")
    trust.write_text(trust_line("acme", publisher.read_text()))
    roster = tmp_path / "roster.txt"
    roster.write_text(roster_line("eu-west", _pub(tmp_path, "eu-west")))

    def node(roster_file=roster):
        return SuperNodeProcess("us-east", data, certs, "127.0.0.1:1", free_port(), trust_file=trust,
                                roster_file=roster_file)

    with pytest.raises(FedprivError, match="missing identity key .*us-east.id.key.*fedpriv keygen --region us-east"):
        node().preflight()
    write_identity(certs, "us-east")
    with pytest.raises(FedprivError, match="missing roster"):
        node(tmp_path / "nope.txt").preflight()
    (tmp_path / "bad.txt").write_text("eu-west not-a-key\n")
    with pytest.raises(FedprivError, match="bad.txt line 1"):
        node(tmp_path / "bad.txt").preflight()
    sn = node()
    sn.preflight()
    assert sn.peers == ["eu-west"]
    config = sn.node_config()
    assert f"roster-path='{roster}'" in config and f"identity-key-path='{certs}/regions/us-east.id.key'" in config
    bare = node(None)
    bare.preflight()
    assert "roster-path" not in bare.node_config() and any("--roster" in w for w in bare.warnings)
