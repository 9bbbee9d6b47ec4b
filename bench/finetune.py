"""The utility yardstick's training runs, on any device: the ceiling, centralized DP, and fedpriv's DP-FL.

Shared by ``bench/utility.py`` (the full study, data from the real partition) and
``bench/gpu_session.py`` (a time-budgeted run on a GPU machine, data from ``.gpu/``). Everything
that decides privacy or an update is fedpriv's own code:

* a region's round is :class:`fedpriv.client.trainer.LocalTrainer` (Opacus, Poisson sampling,
  ``BatchMemoryManager``, the configured local optimizer and precision);
* σ is :func:`fedpriv.privacy.schedule.choose_noise_multiplier` for the configured accountant;
* ε is :func:`fedpriv.privacy.accountant.cross_checked_epsilon` over each region's history (the
  run's accountant and the cross-check accountant the report uses);
* the round loop (:func:`federated_rounds`) is the coordinator's: the example-weighted mean of the
  regions' values, then the server optimizer's step
  (:class:`fedpriv.strategies.server_update_rules.ServerOptimizer`, identity for plain FedAvg).

Only the **ceiling** has its own loop, on purpose: it is the plain non-private fine-tune a
practitioner would run (AdamW, shuffled mini-batches), not fedpriv. It trains the same module
(:class:`fedpriv.task.features.ClassifierTop` over frozen embeddings) as ``trainable = all``.

Nothing here imports flwr, ray or cryptography: it runs where only torch, transformers, peft
and Opacus are installed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

DELTA = 1e-5

# Config keys other parts of fedpriv add; a run that needs one that this checkout lacks fails with a clear line.
KEY_OWNERS = {
    "local-optimizer": "the trainer change (client/trainer.py)",
    "weight-decay": "the trainer change (client/trainer.py)",
    "mixed-precision": "the trainer change (client/trainer.py)",
    "insecure-deterministic-noise": "the trainer change (client/trainer.py)",
    "server-optimizer": "strategies/server_optimizer.py",
    "server-learning-rate": "strategies/server_optimizer.py",
    "server-momentum": "strategies/server_optimizer.py",
}


class MissingFeature(RuntimeError):
    """A configuration asks for something this checkout does not have yet (merge main)."""


def known_keys() -> set[str]:
    from fedpriv.core.config import load_app_defaults

    return set(load_app_defaults())


def make_config(overrides: dict):
    """The typed run config for ``overrides`` (secure aggregation off: it does not change the model)."""
    from fedpriv.core.config import resolve_config

    missing = sorted(k for k in overrides if k not in known_keys())
    if missing:
        owners = sorted({KEY_OWNERS.get(k, "a later fedpriv change") for k in missing})
        raise MissingFeature(f"config key(s) {', '.join(missing)} not in this checkout's pyproject.toml: "
                             f"needs {', '.join(owners)} (merge main)")
    return resolve_config({"secure-aggregation": False, **overrides})[1]


def describe(o: dict) -> str:
    """Short text of the settings that matter for a run."""
    short = [("trainable", ""), ("lora-rank", "LoRA r="), ("local-optimizer", ""), ("learning-rate", "lr "),
             ("weight-decay", "wd "), ("batch-size", "B "), ("physical-batch-size", "phys "), ("local-epochs", "E "),
             ("local-steps", "S "), ("num-server-rounds", "R "), ("max-grad-norm", "C "), ("server-optimizer", "server "),
             ("server-learning-rate", "slr "), ("server-momentum", "smom "), ("grad-sample-mode", ""),
             ("mixed-precision", ""), ("accountant", "")]
    parts = []
    for key, label in short:
        if key == "local-epochs" and o.get("local-steps"):
            continue  # local-steps overrides the epochs
        if key in o and not (key in ("lora-rank", "local-steps") and not o[key]):
            v = o[key]
            parts.append(f"{label}{v:g}" if isinstance(v, float) else f"{label}{v}")
    return ", ".join(parts)


# =============================================================== data as features


@dataclass
class PolicyData:
    """One model (built once) and the frozen-prefix features of every split for its trainable policy."""

    split: object  # fedpriv.task.features.SplitClassifier
    initial: dict  # trainable values at initialisation
    train: dict  # region -> FeatureDataset
    val: object
    test: object
    seconds: float


class Bench:
    """Data, device and models for the runs; features are computed once per (policy, LoRA rank)."""

    def __init__(self, regions: list[str], train: dict, val: dict, test, device, model_name: str = "minilm",
                 seed: int = 42, log: Callable[[str], None] = print):
        self.regions = list(regions)
        self.train_enc, self.val_enc, self.test_enc = train, val, test  # EncodedDatasets
        self.device = device
        self.model_name = model_name
        self.seed = seed
        self.log = log
        self._data: dict[tuple, PolicyData] = {}
        self._features: dict[str, tuple] = {}

    def data(self, policy: str, lora_rank: int = 0) -> PolicyData:
        key = (policy, lora_rank)
        if key not in self._data:
            import torch

            from fedpriv.task.features import FeatureDataset, SplitClassifier
            from fedpriv.task.model import build_model, get_trainable

            t0 = time.perf_counter()
            model = build_model(self.model_name, policy, self.seed, "mean", lora_rank)
            model.train()  # from_pretrained returns eval mode; Opacus records no activations then (GPU.md)
            split = SplitClassifier(model, policy)
            split.model.to(self.device)
            if policy not in self._features:  # same prefix with or without LoRA (adapters sit above it)
                feats = lambda enc: split.features(enc, self.device)  # noqa: E731
                train = {r: feats(self.train_enc[r]) for r in self.regions}
                vals = [feats(self.val_enc[r]) for r in self.regions]
                val = FeatureDataset([f for v in vals for f in v.features], [y for v in vals for y in v.labels])
                self._features[policy] = (train, val, feats(self.test_enc))
            train, val, test = self._features[policy]
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self._data[key] = PolicyData(split, get_trainable(model), train, val, test, time.perf_counter() - t0)
            self.log(f"  model + features for {policy}{f' LoRA r={lora_rank}' if lora_rank else ''}: "
                     f"{self._data[key].seconds:.1f}s")
        return self._data[key]

    def sizes(self) -> dict[str, int]:
        return {r: len(self.train_enc[r]) for r in self.regions}


def evaluate(pd: PolicyData, which: str, device) -> tuple[float, float]:
    from fedpriv.task.features import evaluate_top

    return evaluate_top(pd.split.top, getattr(pd, which), device)


# =============================================================== the ceiling


@dataclass
class RunResult:
    label: str
    settings: dict
    val_acc: list[float] = field(default_factory=list)  # after each round / epoch
    test_acc: float | None = None  # held-out, final model only
    test_loss: float | None = None
    test_by_epoch: list[float] = field(default_factory=list)  # fixed-schedule baselines only
    epsilon: dict = field(default_factory=dict)
    epsilon_check: dict = field(default_factory=dict)
    accountant: str = ""
    check_accountant: str = ""
    sigma: dict = field(default_factory=dict)
    seconds: float = 0.0
    device: str = ""
    complete: bool = True
    note: str = ""
    final_values: dict | None = None

    def row(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "final_values"}
        return out


def ceiling(bench: Bench, epochs: int = 3, lr: float = 5e-5, batch: int = 32, weight_decay: float = 0.01,
            deadline: float = math.inf, policy: str = "all") -> RunResult:
    """Non-private centralized fine-tune (AdamW, shuffled batches) of the whole encoder, embeddings frozen.

    A fixed schedule (no choice is made), so held-out accuracy after every epoch is reported."""
    import torch
    from torch.utils.data import DataLoader

    from fedpriv.task.features import FeatureDataset, collate_features
    from fedpriv.task.model import set_trainable_values

    pd = bench.data(policy)
    set_trainable_values(pd.split.model, pd.initial)
    pooled = FeatureDataset([f for r in bench.regions for f in pd.train[r].features],
                            [y for r in bench.regions for y in pd.train[r].labels])
    top = pd.split.top
    params = [p for p in top.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    loader = DataLoader(pooled, batch_size=batch, shuffle=True, collate_fn=collate_features,
                        generator=torch.Generator().manual_seed(bench.seed))
    res = RunResult("non-private centralized full fine-tune (ceiling)",
                    {"trainable": policy, "optimizer": "adamw", "learning-rate": lr, "weight-decay": weight_decay,
                     "batch-size": batch, "epochs": epochs}, device=str(bench.device))
    t0 = time.perf_counter()
    for epoch in range(epochs):
        top.train()
        for i, b in enumerate(loader):
            b = {k: v.to(bench.device, non_blocking=True) for k, v in b.items()}
            loss = top(**b).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if time.perf_counter() > deadline:
                res.complete = False
                res.note = f"cut short in epoch {epoch + 1} after {i + 1} of {len(loader)} batches (time budget)"
                break
        res.val_acc.append(evaluate(pd, "val", bench.device)[1])
        loss_t, acc_t = evaluate(pd, "test", bench.device)
        res.test_by_epoch.append(acc_t)
        res.test_acc, res.test_loss = acc_t, loss_t
        bench.log(f"  ceiling epoch {epoch + 1}: val {100 * res.val_acc[-1]:.2f} held-out {100 * acc_t:.2f} "
                  f"({time.perf_counter() - t0:.0f}s)")
        if not res.complete:
            break
        if time.perf_counter() > deadline and epoch + 1 < epochs:
            res.complete, res.note = False, f"cut short after {epoch + 1} of {epochs} epochs (time budget)"
            break
    res.seconds = time.perf_counter() - t0
    return res


# =============================================================== fedpriv's DP-FL (and centralized DP)


def round_seed(cfg, rep: int, index: int, server_round: int) -> int:
    """The region's round seed (dropout, non-DP shuffling): :meth:`fedpriv.client.region.RegionRuntime.round_seed`
    itself, for the run's ``seed`` (``rep = 0``) or, for other repetitions, as if the run config's ``seed`` were
    ``seed + 10_000 * rep``. DP noise and Poisson sampling never use it (fresh OS entropy in LocalTrainer)."""
    from types import SimpleNamespace

    from fedpriv.client.region import RegionRuntime

    run = SimpleNamespace(cfg=SimpleNamespace(seed=cfg.seed + 10_000 * rep), identity=SimpleNamespace(index=index))
    return RegionRuntime.round_seed(run, server_round)  # type: ignore[arg-type]


def weighted_mean(updates: list[tuple[dict, int]]) -> dict:
    """FedAvg's aggregate: the example-weighted mean of the regions' values (float64 sums, float32 out).

    The one copy in bench. The coordinator's (Flower's ``FedAvg`` / ``SecureFedAvg``) needs flwr,
    which the GPU machine lacks."""
    total = sum(n for _, n in updates)
    return {k: sum(v[k].astype(np.float64) * (n / total) for v, n in updates).astype(np.float32)
            for k in updates[0][0]}


def server_optimizer(cfg):
    """fedpriv's server update rule for ``cfg`` (:mod:`fedpriv.strategies.server_update_rules`, numpy only:
    importable where flwr is not installed), as the coordinator builds it."""
    from fedpriv.strategies.server_update_rules import ServerOptimizer

    return ServerOptimizer(cfg.server_optimizer, cfg.server_learning_rate, cfg.server_momentum, cfg.server_beta2,
                           cfg.server_tau)


def federated_rounds(model, initial: dict, sizes: dict[str, int], cfg, local_round: Callable, after_round: Callable,
                     rep: int = 0) -> tuple[dict, dict[str, list]]:
    """The rounds of a run as the coordinator drives them, in one process.

    Every round each region starts from the global values and trains (``local_round(region, seed, history)
    -> (values, history)``); the new global values are the server optimizer's step on the example-weighted
    mean. ``after_round(round, global values)`` runs after each round (the model holds the new values);
    returning False stops the run. Returns the final global values and each region's privacy history.
    """
    from fedpriv.task.model import set_trainable_values

    server = server_optimizer(cfg)
    current = {k: v.copy() for k, v in initial.items()}
    history: dict[str, list] = {r: [] for r in sizes}
    set_trainable_values(model, current)
    for rnd in range(1, cfg.num_server_rounds + 1):
        updates = []
        for index, region in enumerate(sizes):
            set_trainable_values(model, current)
            values, history[region] = local_round(region, round_seed(cfg, rep, index, rnd), history[region])
            updates.append((values, sizes[region]))
        current = dict(server.step(current, weighted_mean(updates)))
        set_trainable_values(model, current)
        if after_round(rnd, current) is False:
            break
    return current, history


def predicted_total(elapsed: float, rnd: int, rounds: int, first_round_s: float) -> float:
    """The whole run's predicted seconds after ``rnd`` rounds, the first of which took ``first_round_s``. Round 1
    carries the warm-up (CUDA kernels, the optimizer's first allocation: on an H200 about twice a later DP-FedSGD
    round, which once stopped a 130 s run after round 1 as "about 250 s"), so the rate comes from the rounds after
    it; after round 1 alone there is no rate yet, and the run goes on unless its time is already spent."""
    if rnd == 1:
        return elapsed
    return elapsed + (elapsed - first_round_s) / (rnd - 1) * (rounds - rnd)


def dp_fl(bench: Bench, overrides: dict, label: str, deadline: float = math.inf, pooled: bool = False,
          keep_values: bool = False, rep: int = 0) -> RunResult:
    """FedAvg over the regions with each region's round from LocalTrainer (``pooled``: one region holding
    every training post and one round = centralized training through the same code).

    Validation accuracy after every round; held-out accuracy is *not* computed here (call
    :func:`held_out` on the chosen run), so a caller cannot pick on it by accident. After the first
    round the run predicts its total time and stops early (``complete = False``) if it would pass
    ``deadline``.
    """
    import torch

    from fedpriv.client.trainer import LocalTrainer
    from fedpriv.privacy.accountant import cross_checked_epsilon
    from fedpriv.privacy.schedule import choose_noise_multiplier, region_schedule
    from fedpriv.task.features import FeatureDataset
    from fedpriv.task.model import get_trainable

    cfg = make_config(overrides)
    pd = bench.data(cfg.trainable, cfg.lora_rank)
    if pooled:
        train = {"pooled": FeatureDataset([f for r in bench.regions for f in pd.train[r].features],
                                          [y for r in bench.regions for y in pd.train[r].labels])}
    else:
        train = pd.train
    names = list(train)
    res = RunResult(label, dict(overrides), device=str(bench.device), accountant=cfg.accountant if cfg.dp else "")
    if cfg.dp:
        for r in names:
            res.sigma[r] = choose_noise_multiplier(region_schedule(len(train[r]), cfg), cfg)
    else:
        res.sigma = {r: 0.0 for r in names}
    model = pd.split.model
    kept: dict[str, dict] = {}  # local-optimizer-state = keep: each region's state (in-process; every round accounted)

    def local_round(region: str, seed: int, history: list):
        trainer = LocalTrainer(pd.split, train[region], cfg, bench.device)
        out = trainer.train(history, res.sigma[region], seed=seed, label=region, optimizer_state=kept.get(region))
        if out.optimizer_state:
            kept[region] = out.optimizer_state
        return out.values, out.history

    t0 = time.perf_counter()
    first_round_s = 0.0

    def after_round(rnd: int, _values: dict) -> bool:
        nonlocal first_round_s
        res.val_acc.append(evaluate(pd, "val", bench.device)[1])
        elapsed = time.perf_counter() - t0
        bench.log(f"  {label} round {rnd}/{cfg.num_server_rounds}: val {100 * res.val_acc[-1]:.2f} ({elapsed:.0f}s)")
        if rnd == 1:
            first_round_s = elapsed
        predicted = predicted_total(elapsed, rnd, cfg.num_server_rounds, first_round_s)
        if rnd < cfg.num_server_rounds and time.perf_counter() + (predicted - elapsed) > deadline:
            res.complete = False
            res.note = (f"stopped after {rnd} of {cfg.num_server_rounds} rounds: the whole run would take about "
                        f"{predicted:.0f}s, past its time budget (accuracy is NOT that of the planned schedule)")
            bench.log(f"  {label}: {res.note}")
            return False
        return True

    _, history = federated_rounds(model, pd.initial, {r: len(train[r]) for r in names}, cfg, local_round,
                                  after_round, rep)
    if bench.device.type == "cuda":
        torch.cuda.synchronize()
    res.seconds = time.perf_counter() - t0
    if cfg.dp:
        checked = {r: cross_checked_epsilon(history[r], cfg.delta, cfg.accountant) for r in names}
        res.epsilon = {r: float(c.epsilon) for r, c in checked.items()}
        res.check_accountant = next(iter(checked.values())).check_accountant if checked else ""
        res.epsilon_check = {r: float(c.check_epsilon) for r, c in checked.items()}
    if keep_values:
        res.final_values = get_trainable(model)
    return res


def held_out(bench: Bench, res: RunResult) -> RunResult:
    """Held-out accuracy of a run's final model (a run whose settings were chosen on validation data)."""
    from fedpriv.task.model import set_trainable_values

    cfg = make_config(res.settings)
    pd = bench.data(cfg.trainable, cfg.lora_rank)
    if res.final_values is None:
        raise ValueError("run without keep_values")
    set_trainable_values(pd.split.model, res.final_values)
    res.test_loss, res.test_acc = evaluate(pd, "test", bench.device)
    return res


