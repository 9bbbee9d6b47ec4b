"""The job ceiling binds when a coordinator has two rounds of one job handled at once.

Two processes of one region (one ledger), each handling a round of the same job, each passing every check made
before training (the job has no release yet), then both reaching the point of recording their release. Before,
the job ceiling (``max-job-epsilon``) was checked only before training: both released, and the job's ε went above
the ceiling (issue 21: 1.658 against 1.43). Now the ceiling is checked in the ledger's write transaction that
records the release, with the region's own accountant (policy ``accountant``; the run config asks for another):
exactly one round is released, and the job's ε, recomputed by Opacus' own accountant, stays within the ceiling.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from adversary_support import run_config, shard_root, write_policy  # noqa: F401
from opacus.accountants import RDPAccountant

from fedpriv.client.trainer import region_schedule
from fedpriv.core.config import FedprivConfig
from fedpriv.privacy.ledger import PrivacyLedger

ROOT = Path(__file__).resolve().parents[2]
DELTA = 1e-5


def rdp(history) -> float:
    acc = RDPAccountant()
    acc.history = list(history)
    return acc.get_epsilon(delta=DELTA)


@pytest.mark.slow  # two processes that each build and train the tiny model
def test_two_rounds_at_once_cannot_exceed_the_job_ceiling(shard_root, tmp_path):
    # the run config asks for PRV (the looser-for-the-region choice is the coordinator's to make); the policy says RDP
    flat = run_config(shard_root, tmp_path / "run", **{"secure-aggregation": False, "num-server-rounds": 1,
                                                        "accountant": "prv"})
    cfg = FedprivConfig.from_run_config(flat)
    schedule = region_schedule(64, cfg)
    entry = (1.0, schedule.sample_rate, schedule.steps_per_round)
    one, two = rdp([entry]), rdp([entry] * 2)
    ceiling = (one + two) / 2  # one round fits, two do not
    policy = write_policy(tmp_path / "policy.toml", **{"require-secure-aggregation": False, "max-job-epsilon": ceiling,
                                                       "accountant": "rdp"})
    ledger = tmp_path / "us-east.sqlite"
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"run_config": flat, "job": "job-1", "barrier": str(barrier), "parties": 2,
                                "node_config": {"region": "us-east", "data-path": str(shard_root),
                                                "ledger-path": str(ledger), "policy-path": str(policy)}}))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "region_round_worker.py"), str(spec), str(rnd),
                               f"attempt-{rnd}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
             for rnd in (1, 2)]
    answers = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()[-3000:]
        answers.append(json.loads(out.decode().strip().splitlines()[-1]))
    assert len(list(barrier.iterdir())) == 2  # both trained: both passed every check made before training
    assert sorted(a["ok"] for a in answers) == [False, True], answers
    refused = next(a for a in answers if not a["ok"])
    assert refused["error"].startswith("max-job-epsilon:"), refused
    with PrivacyLedger(ledger) as led:
        rows = led.releases()
    assert len(rows) == 1 and rows[0].accountant == "rdp"
    job_epsilon = rdp([r.history_entry for r in rows])
    assert job_epsilon <= ceiling
    assert next(a["epsilon"] for a in answers if a["ok"]) == pytest.approx(job_epsilon, rel=1e-9)
