"""The DP schedule planner and ``fedpriv plan``."""

from __future__ import annotations

import argparse
import json
import math

import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from conftest import assert_epsilon_is_the_libraries
from fedpriv.core.config import resolve_config
from fedpriv.core.errors import ConfigError
from fedpriv.privacy.accountant import CROSS_CHECK_TOLERANCE
from fedpriv.privacy.planner import Plan, plan_region, plan_schedule, sample_rate_for, steps_per_round
from fedpriv.privacy.schedule import region_schedule

DELTA = 1e-5
N, B, R = 4500, 256, 4


@pytest.fixture(scope="module")
def rdp_plan() -> Plan:
    return plan_schedule(8.0, DELTA, R, steps_per_round(N, B, 1.0), sample_rate_for(N, B), "rdp", num_examples=N)


@pytest.fixture(scope="module")
def prv_plan() -> Plan:
    return plan_schedule(3.0, DELTA, 2, 10, 0.02, "prv")


def test_schedule_helpers_are_the_runs():
    assert steps_per_round(4500, 256, 1.0) == 18  # ceil(4500 / 256) = 18 batches
    assert steps_per_round(4500, 256, 2) == 36
    assert steps_per_round(1000, 10, 0.1) == 10  # exactly 10, not 11 from float noise
    assert steps_per_round(1000, 100, 0.01) == 1
    assert sample_rate_for(4500, 256) == 1 / 18  # Opacus' 1 / len(loader), not 256 / 4500
    with pytest.raises(ConfigError, match="batch-size"):
        steps_per_round(100, 256, 1.0)
    with pytest.raises(ConfigError, match="local-epochs"):
        steps_per_round(100, 10, 0)


@pytest.mark.filterwarnings("ignore:Optimal order")
def test_noise_multiplier_is_opacus_get_noise_multiplier_over_the_whole_schedule(rdp_plan):
    expected = get_noise_multiplier(target_epsilon=8.0, target_delta=DELTA, sample_rate=1 / 18,
                                    steps=R * 18, accountant="rdp")
    assert rdp_plan.noise_multiplier == expected
    assert rdp_plan.total_steps == 72 and rdp_plan.steps_per_round == 18


def test_final_epsilon_meets_target_and_trajectory_is_opacus(rdp_plan):
    assert rdp_plan.final_epsilon <= 8.0
    assert rdp_plan.final_epsilon >= 8.0 - 0.02  # the search tolerance is 0.01
    eps = rdp_plan.epsilon_by_round
    assert eps == sorted(eps) and len(eps) == R
    assert [r.steps for r in rdp_plan.per_round] == [18, 36, 54, 72]
    for r in rdp_plan.per_round:
        acc = RDPAccountant()
        acc.history = [(rdp_plan.noise_multiplier, rdp_plan.sample_rate, r.steps)]
        assert r.epsilon == pytest.approx(acc.get_epsilon(delta=DELTA), rel=1e-12)
    # a run with the planner's numbers (one history entry per round, as a ledger keeps it) reports the same
    acc = RDPAccountant()
    acc.history = [(rdp_plan.noise_multiplier, rdp_plan.sample_rate, 18)] * R
    assert acc.get_epsilon(delta=DELTA) == pytest.approx(rdp_plan.final_epsilon, rel=1e-9)


def test_cross_check(rdp_plan, prv_plan):
    # PRV and PLD are both near-tight: they agree within the tolerance, so no warning
    assert prv_plan.check_accountant == "pld"
    for r in prv_plan.per_round:
        assert abs(r.difference) < CROSS_CHECK_TOLERANCE
    assert prv_plan.warnings == []
    assert prv_plan.final_epsilon <= 3.0
    # RDP is a looser upper bound: above PLD, never below, and the plan says so
    assert rdp_plan.check_accountant == "pld"
    for r in rdp_plan.per_round:
        assert r.epsilon_check is not None and 0 < r.difference < 0.35
    assert any("more conservative" in w for w in rdp_plan.warnings)
    # the cross-check is PLD over the history the ledger holds after each round (dp_accounting's, built here)
    for r in range(1, R + 1):
        assert_epsilon_is_the_libraries(rdp_plan.per_round[r - 1].epsilon_check, rdp_plan.history(r), DELTA, "pld")


@pytest.mark.filterwarnings("ignore:Optimal order")
def test_pld_plan_is_checked_by_prv_and_spends_at_most_the_target():
    plan = plan_schedule(3.0, DELTA, 2, 10, 0.05, "pld")
    assert plan.check_accountant == "prv" and plan.warnings == []
    assert 3.0 - 0.02 <= plan.final_epsilon <= 3.0
    assert abs(plan.per_round[-1].difference) < CROSS_CHECK_TOLERANCE


def test_plan_region_uses_the_runs_schedule_and_sigma():
    cfg = resolve_config({"batch-size": 32, "local-epochs": 1.5, "num-server-rounds": 3, "noise-multiplier": 1.3})[1]
    plan = plan_region(80, cfg, cross_check=False)
    s = region_schedule(80, cfg)
    assert (plan.sample_rate, plan.steps_per_round, plan.total_steps) == (s.sample_rate, s.steps_per_round, s.total_steps)
    assert plan.noise_multiplier == 1.3 and plan.accountant == cfg.accountant


