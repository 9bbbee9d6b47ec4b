"""``fedpriv run``: bad input is a one-line error before anything is submitted; resume planning.

No Flower process is started here (the Control API check uses a port nobody
listens on); the end-to-end runs are in tests/test_deployment_e2e.py and
tests/test_faults.py.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
from pathlib import Path

import pytest

from fedpriv.cli import main
from fedpriv.deploy.certs import create_certs
from e2e_support import TINY, write_region_data

REGIONS = ("us-east", "eu-west", "ap-south")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("runcmd")
    from fedpriv.deploy.app_signing import create_publisher_key

    certs = create_certs(root / "certs", demo_regions=REGIONS).paths
    data = write_region_data(root, REGIONS)
    create_publisher_key(root / "publisher", "tests")
    return root, certs, data


def _key(certs) -> str:  # noqa: ANN001
    return str(certs.root.parent / "publisher" / "publisher.key")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(capsys, *args: str) -> tuple[int, str]:
    rc = main(["run", *args])
    captured = capsys.readouterr()
    return rc, (captured.err + captured.out).strip()


def _one_line_error(rc: int, out: str) -> str:
    assert rc == 2, out
    lines = out.splitlines()
    assert len(lines) == 1, out
    assert lines[0].startswith("fedpriv run: error: ")
    return lines[0]


def test_bad_inputs_are_one_line_errors(setup, tmp_path, capsys):
    root, certs, data = setup
    base = ["--superlink", f"127.0.0.1:{_closed_port()}", "--certs", str(certs.root), "--data", str(data),
            "--run-dir", str(tmp_path / "r")]
    signed = ["--sign-key", _key(certs)]
    loose = tmp_path / "loose.key"
    loose.write_bytes(Path(_key(certs)).read_bytes())
    loose.chmod(0o644)
    cases = {
        "unknown region 'eu-central': .*has keys for ap-south, eu-west, us-east":
            [*base, "--run-config", f"{TINY} regions='us-east,eu-central'"],
        "missing CA certificate .*/empty/ca.crt": [*base[:2], "--certs", str(_empty(tmp_path)), "--data", str(data)],
        r"--certs .*/nope: no such directory": [*base[:2], "--certs", str(tmp_path / "nope"), "--data", str(data)],
        "data directory .*/missing does not exist": [*base[:4], "--data", str(tmp_path / "missing"), "--run-config", TINY],
        "is not a directory": [*base[:4], "--data", str(certs.ca_cert), "--run-config", TINY],
        r"no server held-out set .*/regions/server/test.jsonl": [*base[:4], "--data", str(data / "regions"), "--run-config", TINY],
        "unknown config key 'bogus'": [*base, "--run-config", "bogus=1"],
        "config key 'num-server-rounds' = 'x': expected a int": [*base, "--run-config", "num-server-rounds='x'"],
        r"num-server-rounds = 0: expected an integer >= 1": [*base, "--run-config", f"{TINY} num-server-rounds=0"],
        r"num-server-rounds = 1000000: expected an integer >= 1 and at most 10000":
            [*base, "--run-config", f"{TINY} num-server-rounds=1000000"],
        r"target-epsilon = inf: expected a finite number": [*base, "--run-config", f"{TINY} target-epsilon=inf"],
        "fewer than batch-size = 1024": [*base],  # pyproject defaults vs 128-post regions
        "unknown preset 'huge'": [*base, "--preset", "huge"],
        "is set by fedpriv run: pass --data instead": [*base, "--run-config", "data-dir='/x'"],
        r"--timeout = -1.0: expected seconds > 0": [*base, "--run-config", TINY, "--timeout", "-1"],
        "expected HOST:PORT": ["--superlink", "nohost", *base[2:]],
        "cannot reach the SuperLink's Control API at 127.0.0.1:[0-9]+: nothing is listening there": [*base, "--run-config", TINY],
        "no server data: pass --data DIR": [*base[:4], "--run-config", TINY],
    }
    # The submission is signed: no (usable) publisher key, no run - every region would refuse it.
    unsigned = {
        "missing --sign-key FILE: regions run only app bundles signed": [],
        "missing publisher key .*/nope.key: create it with `fedpriv keygen --publisher": ["--sign-key", str(tmp_path / "nope.key")],
        r"loose.key is readable by other users \(mode 644\): chmod 600 it": ["--sign-key", str(loose)],
        "is not an Ed25519 key": ["--sign-key", str(certs.region_key("us-east"))],
        r"--sign-key .*publisher.pub is a public key: pass the publisher's private key .*publisher.key":
            ["--sign-key", str(Path(_key(certs)).with_suffix(".pub"))],
    }
    import re

    for pattern, args in [*((p, [*signed, *a]) for p, a in cases.items()),
                          *((p, [*base, "--run-config", TINY, *a]) for p, a in unsigned.items())]:
        line = _one_line_error(*_run(capsys, *args))
        assert re.search(pattern, line), (pattern, line)
    # Regions the data was not prepared for (keys exist, shards do not).
    other = create_certs(tmp_path / "certs4", demo_regions=(*REGIONS, "sa-east")).paths
    line = _one_line_error(*_run(capsys, *base[:2], "--certs", str(other.root), "--data", str(data), *signed,
                                 "--run-config", f"{TINY} regions='us-east,sa-east'"))
    assert "unknown region 'sa-east': " in line and "was prepared for ap-south, eu-west, us-east" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_data_dir_is_a_one_line_error(setup, tmp_path, capsys):
    _, certs, data = setup
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0)
    try:
        line = _one_line_error(*_run(capsys, "--certs", str(certs.root), "--data", str(locked), "--sign-key", _key(certs),
                                     "--run-config", TINY))
        assert "cannot read data directory" in line
    finally:
        locked.chmod(0o700)


def _empty(tmp_path: Path) -> Path:
    d = tmp_path / "empty"
    d.mkdir(exist_ok=True)
    return d


# ---------------------------------------------------------------------------
# Planning a new run and a resume
# ---------------------------------------------------------------------------


def _args(**kw) -> argparse.Namespace:
    base = dict(superlink="127.0.0.1:9093", certs=None, data=None, run_dir=None, run_config=[], preset=None,
                resume=None, timeout=None, quiet=True, sign_key=None)
    base.update(kw)
    if base["certs"] and base["sign_key"] is None:
        base["sign_key"] = str(Path(base["certs"]).parent / "publisher" / "publisher.key")
    return argparse.Namespace(**base)


def test_plan_new_run_sets_absolute_dirs_and_a_fresh_job_id(setup, tmp_path, monkeypatch):
    from fedpriv.commands.run import plan_run

    _, certs, data = setup
    monkeypatch.chdir(tmp_path)
    plan = plan_run(_args(certs=str(certs.root), data=str(data), run_config=[TINY], preset="tiny"))
    assert plan.run_dir.is_absolute() and plan.run_dir.parent == tmp_path / "runs"
    assert plan.flat["run-dir"] == str(plan.run_dir) and plan.flat["data-dir"] == str(data)
    assert plan.flat["resume-from"] == "" and len(plan.job_id) == 32
    assert plan.flat["model"] == "tiny" and plan.flat["regions"] == "us-east,eu-west"  # preset, then --run-config
    assert plan.ca_cert == certs.ca_cert and plan.resumed_from_round is None
    again = plan_run(_args(certs=str(certs.root), data=str(data), run_config=[TINY], preset="tiny"))
    assert again.job_id != plan.job_id


def _fake_previous_run(run_dir: Path, data: Path, status: str = "interrupted: the run was stopped") -> dict:
    from fedpriv.core.config import parse_overrides, resolve_config

    flat, _ = resolve_config(parse_overrides(TINY + " num-server-rounds=3 regions='us-east,eu-west,ap-south'"))
    flat.update({"run-dir": str(run_dir), "data-dir": str(data), "job-id": "job-42"})
    report = {"schema_version": 1, "run_id": "123", "status": status, "config": flat, "regions": {},
              "rounds": [{"round": 0, "accuracy": 0.5}, {"round": 1, "accuracy": 0.6}]}
    run_dir.mkdir(parents=True)
    (run_dir / "privacy_report.json").write_text(json.dumps(report))
    return flat


def test_plan_resume_keeps_job_and_config(setup, tmp_path):
    from fedpriv.commands.run import plan_run
    from fedpriv.server.resume import checkpoint_path

    _, certs, data = setup
    run_dir = tmp_path / "prev"
    flat = _fake_previous_run(run_dir, data)
    from safetensors.numpy import save_file
    import numpy as np

    checkpoint_path(run_dir, 1).parent.mkdir()
    save_file({"w": np.zeros(2, dtype=np.float32)}, str(checkpoint_path(run_dir, 1)))
    plan = plan_run(_args(certs=str(certs.root), resume=str(run_dir), run_config=["round-timeout=30.0"]))
    assert plan.job_id == "job-42" and plan.resumed_from_round == 1 and plan.previous_run_id == "123"
    assert plan.flat["resume-from"] == str(run_dir) and plan.flat["run-dir"] == str(run_dir)
    assert plan.flat["round-timeout"] == 30.0
    assert {k: v for k, v in plan.flat.items() if k not in ("resume-from", "round-timeout")} == \
        {k: v for k, v in flat.items() if k not in ("resume-from", "round-timeout")}


def test_resume_errors(setup, tmp_path, capsys):
    _, certs, data = setup
    prev = tmp_path / "prev"
    _fake_previous_run(prev, data)
    done = tmp_path / "done"
    _fake_previous_run(done, data, status="completed")
    common = ["--superlink", f"127.0.0.1:{_closed_port()}", "--certs", str(certs.root)]
    cases = {
        "cannot change 'batch-size' when resuming": [*common, "--resume", str(prev), "--run-config", "batch-size=8"],
        "--preset cannot be combined with --resume": [*common, "--resume", str(prev), "--preset", "tiny"],
        "a resumed run writes into its own run dir": [*common, "--resume", str(prev), "--run-dir", str(tmp_path / "x")],
        "that run already completed": [*common, "--resume", str(done)],
        "no privacy_report.json in it": [*common, "--resume", str(tmp_path)],
        "not a directory": [*common, "--resume", str(tmp_path / "nope")],
        r"already holds a run \(status: interrupted": [*common, "--data", str(data), "--run-dir", str(prev), "--run-config", TINY],
    }
    for needle, args in cases.items():
        line = _one_line_error(*_run(capsys, *args))
        assert needle.replace("\\", "") in line or __import__("re").search(needle, line), (needle, line)
