#!/usr/bin/env python
"""One time-budgeted measurement session on a GPU machine: DP cost, the ceiling, and fedpriv's DP-FL.

Run on the GPU machine (after ``bash scripts/prepare_gpu.sh`` here and installing ``.gpu/whl`` there)::

    PYTHONUNBUFFERED=1 python3 bench/gpu_session.py --out $OUT --budget 480

and on a CPU machine first, end to end on a tiny subset with the same assets::

    python bench/gpu_session.py --quick --out /tmp/gpu-quick

Sections, in priority order, each with its own time budget and try/except; every result is appended to
``OUT/results.jsonl`` the moment it exists (a run cut short keeps what it measured) and ``OUT/summary.md``
is rewritten after every section:

a. DP cost per step (``bench/dp_cost.py`` accelerator rows): trainable = all and LoRA on all layers;
   non-private, Opacus hooks, fedpriv's book-keeping (``bk``); fp32 and bf16; physical batch 256 and 512;
   peak GPU memory. The fastest DP setting measured here is what the later DP runs use (grad-sample-mode,
   physical batch, bf16 with ``bk``); without section a they use ``H200_FASTEST``.
b. The ceiling: non-private centralized fine-tune of the whole encoder (AdamW 5e-5, batch 32, 3 epochs).
c. fedpriv DP-FL at ε = 8: a small grid (``--grid first|long|fedsgd``: full fine-tune / LoRA; local Adam with
   server momentum, or DP-FedSGD with server Adam; batch, rounds x epochs), chosen on **validation**
   accuracy (the regions' local test posts, or with ``--val-from train`` 10 % of their training posts);
   then the chosen run's held-out accuracy.
d. The chosen configuration at ε = 3 and ε = 1.
e. Centralized DP fine-tune (all training posts in one place, same trainer) at ε = 8.
f. fedpriv's CPU default (``trainable = head``) at ε = 8, for comparison.
g. One crafted post against the clipping bound on this device, for every clipping mode and precision
   (``bench/clipping_bound.py``): on a GPU, TF32/bf16 kernels may let one post move the others' contributions.
h. A real local DP round of the whole encoder with each Poisson batch cut into physical batches in drawing
   order and by length (``bench/padding.py``; fedpriv sorts, client/batching.py): what padding costs there.

Privacy accounting: the accountant named in fedpriv's config (``pld`` when this checkout has it),
σ from fedpriv's own search, ε of every region recomputed from its DP history and cross-checked by a
second accountant. The held-out set (the server's posts) is evaluated only for fixed-schedule
baselines and for configurations already chosen on validation data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, markdown_table  # noqa: E402

from fedpriv.core.files import atomic_write_text  # noqa: E402

ASSETS = ROOT / ".gpu"

# Section budgets in seconds (full run); --budget caps their sum.
BUDGETS = {"a": 60, "b": 40, "c": 190, "d": 130, "e": 65, "f": 30, "g": 30, "h": 30}
QUICK_BUDGETS = {"a": 15, "b": 30, "c": 90, "d": 60, "e": 30, "f": 30, "g": 30, "h": 30}
TITLES = {"a": "DP cost per step", "b": "ceiling", "c": "DP-FL grid at epsilon = 8", "d": "chosen DP-FL at epsilon = 3, 1",
          "e": "centralized DP at epsilon = 8", "f": "head (CPU default) at epsilon = 8",
          "g": "one crafted post against the clipping bound",
          "h": "length-sorted physical batches"}


# The fastest exact DP step the H200 sessions measured for the whole encoder (the fourth session, section a:
# book-keeping, fp32, physical batch 512, 0.55x of the non-private step): what DP runs use when section a does
# not run this session.
H200_FASTEST = {"grad-sample-mode": "bk", "physical-batch-size": 512, "mixed-precision": "off"}
SECTION_A_MODES = ("non-private", "DP hooks", "DP bk")  # ghost: measured twice (0.33x), slower than hooks there

GRIDS = ("first", "long", "fedsgd", "fedsgd-tune")  # section c's candidate lists (``grid``); --plan-only caches σ for all of them

# DP-FedSGD with server Adam: one noisy SGD step of lr 1 a round in each region (its update is minus its noisy
# gradient), FedAdam on the example-weighted mean (tests/test_server_optimizer.py: that is torch's Adam on the
# mean gradient). Shared by this grid and bench/utility.py's CPU grid; each adds model, batch and server lr.
FEDSGD = {"local-optimizer": "sgd", "momentum": 0.0, "learning-rate": 1.0, "weight-decay": 0.0, "local-steps": 1,
          "server-optimizer": "fedadam", "server-momentum": 0.9, "server-beta2": 0.999, "server-tau": 1e-8}


def dp_base(accountant: str) -> dict:
    return {"dp": True, "delta": 1e-5, "noise-multiplier": 0.0, "accountant": accountant, "momentum": 0.0,
            "max-grad-norm": 1.0, "target-epsilon": 8.0}


def grid(quick: bool, name: str = "first") -> list[tuple[str, dict]]:
    """Candidates at ε = 8, most promising first (issue 10's measurements): the section runs as many as its
    budget allows, at least the first two. ``name = "long"``: the second session's grid, more rounds
    (the first session's validation curves were still rising after 5-10 rounds)."""
    adam = {"local-optimizer": "adam", "weight-decay": 0.0}
    if name == "fedsgd":
        return fedsgd_grid(quick)
    if name == "fedsgd-tune":
        return fedsgd_tune_grid(quick)
    if name == "long" and not quick:
        long = {"local-epochs": 1.0, "num-server-rounds": 25, "batch-size": 1024,
                "server-optimizer": "fedavgm", "server-momentum": 0.5,
                "grad-sample-mode": "hooks", "physical-batch-size": 512}  # the first session's fastest DP setting
        return [("LoRA r=16 all layers, Adam 3e-3, B 1024, E 1 x R 25, FedAvgM 0.5",
                 {"trainable": "all", "lora-rank": 16, **adam, "learning-rate": 3e-3, **long}),
                ("all, Adam 1e-3, B 1024, E 1 x R 25, FedAvgM 0.5",
                 {"trainable": "all", **adam, "learning-rate": 1e-3, **long})]
    if quick:
        sched = {"batch-size": 64, "physical-batch-size": 64, "local-epochs": 1.0, "num-server-rounds": 2}
        return [("all, Adam 5e-4, FedAvg", {"trainable": "all", **adam, "learning-rate": 5e-4, **sched}),
                ("LoRA r=4 all layers, Adam 2e-3", {"trainable": "all", "lora-rank": 4, **adam, "learning-rate": 2e-3,
                                                   **sched}),
                ("all, Adam 1e-3, FedAvgM 0.5", {"trainable": "all", **adam, "learning-rate": 1e-3, **sched,
                                                 "server-optimizer": "fedavgm", "server-momentum": 0.5})]
    sched = {"local-epochs": 2.0, "num-server-rounds": 5}
    return [
        ("gpu preset (simulations/presets.toml)", gpu_preset()),
        # issue 10: 85.4 % held-out with PLD at this schedule (plain transformers + Opacus)
        ("all, Adam 5e-4, B 512, E 2 x R 5, FedAvg", {"trainable": "all", **adam, "learning-rate": 5e-4,
                                                     "batch-size": 512, **sched}),
        ("LoRA r=16 all layers, Adam 2e-3, B 1024, E 2 x R 5", {"trainable": "all", "lora-rank": 16, **adam,
                                                               "learning-rate": 2e-3, "batch-size": 1024, **sched}),
        ("all, Adam 1e-3, B 1024, E 2 x R 5, FedAvgM 0.5", {"trainable": "all", **adam, "learning-rate": 1e-3,
                                                           "batch-size": 1024, **sched, "server-optimizer": "fedavgm",
                                                           "server-momentum": 0.5}),
    ]


def fedsgd_grid(quick: bool) -> list[tuple[str, dict]]:
    """The third session's grid: DP-FedSGD (``local-steps = 1``: each region releases one noisy clipped gradient a
    round) with Adam on the server (FedAdam, post-processing). The server then takes the DP-Adam step a centralized
    run takes, on the example-weighted mean of the regions' noisy gradients -- no client drift and no Adam state
    reset every round, the two things separating the 83.7 % of local Adam + FedAvgM from centralized DP's 86.2 %.
    On 2 CPU cores this closed half of that gap for LoRA on the top layer (bench/results/utility_cpu_fedsgd.md).
    150 rounds = the 150 steps per region of the current preset (25 rounds x 6 steps) and of centralized DP (3 local
    steps x a third of the rounds, to cut Flower's per-round cost, lost 2 points on the CPU proxy: not tried); the
    current preset runs last, as the reference this session's noise is compared against."""
    fedsgd = {**FEDSGD, "batch-size": 1024, "num-server-rounds": 150}
    if quick:
        small = {"batch-size": 64, "physical-batch-size": 64, "num-server-rounds": 4}
        return [("all, DP-FedSGD, FedAdam 1e-3", {"trainable": "all", **fedsgd, "server-learning-rate": 1e-3, **small}),
                ("LoRA r=4 all layers, DP-FedSGD, FedAdam 3e-3",
                 {"trainable": "all", "lora-rank": 4, **fedsgd, "server-learning-rate": 3e-3, **small})]
    # how they clip: section a's fastest DP setting this session, else H200_FASTEST (Session.dp_settings)
    return [("all, DP-FedSGD (1 step of SGD lr 1 a round), B 1024, R 150, FedAdam 1e-3",
             {"trainable": "all", **fedsgd, "server-learning-rate": 1e-3}),
            ("LoRA r=16 all layers, DP-FedSGD, B 1024, R 150, FedAdam 3e-3",
             {"trainable": "all", "lora-rank": 16, **fedsgd, "server-learning-rate": 3e-3}),
            # twice the batch in half the rounds: the same compute as the first candidate, a third less noise in
            # the regions' example-weighted mean gradient per step (σ 1.93 / 2.73 / 1.93 at q 1/3, 1/2, 1/3:
            # 0.66e-3 vs 0.98e-3 C; signal-to-noise over the run √T/noise 13.1 vs 12.5), and half of Flower's
            # per-round cost (14.5-19.5 s a round for the whole encoder on 2 CPU cores, README); twice the server
            # lr so Adam's half as many steps can move as far
            ("all, DP-FedSGD, B 2048, R 75, FedAdam 2e-3",
             {"trainable": "all", **fedsgd, "batch-size": 2048, "num-server-rounds": 75, "server-learning-rate": 2e-3}),
            ("gpu preset (simulations/presets.toml)", gpu_preset())]


def fedsgd_tune_grid(quick: bool) -> list[tuple[str, dict]]:
    """The levers the fourth session left untried around the ``gpu`` preset (DP-FedSGD, B 2048, 75 rounds, FedAdam
    2e-3: 83.5 % validation, 85.5 % held-out at ε = 8), most promising first. A small clipping norm: server Adam
    is invariant to the gradient's scale, so C only sets which posts are clipped, and clipping nearly all of them
    (normalised per-post gradients) is what the DP fine-tuning literature found best; σ does not depend on C.
    Then the server learning rate both ways. The chosen run's ε = 3 and 1 follow in section d."""
    preset = gpu_preset()
    if quick:
        preset = {**preset, "batch-size": 64, "physical-batch-size": 64, "num-server-rounds": 4}
    return [("gpu preset, C 0.1", {**preset, "max-grad-norm": 0.1}),
            ("gpu preset, FedAdam 3e-3", {**preset, "server-learning-rate": 3e-3}),
            ("gpu preset", preset),
            ("gpu preset, FedAdam 1e-3", {**preset, "server-learning-rate": 1e-3})]


def gpu_preset() -> dict:
    """The ``gpu`` preset as committed (DP-Adam if the preset does not name a local optimizer yet)."""
    from _common import committed_preset

    preset = {k: v for k, v in committed_preset("gpu").items() if not k.startswith("sim-")}  # Ray's GPU share: not a training knob
    preset.setdefault("local-optimizer", "adam")
    preset.pop("physical-batch-size", None)  # section a's measurement decides
    preset.pop("grad-sample-mode", None)
    preset.pop("mixed-precision", None)
    return preset


def central_dp(quick: bool) -> dict:
    """GPU.md: Adam 1e-3, Poisson batch 1024, 150 steps (about 10 epochs of 14,887 posts): 85.3 % under RDP.
    A fixed setting from that earlier measurement, not tuned here."""
    if quick:
        return {"trainable": "all", "local-optimizer": "adam", "weight-decay": 0.0, "learning-rate": 1e-3,
                "batch-size": 128, "physical-batch-size": 64, "local-epochs": 2.0, "num-server-rounds": 1}
    return {"trainable": "all", "local-optimizer": "adam", "weight-decay": 0.0, "learning-rate": 1e-3,
            "batch-size": 1024, "local-epochs": 10.0, "num-server-rounds": 1}


def head_default(quick: bool) -> dict:
    """fedpriv's CPU default (pyproject.toml): head on frozen mean-pooled embeddings, SGD."""
    from fedpriv.core.config import load_app_defaults

    d = load_app_defaults()
    o = {k: d[k] for k in ("learning-rate", "momentum", "batch-size", "physical-batch-size", "local-epochs",
                           "num-server-rounds") if k in d}
    o["trainable"] = "head"
    if quick:
        o.update({"batch-size": 64, "physical-batch-size": 64, "num-server-rounds": 2, "local-epochs": 1.0})
    return o


class Session:
    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.out = args.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.out / "results.jsonl"
        self.t_start = time.perf_counter()
        self.deadline = self.t_start + args.budget
        self.records: list[dict] = []
        self.dp_settings: dict = {} if args.quick else dict(H200_FASTEST)
        self.chosen: tuple[str, dict] | None = None
        self.ceiling_acc: float | None = None
        self.rate: dict[str, float] = {}  # seconds per (example x epoch) by model family, from finished runs

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t_start:6.1f}s] {msg}", flush=True)

    def write(self, record: dict) -> None:
        record = {"t": round(time.perf_counter() - self.t_start, 1), **record}
        self.records.append(record)
        with self.jsonl.open("a") as fh:
            fh.write(json.dumps(record, default=_json_default) + "\n")

    def remaining(self) -> float:
        return self.deadline - time.perf_counter()


