"""Signed app bundles: what a region accepts and refuses before any bundle code is installed (no processes)."""

from __future__ import annotations

import io
import os
import sys
import time
import zipfile
from pathlib import Path

import pytest

from fedpriv.deploy.app_signing import (
    SIGNATURE_ENTRY, AppNotTrusted, create_publisher_key, load_publisher_key, load_trust_file, sign_bundle,
    trust_line, verify_bundle,
)
from fedpriv.core.errors import FedprivError


def _fab(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return out.getvalue()


FILES = {"pyproject.toml": b"[project]\nname='x'\n", "client/app.py": b"print('region code')\n", ".info/CONTENT": b"..."}


def _publisher(tmp_path: Path, name: str = "acme"):
    key_path, pub_path = create_publisher_key(tmp_path / name, name)
    trust = tmp_path / f"trust-{name}.yaml"
    trust.write_text(trust_line(name, pub_path.read_text()))
    return load_publisher_key(key_path), trust


def _rewrite(fab: bytes, change) -> bytes:  # noqa: ANN001
    src = zipfile.ZipFile(io.BytesIO(fab))
    entries = {i.filename: src.read(i) for i in src.infolist()}
    change(entries)
    return _fab(entries)


def test_signed_bundle_is_accepted_by_a_region_that_trusts_the_publisher(tmp_path):
    key, trust = _publisher(tmp_path)
    signed = sign_bundle(_fab(FILES), key)
    assert verify_bundle(signed, load_trust_file(trust)).label == "acme"


def test_unsigned_bundle_is_refused_in_one_line(tmp_path):
    _, trust = _publisher(tmp_path)
    with pytest.raises(AppNotTrusted, match="is not signed") as exc:
        verify_bundle(_fab(FILES), load_trust_file(trust))
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("attack", ["change-file", "add-file", "drop-file", "change-metadata-only-file"])
def test_any_change_after_signing_is_refused(tmp_path, attack):
    """The coordinator edits the ClientApp (or adds a module) after the publisher signed the bundle."""
    key, trust = _publisher(tmp_path)
    signed = sign_bundle(_fab(FILES), key)

    def change(entries):  # noqa: ANN001
        if attack == "change-file":
            entries["client/app.py"] = b"print('no DP today')\n"
        elif attack == "add-file":
            entries["client/sitecustomize.py"] = b"import os\n"
        elif attack == "drop-file":
            del entries["client/app.py"]
        else:  # a file Flower's own .info/CONTENT does not cover
            entries[".info/CONTENT"] = b"other"

    with pytest.raises(AppNotTrusted, match="modified after signing"):
        verify_bundle(_rewrite(signed, change), load_trust_file(trust))


def test_signature_by_an_untrusted_key_is_refused(tmp_path):
    mallory, _ = _publisher(tmp_path, "mallory")
    _, trust = _publisher(tmp_path, "acme")
    with pytest.raises(AppNotTrusted, match="not in this region's trust file"):
        verify_bundle(sign_bundle(_fab(FILES), mallory), load_trust_file(trust))


def test_a_forged_key_id_does_not_help(tmp_path):
    """The signature names the trusted key's id, but the key itself always comes from the region's file."""
    import json

    mallory, _ = _publisher(tmp_path, "mallory")
    acme, trust = _publisher(tmp_path, "acme")
    forged = sign_bundle(_fab(FILES), mallory)
    honest_id = json.loads(zipfile.ZipFile(io.BytesIO(sign_bundle(_fab(FILES), acme))).read(SIGNATURE_ENTRY))["key-id"]

    def relabel(entries):  # noqa: ANN001
        doc = json.loads(entries[SIGNATURE_ENTRY])
        doc["key-id"] = honest_id
        entries[SIGNATURE_ENTRY] = json.dumps(doc).encode()

    with pytest.raises(AppNotTrusted, match="does not match its signature"):
        verify_bundle(_rewrite(forged, relabel), load_trust_file(trust))


def test_duplicate_or_non_canonical_entries_are_refused(tmp_path):
    key, trust = _publisher(tmp_path)
    signed = sign_bundle(_fab(FILES), key)
    out = io.BytesIO(signed)
    with zipfile.ZipFile(out, "a") as zf, pytest.warns(UserWarning):
        zf.writestr("client/app.py", b"evil")  # extracted last, so it would win
    with pytest.raises(AppNotTrusted, match="two entries named"):
        verify_bundle(out.getvalue(), load_trust_file(trust))
    with pytest.raises(AppNotTrusted, match="non-canonical"):
        verify_bundle(sign_bundle(_fab({**FILES, "client/../x.py": b""}), key), load_trust_file(trust))


def test_the_real_app_bundle_signs_installs_and_refuses_tampering(tmp_path):
    """The FAB `flwr run` builds from this repository, signed, installs with Flower's own installer."""
    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.install import install_from_fab

    from fedpriv.core.config import APP_DIR

    key, trust = _publisher(tmp_path)
    signed = sign_bundle(build_fab_from_disk(Path(APP_DIR)), key)
    assert verify_bundle(signed, load_trust_file(trust)).label == "acme"
    installed = install_from_fab(signed, tmp_path / "home", skip_prompt=True)
    assert (installed / "client" / "app.py").is_file() and not (installed / ".info").exists()


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (None, "missing trust file"),
        ("acme: [unclosed", "not readable YAML"),
        ("", "at least one publisher key"),
        ("- ssh-ed25519 AAAA", "expected a mapping"),
        ("acme: 42", "expected an OpenSSH public key line"),
        ("acme: 'ssh-ed25519 notbase64'", "is not an OpenSSH public key line"),
    ],
)
def test_bad_trust_files_are_one_line_errors(tmp_path, content, needle):
    path = tmp_path / "trust.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(FedprivError, match=needle) as exc:
        load_trust_file(path)
    assert "\n" not in str(exc.value)


