"""End to end: a real SuperLink and three SuperNodes as separate OS processes, then `fedpriv run`.

127.0.0.1 only, free ports, TLS with the deployment's CA, SuperNode authentication
(each region's key made in its own directory, only the .pub registered, as `fedpriv
register` does), a bundle signed with the publisher key every region trusts, each
region reading only its own shard. Two rounds of the tiny model with DP; the privacy report is checked. All
processes (SuperLink, gateway, SuperExecs, SuperNodes, ServerApp/ClientApps,
`fedpriv run`) are stopped and checked gone, also when the test fails.
"""

from __future__ import annotations

import json

import pytest

from conftest import assert_epsilon_is_the_libraries
from e2e_support import REGIONS, TINY, Deployment, FedprivRun

RUN_TIMEOUT = 900.0  # two rounds take ~1.5-4 min on a shared 2-core machine


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    with Deployment(tmp_path_factory.mktemp("e2e"), REGIONS) as dep:
        yield dep


@pytest.mark.slow
def test_two_rounds_over_tls_with_node_auth_write_the_privacy_report(deployment):
    run_dir = deployment.root / "run"
    config = f"{TINY} regions='{','.join(REGIONS)}' num-server-rounds=2 min-train-regions=3 round-timeout=300.0"
    with FedprivRun(deployment.run_args(run_dir, config), deployment.root / "fedpriv-run.log") as run:
        rc = run.wait(RUN_TIMEOUT)
        out = run.output()
    assert rc == 0, run.tail()
    assert "fedpriv run: run " in out and "3 SuperNode(s) online" in out
    assert f"privacy report: {run_dir / 'privacy_report.md'}" in out
    assert "finished: Flower status finished:completed; report status completed" in out

    report = json.loads((run_dir / "privacy_report.json").read_text())
    assert report["status"] == "completed"
    assert report["config"]["job-id"] and report["config"]["run-dir"] == str(run_dir)
    assert [s["first_round"] for s in report["runs"]] == [1] and report["runs"][0]["last_round"] == 2
    rounds = {r["round"]: r for r in report["rounds"]}
    assert sorted(rounds) == [0, 1, 2]
    for rnd in (1, 2):
        assert 0.0 <= rounds[rnd]["accuracy"] <= 1.0 and rounds[rnd]["loss"] > 0
        assert rounds[rnd]["regions_trained"] == sorted(REGIONS) and rounds[rnd]["model_updated"] is True
        assert not rounds[rnd]["regions_failed"] and "regions_lost" not in rounds[rnd]
    for name in REGIONS:
        region = report["regions"][name]
        eps = region["epsilon_by_round"]
        assert region["rounds_participated"] == [1, 2]
        assert len(eps) == 2 and 0 < eps[0] < eps[1] <= 8.0 + 1e-6  # increasing, within the planned target
        assert region["steps_by_round"][1] == 2 * region["steps_by_round"][0]
        # The reported ε is what the named accountant gives for the region's recorded history.
        assert_epsilon_is_the_libraries(eps[-1], region["history"], report["delta"], report["accountant"])
        # The region ran the bundle only after checking the publisher's signature against its trust file.
        log = (deployment.root / f"supernode-{name}.log").read_text()
        assert "fedpriv: app bundle verified: signed by 'tests'" in log and "REFUSED" not in log
        # Each region read only its own shard, and its ledger lives next to it.
        assert (deployment.data / "regions" / name / "privacy_ledger.sqlite").exists()
    assert (run_dir / "checkpoints" / "round-002.safetensors").exists()
    assert (run_dir / "final_model" / "config.json").exists()
    assert (run_dir / "privacy_report.md").read_text().startswith("# fedpriv privacy-budget report")
