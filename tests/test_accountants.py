"""Each accountant fedpriv names computes what an independent implementation computes, and its cross-check agrees.

The independent values are built here, from the libraries' own public classes: a fresh Opacus
``RDPAccountant`` / ``PRVAccountant`` over the per-round history as a ledger holds it, and a fresh
``dp_accounting`` ``PLDAccountant`` over DpEvents at its default (finer) discretisation.
"""

from __future__ import annotations

import math

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant
from opacus.accountants import PRVAccountant, RDPAccountant

from fedpriv.core import config as fedpriv_config
from fedpriv.core.config import resolve_config
from fedpriv.privacy.accountant import (
    ACCOUNTANTS,
    CROSS_CHECK,
    CROSS_CHECK_TOLERANCE,
    compact,
    cross_check_accountant,
    cross_checked_epsilon,
    epsilon_of,
)
from fedpriv.privacy.report import RunReport
from fedpriv.privacy.schedule import schedule_for

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order")

DELTA = 1e-5
# the default schedule (N ≈ 5,500, batch 1024, 2 epochs, 8 rounds) and a GPU-like one (N = 5,000, 1 epoch, 10 rounds)
DEFAULT = schedule_for(5500, 1024, 2.0, 8)
GPU = schedule_for(5000, 1024, 1.0, 10)
HISTORIES = {  # a few rounds each: the libraries' own accountants are slow on a small CPU
    "default, σ 1.25, 4 rounds": DEFAULT.history(1.25, 4),
    "gpu-like, σ 1.0, 3 rounds": GPU.history(1.0, 3),
    "mixed σ and q": DEFAULT.history(2.0, 2) + GPU.history(1.1, 1) + [(1.5, 0.01, 200)],
}


def independent_epsilon(history, delta: float, name: str) -> float:
    if name == "pld":
        acc = PLDAccountant()  # dp_accounting's default discretisation 1e-4, finer than fedpriv's
        for sigma, q, steps in history:
            acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
        return acc.get_epsilon(delta)
    acc = {"rdp": RDPAccountant, "prv": PRVAccountant}[name]()
    acc.history = list(history)
    return acc.get_epsilon(delta=delta)


@pytest.mark.parametrize("name", ACCOUNTANTS)
@pytest.mark.parametrize("label", HISTORIES)
def test_each_accountant_is_its_library(name, label):
    history = HISTORIES[label]
    ours, theirs = epsilon_of(history, DELTA, name), independent_epsilon(history, DELTA, name)
    if name == "rdp":
        assert ours == pytest.approx(theirs, rel=1e-9)
    elif name == "prv":  # fedpriv merges equal (σ, q) entries first; PRV's numerics move by far less than its error
        assert ours == pytest.approx(theirs, rel=2e-3)
    else:  # coarser pessimistic discretisation: an upper bound on the finer one, and close to it
        assert theirs * (1 - 1e-9) <= ours <= theirs * (1 + 1e-3)


@pytest.mark.parametrize("label", HISTORIES)
def test_prv_with_the_memoised_domain_is_opacus_prv_exactly(label):
    """fedpriv's PRV takes the RDP bound that sizes its domain from a memo; on the same (compacted) history, ε is
    the stock accountant's -- also for the next round's history, whose RDP curve comes from the memo."""
    for history in (compact(HISTORIES[label]), [(s, q, n + 7) for s, q, n in compact(HISTORIES[label])]):
        stock = PRVAccountant()
        stock.history = list(history)
        assert epsilon_of(history, DELTA, "prv") == pytest.approx(stock.get_epsilon(delta=DELTA), rel=1e-12, abs=0)


@pytest.mark.parametrize("label", HISTORIES)
def test_pld_and_prv_agree_and_rdp_is_the_looser_bound(label):
    history = HISTORIES[label]
    pld, prv, rdp = (epsilon_of(history, DELTA, n) for n in ("pld", "prv", "rdp"))
    assert abs(pld - prv) / pld < CROSS_CHECK_TOLERANCE / 2  # stated: within 1 %
    assert rdp > pld  # RDP's conversion to (ε, δ) only loses
    for name in ACCOUNTANTS:
        checked = cross_checked_epsilon(history, DELTA, name)
        assert checked.check_accountant == CROSS_CHECK[name] != name
        assert not checked.disagrees, checked