def test_trust_file_refuses_non_ed25519_keys(tmp_path):
    from fedpriv.deploy.certs import create_region_key

    _, pub = create_region_key(tmp_path, "r")  # an EC P-384 SuperNode key is not a publisher key
    (tmp_path / "trust.yaml").write_text(trust_line("oops", pub.read_text()))
    with pytest.raises(FedprivError, match="not an Ed25519 key"):
        load_trust_file(tmp_path / "trust.yaml")


def test_publisher_key_errors(tmp_path):
    with pytest.raises(FedprivError, match="missing publisher key"):
        load_publisher_key(tmp_path / "nope.key")
    key, _ = create_publisher_key(tmp_path / "p", "acme")
    os.chmod(key, 0o644)
    with pytest.raises(FedprivError, match="readable by other users"):
        load_publisher_key(key)
    from fedpriv.deploy.certs import create_region_key

    region_key, _ = create_region_key(tmp_path / "r", "r")
    with pytest.raises(FedprivError, match="not an Ed25519 key"):
        load_publisher_key(region_key)


def test_verifying_clientapp_verifies_never_installs_and_loads_the_installed_clientapp(tmp_path, monkeypatch, capsys):
    """The region's gate replaces Flower's install_from_fab (verify, never unpack) and its ClientApp loader."""
    import importlib

    from flwr.clientapp import ClientApp
    from flwr.supernode.runtime import run_clientapp as rc

    from fedpriv.deploy import trusted_exec

    key, trust = _publisher(tmp_path)
    flower_install = []
    monkeypatch.setattr(rc, "install_from_fab", lambda fab, *a, **k: flower_install.append(fab))
    monkeypatch.setattr(rc, "pull_task_input", rc.pull_task_input)
    monkeypatch.setattr(rc, "get_load_client_app_fn", rc.get_load_client_app_fn)
    outcomes = []
    components = b"[tool.flwr.app.components]\nclientapp = 'fedpriv.apps:clientapp'\n"
    good = {**FILES, "pyproject.toml": components}
    elsewhere = {**FILES, "pyproject.toml": components.replace(b"fedpriv.apps", b"client.evil")}

    def fake_flwr_clientapp():  # what Flower's ClientApp process does with the pulled bundle
        for fab in (_fab(good), sign_bundle(_fab(elsewhere), key), sign_bundle(_fab(good), key)):
            try:
                rc.install_from_fab(fab, skip_prompt=True)
                outcomes.append("accepted")
            except AppNotTrusted as exc:
                outcomes.append(str(exc))
        load = rc.get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
        outcomes.append(load("evil/app", "6.6.6", "0" * 64))

    cli = importlib.import_module("flwr.supernode.cli.flwr_clientapp")
    monkeypatch.setattr(cli, "flwr_clientapp", fake_flwr_clientapp)
    trusted_exec.main(["clientapp", "--trust", str(trust), "--token", "t"])
    assert "is not signed" in outcomes[0] and "names ClientApp 'client.evil:clientapp'" in outcomes[1]
    assert outcomes[2] == "accepted" and flower_install == []  # verified, and never unpacked
    from fedpriv.apps import clientapp

    assert isinstance(outcomes[3], ClientApp) and outcomes[3] is clientapp  # the installed one, whatever the bundle says
    err = capsys.readouterr().err
    assert trusted_exec.REFUSED in err and "app bundle verified: signed by 'acme'" in err


