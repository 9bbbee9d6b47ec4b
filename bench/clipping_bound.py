#!/usr/bin/env python
"""Does one post move a DP step by more than the clipping norm *on this device*? The attacker test, measured.

``tests/adversary/test_clipping_bound.py`` asserts the bound on 2 CPU cores with the tiny model. What it cannot
see from there: on a GPU, TF32 and bf16 matmuls round, and the kernel cuBLAS picks depends on the matrices'
shapes, so adding one post to a batch can change how the *other* posts' gradients round. Each post's own
clipped contribution still has norm ≤ C; the other posts' part of the sum moving is the excess. This script runs
the same attack through the real :class:`~fedpriv.client.trainer.LocalTrainer` on any device and model and
prints, per clipping mode and precision, both numbers in units of C:

* ``influence``: ‖sum(D ∪ {post}) − sum(D)‖ / C, the bound DP-SGD's guarantee rests on (≤ 1);
* ``others moved``: ‖sum(D ∪ {post}) − sum({post}) − sum(D)‖ / C, the rounding cross-talk (0 in exact arithmetic).

The attacker's post is an honest post's features x 100 with the other label; σ = 0, q = 1 (every post in the
step), one physical batch, dropout off (so only the batch's shape differs between the runs), one SGD step of lr
1000 so the update *is* −lr x the clipped sum over the batch. ``hooks`` under bf16 is refused by the config and
measured anyway (forced), to show what the refusal prevents.

Usage: ``python bench/clipping_bound.py`` (tiny model, CPU, seconds) or ``--model minilm --device cuda``;
``bench/gpu_session.py`` section g runs it on the GPU machine with real posts.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line, markdown_table, write_result  # noqa: E402

CLIP = 0.05
LR = 1000.0
# (grad-sample-mode, mixed-precision, accepted by the config)
CASES = (("hooks", "off", True), ("ghost", "off", True), ("bk", "off", True), ("bk", "bf16", True),
         ("hooks", "bf16", False))


def clipped_sum(split, data, device, mode: str, precision: str, model_name: str):
    """The clipped gradient sum one noiseless DP step over all of ``data`` releases (a flat float64 array)."""
    import numpy as np
    import torch

    from fedpriv.client.trainer import LocalTrainer
    from fedpriv.core.config import resolve_config
    from fedpriv.task.model import get_trainable

    _, cfg = resolve_config({"model": model_name, "trainable": "all", "grad-sample-mode": mode, "dp": True,
                             "mixed-precision": "off", "batch-size": len(data), "physical-batch-size": len(data),
                             "local-steps": 1, "local-optimizer": "sgd", "learning-rate": LR, "momentum": 0.0,
                             "weight-decay": 0.0, "max-grad-norm": CLIP, "secure-aggregation": False})
    cfg = dataclasses.replace(cfg, mixed_precision=precision)  # hooks + bf16: past the config's refusal
    split = copy.deepcopy(split)
    for module in split.model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    start = get_trainable(split.model)
    result = LocalTrainer(split, data, cfg, device).train([], noise_multiplier=0.0, seed=1)
    update = np.concatenate([(result.values[k] - start[k]).ravel() for k in start]).astype(np.float64)
    return -update * len(data) / LR


def attack(split, honest, device, model_name: str, cases=CASES, log=print) -> list[dict]:
    """Run every case against ``honest`` (a FeatureDataset); return one row per case."""
    import numpy as np

    from fedpriv.task.features import FeatureDataset

    crafted = (np.asarray(honest.features[0], dtype=np.float32) * 100).astype(np.float16)
    wrong = 1 - int(honest.labels[0])
    with_post = FeatureDataset(list(honest.features) + [crafted], list(honest.labels) + [wrong])
    alone = FeatureDataset([crafted], [wrong])
    rows = []
    for mode, precision, accepted in cases:
        row = {"mode": mode, "precision": precision, "accepted": accepted, "honest": len(honest), "device": str(device)}
        try:
            sums = [clipped_sum(split, d, device, mode, precision, model_name) for d in (honest, with_post, alone)]
            without, both, own = sums
            row["influence"] = float(np.linalg.norm(both - without) / CLIP)
            row["others_moved"] = float(np.linalg.norm(both - own - without) / CLIP)
            row["own"] = float(np.linalg.norm(own) / CLIP)
            log(f"  clipping bound {mode} {precision}: influence {row['influence']:.6f} C, "
                f"others moved {row['others_moved']:.2e} C")
        except Exception as exc:  # noqa: BLE001 - one failing case (e.g. no bf16 on this GPU) is a result
            row["error"] = f"{type(exc).__name__}: {exc}"[:200]
            log(f"  clipping bound {mode} {precision}: {row['error']}")
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    out = []
    for r in rows:
        what = (f"{r['influence']:.6f}", f"{r['others_moved']:.1e}", f"{r['own']:.6f}") if "error" not in r \
            else ("failed: " + r["error"][:80], "-", "-")
        out.append((r["mode"], r["precision"], "yes" if r["accepted"] else "no (refused)", r["honest"], *what,
                    r["device"]))
    return markdown_table(("grad-sample-mode", "precision", "config accepts", "honest posts", "influence / C",
                           "others moved / C", "the post alone / C", "device"), out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", choices=("tiny", "minilm"), default="tiny")
    parser.add_argument("--honest", type=int, default=32, help="honest posts in the batch (default 32)")
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown here")
    args = parser.parse_args(argv)
    import numpy as np
    import torch

    from fedpriv.task.features import FeatureDataset, SplitClassifier
    from fedpriv.task.model import build_model

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    device = torch.device(args.device)
    split = SplitClassifier(build_model(args.model, "all", 0, "mean"), "all")
    split.model.to(device)
    if args.model == "tiny":
        rng = np.random.default_rng(0)
        dim = split.model.config.hidden_size
        honest = FeatureDataset([rng.standard_normal((6, dim)).astype(np.float16) for _ in range(args.honest)],
                                [i % 2 for i in range(args.honest)])
    else:
        from dp_cost import _texts

        from fedpriv.task.encoding import EncodedDataset
        from fedpriv.task.model import load_tokenizer

        texts, labels = _texts(args.honest)
        enc = load_tokenizer()(texts, truncation=True, max_length=64)
        honest = split.features(EncodedDataset(list(enc["input_ids"]), labels), device)
    rows = attack(split, honest, device, args.model)
    body = "\n".join([f"Machine: {machine_line([str(device)])}.", "",
                      f"Model {args.model} (`trainable = all`), {args.honest} honest posts"
                      f"{' (real posts)' if args.model == 'minilm' else ' (random features)'} + one crafted post "
                      f"(an honest post's features x 100, the other label); C = {CLIP}, σ = 0, q = 1, one physical "
                      f"batch, dropout off. Command: `python bench/clipping_bound.py --device {args.device} --model "
                      f"{args.model} --honest {args.honest}`.", "", table(rows), "",
                      "influence: how far the post moved the clipped sum (DP-SGD's guarantee needs ≤ 1); others moved: "
                      "how far the other posts' part of the sum moved when it joined (0 in exact arithmetic); the post "
                      "alone: its own clipped contribution. `hooks` under bf16 is refused by the config and run here "
                      "past the refusal."])
    write_result("clipping_bound", "One crafted post against the clipping bound", body, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
