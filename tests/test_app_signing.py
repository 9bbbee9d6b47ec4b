"""Signed app bundles: what a region accepts and refuses before any bundle code is installed (no processes)."""

from __future__ import annotations

import io
import os
import sys
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


def test_verifying_clientapp_refuses_before_installing(tmp_path, monkeypatch, capsys):
    """The region's gate wraps Flower's install_from_fab: a refused bundle is never unpacked."""
    import importlib

    from flwr.supernode.runtime import run_clientapp as rc

    from fedpriv.deploy import trusted_exec

    key, trust = _publisher(tmp_path)
    installed: list[bytes] = []
    monkeypatch.setattr(rc, "install_from_fab", lambda fab, *a, **k: installed.append(fab) or tmp_path)
    outcomes = []

    def fake_flwr_clientapp():  # what Flower's ClientApp process does first with the pulled bundle
        for fab in (_fab(FILES), sign_bundle(_fab(FILES), key)):
            try:
                rc.install_from_fab(fab, skip_prompt=True)
                outcomes.append("installed")
            except AppNotTrusted as exc:
                outcomes.append(str(exc))

    cli = importlib.import_module("flwr.supernode.cli.flwr_clientapp")
    monkeypatch.setattr(cli, "flwr_clientapp", fake_flwr_clientapp)
    ours = {m: mod for m, mod in sys.modules.items() if m == "fedpriv" or m.startswith("fedpriv.")}
    try:
        trusted_exec.main(["clientapp", "--trust", str(trust), "--token", "t"])
        # After verifying, the gate forgot the region's fedpriv: the bundle imports its own signed copy.
        assert "fedpriv.core.errors" not in sys.modules
    finally:
        sys.modules.update(ours)  # keep one FedprivError class for the rest of this test session
    assert outcomes[1] == "installed" and "is not signed" in outcomes[0]
    assert len(installed) == 1 and verify_bundle(installed[0], load_trust_file(trust))
    err = capsys.readouterr().err
    assert trusted_exec.REFUSED in err and "app bundle verified: signed by 'acme'" in err


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
    assert ours[3:6] == ["clientapp", "--trust", "/etc/trust.yaml"] and ours[6:] == seen[0][1:]


def test_signed_run_replaces_flowers_bundle_builder():
    """`flwr run` builds its bundle through this name; fedpriv.deploy.signed_run swaps it for the signed bytes."""
    import importlib

    flwr_run = importlib.import_module("flwr.cli.run.run")
    assert callable(flwr_run.build_fab_from_disk)
    assert flwr_run._run_with_control_api.__globals__ is vars(flwr_run)  # looked up at call time, in this module