def utility_table(rows: list[dict]) -> str:
    """Markdown of utility rows (:meth:`RunResult.row` dicts); the ceiling is the row labelled as such."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import markdown_table

    ceil = next((r["test_acc"] for r in rows if "ceiling" in r["label"] and r.get("test_acc") is not None), None)
    out = []
    for r in rows:
        eps = max(r["epsilon"].values()) if r.get("epsilon") else None
        chk = max(r["epsilon_check"].values()) if r.get("epsilon_check") else None
        gap = 100 * (r["test_acc"] - ceil) if ceil is not None and r.get("test_acc") is not None else None
        out.append((r["label"], "∞" if eps is None else f"{eps:.2f} ({r.get('accountant')})",
                    "-" if chk is None or chk != chk else f"{chk:.2f} ({r.get('check_accountant')})",
                    "-" if r.get("test_acc") is None else f"**{100 * r['test_acc']:.2f}**",
                    "-" if gap is None else f"**{gap:+.2f}**",
                    f"{100 * r['val_acc'][-1]:.2f}" if r.get("val_acc") else "-",
                    ", ".join(f"{v:.2f}" for v in r["sigma"].values()) if r.get("sigma") and eps else "-",
                    describe(r["settings"]) or ", ".join(f"{k} {v}" for k, v in r["settings"].items()),
                    f"{r['seconds']:.0f}s", r["device"],
                    "yes" if r.get("complete", True) else f"no: {r.get('note')}"))
    return markdown_table(("setting", "ε", "ε cross-check", "held-out %", "vs ceiling (pts)", "validation %",
                           "σ per region", "settings", "wall", "device", "complete"), out)
