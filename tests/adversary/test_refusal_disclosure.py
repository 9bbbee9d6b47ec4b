"""A refusal says only what the region's policy releases: the rule, the job's own (public) ε, the caps.

With ``release-lifetime-epsilon = false`` a budget refusal used to say "would raise ε from 8.693 to 11.46 (…, 9
earlier release(s) in the ledger)": the region's ε over its whole ledger, and how many releases of other jobs used
its data -- for the price of one refused request. Played with a real region (ClientApp, RegionRuntime, ledger)
whose ledger holds nine releases of another job, for every refusal the budget can give: the lifetime cap before
training, the lifetime cap met only at the release (another process spent the budget meanwhile), the job ceiling,
and a round already released. None names the ledger's ε or its size; with ``release-lifetime-epsilon = true``
the lifetime refusal does (the policy releases it).
"""

from __future__ import annotations

import pytest
from adversary_support import Region, global_arrays, refusal, run_config, shard_root, task_identity  # noqa: F401
from opacus.accountants import RDPAccountant

from fedpriv.client.trainer import region_schedule
from fedpriv.core.config import FedprivConfig
from fedpriv.privacy.ledger import PrivacyLedger, Release

DELTA = 1e-5
OTHER = (2.0, 0.1, 5)  # another job's releases: 9 of them


def rdp(history) -> float:
    acc = RDPAccountant()
    acc.history = list(history)
    return acc.get_epsilon(delta=DELTA)


def _config(shard_root, tmp_path, **over):
    flat = run_config(shard_root, tmp_path / "run", **{"secure-aggregation": False, **over})
    schedule = region_schedule(64, FedprivConfig.from_run_config(flat))
    return flat, (1.0, schedule.sample_rate, schedule.steps_per_round)


def _setup(shard_root, tmp_path, cap_between: bool = True, rounds: int = 3, **policy):
    flat, entry = _config(shard_root, tmp_path, **{"num-server-rounds": rounds})
    before = rdp([OTHER] * 9)
    after = rdp([OTHER] * 9 + [entry])
    cap = (before + after) / 2 if cap_between else after * 1.01
    region = Region("us-east", shard_root, tmp_path / "home", flat, **{
        "require-secure-aggregation": False, "accountant": "rdp", "max-lifetime-epsilon": cap,
        "max-job-epsilon": 1000.0, **policy})
    with PrivacyLedger(region.ledger_path) as ledger:
        for rnd in range(9):
            ledger.record(Release("job-0", rnd, OTHER[2], OTHER[1], OTHER[0], 1.0, DELTA, "rdp"))
    return region, flat, before, after, entry


def _leaks(text: str, *epsilons: float) -> list[str]:
    found = [f"{e:.4g}" for e in epsilons if f"{e:.4g}" in text]
    return found + [w for w in ("earlier release", " 9 ", "9 release") if w in text]


def test_a_lifetime_refusal_before_training_names_the_rule_only(shard_root, tmp_path, train_calls):
    region, flat, before, after, _ = _setup(shard_root, tmp_path)
    err = refusal(region.train(global_arrays(flat), server_round=1, secagg_round=None))
    assert "max-lifetime-epsilon" in err.text and "above the budget" in err.text
    assert _leaks(err.text, before, after) == [], err.text
    assert train_calls == []


def test_the_policy_may_release_the_lifetime_epsilon_in_a_refusal(shard_root, tmp_path, train_calls):
    region, flat, before, after, _ = _setup(shard_root, tmp_path, **{"release-lifetime-epsilon": True})
    err = refusal(region.train(global_arrays(flat), server_round=1, secagg_round=None))
    assert f"{before:.4g}" in err.text and f"{after:.4g}" in err.text and "9 earlier release(s)" in err.text


def test_a_lifetime_refusal_at_the_release_names_the_rule_only(shard_root, tmp_path, monkeypatch):
    import fedpriv.client.region as region_mod

    region, flat, before, after, entry = _setup(shard_root, tmp_path, cap_between=False)
    assert rdp([OTHER] * 9 + [(1.0, 0.5, 50), entry]) > after * 1.01
    real = region_mod.LocalTrainer.train
    big = (1.0, 0.5, 50)  # another job's release, recorded while this one trains: the cap is met only at release

    def train_while_another_job_spends(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        with PrivacyLedger(region.ledger_path) as ledger:
            ledger.record(Release("job-0", 9, big[2], big[1], big[0], 1.0, DELTA, "rdp"))
        return result

    monkeypatch.setattr(region_mod.LocalTrainer, "train", train_while_another_job_spends)
    err = refusal(region.train(global_arrays(flat), server_round=1, secagg_round=None))
    assert "max-lifetime-epsilon" in err.text
    spent = rdp([OTHER] * 9 + [big])
    assert _leaks(err.text, before, after, spent, rdp([OTHER] * 9 + [big, entry])) == [], err.text
    assert "10 " not in err.text and "earlier" not in err.text


def test_job_ceiling_and_released_once_refusals_name_no_ledger_numbers(shard_root, tmp_path, train_calls):
    _, entry = _config(shard_root, tmp_path)
    region, flat, before, after, entry = _setup(shard_root, tmp_path, cap_between=False, rounds=1,
                                                **{"max-job-epsilon": (rdp([entry]) + rdp([entry] * 2)) / 2,
                                                   "max-lifetime-epsilon": 1000.0})
    values = global_arrays(flat)
    first = region.train(values, server_round=1, secagg_round=None)
    assert not first.has_error(), first.error.reason
    lifetime = rdp([OTHER] * 9 + [entry])
    err = refusal(region.train(values, server_round=2, secagg_round=None))  # job ε after round 2 > ceiling
    assert err.text.startswith("max-job-epsilon:") and f"{rdp([entry] * 2):.4g}" in err.text  # the job's own ε
    assert _leaks(err.text, before, lifetime, rdp([OTHER] * 9 + [entry] * 2)) == [], err.text
    for stored in (region.ledger_path.parent / "releases").iterdir():
        stored.unlink()  # round 1's stored release is gone: a retry of it is refused, not trained
    err = refusal(region.train(values, server_round=1, secagg_round=None))
    assert "already released once" in err.text and _leaks(err.text, before, lifetime) == [], err.text
    assert len(train_calls) == 1