def test_cross_check_pairing():
    assert {n: cross_check_accountant(n) for n in ACCOUNTANTS} == {"rdp": "pld", "prv": "pld", "pld": "prv"}
    with pytest.raises(ValueError, match="accountant = 'gdp'"):
        cross_check_accountant("gdp")
    assert fedpriv_config.ACCOUNTANTS == ACCOUNTANTS  # the config accepts exactly the accountants that exist


@pytest.mark.parametrize("name", ACCOUNTANTS)
def test_epsilon_is_never_negative(name):
    """Issue 9, finding 2: q = 0.2, 80 steps, σ = 1.422 gave ε = -1.28 at δ = 0.9 under RDP."""
    history = [(1.422, 0.2, 80)]
    assert epsilon_of(history, 0.9, name) >= 0.0
    assert epsilon_of(history, 0.99, name) >= 0.0
    assert epsilon_of(history, 1e-5, name) > 5  # the same history at a sane δ is far from free


def test_empty_and_noiseless_histories():
    for name in ACCOUNTANTS:
        assert epsilon_of([], DELTA, name) == 0.0
        assert epsilon_of([(1.0, 0.1, 0)], DELTA, name) == 0.0
        assert math.isinf(epsilon_of([(1.0, 0.1, 3), (0.0, 0.1, 1)], DELTA, name))


def test_a_wrong_accountant_shows_up_as_a_disagreement():
    checked = cross_checked_epsilon(DEFAULT.history(1.25), DELTA, "prv")
    broken = type(checked)("prv", checked.epsilon * 0.9, checked.check_accountant, checked.check_epsilon)
    assert broken.disagrees  # 10 % below its check: flagged
    loose = type(checked)("rdp", checked.check_epsilon * 1.2, "pld", checked.check_epsilon)
    assert not loose.disagrees  # RDP above PLD is expected; below would be flagged
    assert type(checked)("rdp", checked.check_epsilon * 0.9, "pld", checked.check_epsilon).disagrees


@pytest.mark.parametrize("name", ACCOUNTANTS)
def test_the_accountant_named_in_the_config_is_the_one_in_the_report_and_agrees_with_its_check(tmp_path, name):
    cfg = resolve_config({"accountant": name, "regions": "us-east"})[1]
    assert cfg.accountant == name
    report = RunReport(tmp_path, {}, cfg.accountant, cfg.delta, ["us-east"])  # as server/coordinator.py builds it
    history = []
    for rnd in (1, 2):
        history = DEFAULT.history(2.0, rnd)
        metrics = {"dp": 1, "epsilon": epsilon_of(history, cfg.delta, cfg.accountant), "steps": rnd * 12,
                   "noise-multiplier": 2.0, "sample-rate": DEFAULT.sample_rate, "max-grad-norm": 1.0,
                   "num-examples": 5500, "delta": cfg.delta}
        report.record_training("us-east", rnd, metrics, history)
    report.write()
    data = report.to_dict()
    region = data["regions"]["us-east"]
    assert data["accountant"] == name and data["cross_check_accountant"] == CROSS_CHECK[name]
    assert region["epsilon"] == pytest.approx(independent_epsilon(history, DELTA, name), rel=2e-3)
    check = independent_epsilon(history, DELTA, CROSS_CHECK[name])
    assert region["epsilon_check"] == pytest.approx(check, rel=2e-3)
    gap = (region["epsilon"] - region["epsilon_check"]) / region["epsilon_check"]
    assert (0 < gap < 0.35) if name == "rdp" else abs(gap) < CROSS_CHECK_TOLERANCE
    markdown = (tmp_path / "privacy_report.md").read_text()
    assert f"accountant **{name.upper()}**" in markdown
    assert f"{CROSS_CHECK[name].upper()} cross-check" in markdown and f"{region['epsilon_check']:.3f}" in markdown