def test_plan_without_cross_check_and_to_dict():
    plan = plan_schedule(5.0, DELTA, 2, 5, 0.05, cross_check=False)
    assert all(r.epsilon_check is None and r.difference is None for r in plan.per_round)
    assert plan.check_accountant is None
    d = json.loads(json.dumps(plan.to_dict()))
    assert d["noise_multiplier"] == plan.noise_multiplier and d["total_steps"] == 10
    assert plan.history() == [(plan.noise_multiplier, 0.05, 5)] * 2 and plan.history(0) == []


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"target_epsilon": 0.0}, "target-epsilon = 0.0: expected"),
        ({"target_epsilon": -1.0}, "target-epsilon"),
        ({"target_epsilon": math.nan}, "target-epsilon"),
        ({"target_epsilon": math.inf}, "target-epsilon"),
        ({"delta": 0.0}, r"delta = 0.0: expected a probability in \(0, 1\)"),
        ({"delta": 1.0}, "delta"),
        ({"rounds": 0}, "rounds = 0: expected an integer >= 1"),
        ({"rounds": 2.5}, "rounds"),
        ({"steps_per_round": 0}, "local-steps"),
        ({"sample_rate": 0.0}, "sample-rate"),
        ({"sample_rate": 1.5}, "sample-rate"),
        ({"accountant": "gdp"}, "accountant = 'gdp': expected one of rdp, prv, pld"),
        ({"target_epsilon": 1e-9, "sample_rate": 1.0, "steps_per_round": 1000}, "too small to reach"),
    ],
)
def test_bad_input_is_a_one_line_config_error(kwargs, match):
    args = dict(target_epsilon=3.0, delta=DELTA, rounds=2, steps_per_round=5, sample_rate=0.05, cross_check=False)
    args.update(kwargs)
    with pytest.raises(ConfigError, match=match) as info:
        plan_schedule(**args)
    assert "\n" not in str(info.value)


def test_delta_not_below_one_over_n_warns():
    plan = plan_schedule(3.0, 1e-2, 1, 5, 0.05, cross_check=False, num_examples=200)
    assert any("1/num-examples" in w for w in plan.warnings)


# -- the CLI -------------------------------------------------------------------------------


def _plan_args(*argv: str) -> argparse.Namespace:
    from fedpriv.commands.plan import PlanCommand

    parser = argparse.ArgumentParser()
    PlanCommand.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_prints_a_table(capsys):
    from fedpriv.commands.plan import PlanCommand

    args = _plan_args("--target-epsilon", "3", "--delta", "1e-5", "--rounds", "2", "--local-steps", "5",
                      "--batch-size", "100", "--num-examples", "2000", "--accountant", "prv")
    assert PlanCommand.run(args) == 0
    out = capsys.readouterr().out
    assert "noise multiplier" in out and "sample rate       0.05000" in out  # 1 / ceil(2000 / 100)
    assert "ε (PRV)" in out and "ε (PLD)" in out
    lines = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [row[:2] for row in lines] == [["1", "5"], ["2", "10"]]


def test_cli_pld_with_comparison(capsys):
    from fedpriv.commands.plan import PlanCommand

    args = _plan_args("--target-epsilon", "3", "--rounds", "2", "--local-steps", "5", "--batch-size", "100",
                      "--num-examples", "2000", "--accountant", "pld", "--compare")
    assert PlanCommand.run(args) == 0
    out = capsys.readouterr().out
    assert "accountant: PLD, cross-check: PRV" in out and "ε (PLD)" in out and "ε (PRV)" in out
    sigma = {row.split()[0]: float(row.split()[1]) for row in out.splitlines()
             if row.split()[:1] in (["rdp"], ["prv"], ["pld"])}
    assert set(sigma) == {"rdp", "prv", "pld"} and sigma["rdp"] > max(sigma["prv"], sigma["pld"])


def test_cli_local_epochs_and_json(capsys):
    from fedpriv.commands.plan import PlanCommand

    args = _plan_args("--target-epsilon", "8", "--local-epochs", "1", "--num-examples", "4500", "--batch-size", "256",
                      "--rounds", "4", "--no-cross-check", "--json")
    assert PlanCommand.run(args) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["steps_per_round"] == 18 and d["rounds"] == 4 and d["sample_rate"] == 1 / 18
    assert d["final_epsilon"] <= 8.0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--target-epsilon", "0", "--num-examples", "4500"], "--target-epsilon = 0.0: expected a privacy budget"),
        (["--target-epsilon", "3", "--num-examples", "100", "--batch-size", "256"],
         "--batch-size = 256: expected at most --num-examples = 100"),
        (["--target-epsilon", "3", "--num-examples", "4500", "--delta", "1"], "--delta = 1.0: expected"),
        (["--target-epsilon", "3", "--num-examples", "4500", "--rounds", "0"], "--rounds = 0: expected"),
        (["--target-epsilon", "3", "--num-examples", "4500", "--local-steps", "0"], "--local-steps = 0: expected"),
        (["--target-epsilon", "3", "--num-examples", "4500", "--local-epochs", "-1"], "--local-epochs = -1.0"),
    ],
)
def test_cli_bad_input_prints_one_line_and_exits_2(capsys, argv, message):
    from fedpriv.cli import main

    assert main(["plan", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert err.count("\n") == 0 and message in err and err.startswith("fedpriv plan: error:")
