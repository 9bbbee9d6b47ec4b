"""client/optimizer_state.py: a local optimizer's state survives the trip to disk and back exactly, and a state
that does not fit the model is refused whole."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpriv.client import optimizer_state as st


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))


def _steps(model, optimizer, n: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        optimizer.zero_grad()
        model(torch.randn(8, 4, generator=gen)).pow(2).sum().backward()
        optimizer.step()


def _names(model):
    return [n for n, _ in model.named_parameters()]


@pytest.mark.parametrize("make", [lambda p: torch.optim.Adam(p, lr=1e-2),
                                  lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
                                  lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9)],
                         ids=["adam", "adamw", "sgd-momentum"])
def test_a_kept_state_continues_exactly_as_one_optimizer_would(tmp_path, make):
    one = _model()
    optimizer = make(one.parameters())
    _steps(one, optimizer, 3, seed=1)
    path = tmp_path / "s.safetensors"
    st.save_state(path, "job", 5, st.export_state(optimizer, _names(one)))

    two = _model()
    two.load_state_dict(one.state_dict())
    resumed = make(two.parameters())
    assert st.import_state(resumed, _names(two), st.load_state(path, "job", 5))
    _steps(one, optimizer, 2, seed=2)
    _steps(two, resumed, 2, seed=2)
    for (name, a), b in zip(one.named_parameters(), two.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)

    fresh = _model()
    fresh.load_state_dict(two.state_dict())
    _steps(fresh, make(fresh.parameters()), 1, seed=3)
    _steps(two, resumed, 1, seed=3)
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(fresh.parameters(), two.parameters())), \
        "the state changed the step (else this test proves nothing)"


def test_a_state_that_does_not_fit_is_refused_whole(tmp_path):
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    _steps(model, optimizer, 1, seed=1)
    arrays = st.export_state(optimizer, _names(model))
    target = torch.optim.Adam(_model().parameters(), lr=1e-2)
    names = _names(model)
    assert not st.import_state(target, names, {k: v for k, v in arrays.items() if not k.startswith("2.")})  # a layer lacks state
    assert not st.import_state(target, names, {**arrays, "0.weight/exp_avg": np.zeros((2, 2), np.float32)})  # wrong shape
    assert not st.import_state(target, names, {**arrays, "9.weight/exp_avg": np.zeros(1, np.float32)})  # a stranger's
    assert not st.import_state(target, names[:-1], arrays)
    assert not st.import_state(target, names, {**arrays, "0.weight": np.zeros((3, 4), np.float32)})  # not "name/key"
    assert target.state_dict()["state"] == {}, "nothing was loaded"


def test_only_the_named_job_and_round_load(tmp_path):
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    _steps(model, optimizer, 1, seed=1)
    path = tmp_path / "s.safetensors"
    st.save_state(path, "job-a", 3, st.export_state(optimizer, _names(model)))
    assert st.load_state(path, "job-a", 3) is not None
    assert st.load_state(path, "job-a", 2) is None
    assert st.load_state(path, "job-b", 3) is None
    assert st.load_state(path, "job-a", None) is None
    path.write_bytes(b"not a safetensors file")
    assert st.load_state(path, "job-a", 3) is None
    assert st.state_file(tmp_path / "ledger.sqlite", "us-east", "a/b:c").parent == tmp_path / st.STATE_DIR


def test_stale_states_of_other_jobs_are_pruned_and_nothing_else(tmp_path):
    import os

    now = 1_000_000_000.0
    old, recent = now - st.STALE_AFTER_S - 60, now - st.STALE_AFTER_S + 60
    keep = st.state_file(tmp_path / "ledger.db", "us-east", "this-job")
    keep.parent.mkdir()
    files = {
        "keep": keep,
        "stale": st.state_file(tmp_path / "ledger.db", "us-east", "ended-job"),
        "stale-partial": keep.parent / ".us-east.0123456789abcdef.safetensors.00ff00ff00ff00ff.tmp",
        "recent": st.state_file(tmp_path / "ledger.db", "us-east", "other-running-job"),
        "other-region": st.state_file(tmp_path / "ledger.db", "us-east-2", "ended-job"),
        "not-a-state": keep.parent / "us-east.notes.txt",
    }
    for name, path in files.items():
        path.write_bytes(b"x")
        when = recent if name == "recent" else old
        os.utime(path, (when, when))
    removed = st.prune_stale_states(keep.parent, "us-east", keep=keep, now=now)
    assert sorted(removed) == sorted([files["stale"], files["stale-partial"]])
    assert {name for name, path in files.items() if path.exists()} == {"keep", "recent", "other-region", "not-a-state"}


def test_forgetting_a_state_that_is_not_there_is_fine(tmp_path):
    present, absent, neighbour = tmp_path / "present.safetensors", tmp_path / "absent.safetensors", tmp_path / "n"
    present.write_bytes(b"state")
    neighbour.write_bytes(b"other")
    st.forget_state(absent)  # no error
    st.forget_state(present)
    st.forget_state(present)  # twice: still no error
    assert not present.exists() and not absent.exists() and neighbour.read_bytes() == b"other"
