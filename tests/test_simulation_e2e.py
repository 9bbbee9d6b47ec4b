"""End to end: the real Flower simulation engine, real processes, a real privacy report."""

from __future__ import annotations

import json

import pytest
from safetensors.numpy import load_file

from conftest import TINY, write_corpus
from fedpriv.simulations.runner import Simulation

pytestmark = pytest.mark.slow

E2E = {**TINY, "secure-aggregation": False, "target-epsilon": 8.0, "max-examples-per-region": 600,
       "trainable": "head", "batch-size": 64, "physical-batch-size": 64, "learning-rate": 1.0, "momentum": 0.0,
       "local-epochs": 2.0, "dirichlet-alpha": 100.0}


def simulate(tmp_path, name, **overrides):
    data = write_corpus(tmp_path / "data", 1500)
    sim = Simulation({**E2E, "data-dir": str(data), **overrides}, preset="default", run_dir=tmp_path / name)
    return sim.run(stream=False)


def test_two_regions_two_rounds_write_the_report_with_composed_epsilon(tmp_path):
    result = simulate(tmp_path, "run", **{"keep-checkpoints": 1})
    assert result.outcome.succeeded, result.outcome
    run_dir = result.run_dir
    report = json.loads((run_dir / "privacy_report.json").read_text())
    assert (run_dir / "privacy_report.md").read_text().startswith("# fedpriv privacy-budget report")
    assert report["status"] == "completed" and report["accountant"] == "pld" and report["delta"] == 1e-5
    assert set(report["regions"]) == {"us-east", "eu-west"}
    for region in report["regions"].values():
        eps = region["epsilon_by_round"]
        assert len(eps) == 2 and 0 < eps[0] < eps[1] <= 8.0 + 1e-6
        assert region["steps_by_round"][1] == 2 * region["steps_by_round"][0]
    final = [r for r in report["rounds"] if r["round"] == 2][0]
    assert final["accuracy"] > 0.65, f"the global model did not learn a learnable task: {final}"
    # keep-checkpoints = 1: round 1's checkpoint went once round 2 was complete (a resume starts from round 2)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round-002.safetensors"]
    final_model = run_dir / "final_model"
    # the weights get the mode the umask gives config.json, not the 0600 safetensors' writer creates
    assert (final_model / "model.safetensors").stat().st_mode & 0o777 == (final_model / "config.json").stat().st_mode & 0o777


def test_same_seed_gives_identical_checkpoints_under_the_replayable_noise_testing_key(tmp_path):
    """The seed fixes partition, initialisation and dropout; DP noise and sampling are fresh OS entropy
    unless the testing key replays them from the seed (tests/adversary: without it two runs differ)."""
    replay = {"num-server-rounds": 1, "insecure-deterministic-noise": True}
    a = simulate(tmp_path, "a", **replay)
    b = simulate(tmp_path, "b", **replay)
    assert a.outcome.succeeded and b.outcome.succeeded
    wa = load_file(str(a.run_dir / "checkpoints" / "round-001.safetensors"))
    wb = load_file(str(b.run_dir / "checkpoints" / "round-001.safetensors"))
    assert wa.keys() == wb.keys()
    assert all((wa[k] == wb[k]).all() for k in wa)
