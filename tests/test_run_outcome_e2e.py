"""End to end (real Flower simulation, tiny model): runs that train nothing, or without a region, do not succeed.

Before (issue 23): ``fedpriv simulate --run-config delta=0.5`` (every region's policy refuses) and a run
with a corrupt region shard both exited 0 with report status "completed" (or "stopped: ..."), the
console carried Flower's repeated evaluation lines and a "Final results" block, and a failed region was
named only as "only region us-east trained".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_corpus

pytestmark = pytest.mark.slow


def _simulate(tmp_path: Path, data: Path, config: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "FEDPRIV_DATA_DIR": str(data), "HF_HUB_OFFLINE": "1"}
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "fedpriv", "simulate", "--preset", "tiny", "--run-dir", str(run_dir),
                           "--run-config", f"num-threads=1 {config}"], capture_output=True, text=True, env=env,
                          timeout=600)

    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name} in the report")

    report = json.loads((run_dir / "privacy_report.json").read_text(), parse_constant=refuse)
    return proc, report


def _console(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def test_a_simulation_whose_every_region_refuses_fails_with_one_line_per_region(tmp_path):
    data = write_corpus(tmp_path / "data", 1200)
    proc, report = _simulate(tmp_path, data, "delta=0.5")
    out = _console(proc)
    assert proc.returncode == 1, out[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("fedpriv simulate: run ") and " failed: " in last and "no region may train" in last, last
    assert report["status"] == "failed" and "no region may train" in report["status_reason"]
    for region in ("us-east", "eu-west"):
        lines = [ln for ln in out.splitlines() if f"round 1: region {region} refused to train: refused by region "
                                                  "policy: delta: the run asks for δ = 0.5" in ln]
        assert len(lines) == 1, out[-3000:]
    assert "Traceback" not in out and "Final results" not in out and "Initial global evaluation results" not in out
    assert "Status: **failed**" in (tmp_path / "run" / "privacy_report.md").read_text()


def test_a_region_with_a_corrupt_shard_fails_every_round_and_the_run_says_so(tmp_path):
    from fedpriv.core.config import resolve_config
    from fedpriv.simulations.runner import prepare_shards, preset_overrides
    from fedpriv.task.partition import region_train_path

    data = write_corpus(tmp_path / "data", 1200)
    _, cfg = resolve_config({"data-dir": str(data)}, preset_overrides("tiny"))
    shards = prepare_shards(cfg, data)  # the simulation reuses these shards: corrupt eu-west's
    region_train_path(shards, "eu-west").write_text("{not json\n")
    proc, report = _simulate(tmp_path, data, "")
    out = _console(proc)
    assert proc.returncode == 3, out[-3000:]
    assert report["status"] == "completed with failures", report["status_reason"]
    assert "eu-west refused or failed in every round" in report["status_reason"]
    assert proc.stderr.strip().splitlines()[-1].startswith("fedpriv simulate: run ")
    assert "completed with failures: eu-west refused or failed in every round" in proc.stderr
    for rnd in (1, 2):
        lines = [ln for ln in out.splitlines() if f"round {rnd}: region eu-west failed: " in ln]
        assert len(lines) == 1 and "is not fedpriv JSONL" in lines[0], out[-3000:]
        assert str(shards) not in lines[0]  # the region's file path is not echoed
    accuracy_lines = [ln for ln in out.splitlines() if "global model on" in ln and "accuracy" in ln]
    assert len(accuracy_lines) == 3, accuracy_lines  # rounds 0, 1, 2: each once
    assert report["regions"]["us-east"]["rounds_participated"] == [1, 2]
    assert report["regions"]["eu-west"]["rounds_participated"] == []


def test_a_deployment_run_no_region_trusts_fails_and_a_capped_run_uses_the_cap(tmp_path):
    """Real SuperLink + 2 SuperNodes over TLS. (1) A bundle signed by a publisher no region trusts: every round
    refused; before, "completed, 2 of 2", exit 0, a Python repr per refusal and a 13-line traceback per round in
    each region's log. (2) The preset's data cap applies in the regions: before, each trained its whole shard."""
    from e2e_support import TINY, Deployment, FedprivRun

    from fedpriv.deploy.app_signing import create_publisher_key

    regions = ("us-east", "eu-west")
    with Deployment(tmp_path / "dep", regions) as dep:
        stranger, _ = create_publisher_key(tmp_path / "stranger", "stranger")
        config = f"{TINY} regions='us-east,eu-west' num-server-rounds=2 round-timeout=240.0"
        args = [a if a != str(dep.publisher_key) else str(stranger) for a in dep.run_args(tmp_path / "untrusted", config)]
        with FedprivRun(args, tmp_path / "untrusted.log") as run:
            rc = run.wait(900)
            out = run.output()
        report = json.loads((tmp_path / "untrusted" / "privacy_report.json").read_text())
        assert rc == 1, out[-3000:]
        assert report["status"] == "failed" and report["status_reason"].startswith("no round updated the global model")
        assert out.strip().splitlines()[-1].startswith("fedpriv run: run ") and " failed: " in out.strip().splitlines()[-1]
        for region in regions:
            for rnd in (1, 2):
                lines = [ln for ln in out.splitlines() if f"round {rnd}: region {region} failed: " in ln]
                assert len(lines) == 1 and "app bundle" in lines[0] and "<class" not in lines[0], out[-3000:]
            log = (dep.root / f"supernode-{region}.log").read_text(errors="replace")
            assert log.count("fedpriv: REFUSED app bundle:") == 2 and "Traceback" not in log, log[-3000:]

        tiny = TINY.replace("max-examples-per-region=128", "max-examples-per-region=48")
        assert tiny != TINY
        capped = f"{tiny} regions='us-east,eu-west' num-server-rounds=1 round-timeout=240.0"
        with FedprivRun(dep.run_args(tmp_path / "capped", capped), tmp_path / "capped.log") as run:
            rc = run.wait(900)
            out = run.output()
        assert (tmp_path / "capped" / "privacy_report.json").exists(), out[-3000:]
        report = json.loads((tmp_path / "capped" / "privacy_report.json").read_text())
        assert rc == 0 and report["status"] == "completed", out[-3000:]
        for region in regions:
            assert report["regions"][region]["num_examples"] == 48  # not the shard's 128
            assert report["partition"][region]["train"] == 48
            log = (dep.root / f"supernode-{region}.log").read_text(errors="replace")
            assert f"{region}: feature extraction (train): 48/48 posts (100%)" in log, log[-3000:]
