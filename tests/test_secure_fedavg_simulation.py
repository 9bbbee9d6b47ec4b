"""End to end: the same seeded tiny-model simulation with secure aggregation on and off.

Real Flower simulation (private SuperLink, ClientApps in Ray actors), real DP-SGD.
The two runs differ only in how the coordinator combines the updates, so:

* after round 1 (both rounds start from the same global model and the regions'
  training is seeded — DP noise and sampling included, through the testing key
  ``insecure-deterministic-noise``; without it every release has fresh noise) the checkpoints agree within round 1's quantisation
  ``error_bound`` (plus float32 rounding);
* after round 2 they still agree closely: round 2 starts from models that differ
  by at most that bound, and local training may amplify a difference that small
  only by a modest factor.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

pytestmark = pytest.mark.slow


def _simulate(tmp_path, secure: bool):
    from conftest import TINY, write_corpus
    from fedpriv.simulations.runner import Simulation

    corpus = write_corpus(tmp_path / "data", 1200)
    run_dir = tmp_path / ("secure" if secure else "plain")
    overrides = {**TINY, "data-dir": str(corpus), "seed": 7, "secure-aggregation": secure,
                 "insecure-deterministic-noise": True}
    result = Simulation(overrides, preset="tiny", run_dir=run_dir).run(stream=False)
    assert result.outcome.succeeded, result.outcome
    report = json.loads((run_dir / "privacy_report.json").read_text())
    checkpoints = {r: load_file(run_dir / "checkpoints" / f"round-{r:03d}.safetensors") for r in (1, 2)}
    return report, checkpoints


def _max_diff(a, b) -> float:
    assert sorted(a) == sorted(b)
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))) for k in a)


def test_seeded_simulation_gives_the_same_model_with_and_without_secure_aggregation(tmp_path):
    secure_report, secure = _simulate(tmp_path, secure=True)
    plain_report, plain = _simulate(tmp_path, secure=False)

    section = secure_report["secure_aggregation"]
    assert section["enabled"] is True and plain_report["secure_aggregation"] == {"enabled": False}
    rounds = section["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["mode"] == "secure" and not r["aborted"] and r["survivors"] == ["eu-west", "us-east"] for r in rounds)
    assert section["rounds_plain"] == [] and section["rounds_aborted"] == []
    bound1 = rounds[0]["error_bound"]
    assert 0 < bound1 < 1e-5

    # Round 1: same start, same seeded training -> only the aggregation differs.
    assert _max_diff(secure[1], plain[1]) <= bound1 + 1e-6
    # Round 2: starts from models within bound1 of each other.
    assert _max_diff(secure[2], plain[2]) <= 50 * (bound1 + rounds[1]["error_bound"])
    # ... and the model really trained (the comparison is not between two untouched models).
    assert _max_diff(plain[2], plain[1]) > 1e-2

    # The privacy books are the same either way.
    for name in ("eu-west", "us-east"):
        s, p = secure_report["regions"][name], plain_report["regions"][name]
        assert s["epsilon_by_round"] == pytest.approx(p["epsilon_by_round"]) and s["rounds_participated"] == [1, 2]