def test_installed_clientapp_refuses_a_fedpriv_module_from_elsewhere(tmp_path, monkeypatch):
    """Belt and braces: had any fedpriv module come from outside the installed package, nothing runs."""
    import types

    from fedpriv.deploy.trusted_exec import installed_clientapp, installed_roots

    roots = installed_roots()
    assert installed_clientapp(roots) is not None
    rogue = types.ModuleType("fedpriv.privacy.rogue")
    rogue.__file__ = str(tmp_path / "fedpriv" / "privacy" / "rogue.py")
    monkeypatch.setitem(sys.modules, "fedpriv.privacy.rogue", rogue)
    with pytest.raises(RuntimeError, match="fedpriv.privacy.rogue is not the region's installed fedpriv"):
        installed_clientapp(roots)


def test_signature_names_the_fedpriv_version_and_signing_time(tmp_path):
    """Both are inside the signed message: editing either breaks the signature."""
    import json

    import fedpriv

    key, trust = _publisher(tmp_path)
    signed = sign_bundle(_fab(FILES), key, signed_at=1_700_000_000)
    verified = verify_bundle(signed, load_trust_file(trust))
    assert (verified.fedpriv_version, verified.signed_at) == (fedpriv.__version__, 1_700_000_000)
    for field, value in (("signed-at", int(time.time())), ("fedpriv-version", "0.0.9")):
        def edit(entries, field=field, value=value):  # noqa: ANN001, ANN202
            doc = json.loads(entries[SIGNATURE_ENTRY])
            doc[field] = value
            entries[SIGNATURE_ENTRY] = json.dumps(doc).encode()
        with pytest.raises(AppNotTrusted, match="does not match its signature"):
            verify_bundle(_rewrite(signed, edit), load_trust_file(trust), fedpriv_version="0.0.9")


def test_other_version_old_future_and_v1_signatures_are_refused(tmp_path):
    import json

    key, trust = _publisher(tmp_path)
    trusted = load_trust_file(trust)
    now = 1_800_000_000
    with pytest.raises(AppNotTrusted, match="signed for fedpriv '9.9'; this region runs fedpriv"):
        verify_bundle(sign_bundle(_fab(FILES), key, fedpriv_version="9.9"), trusted)
    fresh = sign_bundle(_fab(FILES), key, signed_at=now - 29 * 86400)
    assert verify_bundle(fresh, trusted, max_age_days=30, now=now).label == "acme"
    with pytest.raises(AppNotTrusted, match=r"29.0 days ago: this region's policy max-bundle-age-days = 7") as exc:
        verify_bundle(fresh, trusted, max_age_days=7, now=now)
    assert "\n" not in str(exc.value)
    with pytest.raises(AppNotTrusted, match="in the future"):
        verify_bundle(sign_bundle(_fab(FILES), key, signed_at=now + 3600), trusted, max_age_days=30, now=now)

    def as_v1(entries):  # noqa: ANN001, ANN202 - a signature of the format before versions were signed
        doc = json.loads(entries[SIGNATURE_ENTRY])
        doc["format"] = "fedpriv-fab-signature/1"
        del doc["fedpriv-version"]
        entries[SIGNATURE_ENTRY] = json.dumps(doc).encode()
    with pytest.raises(AppNotTrusted, match="unreadable signature.*re-sign it with this fedpriv"):
        verify_bundle(_rewrite(fresh, as_v1), trusted)


