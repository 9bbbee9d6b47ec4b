#!/usr/bin/env python
"""What differential privacy costs per training step, for fedpriv's model.

all-MiniLM-L6-v2 with mean pooling (fedpriv's default model), real ICWSM-2014
posts padded to 64 tokens (one fixed shape for every configuration), SGD with
momentum, the same number of torch threads everywhere. Measured configurations:

Full forward pass (embeddings + all 6 layers run every step; embeddings frozen),
for ``trainable = top-1`` and ``top-2``:

* ``non-private``     plain SGD on the trainable parameters;
* ``DP hooks``        Opacus DP-SGD, per-sample gradients from hooks (the default);
* ``DP ghost``        Opacus ghost clipping (``grad_sample_mode="ghost"``: per-sample
                      gradient *norms* only, then a second backward pass);
* ``DP LoRA``         ``peft`` LoRA r=8 (alpha 16) on query/value of the trainable
                      layers (``task/lora.py``) + the head, Opacus hooks;
* ``non-private LoRA`` and ``DP LoRA ghost`` for reference.

fedpriv's split model (``task/features.py``): the frozen prefix runs once per post
(features cached), and only :class:`~fedpriv.task.features.ClassifierTop` trains:

* ``trainable = head`` (the default): non-private, DP hooks, DP ghost, per step on
  pre-collated batches, and a whole local round through the real code path
  (:class:`fedpriv.client.trainer.LocalTrainer`: Poisson sampling, ``BatchMemoryManager``,
  collation, the accountant) with ``dp`` on and off;
* ``trainable = top-1`` on cached layer-5 inputs (non-private, DP hooks, DP LoRA);
* the one-time feature extraction cost per post.

Every configuration runs in a fresh subprocess (so its peak memory is its own),
repeated ``--reps`` times in rotated order (so load from other users of the
machine spreads over all configurations); steps/s is the median. Peak memory is
the process's resident high-water mark after model, data and optimizer were set up
(``VmHWM`` after resetting it via ``/proc/self/clear_refs``); "added" is the peak
minus the resident size before the first step.

The LoRA run is a real DP-SGD run through ``LocalTrainer`` (Poisson sampling, sigma
for epsilon = 8): its time, how far the adapters move and the held-out loss before and
after. Whether LoRA's per-sample gradients are right with the pinned Opacus/PEFT
(Opacus issue #820) is not measured here but tested: ``tests/test_per_sample_gradients.py``
and ``tests/test_lora.py``.

Usage: ``python bench/dp_cost.py`` (writes bench/results/dp_cost.md, ~30-40 min
on 2 shared cores) or ``python bench/dp_cost.py --quick`` (< 1 min, tiny model,
prints only).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (RESULTS, PeakRSS, fmt_mib, fmt_rate, fmt_ratio, fmt_s, machine_line,  # noqa: E402
                     markdown_table, median, run_worker, set_threads, worker_main, write_result)

SEQ_LEN = 64
LORA_RANK = 8
LR = 0.05
MOMENTUM = 0.9
SIGMA = 1.0  # timing only: the cost of a DP step does not depend on sigma
CLIP = 1.0

FULL_MODES = ("non-private", "DP hooks", "DP ghost", "non-private LoRA", "DP LoRA", "DP LoRA ghost")
SPLIT_HEAD_MODES = ("non-private", "DP hooks", "DP ghost")
SPLIT_TOP1_MODES = ("non-private", "DP hooks", "DP LoRA")


# =============================================================== accelerator rows (in-process)

CUDA_MODES = ("non-private", "DP ghost", "DP hooks", "DP bk")


def fixed_length_batch(features, labels, batch: int, seq_len: int = SEQ_LEN, offset: int = 0):
    """One physical batch of frozen-prefix features padded/cut to ``seq_len`` tokens (one shape for every mode)."""
    import numpy as np
    import torch

    n = len(labels)
    idx = [(offset + i) % n for i in range(batch)]
    dim = features[0].shape[1]
    hidden = torch.zeros((batch, seq_len, dim), dtype=torch.float32)
    mask = torch.zeros((batch, seq_len), dtype=torch.long)
    for row, i in enumerate(idx):
        f = features[i][:seq_len]
        hidden[row, : f.shape[0]] = torch.from_numpy(np.asarray(f, dtype=np.float32))
        mask[row, : f.shape[0]] = 1
    return {"hidden": hidden, "attention_mask": mask}, torch.tensor([labels[i] for i in idx], dtype=torch.long)


def accelerator_step_rows(templates: dict, features, labels, device, *, physical_batches=(256, 512),
                          precisions=("fp32", "bf16"), modes=CUDA_MODES, budget_s: float = 60.0, steps: int = 10,
                          warmup: int = 3, lr: float = 1e-3, log=print, on_row=None) -> list[dict]:
    """Time one training step of fedpriv's trainable top on ``device`` for every (family, batch, precision, mode).

    ``templates``: family name ("full", "LoRA", "head") -> a ``ClassifierTop`` on ``device`` (deep-copied for
    every configuration, so Opacus' hooks never stack); ``features``: the posts' prefix features, or a dict of
    them by family (the head's are pooled vectors). The step is Adam (what DP fine-tuning uses); DP is Opacus
    with Poisson-rate bookkeeping, noise multiplier SIGMA, clip CLIP. bf16 = ``torch.autocast`` around forward + loss
    (parameters, optimizer state and Opacus' clipping/noise stay float32). Peak memory is
    ``torch.cuda.max_memory_allocated`` since just before the configuration (CUDA only). Configurations run in
    priority order (full before LoRA, the smaller batch first) until ``budget_s`` is spent.
    """
    import copy

    import torch

    cuda = device.type == "cuda"
    t_end = time.perf_counter() + budget_s
    rows: list[dict] = []
    base: dict[tuple, float] = {}
    order = [(fam, b, prec) for b in physical_batches for fam in templates for prec in precisions]
    for fam, batch, prec in order:
        feats = features[fam] if isinstance(features, dict) else features
        data = [fixed_length_batch(feats, labels, batch, offset=k * batch) for k in range(2)]
        data = [({k: v.to(device) for k, v in x.items()}, y.to(device)) for x, y in data]
        for mode in modes:
            if time.perf_counter() > t_end:
                log(f"  dp_cost: time budget spent before {fam} {mode} {prec} batch {batch}")
                return rows
            row = {"family": fam, "mode": mode, "precision": prec, "batch": batch, "device": str(device)}
            module = None
            try:
                module = copy.deepcopy(templates[fam]).train()
                params = [p for p in module.parameters() if p.requires_grad]
                row["params"] = sum(p.numel() for p in params)
                optimizer = torch.optim.Adam(params, lr=lr)
                criterion = torch.nn.CrossEntropyLoss()
                if mode.startswith("DP"):
                    module, optimizer, crit = _private_with(module, optimizer, batch, mode.split()[-1], batch * 64)
                    criterion = crit or criterion
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=prec == "bf16")

                def step(x, y):
                    with autocast:
                        logits = module(**x).logits
                    loss = criterion(logits.float(), y)
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    return loss

                for i in range(warmup):
                    step(*data[i % 2])
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for i in range(steps):
                    loss = step(*data[i % 2])
                loss_value = float(loss.detach())
                if cuda:
                    torch.cuda.synchronize()
                dt = (time.perf_counter() - t0) / steps
                row.update(ms_per_step=1e3 * dt, examples_per_s=batch / dt, loss=loss_value,
                           peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None)
                key = (fam, batch, prec)
                if mode == "non-private":
                    base[key] = dt
                if key in base:
                    row["vs_non_private"] = base[key] / dt
                if (fam, batch, "fp32") in base:
                    row["vs_non_private_fp32"] = base[(fam, batch, "fp32")] / dt
                log(f"  dp_cost {fam} {mode} {prec} batch {batch}: {1e3 * dt:.1f} ms/step"
                    + (f", {row['vs_non_private']:.2f}x non-private" if "vs_non_private" in row else "")
                    + (f", peak {row['peak_gib']:.2f} GiB" if cuda else ""))
            except Exception as exc:  # noqa: BLE001 - one failing mode (e.g. bf16 with hooks) is a result
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                log(f"  dp_cost {fam} {mode} {prec} batch {batch}: {row['error']}")
            finally:
                if module is not None and hasattr(module, "_close"):
                    try:
                        module._close()
                    except Exception:  # noqa: BLE001
                        pass
                del module
                if cuda:
                    torch.cuda.empty_cache()
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


def _private_with(module, optimizer, batch: int, how: str, n_examples: int):
    """Opacus around a given optimizer (``how``: hooks, ghost, or fedpriv's book-keeping ``bk``);
    returns (module, optimizer, criterion or None)."""
    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(torch.zeros(n_examples, 1)), batch_size=batch,
                        generator=torch.Generator())  # sets q = batch / n
    engine = PrivacyEngine(accountant="rdp")
    kwargs = dict(module=module, optimizer=optimizer, data_loader=loader, noise_multiplier=SIGMA,
                  max_grad_norm=CLIP, poisson_sampling=True)
    if how == "bk":
        from fedpriv.client import book_keeping

        module, optimizer, criterion, _ = book_keeping.make_private(
            module, optimizer, loader, engine.accountant, noise_multiplier=SIGMA, max_grad_norm=CLIP,
            noise_generator=torch.Generator(device=next(module.parameters()).device))
        return module, optimizer, criterion
    if how == "ghost":
        module, optimizer, criterion, _ = engine.make_private(**kwargs, criterion=torch.nn.CrossEntropyLoss(),
                                                              grad_sample_mode="ghost")
        return module, optimizer, criterion
    module, optimizer, _ = engine.make_private(**kwargs)
    return module, optimizer, None


def accelerator_table(rows: list[dict]) -> str:
    """Markdown of :func:`accelerator_step_rows`."""
    out = []
    for r in rows:
        if "error" in r:
            out.append((r["family"], r["batch"], r["precision"], r["mode"], "failed: " + r["error"][:120], "-", "-", "-",
                        "-", r["device"]))
            continue
        out.append((r["family"], r["batch"], r["precision"], r["mode"], f"{r['ms_per_step']:.1f}",
                    f"{r['examples_per_s']:,.0f}", f"**{fmt_ratio(r.get('vs_non_private'))}**",
                    fmt_ratio(r.get("vs_non_private_fp32")),
                    f"{r['peak_gib']:.2f} GiB" if r.get("peak_gib") is not None else "-", r["device"]))
    return markdown_table(("model", "physical batch", "precision", "mode", "ms/step", "examples/s",
                           "vs non-private (same precision)", "vs non-private fp32", "peak GPU memory", "device"), out)


def accelerator_main(args) -> int:
    """``--device cuda``: the accelerator rows on real posts, all-MiniLM trainable = all, full and LoRA r=8."""
    import torch

    torch.set_float32_matmul_precision("high")
    device = torch.device("cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and device.type != "cuda":
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    from fedpriv.task.encoding import EncodedDataset
    from fedpriv.task.features import SplitClassifier
    from fedpriv.task.model import build_model, load_tokenizer

    model_name = "tiny" if args.quick else "minilm"
    texts, labels = _texts(64 if args.quick else 1024)
    enc = load_tokenizer()(texts, truncation=True, max_length=SEQ_LEN)
    templates, feats = {}, {}
    families = {"full": ("all", 0), "LoRA": ("all", LORA_RANK), "head": ("head", 0)}
    for fam in args.families.split(","):
        trainable, rank = families[fam]
        model = build_model(model_name, trainable, 42, "mean", rank).train()
        split = SplitClassifier(model, trainable)
        split.model.to(device)
        feats[fam] = split.features(EncodedDataset(list(enc["input_ids"]), labels), device).features
        templates[fam] = split.top
    batches = tuple(int(b) for b in args.physical_batches.split(",")) if args.physical_batches else \
        ((8, 16) if args.quick else (256, 512))
    steps = args.steps or (2 if args.quick else 10)
    rows = accelerator_step_rows(templates, feats, labels, device, physical_batches=batches,
                                 precisions=tuple(args.precisions.split(",")),
                                 budget_s=20 if args.quick else 1800, steps=steps,
                                 warmup=1 if args.quick else min(3, steps), log=lambda m: print(m, file=sys.stderr, flush=True))
    body = "\n".join([f"Machine: {machine_line([str(device)])}.", "",
                      f"fedpriv's trainable top (full = `trainable = all`: all 6 encoder layers + head over frozen "
                      f"embeddings; LoRA r={LORA_RANK} on query/value of all layers + head; head = the CPU default's "
                      f"head on pooled vectors), {SEQ_LEN} tokens, Adam; DP = Opacus hooks or ghost clipping, or "
                      f"fedpriv's book-keeping (bk), noise {SIGMA}, clip {CLIP}; bf16 = autocast around forward and "
                      f"loss.", "",
                      accelerator_table(rows)])
    out = args.out if args.out is not None else (None if args.quick else RESULTS / "dp_cost_cuda.md")
    write_result("dp_cost_cuda", "Cost of differential privacy per training step on an accelerator", body, out)
    return 0


# =============================================================== worker side


def _texts(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    import numpy as np

    from fedpriv.core.config import default_data_dir
    from fedpriv.task.data import load_corpus

    try:
        corpus = load_corpus(default_data_dir())
    except Exception:  # noqa: BLE001 - no prepared data: synthetic posts of similar length
        rng = np.random.default_rng(seed)
        words = "good bad great awful movie service love hate fine product really not very the a is".split()
        return ([" ".join(rng.choice(words, size=rng.integers(5, 60))) for _ in range(n)],
                [int(x) for x in rng.integers(0, 2, n)])
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(corpus), size=min(n, len(corpus)), replace=False)
    return [corpus[i].text for i in idx], [corpus[i].label for i in idx]


def _padded_batches(tokenizer, texts, labels, batch: int, count: int):
    import torch

    out = []
    for b in range(count):
        sl = slice(b * batch, (b + 1) * batch)
        enc = tokenizer(texts[sl], padding="max_length", truncation=True, max_length=SEQ_LEN, return_tensors="pt")
        n = enc["input_ids"].shape[0]
        pos = torch.arange(SEQ_LEN).unsqueeze(0).expand(n, -1).contiguous()
        out.append(({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "position_ids": pos},
                    torch.tensor(labels[sl], dtype=torch.long)))
    return out


def _build_full(spec):
    from fedpriv.task.model import build_model, count_trainable

    model = build_model(spec["model"], spec["trainable"], 42, "mean")
    if "LoRA" in spec["mode"]:
        from fedpriv.task.lora import apply_lora

        apply_lora(model, spec["trainable"], LORA_RANK, seed=42)
    model.train()
    return model, count_trainable(model)


def _timed_loop(step, batches, warmup: int, min_steps: int, min_seconds: float, max_steps: int):
    """Run ``warmup`` steps, then at least ``min_steps`` and ``min_seconds`` of timed steps."""
    losses = []
    for i in range(warmup):
        losses.append(step(*batches[i % len(batches)]))
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while n < max_steps and (n < min_steps or time.perf_counter() - t0 < min_seconds):
        losses.append(step(*batches[(warmup + n) % len(batches)]))
        n += 1
    return n / (time.perf_counter() - t0), (time.process_time() - c0) / n, losses


def worker_step(spec: dict) -> dict:
    """One configuration: steps/s and memory of the training step."""
    set_threads(spec["threads"])
    import torch

    from fedpriv.task.model import load_tokenizer

    family, mode, batch = spec["family"], spec["mode"], spec["batch"]
    tokenizer = load_tokenizer()
    n_batches = 4
    texts, labels = _texts(batch * n_batches)

    if family == "full":
        model, n_params = _build_full(spec)
        batches = _padded_batches(tokenizer, texts, labels, batch, n_batches)
        forward = lambda m, inputs: m(**inputs).logits  # noqa: E731
        module = model
    else:  # split: precomputed prefix features, only ClassifierTop trains
        from fedpriv.task.features import SplitClassifier

        model, n_params = _build_full(spec if spec["trainable"] != "head" else {**spec, "mode": "non-private"})
        split = SplitClassifier(model, spec["trainable"])
        raw = _padded_batches(tokenizer, texts, labels, batch, n_batches)
        batches = []
        with torch.no_grad():
            for inputs, y in raw:
                hidden = split.prefix(**inputs)
                mask = inputs["attention_mask"] if not split.prefix.pool_here else torch.ones(hidden.shape[:2], dtype=torch.long)
                batches.append(({"hidden": hidden.float(), "attention_mask": mask}, y))
        module = split.top
        module.train()
        forward = lambda m, inputs: m(**inputs).logits  # noqa: E731

    params = [p for p in module.parameters() if p.requires_grad]
    private = mode.startswith("DP")
    ghost = "ghost" in mode
    if private:
        optimizer = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
        module, optimizer, criterion = _private_with(module, optimizer, batch, ghost, batch * 64)
    else:
        optimizer = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
        criterion = torch.nn.CrossEntropyLoss()
    loss_fn = criterion if criterion is not None else torch.nn.CrossEntropyLoss()

    def step(inputs, y):
        loss = loss_fn(forward(module, inputs), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    mem = PeakRSS().start()
    rate, cpu, losses = _timed_loop(step, batches, spec["warmup"], spec["min_steps"], spec["min_seconds"],
                                    spec["max_steps"])
    peak, added = mem.stop()
    return {"steps_per_s": rate, "cpu_per_step": cpu, "peak_mib": peak, "added_mib": added, "params": n_params,
            "mem_method": mem.method, "loss_first": losses[0], "loss_last": losses[-1]}


def worker_round(spec: dict) -> dict:
    """One local round through LocalTrainer (the ClientApp's code path), dp on or off, head features."""
    set_threads(spec["threads"])
    import numpy as np
    import torch

    from fedpriv.client.trainer import LocalTrainer
    from fedpriv.core.config import resolve_config
    from fedpriv.task.features import FeatureDataset, SplitClassifier
    from fedpriv.task.model import build_model

    batch, n = spec["batch"], spec["examples"]
    _, cfg = resolve_config({"dp": spec["mode"] != "non-private", "batch-size": batch, "physical-batch-size": batch,
                             "grad-sample-mode": "ghost" if spec["mode"] == "DP ghost" else "hooks",
                             "local-epochs": 1.0, "num-server-rounds": 1, "noise-multiplier": SIGMA,
                             "max-grad-norm": CLIP, "learning-rate": LR, "momentum": MOMENTUM,
                             "model": spec["model"], "trainable": "head", "secure-aggregation": False})
    split = SplitClassifier(build_model(cfg.model, "head", cfg.seed, cfg.pooling), "head")
    dim = split.model.config.hidden_size
    rng = np.random.default_rng(0)
    data = FeatureDataset([rng.standard_normal((1, dim)).astype(np.float16) for _ in range(n)],
                          [int(x) for x in rng.integers(0, 2, n)])
    trainer = LocalTrainer(split, data, cfg, torch.device("cpu"))
    trainer.train([], cfg.noise_multiplier, seed=1)  # warm-up round
    mem = PeakRSS().start()
    t0, c0 = time.perf_counter(), time.process_time()
    rounds = 0
    while rounds < 2 or time.perf_counter() - t0 < spec["min_seconds"]:
        result = trainer.train([], cfg.noise_multiplier, seed=2 + rounds)
        rounds += 1
    elapsed = time.perf_counter() - t0
    cpu = (time.process_time() - c0) / (rounds * result.steps)
    peak, added = mem.stop()
    return {"steps_per_s": rounds * result.steps / elapsed, "cpu_per_step": cpu, "peak_mib": peak, "added_mib": added,
            "params": sum(p.numel() for p in split.top.parameters() if p.requires_grad), "mem_method": mem.method,
            "round_s": elapsed / rounds, "steps": result.steps}


def worker_extract(spec: dict) -> dict:
    """One-time cost of the frozen prefix (trainable = head): seconds per post."""
    set_threads(spec["threads"])
    import torch

    from fedpriv.task.encoding import encode
    from fedpriv.task.data import Example
    from fedpriv.task.features import SplitClassifier, compute_features
    from fedpriv.task.model import build_model, load_tokenizer

    tokenizer = load_tokenizer()
    texts, labels = _texts(spec["examples"], seed=1)
    split = SplitClassifier(build_model(spec["model"], spec["trainable"], 42, "mean"), spec["trainable"])
    data = encode([Example(str(i), t, y, "x", 1.0) for i, (t, y) in enumerate(zip(texts, labels))], tokenizer, SEQ_LEN)
    compute_features(split.prefix, data, torch.device("cpu"), batch_size=64)  # warm-up
    mem = PeakRSS().start()
    t0 = time.perf_counter()
    compute_features(split.prefix, data, torch.device("cpu"), batch_size=64)
    real = (time.perf_counter() - t0) / len(data)
    padded = _padded_batches(tokenizer, texts, labels, 64, max(1, len(texts) // 64))
    t0 = time.perf_counter()
    with torch.no_grad():
        for inputs, _ in padded:
            split.prefix(**inputs)
    pad = (time.perf_counter() - t0) / (64 * len(padded))
    peak, added = mem.stop()
    mean_len = sum(len(x) for x in data.input_ids) / len(data)
    return {"s_per_post": real, "s_per_post_pad64": pad, "mean_tokens": mean_len, "peak_mib": peak,
            "added_mib": added}


def worker_lora_run(spec: dict) -> dict:
    """A real DP-SGD run with LoRA through LocalTrainer: its time, held-out loss before/after, adapter change.

    Measurement only. Whether Opacus computes LoRA's per-sample gradients right with the pinned
    Opacus/peft (issue #820) is a test: ``tests/test_per_sample_gradients.py`` and ``tests/test_lora.py``.
    """
    set_threads(spec["threads"])
    import copy

    import numpy as np
    import torch

    from fedpriv.client.trainer import LocalTrainer
    from fedpriv.core.config import resolve_config
    from fedpriv.privacy.schedule import choose_noise_multiplier, region_schedule
    from fedpriv.task.data import Example
    from fedpriv.task.encoding import encode
    from fedpriv.task.features import SplitClassifier, evaluate_top
    from fedpriv.task.lora import adapter_names, apply_lora
    from fedpriv.task.model import build_model, get_trainable, load_tokenizer

    tokenizer = load_tokenizer()
    model_name = spec["model"]
    n_train, n_test = spec["train_examples"], spec["test_examples"]
    texts, labels = _texts(n_train + n_test, seed=4)
    examples = [Example(str(i), t, lab, "x", 1.0) for i, (t, lab) in enumerate(zip(texts, labels))]
    model = build_model(model_name, "top-1", 42, "mean")
    apply_lora(model, "top-1", LORA_RANK, seed=42)
    split = SplitClassifier(model, "top-1")
    train = split.features(encode(examples[:n_train], tokenizer, SEQ_LEN), torch.device("cpu"))
    test = split.features(encode(examples[n_train:], tokenizer, SEQ_LEN), torch.device("cpu"))
    start = copy.deepcopy(get_trainable(model))
    names = adapter_names(model)
    split.top.train()  # from_pretrained returns eval mode; Opacus only records activations in training mode

    # a real DP-SGD run: Poisson batches, sigma from fedpriv's search for epsilon = 8 over the run
    loss0, acc0 = evaluate_top(split.top, test, torch.device("cpu"))
    _, cfg = resolve_config({"model": model_name, "trainable": "top-1", "secure-aggregation": False,
                             "num-server-rounds": 1, "dp": True, "batch-size": spec["batch"],
                             "physical-batch-size": spec["batch"], "local-epochs": spec["epochs"],
                             "learning-rate": spec["lr"], "momentum": spec.get("momentum", 0.9), "max-grad-norm": 1.0,
                             "target-epsilon": 8.0, "noise-multiplier": 0.0})
    sigma = choose_noise_multiplier(region_schedule(len(train), cfg), cfg)
    t0 = time.perf_counter()
    result = LocalTrainer(split, train, cfg, torch.device("cpu")).train([], sigma, seed=7)
    dp_run_s = time.perf_counter() - t0
    loss1, acc1 = evaluate_top(split.top, test, torch.device("cpu"))
    after = get_trainable(model)
    return dict(dp_run_s=dp_run_s, sigma=sigma, steps=result.steps, loss_before=loss0, loss_after=loss1,
                acc_before=acc0, acc_after=acc1, train_loss=result.loss,
                adapter_change={k.split("bert.encoder.")[-1]: float(np.abs(after[k] - start[k]).max()) for k in names},
                adapter_norm={k.split("bert.encoder.")[-1]: float(np.linalg.norm(after[k])) for k in names},
                trainable_params=sum(v.size for v in after.values()),
                full_top1_params=sum(p.numel() for p in build_model(model_name, "top-1", 42, "mean").parameters()
                                     if p.requires_grad))


def worker(spec: dict) -> dict:
    return {"step": worker_step, "round": worker_round, "extract": worker_extract,
            "lora": worker_lora_run}[spec["kind"]](spec)


# =============================================================== driver side


def plan(quick: bool, trainables: tuple[str, ...] = ("top-1", "top-2")) -> tuple[list[dict], dict, dict]:
    """The configurations; --quick runs the same code on the tiny model, batch 8, top-1 only.

    Batch 32 and 64 for everything; the split head (the default configuration) also at its default batch 256.
    """
    model = "tiny" if quick else "minilm"
    batches = (8,) if quick else (32, 64, 256)
    trainables = ("top-1",) if quick else trainables
    timing = dict(warmup=1, min_steps=2, min_seconds=0.0, max_steps=2) if quick else \
        dict(warmup=2, min_steps=5, min_seconds=6.0, max_steps=60)
    split_timing = dict(warmup=3, min_steps=5, min_seconds=0.0, max_steps=5) if quick else \
        dict(warmup=20, min_steps=100, min_seconds=5.0, max_steps=100_000)
    configs = []
    for batch in batches:
        head_only = batch == 256
        for trainable in () if head_only else trainables:
            for mode in FULL_MODES:
                configs.append(dict(kind="step", family="full", trainable=trainable, mode=mode, batch=batch,
                                    model=model, **timing))
        for mode in SPLIT_HEAD_MODES:
            configs.append(dict(kind="step", family="split", trainable="head", mode=mode, batch=batch, model=model,
                                **split_timing))
        for mode in ("non-private", "DP hooks", "DP ghost"):
            configs.append(dict(kind="round", family="round", trainable="head", mode=mode, batch=batch, model=model,
                                examples=128 if quick else 8192, min_seconds=0.0 if quick else 5.0))
        for mode in () if head_only else SPLIT_TOP1_MODES:
            configs.append(dict(kind="step", family="split", trainable="top-1", mode=mode, batch=batch, model=model,
                                **timing))
    extract = dict(kind="extract", model=model, trainable="head", examples=64 if quick else 1024)
    lora = dict(kind="lora", model=model, train_examples=128 if quick else 2048, test_examples=64 if quick else 512,
                batch=32 if quick else 256, epochs=1.0 if quick else 8.0, lr=0.5, momentum=0.0)
    return configs, extract, lora


def key(c: dict) -> tuple:
    return (c["family"], c["trainable"], c["mode"], c["batch"])


def lora_section(lora: dict, lora_spec: dict) -> list[str]:
    """The LoRA DP run as Markdown bullets."""
    lora_lines: list[str] = []
    if "error" in lora:
        lora_lines.append(f"LoRA DP run failed: {lora['error']}")
    else:
        ch = lora["adapter_change"]
        lora_lines += [
            f"- Real DP-SGD run through `LocalTrainer` (split top-1 + LoRA r={LORA_RANK}, {lora_spec['train_examples']} "
            f"posts, Poisson batch {lora_spec['batch']}, {lora_spec['epochs']:g} epochs = {lora['steps']} steps, "
            f"lr {lora_spec['lr']}, momentum {lora_spec.get('momentum', 0.9)}, C = 1, sigma = {lora['sigma']:.3f} from the planner for epsilon = 8, "
            f"delta = 1e-5; {fmt_s(lora['dp_run_s'])}): held-out loss **{lora['loss_before']:.4f} -> "
            f"{lora['loss_after']:.4f}**, accuracy {100 * lora['acc_before']:.1f}% -> {100 * lora['acc_after']:.1f}% "
            f"({lora_spec['test_examples']} held-out posts).",
            "- Adapter change (max |after - before|): " + ", ".join(f"`{k}` {v:.3g}" for k, v in ch.items()) + ".",
            f"- Trainable (= transmitted) parameters: {lora['trainable_params']:,} with LoRA vs "
            f"{lora['full_top1_params']:,} for full top-1 ({lora['full_top1_params'] / lora['trainable_params']:.1f}x "
            f"smaller update).",
            "- Correctness (Opacus issue #820: per-sample adapter gradients vs a per-example loop, a noiseless DP "
            "step vs the plain step, the merged export) is checked by the tests `tests/test_per_sample_gradients.py` "
            "and `tests/test_lora.py`, not here.",
        ]
    return lora_lines


def lora_only(script: Path, lora_spec: dict, args, out: Path | None) -> int:
    """Just the LoRA DP run, in a fresh process, as its own report."""
    started = time.time()
    lora = run_worker(script, lora_spec, timeout=1800) if not args.quick else worker(lora_spec)
    body = "\n".join([
        "Generated by `python bench/dp_cost.py --lora-only`; do not edit by hand.",
        "",
        f"Machine: {machine_line([f'{args.threads} torch threads'])}. Total run time {(time.time() - started) / 60:.0f} min.",
        "",
        f"{'a tiny random BERT (--quick)' if args.quick else 'all-MiniLM-L6-v2'} (mean pooling), `peft` LoRA r={LORA_RANK}, alpha {2 * LORA_RANK}, query+value of the top "
        f"encoder layer, head trains in full (`task/lora.py`, what `lora-rank = {LORA_RANK}` with `trainable = top-1` "
        f"runs); real ICWSM-2014 posts padded to {SEQ_LEN} tokens.",
        "",
        *lora_section(lora, lora_spec),
    ])
    write_result("dp_cost_lora", f"A DP run with LoRA, Opacus {__import__('opacus').__version__} + peft "
                 f"{__import__('peft').__version__}", body, out)
    return 0 if "error" not in lora else 1


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if worker_main(argv, worker):
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 repetition, batch 8: a < 1 min smoke run")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per configuration (default 3; quick 1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lora-only", action="store_true",
                        help="only the LoRA DP run (a few minutes) -> bench/results/dp_cost_lora.md "
                             "(LoRA correctness, Opacus #820, is tests/test_per_sample_gradients.py)")
    parser.add_argument("--trainables", default="top-1,top-2",
                        help="full-forward trainable sets to measure (default top-1,top-2)")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the Markdown here (default bench/results/dp_cost.md; nothing for --quick)")
    parser.add_argument("--device", choices=("cpu-processes", "auto", "cpu", "cuda"), default="cpu-processes",
                        help="cpu-processes (default): the CPU study in fresh processes; cuda / auto / cpu: the "
                             "in-process accelerator rows (trainable = all, full and LoRA; non-private, ghost, hooks; "
                             "fp32 and bf16; peak GPU memory) -> bench/results/dp_cost_cuda.md")
    parser.add_argument("--physical-batches", default=None,
                        help="accelerator rows: comma-separated physical batches (default 256,512; quick 8,16)")
    parser.add_argument("--precisions", default="fp32,bf16", help="accelerator rows: fp32 and/or bf16")
    parser.add_argument("--steps", type=int, default=None, help="accelerator rows: timed steps (default 10; quick 2)")
    parser.add_argument("--families", default="full,LoRA",
                        help="accelerator rows: full (trainable = all), LoRA (r=8, all layers), head (pooled vectors)")
    args = parser.parse_args(argv)
    bad = [f for f in args.families.split(",") if f not in ("full", "LoRA", "head")]
    if bad:
        parser.error(f"--families {args.families!r}: expected a comma-separated subset of full, LoRA, head")
    if args.device != "cpu-processes":
        set_threads(args.threads)
        return accelerator_main(args)
    reps = args.reps or (1 if args.quick else 3)
    out = args.out if args.out is not None else (None if args.quick else RESULTS / "dp_cost.md")
    script = Path(__file__).resolve()
    configs, extract_spec, lora_spec = plan(args.quick, tuple(args.trainables.split(",")))
    for c in configs + [extract_spec, lora_spec]:
        c["threads"] = args.threads

    isolate = not args.quick  # --quick: everything in this process (fast; memory figures then overlap)

    def run(spec: dict, timeout: float) -> dict:
        if isolate:
            return run_worker(script, spec, timeout=timeout)
        try:
            return worker(spec)
        except Exception as exc:  # noqa: BLE001 - report, as run_worker does
            return {"error": f"{type(exc).__name__}: {exc}"[:400]}

    if args.lora_only:
        return lora_only(script, lora_spec, args, None if args.quick and args.out is None else
                         (args.out or RESULTS / "dp_cost_lora.md"))

    started = time.time()
    results: dict[tuple, list[dict]] = {}
    for rep in range(reps):
        shift = (rep * len(configs)) // reps
        for i, c in enumerate(configs[shift:] + configs[:shift]):
            r = run(c, 900)
            results.setdefault(key(c), []).append(r)
            status = r.get("error") or f"{r['steps_per_s']:.3g} steps/s, peak {r['peak_mib']:.0f} MiB"
            print(f"[rep {rep + 1}/{reps} {i + 1}/{len(configs)}] {key(c)}: {status}", file=sys.stderr, flush=True)
    extract = run(extract_spec, 900)
    lora = run(lora_spec, 1800)
    elapsed = time.time() - started

    def agg(k):
        rs = [r for r in results.get(k, []) if "error" not in r]
        if not rs:
            errs = [r["error"] for r in results.get(k, [])]
            return None, errs[0] if errs else "not run"
        return {"steps_per_s": median([r["steps_per_s"] for r in rs]),
                "cpu_per_step": median([r["cpu_per_step"] for r in rs]),
                "spread": (min(r["steps_per_s"] for r in rs), max(r["steps_per_s"] for r in rs)),
                "peak_mib": median([r["peak_mib"] for r in rs]), "added_mib": median([r["added_mib"] for r in rs]),
                "params": rs[0]["params"], "method": rs[0]["mem_method"], "n": len(rs)}, None

    rows, errors = [], []
    labels = {"full": "full forward", "split": "split (cached features)", "round": "split, LocalTrainer round"}
    batches = sorted({c["batch"] for c in configs})
    for batch in batches:
        for c in [c for c in configs if c["batch"] == batch]:
            a, err = agg(key(c))
            base_mode = "non-private"
            b, _ = agg((c["family"], c["trainable"], base_mode, batch))
            if a is None:
                errors.append(f"{labels[c['family']]} {c['trainable']} {c['mode']} batch {batch}: {err}")
                rows.append((labels[c["family"]], c["trainable"], c["mode"], batch) + ("failed",) + ("-",) * 7)
                continue
            ratio = a["steps_per_s"] / b["steps_per_s"] if b else float("nan")
            cpu_ratio = b["cpu_per_step"] / a["cpu_per_step"] if b else float("nan")
            lo, hi = a["spread"]
            rows.append((labels[c["family"]], c["trainable"], c["mode"], batch,
                         f"{fmt_rate(a['steps_per_s'])} ({fmt_rate(lo)}-{fmt_rate(hi)})",
                         fmt_rate(a["steps_per_s"] * batch), f"**{fmt_ratio(ratio)}**", fmt_s(a["cpu_per_step"]),
                         fmt_ratio(cpu_ratio), fmt_mib(a["peak_mib"]), fmt_mib(a["added_mib"]), f"{a['params']:,}"))
    table = markdown_table(("configuration", "trainable", "mode", "batch", "steps/s (min-max)", "examples/s",
                            "vs non-private", "CPU time/step", "vs non-private (CPU)", "peak RSS",
                            "added by training", "trainable params"), rows)

    # the goal: recommended configuration (split head) DP vs non-private, step and round
    goal_lines = []
    for batch in batches:
        for fam, what in (("split", "per step"), ("round", "whole LocalTrainer round")):
            a, _ = agg((fam, "head", "DP hooks", batch))
            b, _ = agg((fam, "head", "non-private", batch))
            g, _ = agg((fam, "head", "DP ghost", batch))
            if a and b:
                line = (f"batch {batch}, {what}: Opacus DP with per-sample hooks (`grad-sample-mode = hooks`) "
                        f"**{fmt_ratio(a['steps_per_s'] / b['steps_per_s'])}** of non-private")
                if g:
                    line += (f"; Opacus ghost clipping (`grad-sample-mode = ghost`, the default) "
                             f"**{fmt_ratio(g['steps_per_s'] / b['steps_per_s'])}**")
                goal_lines.append(f"- {line}")
    for batch in batches:  # what the split buys: DP on cached features vs the full forward pass, top-1
        s, _ = agg(("split", "top-1", "DP hooks", batch))
        f, _ = agg(("full", "top-1", "DP hooks", batch))
        h, _ = agg(("split", "head", "DP hooks", batch))
        if s and f and h:
            goal_lines.append(f"- batch {batch}: DP top-1 on cached features is {fmt_ratio(s['steps_per_s'] / f['steps_per_s'])} "
                              f"the speed of DP top-1 over the full forward pass; DP head (the default) is "
                              f"{h['steps_per_s'] / f['steps_per_s']:,.0f}x.")

    ex_lines = []
    if "error" not in extract:
        ex_lines.append(f"One-time feature extraction (frozen prefix = the whole encoder + mean pooling, `trainable = "
                        f"head`), {extract_spec['examples']} real posts (mean {extract['mean_tokens']:.1f} tokens, "
                        f"length-sorted batches of 64 as `compute_features` does): **{fmt_s(extract['s_per_post'])} per "
                        f"post**; padded to {SEQ_LEN} tokens: {fmt_s(extract['s_per_post_pad64'])} per post. "
                        f"Peak RSS {fmt_mib(extract['peak_mib'])}. Cached on the region's disk, so it is paid once per "
                        f"post and model, not per round.")
        for batch in batches:
            h, _ = agg(("split", "head", "DP hooks", batch))
            f, _ = agg(("full", "top-1", "DP hooks", batch))
            if h and f:
                ex_lines.append(f"At batch {batch}, one DP epoch over N posts costs N x {fmt_s(extract['s_per_post'])} "
                                f"(extraction, once) + N x {fmt_s(1 / (h['steps_per_s'] * batch))} (training) with the "
                                f"split head, vs N x {fmt_s(1 / (f['steps_per_s'] * batch))} per epoch for DP top-1 "
                                f"over the full forward pass.")
    else:
        ex_lines.append(f"Feature extraction failed: {extract['error']}")

    lora_lines = lora_section(lora, lora_spec)

    body = "\n".join([
        "Generated by `python bench/dp_cost.py`; do not edit by hand.",
        "",
        f"Machine: {machine_line([f'{args.threads} torch threads'])}. Total run time {elapsed / 60:.0f} min.",
        "",
        f"all-MiniLM-L6-v2, mean pooling (fedpriv's default model), real ICWSM-2014 posts padded to {SEQ_LEN} tokens, "
        f"SGD lr {LR} momentum {MOMENTUM}; DP: Opacus, noise multiplier {SIGMA}, clipping norm {CLIP}, RDP accountant "
        f"(the cost of a step does not depend on sigma). LoRA: `peft` r={LORA_RANK}, alpha {2 * LORA_RANK}, "
        f"query+value of the trainable layers, head trains in full (`task/lora.py`). Each configuration ran in a fresh "
        f"{'process' if isolate else 'process (--quick: all in one process, so memory figures overlap)'}, "
        f"{reps} times in rotated order; steps/s is the median (min-max over repetitions). "
        f"'vs non-private' = steps/s over the non-private steps/s of the same configuration, trainable set and batch "
        f"*in this run* (wall clock); 'CPU time/step' = process CPU seconds per step (all threads; less sensitive to "
        f"other load on the machine than wall time) and its ratio, non-private CPU/step over this CPU/step. Peak RSS = resident high-water mark of that process (model + data + training; measured "
        f"as {next((a['method'] for a in (agg(key(c))[0] for c in configs) if a), '?')}); 'added by training' = peak "
        f"minus the resident size just before the first step. 'split, LocalTrainer round' = whole local rounds of "
        f"{next(c['examples'] for c in configs if c['kind'] == 'round')} cached head features "
        f"through `fedpriv.client.trainer.LocalTrainer` (DataLoader, Poisson sampling, BatchMemoryManager, collation, "
        f"PrivacyEngine setup, accountant), the ClientApp's code path; steps/s = logical steps per second.",
        "",
        "## Steps per second and memory",
        "",
        table,
        "",
        "## Recommended configuration (split model, `trainable = head`): the goal DP >= 0.8x non-private",
        "",
        *goal_lines,
        "",
        "## One-time feature extraction",
        "",
        *[f"{ln}\n" for ln in ex_lines],
        "## A DP run with LoRA, Opacus "
        f"{__import__('opacus').__version__} + peft {__import__('peft').__version__}",
        "",
        *lora_lines,
        *(["", "## Failures", ""] + [f"- {e}" for e in errors] if errors else []),
    ])
    write_result("dp_cost", "Cost of differential privacy per training step", body, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