def _json_default(x):
    try:
        import numpy as np

        if isinstance(x, np.generic):
            return x.item()
    except ImportError:
        pass
    if isinstance(x, Path):
        return str(x)
    return repr(x)


# =============================================================== setup


def setup(s: Session):
    import torch

    os.environ.setdefault("FEDPRIV_CACHE_DIR", str(s.args.assets / "cache"))
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere+ (GPU.md)
    if s.args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    device = torch.device("cuda" if s.args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(os.cpu_count() or 1, s.args.threads)))

    import gpu_assets
    from finetune import Bench

    model = s.args.model or ("tiny" if s.quick else "minilm")
    if model == "minilm":  # tiny takes its vocabulary size from the packaged tokenizer: leave that alone
        gpu_assets.use_gpu_model(s.args.assets / gpu_assets.MODEL_DIR_NAME)
    splits = gpu_assets.load_splits(s.args.assets / gpu_assets.DATA_FILE, limit=256 if s.quick else 0)
    if s.args.val_from == "local-test":
        train, val = splits.train, splits.local_test
    else:  # 10 % of each region's training posts, seeded; the regions then train on the other 90 %
        import numpy as np

        from fedpriv.task.encoding import EncodedDataset

        train, val = {}, {}
        for i, r in enumerate(splits.regions):
            d = splits.train[r]
            perm = np.random.default_rng([42, i]).permutation(len(d))
            k = max(1, len(d) // 10)
            pick = lambda idx: EncodedDataset([d.input_ids[j] for j in idx], [d.labels[j] for j in idx])  # noqa: E731
            val[r], train[r] = pick(perm[:k]), pick(perm[k:])
    bench = Bench(splits.regions, train, val, splits.server_test, device, model_name=model, log=s.log)
    env = {"kind": "env", "device": str(device), "model": model, "torch": torch.__version__, "python": sys.version.split()[0],
           "quick": s.quick, "budget_s": s.args.budget, "drop_missing_keys": s.args.drop_missing_keys, "val_from": s.args.val_from,
           "train_sizes": {r: len(train[r]) for r in splits.regions},
           "val_size": sum(len(val[r]) for r in splits.regions), "held_out_size": len(splits.server_test),
           "partition": splits.meta.get("spec"), "corpus_sha256": splits.meta.get("corpus_sha256")}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    from importlib.metadata import version

    for mod in ("opacus", "transformers", "peft", "dp_accounting", "numpy"):
        try:
            __import__(mod)
            env[mod] = version(mod.replace("_", "-"))
        except Exception as exc:  # noqa: BLE001
            env[mod] = f"missing ({type(exc).__name__})"
    from fedpriv.core.config import ACCOUNTANTS, load_app_defaults

    env["accountant"] = "pld" if "pld" in ACCOUNTANTS else load_app_defaults()["accountant"]
    env["config_keys_missing"] = sorted(k for k in ("local-optimizer", "weight-decay", "mixed-precision", "server-optimizer",
                                                    "server-learning-rate", "server-momentum")
                                        if k not in load_app_defaults())
    s.write(env)
    s.log(f"device {env.get('gpu', device)}; accountant {env['accountant']}; train {env['train_sizes']}, "
          f"val {env['val_size']}, held-out {env['held_out_size']}"
          + (f"; config keys missing: {env['config_keys_missing']}" if env["config_keys_missing"] else ""))
    return bench, env


# =============================================================== sections


def section_a(s: Session, bench, env, budget: float) -> None:
    from dp_cost import accelerator_step_rows

    pd_full = bench.data("all")
    pd_lora = bench.data("all", 8)
    feats = pd_full.train[bench.regions[0]].features
    labels = pd_full.train[bench.regions[0]].labels
    batches = (16, 32) if s.quick else (256, 512)
    rows = accelerator_step_rows({"full": pd_full.split.top, "LoRA": pd_lora.split.top}, feats, labels, bench.device,
                                 physical_batches=batches, modes=SECTION_A_MODES, budget_s=budget,
                                 steps=2 if s.quick else 10,
                                 warmup=1 if s.quick else 3, log=s.log,
                                 on_row=lambda r: s.write({"kind": "dp_cost", "section": "a", **r}))
    # the fastest DP setting for the full model (examples/s) decides how the later DP runs train
    from finetune import known_keys

    # fedpriv's trainer takes bf16 with grad-sample-mode = bk only (its per-sample arithmetic stays fp32)
    ok = [r for r in rows if r["family"] == "full" and r["mode"].startswith("DP") and "error" not in r
          and (r["precision"] == "fp32" or ("mixed-precision" in known_keys() and r["mode"] == "DP bk"))]
    if ok:
        best = max(ok, key=lambda r: r["examples_per_s"])
        s.dp_settings = {"grad-sample-mode": best["mode"].split()[-1], "physical-batch-size": best["batch"]}
        if "mixed-precision" in known_keys():
            s.dp_settings["mixed-precision"] = "bf16" if best["precision"] == "bf16" else "off"
        s.write({"kind": "dp_choice", "section": "a", **s.dp_settings, "examples_per_s": best["examples_per_s"]})
        s.log(f"DP runs will use {s.dp_settings}")


def section_b(s: Session, bench, env, budget: float) -> None:
    from finetune import ceiling

    res = ceiling(bench, epochs=1 if s.quick else 3, deadline=time.perf_counter() + budget)
    s.ceiling_acc = res.test_acc
    s.write({"kind": "utility", "section": "b", **res.row()})


def _settings(s: Session, o: dict, eps: float, accountant: str) -> dict:
    from finetune import known_keys

    merged = {**dp_base(accountant), **s.dp_settings, **o, "target-epsilon": eps}
    if "physical-batch-size" not in o and "batch-size" in merged:
        merged["physical-batch-size"] = min(merged.get("physical-batch-size", 256), merged["batch-size"])
    if merged.get("physical-batch-size", 0) > merged.get("batch-size", 1 << 30):
        merged["physical-batch-size"] = merged["batch-size"]
    if s.args.drop_missing_keys:  # plumbing test only: the run is then NOT the configuration named
        return {k: v for k, v in merged.items() if k in known_keys()}
    return {k: v for k, v in merged.items() if k in known_keys() or k in o}  # unknown keys in o fail loudly later


def _examples_per_round(bench, o: dict, pooled: bool = False) -> float:
    """Expected training examples all regions process in one round of ``o`` (privacy/schedule.py's steps at
    Opacus' expected batch N / ceil(N/B)), whether ``o`` counts local epochs or ``local-steps``."""
    from fedpriv.core.config import load_app_defaults
    from fedpriv.privacy.schedule import batches_per_epoch, steps_per_round

    sizes = [sum(bench.sizes().values())] if pooled else list(bench.sizes().values())
    b = int(o.get("batch-size", load_app_defaults()["batch-size"]))
    e, k = float(o.get("local-epochs", 1)), int(o.get("local-steps", 0))
    return sum(steps_per_round(n, min(b, n), e, k) * n / batches_per_epoch(n, min(b, n)) for n in sizes)


def _predicted(s: Session, bench, o: dict, pooled: bool = False) -> float | None:
    fam = "LoRA" if o.get("lora-rank") else o.get("trainable", "all")
    if fam not in s.rate:
        return None
    return s.rate[fam] * _examples_per_round(bench, o, pooled) * int(o.get("num-server-rounds", 1))


def _learn_rate(s: Session, bench, o: dict, res, pooled: bool = False) -> None:
    if not res.val_acc:
        return
    fam = "LoRA" if o.get("lora-rank") else o.get("trainable", "all")
    s.rate[fam] = res.seconds / (_examples_per_round(bench, o, pooled) * len(res.val_acc))


def run_one(s: Session, bench, label: str, o: dict, section: str, deadline: float, pooled: bool = False,
            report_held_out: bool = True, kind: str = "utility"):
    from finetune import dp_fl, held_out

    pred = _predicted(s, bench, o, pooled)
    if pred is not None and time.perf_counter() + pred > deadline:
        s.log(f"skip {label}: predicted {pred:.0f}s, {deadline - time.perf_counter():.0f}s left in the section")
        s.write({"kind": "skipped", "section": section, "label": label, "settings": o, "predicted_s": pred})
        return None
    s.log(f"{label}: {_describe(o)}")
    res = dp_fl(bench, o, label, deadline=deadline, pooled=pooled, keep_values=True)
    _learn_rate(s, bench, o, res, pooled)
    if report_held_out:
        held_out(bench, res)
    row = res.row()
    if res.test_acc is not None and s.ceiling_acc is not None:
        row["gap_to_ceiling_pts"] = 100 * (res.test_acc - s.ceiling_acc)
    s.write({"kind": kind, "section": section, **row})
    eps = max(res.epsilon.values()) if res.epsilon else float("nan")
    s.log(f"{label}: val {100 * res.val_acc[-1]:.2f}"
          + (f", held-out {100 * res.test_acc:.2f}" if res.test_acc is not None else "")
          + f", eps {eps:.2f} ({res.accountant}), {res.seconds:.0f}s" + ("" if res.complete else " [incomplete]"))
    return res


def _describe(o: dict) -> str:
    from finetune import describe

    return describe(o)


def section_c(s: Session, bench, env, budget: float) -> None:
    end = time.perf_counter() + budget
    results = []
    for i, (name, g) in enumerate(candidates(s)):
        if i >= 2 and time.perf_counter() > end:
            break
        try:
            o = _settings(s, g, 8.0, env["accountant"])
            res = run_one(s, bench, f"grid: {name}", o, "c", end, report_held_out=False, kind="grid")
        except Exception as exc:  # noqa: BLE001 - one grid point failing (e.g. a missing feature) is a result
            s.log(f"grid: {name}: {type(exc).__name__}: {exc}")
            s.write({"kind": "error", "section": "c", "label": name, "error": f"{type(exc).__name__}: {exc}"[:500]})
            continue
        if res is not None and res.complete:
            results.append((res.val_acc[-1], name, o, res))
    if not results:
        raise RuntimeError("no grid configuration completed")
    val, name, o, res = max(results, key=lambda t: t[0])
    from finetune import held_out

    held_out(bench, res)
    s.chosen = (name, {k: v for k, v in o.items() if k != "target-epsilon"})
    row = res.row()
    row["label"] = f"DP-FL ε = 8, chosen on validation: {name}"
    if s.ceiling_acc is not None:
        row["gap_to_ceiling_pts"] = 100 * (res.test_acc - s.ceiling_acc)
    s.write({"kind": "utility", "section": "c", "chosen": name, **row})
    s.log(f"chosen on validation: {name} (val {100 * val:.2f}); held-out {100 * res.test_acc:.2f}")


def candidates(s: Session) -> list[tuple[str, dict]]:
    """The grid's candidates that ``--candidates`` keeps (1-based positions; all by default)."""
    full = grid(s.quick, s.args.grid)
    if not s.args.candidates:
        return full
    return [full[i - 1] for i in s.args.candidates]


def section_d(s: Session, bench, env, budget: float) -> None:
    if s.args.choose:  # chosen on validation in an earlier session: the grid's candidate at that position
        name, g = grid(s.quick, s.args.grid)[s.args.choose - 1]
        s.chosen = (name, {k: v for k, v in _settings(s, g, 8.0, env["accountant"]).items() if k != "target-epsilon"})
    if s.chosen is None:
        raise RuntimeError("no configuration chosen in section c (or by --choose)")
    end = time.perf_counter() + budget
    name, o = s.chosen
    for eps in s.args.epsilons:
        run_one(s, bench, f"DP-FL ε = {eps:g}: {name}", {**o, "target-epsilon": eps}, "d", end)


def section_e(s: Session, bench, env, budget: float) -> None:
    end = time.perf_counter() + budget
    o = _settings(s, central_dp(s.quick), 8.0, env["accountant"])
    run_one(s, bench, "centralized DP fine-tune ε = 8", o, "e", end, pooled=True)


def section_f(s: Session, bench, env, budget: float) -> None:
    end = time.perf_counter() + budget
    o = _settings(s, {**head_default(s.quick), "grad-sample-mode": "ghost"}, 8.0, env["accountant"])
    o.pop("mixed-precision", None)
    run_one(s, bench, "DP-FL head (CPU default) ε = 8", o, "f", end)


def section_g(s: Session, bench, env, budget: float) -> None:
    """The attacker's crafted post against every clipping mode and precision on this device (bench/clipping_bound.py):
    TF32/bf16 kernels chosen by matrix shape may let one post move the other posts' contributions."""
    from clipping_bound import attack

    from fedpriv.task.features import FeatureDataset

    pd = bench.data("all")
    train = pd.train[bench.regions[0]]
    n = 16 if s.quick else 64
    honest = FeatureDataset(list(train.features[:n]), list(train.labels[:n]))
    for row in attack(pd.split, honest, bench.device, bench.model_name, log=s.log):
        s.write({"kind": "clipping_bound", "section": "g", **row})


def section_h(s: Session, bench, env, budget: float) -> None:
    """A real local DP round of the whole encoder with each Poisson batch cut in drawing order and cut by length
    (bench/padding.py, client/batching.py), with the clipping section a chose (else the H200's fastest)."""
    from padding import measure_rows

    mode = s.dp_settings.get("grad-sample-mode", "bk")
    physicals = [16] if s.quick else sorted({256, int(s.dp_settings.get("physical-batch-size", 512))})
    for row in measure_rows(bench, ["all"], physicals, steps=2, batch=64 if s.quick else 1024, mode=mode, log=s.log):
        s.write({"kind": "padding", "section": "h", **row})


SECTIONS = {"a": section_a, "b": section_b, "c": section_c, "d": section_d, "e": section_e, "f": section_f,
            "g": section_g, "h": section_h}


# =============================================================== summary


def summary(s: Session) -> str:
    from dp_cost import accelerator_table

    env = next((r for r in s.records if r["kind"] == "env"), {})
    lines = [f"# GPU session{' (--quick: tiny subset, NOT a result)' if s.quick else ''}", "",
             f"Device: {env.get('gpu', env.get('device'))}; model {env.get('model')}; torch {env.get('torch')}, opacus {env.get('opacus')}, "
             f"transformers {env.get('transformers')}, peft {env.get('peft')}, dp_accounting {env.get('dp_accounting')}; "
             f"wall {time.perf_counter() - s.t_start:.0f}s of a {s.args.budget:.0f}s budget. Training posts "
             f"{env.get('train_sizes')}, validation {env.get('val_size')} ({env.get('val_from')}), held-out "
             f"{env.get('held_out_size')}. Accountant {env.get('accountant')} (σ from fedpriv's search; ε recomputed "
             f"from each region's history, cross-checked).", ""]
    dp = [r for r in s.records if r["kind"] == "dp_cost"]
    if dp:
        lines += ["## DP cost per step", "", accelerator_table(dp), ""]
        choice = next((r for r in s.records if r["kind"] == "dp_choice"), None)
        if choice:
            lines += [f"DP runs below used: {', '.join(f'{k} = {v}' for k, v in choice.items() if k not in ('kind', 'section', 't'))}", ""]
    bound = [r for r in s.records if r["kind"] == "clipping_bound"]
    if bound:
        from clipping_bound import table

        lines += ["## One crafted post against the clipping bound (units of C; bench/clipping_bound.py)", "",
                  table(bound), ""]
    padding = [r for r in s.records if r["kind"] == "padding"]
    if padding:
        from padding import table as padding_table

        lines += ["## Length-sorted physical batches (one region's local DP round; bench/padding.py)", "",
                  padding_table(padding), ""]
    util = [r for r in s.records if r["kind"] == "utility"]
    if util:
        from finetune import utility_table

        lines += ["## Utility (held-out accuracy; gap to the ceiling is the headline)", "", utility_table(util), ""]
    grid_rows = [r for r in s.records if r["kind"] == "grid"]
    if grid_rows:
        lines += ["## Grid at ε = 8 (validation accuracy after each round; the choice looks only at the last)", "",
                  markdown_table(("configuration", "validation % by round", "wall", "complete"),
                                 [(r["label"], ", ".join(f"{100 * v:.1f}" for v in r["val_acc"]), f"{r['seconds']:.0f}s",
                                   "yes" if r.get("complete", True) else f"no: {r.get('note')}") for r in grid_rows]), ""]
    other = [r for r in s.records if r["kind"] in ("error", "skipped", "section")]
    if other:
        lines += ["## Sections, skips and errors", ""]
        for r in other:
            if r["kind"] == "section":
                lines.append(f"- section {r['section']} ({TITLES[r['section']]}): {r['status']}, {r['seconds']:.0f}s")
            elif r["kind"] == "skipped":
                lines.append(f"- skipped {r['label']}: predicted {r['predicted_s']:.0f}s (budget)")
            else:
                lines.append(f"- error in {r['section']} {r.get('label', '')}: {r['error']}")
    return "\n".join(lines) + "\n"


# =============================================================== main


def plan_only(s: Session, accountant: str) -> int:
    """Compute (and cache in FEDPRIV_CACHE_DIR) every σ the session may ask for, whichever ``--grid`` it runs:
    run on the CPU machine."""
    import gpu_assets
    from fedpriv.privacy.schedule import choose_noise_multiplier, region_schedule
    from finetune import MissingFeature, make_config

    os.environ.setdefault("FEDPRIV_CACHE_DIR", str(s.args.assets / "cache"))
    splits = gpu_assets.load_splits(s.args.assets / gpu_assets.DATA_FILE, limit=256 if s.quick else 0)
    sizes = {r: len(splits.train[r]) for r in splits.regions}
    if s.args.val_from == "train":
        sizes = {r: n - max(1, n // 10) for r, n in sizes.items()}
    todo = [(g, eps, False) for name in GRIDS for _, g in grid(s.quick, name) for eps in (8.0, 3.0, 1.0)]
    todo += [(central_dp(s.quick), 8.0, True), (head_default(s.quick), 8.0, False)]
    n_done = 0
    for o, eps, pooled in todo:
        for phys in ({}, {"physical-batch-size": 256}):  # σ does not depend on the physical batch
            try:
                cfg = make_config({**dp_base(accountant), **o, **phys, "target-epsilon": eps})
            except MissingFeature:
                cfg = make_config({k: v for k, v in {**dp_base(accountant), **o, "target-epsilon": eps}.items()
                                   if k not in ("local-optimizer", "weight-decay", "server-optimizer", "server-momentum",
                                                "server-learning-rate", "mixed-precision")})
            for n in ([sum(sizes.values())] if pooled else sizes.values()):
                t0 = time.perf_counter()
                sigma = choose_noise_multiplier(region_schedule(n, cfg), cfg)
                n_done += 1
                print(f"sigma {sigma:.4f} for eps {eps:g}, N {n}, B {cfg.batch_size}, "
                      + (f"S {cfg.local_steps}, " if cfg.local_steps else f"E {cfg.local_epochs:g}, ")
                      + f"R {cfg.num_server_rounds}, {cfg.accountant} ({time.perf_counter() - t0:.1f}s)", flush=True)
            break
    print(f"{n_done} noise multipliers cached in {os.environ['FEDPRIV_CACHE_DIR']}")
    return 0


def parse_budgets(parser: argparse.ArgumentParser, text: str) -> dict[str, float]:
    """``c=360,d=240`` -> {"c": 360.0, "d": 240.0}; a bad entry is one argparse error line."""
    out: dict[str, float] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, _, value = item.partition("=")
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if key not in BUDGETS or not seconds > 0:
            parser.error(f"--section-budgets {item!r}: expected SECTION=SECONDS with SECTION one of "
                         f"{''.join(BUDGETS)} and SECONDS > 0")
        out[key] = seconds
    return out


def _number_list(kind: type, ok: Callable[[float], bool], expected: str) -> Callable[[str], list]:
    """An argparse type: a comma-separated list of ``kind`` values, each passing ``ok``."""
    def parse(text: str) -> list:
        try:
            out = [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            out = []
        if not out or not all(ok(x) for x in out):
            raise argparse.ArgumentTypeError(f"{text!r}: expected {expected}")
        return out
    return parse


_positions = _number_list(int, lambda i: i >= 1, "1-based positions such as 1,3")
_positive_floats = _number_list(float, lambda e: e > 0, "positive numbers such as 3,1")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="results.jsonl and summary.md go here")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for all sections together (default 480)")
    parser.add_argument("--quick", action="store_true", help="256 posts per split, tiny schedules: a CPU smoke run")
    parser.add_argument("--sections", default="abcdef", help="which sections, in priority order (default abcdef)")
    parser.add_argument("--section-budgets", default="", metavar="K=S,...",
                        help="override sections' budgets in seconds, e.g. c=360,d=240 (defaults: %s)"
                             % ",".join(f"{k}={v}" for k, v in BUDGETS.items()))
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--grid", choices=GRIDS, default="first",
                        help="section c's candidates: the first session's, the longer schedules tried second, "
                             "DP-FedSGD with server Adam (the third and fourth sessions'), or the levers around the "
                             "gpu preset the fourth left untried (fedsgd-tune)")
    parser.add_argument("--candidates", type=_positions, default=[], metavar="I,J",
                        help="section c runs only these candidates of the grid (1-based positions; default all)")
    parser.add_argument("--choose", type=int, default=0, metavar="I",
                        help="section d runs the grid's candidate I (chosen on validation in an earlier session) "
                             "instead of section c's choice")
    parser.add_argument("--epsilons", type=_positive_floats, default=[3.0, 1.0], metavar="E,F",
                        help="the epsilons section d runs the chosen configuration at (default 3,1)")
    parser.add_argument("--assets", type=Path, default=ASSETS, help="the folder prepare_gpu.sh filled (default .gpu)")
    parser.add_argument("--val-from", choices=("local-test", "train"), default="local-test",
                        help="validation = the regions' local test posts (default; never trained on) or 10%% of "
                             "their training posts (the regions then train on the rest)")
    parser.add_argument("--model", choices=("minilm", "tiny"), default=None,
                        help="minilm (default; from ASSETS/model) or tiny (a random 2-layer BERT; the --quick default, "
                             "needs the packaged tokenizer, so CPU machine only)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads when no GPU is used")
    parser.add_argument("--plan-only", action="store_true", help="only compute and cache every sigma (CPU machine)")
    parser.add_argument("--drop-missing-keys", action="store_true",
                        help="TEST ONLY: drop config keys this checkout lacks (e.g. local-optimizer) instead of failing; "
                             "the runs are then not the configurations they are named after")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning OpenMP threads crawl on a loaded CPU
    s = Session(args)
    budgets = {**(QUICK_BUDGETS if args.quick else BUDGETS), **parse_budgets(parser, args.section_budgets)}
    n = len(grid(args.quick, args.grid))
    for flag, i in [("--candidates", max(args.candidates, default=1)), ("--choose", args.choose)]:
        if not 0 <= i <= n:
            parser.error(f"{flag} {i}: expected a position from 1 to {n} (the {args.grid!r} grid's candidates here)")
    if args.plan_only:
        from fedpriv.core.config import ACCOUNTANTS, load_app_defaults

        return plan_only(s, "pld" if "pld" in ACCOUNTANTS else load_app_defaults()["accountant"])
    try:
        bench, env = setup(s)
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001
        s.write({"kind": "error", "section": "setup", "error": traceback.format_exc()[-1500:]})
        s.log(f"setup failed: {type(exc).__name__}: {exc}")
        atomic_write_text(s.out / "summary.md", summary(s))
        return 1
    for key in args.sections:
        budget = min(budgets[key], s.remaining())
        if budget < (5 if args.quick else 15):
            s.write({"kind": "section", "section": key, "status": "not run (global budget spent)", "seconds": 0.0})
            s.log(f"section {key} ({TITLES[key]}): not run, global budget spent")
            continue
        s.log(f"== section {key}: {TITLES[key]} (budget {budget:.0f}s)")
        t0 = time.perf_counter()
        try:
            SECTIONS[key](s, bench, env, budget)
            status = "done"
        except Exception as exc:  # noqa: BLE001 - the next section still runs
            status = f"failed: {type(exc).__name__}: {exc}"[:300]
            s.write({"kind": "error", "section": key, "error": traceback.format_exc()[-1500:]})
            s.log(f"section {key} {status}")
        finally:
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except Exception:  # noqa: BLE001
                pass
        s.write({"kind": "section", "section": key, "status": status, "seconds": time.perf_counter() - t0})
        atomic_write_text(s.out / "summary.md", summary(s))
    text = summary(s)
    atomic_write_text(s.out / "summary.md", text)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