def test_the_gate_takes_the_bundle_age_from_the_regions_policy(tmp_path):
    from fedpriv.core.errors import ConfigError
    from fedpriv.deploy.trusted_exec import check_bundle
    from fedpriv.privacy.policy import load_policy

    key, trust = _publisher(tmp_path)
    good = _fab({**FILES, "pyproject.toml": b"[tool.flwr.app.components]\nclientapp = 'fedpriv.apps:clientapp'\n"})
    ten_days = sign_bundle(good, key, signed_at=int(time.time()) - 10 * 86400)
    policy = tmp_path / "policy.toml"
    policy.write_text("[policy]\ndelta = 1e-5\nmax-lifetime-epsilon = 10.0\n")
    assert load_policy(policy).max_bundle_age_days == 30.0  # the default
    assert check_bundle(ten_days, str(trust), {"policy-path": str(policy)}) == "acme"
    policy.write_text("[policy]\ndelta = 1e-5\nmax-lifetime-epsilon = 10.0\nmax-bundle-age-days = 3\n")
    with pytest.raises(AppNotTrusted, match="max-bundle-age-days = 3"):
        check_bundle(ten_days, str(trust), {"policy-path": str(policy)})
    policy.write_text("[policy]\ndelta = 1e-5\nmax-lifetime-epsilon = 10.0\nmax-bundle-age-days = 0\n")
    with pytest.raises(ConfigError, match="max-bundle-age-days = 0.0: expected a number of days > 0"):
        load_policy(policy)


def test_superexec_launches_the_verifying_clientapp_with_flowers_arguments(monkeypatch):
    """Drift guard: our launch builds the same argv as flwr 1.41's SubprocessExecutor.launch, behind the gate."""
    import subprocess

    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import subprocess_executor as se
    from flwr.supercore.superexec.executor.types import ExecutionSpec

    from fedpriv.deploy.trusted_exec import clientapp_command

    spec = ExecutionSpec(task_type=TaskType.CLIENT_APP, runtime_api_address="127.0.0.1:9094", token="tok", insecure=True,
                         root_certificates_path=None, runtime_dependency_install=False, parent_pid=7, suppress_output=False,
                         task_id=1)
    seen = []
    monkeypatch.setattr(subprocess, "Popen", lambda args, **kw: seen.append(list(args)))
    se.SubprocessExecutor().launch(spec)
    ours = clientapp_command(spec, "/etc/trust.yaml")
    assert seen[0][0] == "flwr-clientapp"
    assert ours[1:3] == ["-P", "-m"]  # -P: not even the current directory may supply a module
    assert ours[4:7] == ["clientapp", "--trust", "/etc/trust.yaml"] and ours[7:] == seen[0][1:]


def test_signed_run_replaces_flowers_bundle_builder():
    """`flwr run` builds its bundle through this name; fedpriv.deploy.signed_run swaps it for the signed bytes."""
    import importlib

    flwr_run = importlib.import_module("flwr.cli.run.run")
    assert callable(flwr_run.build_fab_from_disk)
    assert flwr_run._run_with_control_api.__globals__ is vars(flwr_run)  # looked up at call time, in this module




def test_the_operator_submits_the_publishers_bundle_and_never_needs_its_key(tmp_path, capsys):
    """`fedpriv sign-bundle` (publisher) writes a signed bundle for this fedpriv; `fedpriv run --bundle` (operator) takes
    it as is, and refuses a file that is not one, a bundle for another version, or --bundle with --sign-key."""
    from fedpriv.cli import main
    from fedpriv.commands.run import check_signing
    from fedpriv.deploy.app_signing import read_signed_bundle

    key_path, pub_path = create_publisher_key(tmp_path / "pub", "acme")
    trust = tmp_path / "trust.yaml"
    trust.write_text(trust_line("acme", pub_path.read_text()))
    out = tmp_path / "app.fab"
    assert main(["sign-bundle", "--sign-key", str(key_path), "--out", str(out)]) == 0
    assert "fedpriv run --bundle app.fab" in capsys.readouterr().out
    fab = out.read_bytes()
    assert read_signed_bundle(out) == fab and verify_bundle(fab, load_trust_file(trust), max_age_days=1).label == "acme"
    assert main(["sign-bundle", "--sign-key", str(key_path), "--out", str(out)]) == 2  # never overwritten silently
    assert "already exists" in capsys.readouterr().err
    assert check_signing(None, str(out)) == (None, out)
    (tmp_path / "old.fab").write_bytes(sign_bundle(fab, load_publisher_key(key_path), fedpriv_version="0.0.9"))
    (tmp_path / "not.fab").write_bytes(b"not a zip")
    for bad, needle in ((tmp_path / "old.fab", "signed for fedpriv '0.0.9'"), (tmp_path / "not.fab", "is not a signed app bundle"),
                        (tmp_path / "missing.fab", "cannot read --bundle")):
        with pytest.raises(FedprivError, match=needle) as exc:
            check_signing(None, str(bad))
        assert "\n" not in str(exc.value)
    with pytest.raises(FedprivError, match="--sign-key and --bundle: pass one"):
        check_signing(str(key_path), str(out))
