"""privacy/schedule.py is the schedule Opacus really runs: its q is the DPDataLoader's rate and the accountant's."""

from __future__ import annotations

import pytest
import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from fedpriv.core.config import resolve_config
from fedpriv.core.errors import ConfigError, DataError
from fedpriv.privacy.schedule import (
    Schedule,
    batches_per_epoch,
    region_schedule,
    sample_rate_for,
    schedule_for,
    steps_per_round,
)


@pytest.mark.parametrize("n, batch", [(80, 32), (100, 100), (101, 100), (4500, 256), (5521, 1024)])
def test_sample_rate_is_the_rate_opacus_samples_and_accounts_with(n, batch):
    data = TensorDataset(torch.randn(n, 3), torch.randint(0, 2, (n,)))
    model = torch.nn.Linear(3, 2)
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(data, batch_size=batch), noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=True)
    assert loader.sample_rate == sample_rate_for(n, batch)  # what the Poisson sampler draws with
    x, y = next(iter(loader))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    assert engine.accountant.history == [(1.0, sample_rate_for(n, batch), 1)]  # what Opacus accounts
    assert batches_per_epoch(n, batch) == len(DataLoader(data, batch_size=batch))


def test_steps_per_round_counts_epochs_of_that_loader_without_float_noise():
    assert steps_per_round(80, 32, 1.5) == 5  # ceil(1.5 · 3); the old planner said ceil(1.5 · 80/32) = 4
    assert steps_per_round(4500, 256, 1.0) == 18
    assert steps_per_round(1000, 100, 0.3) == 3  # 0.3 · 10 is 3.0000000000000004 in floats
    assert steps_per_round(1000, 10, 0.1) == 10
    assert steps_per_round(1000, 100, 0.01) == 1  # at least one step
    assert sample_rate_for(80, 32) == 1 / 3 and sample_rate_for(4500, 256) == 1 / 18


def test_schedule_for_and_history():
    s = schedule_for(80, 32, 1.5, 4)
    assert s == Schedule(sample_rate=1 / 3, steps_per_round=5, total_steps=20) and s.rounds == 4
    assert s.history(1.2, 2) == [(1.2, 1 / 3, 5)] * 2 and len(s.history(1.2)) == 4 and s.history(1.2, 0) == []


def test_region_schedule_is_schedule_for_the_run_config():
    cfg = resolve_config({"batch-size": 32, "local-epochs": 1.5, "num-server-rounds": 3})[1]
    assert region_schedule(80, cfg) == schedule_for(80, 32, 1.5, 3)
    with pytest.raises(DataError, match="fewer than batch-size = 32"):
        region_schedule(31, cfg)


@pytest.mark.parametrize("call, match", [
    (lambda: sample_rate_for(0, 1), "num-examples = 0: expected"),
    (lambda: sample_rate_for(10, 0), "batch-size = 0: expected"),
    (lambda: sample_rate_for(10, 11), "batch-size = 11: expected at most num-examples = 10"),
    (lambda: steps_per_round(10, 5, 0.0), "local-epochs = 0.0: expected"),
    (lambda: steps_per_round(10, 5, float("nan")), "local-epochs"),
    (lambda: schedule_for(10, 5, 1.0, 0), "rounds = 0: expected an integer >= 1"),
])
def test_bad_input_is_one_line(call, match):
    with pytest.raises(ConfigError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


def test_local_steps_fix_the_steps_of_every_region_whatever_its_size():
    """local-steps = S: exactly S steps per round (DP-FedSGD at S = 1), at the region's own Poisson rate."""
    assert steps_per_round(80, 32, 1.5, local_steps=1) == 1
    assert steps_per_round(8000, 32, 1.5, local_steps=7) == 7
    s = schedule_for(8000, 1000, 2.0, 5, local_steps=1)
    assert (s.steps_per_round, s.total_steps, s.rounds) == (1, 5, 5)
    assert s.sample_rate == 1 / 8
    cfg = resolve_config({"batch-size": 32, "local-epochs": 1.5, "num-server-rounds": 3, "local-steps": 2})[1]
    assert region_schedule(80, cfg) == schedule_for(80, 32, 1.5, 3, local_steps=2)
    assert region_schedule(80, cfg).total_steps == 6


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_local_steps_must_be_a_count(bad):
    with pytest.raises(ConfigError, match="local-steps"):
        steps_per_round(80, 32, 1.0, local_steps=bad)
