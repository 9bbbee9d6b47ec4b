"""Auditing a run directory: its final model and shards in, the membership attack's result into its report.

The attack itself (statistics, pairing, per-example losses) is pure and lives in
:mod:`fedpriv.privacy.audit`. This module is the part that knows where a run keeps
things -- the coordinator's checkpoints (:mod:`fedpriv.server.checkpoints`), the shard
layout (:mod:`fedpriv.task.partition`), the report and the coordinator's lock on the
run directory (:mod:`fedpriv.server.resume`) -- so it sits in the server layer, and
``fedpriv audit`` (:mod:`fedpriv.commands.audit`) only parses arguments and prints.
"""

from __future__ import annotations

import contextlib
import fcntl
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from fedpriv.core.errors import DataError, FedprivError
from fedpriv.privacy.audit import AUDIT_KEY, DEFAULT_MAX_EXAMPLES, loss_attack, pair_members, per_example_losses
from fedpriv.server.resume import LOCK_NAME

__all__ = ["audit_run", "load_final_model", "run_config", "run_dir_lock", "save_audit"]


def load_final_model(run_dir: Path, cfg):
    """The run's final global model: built as the run built it, with the last checkpoint's values.

    Falls back to the exported ``final_model/`` when the run has no checkpoint.
    Returns ``(model, round)``; round is None when loaded from ``final_model/``.
    """
    from fedpriv.server.checkpoints import FINAL_MODEL_DIR, latest_checkpoint
    from fedpriv.task.model import build_model, set_trainable, set_trainable_values

    found = latest_checkpoint(run_dir)
    if found is not None:
        server_round, values = found
        model = build_model(cfg.model, cfg.trainable, cfg.seed, cfg.pooling, cfg.lora_rank)
        try:
            set_trainable_values(model, values)
        except ValueError as exc:
            raise DataError(f"checkpoint of round {server_round} in {run_dir} does not fit the run's model "
                            f"(model={cfg.model}, trainable={cfg.trainable}): {exc}") from None
        return model, server_round
    final = run_dir / FINAL_MODEL_DIR
    if (final / "config.json").exists():
        from transformers import BertForSequenceClassification

        from fedpriv.task.modeling_fedpriv import MeanPoolingBertForSequenceClassification

        cls = MeanPoolingBertForSequenceClassification if cfg.pooling == "mean" else BertForSequenceClassification
        model = cls.from_pretrained(final)
        set_trainable(model, cfg.trainable)
        return model, None
    raise DataError(f"{run_dir} has no model to audit: expected {run_dir}/checkpoints/round-NNN.safetensors "
                    f"or {final}/ (did the run finish at least one round?)")


def run_config(report: Mapping[str, Any]):
    """The run's typed config; keys added to fedpriv after the run was written take their defaults."""
    from fedpriv.core.config import FedprivConfig, load_app_defaults

    return FedprivConfig.from_run_config({**load_app_defaults(), **report["config"]})


def audit_run(run_dir: str | Path, max_examples: int = DEFAULT_MAX_EXAMPLES, seed: int | None = None,
              data_dir: str | Path | None = None, report: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run the attack on ``run_dir``'s final model; returns the ``audit`` dict (does not write it)."""
    from fedpriv.core.report_schema import load as load_report
    from fedpriv.privacy.report_view import max_region_epsilon
    from fedpriv.task.device import select_device
    from fedpriv.task.model import load_tokenizer
    from fedpriv.task.partition import load_region, load_server_test, server_test_path

    run_dir = Path(run_dir)
    if max_examples < 1:
        raise FedprivError(f"--max-examples = {max_examples}: expected a number of members >= 1")
    report = dict(report) if report is not None else load_report(run_dir)
    if not isinstance(report.get("config"), Mapping):
        raise FedprivError(f"{run_dir}/privacy_report.json has no run config: expected a report written by fedpriv")
    cfg = run_config(report)
    root = Path(data_dir).expanduser() if data_dir else cfg.data_dir
    seed = cfg.seed if seed is None else int(seed)
    started = time.time()

    pool, origin = [], []
    for region in cfg.regions:
        shard = load_region(root, region)
        pool += shard.train
        origin += [region] * len(shard.train)
    try:
        server = load_server_test(root)
    except DataError:
        raise DataError(f"no held-out non-members under {root}: expected {server_test_path(root)} "
                        "(the shard root the run trained from; pass --data-dir if it moved)") from None
    member_texts = {e.text for e in pool}
    held_out = [e for e in server if e.text not in member_texts]  # an exact copy of a training post is no non-member
    if not pool or not held_out:
        raise DataError(f"cannot audit: {len(pool)} training examples and {len(held_out)} held-out examples under {root}")
    mi, ni = pair_members(pool, held_out, max_examples, seed)
    if not mi:
        raise DataError(f"cannot audit: no (label, domain) appears both among the {len(pool)} training and the "
                        f"{len(held_out)} held-out examples under {root}")
    members, non_members = [pool[i] for i in mi], [held_out[j] for j in ni]

    model, model_round = load_final_model(run_dir, cfg)
    device = select_device(cfg.num_threads)
    model = model.to(device)
    losses = per_example_losses(model, cfg.trainable, members + non_members, load_tokenizer(), cfg.max_length, device)

    epsilon = max_region_epsilon(report)  # ∞ if any region trained without DP (the report view decides)
    delta = float(report.get("delta") or cfg.delta)
    attack = loss_attack(losses[: len(members)], losses[len(members):], epsilon, delta)
    return {
        **attack,
        "members": len(members),
        "non_members": len(non_members),
        "members_by_region": dict(sorted(Counter(origin[i] for i in mi).items())),
        "positive_fraction": round(float(np.mean([e.label for e in members])), 4),
        "matched_on": "label, domain",
        "model_round": model_round,
        "max_examples": int(max_examples),
        "seed": seed,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_time_s": round(time.time() - started, 1),
    }


@contextlib.contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Refuse to write while a coordinator holds the run directory (it rewrites the report every round)."""
    path = Path(run_dir) / LOCK_NAME
    if not path.exists():
        yield
        return
    with path.open("a+", encoding="utf-8") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FedprivError(f"{run_dir} is in use by a running coordinator: audit it after the run ends") from None
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def save_audit(run_dir: str | Path, audit: Mapping[str, Any]) -> Path:
    """Add ``audit`` to the run's ``privacy_report.json`` and re-render its Markdown (and HTML, if present)."""
    from fedpriv.core.report_schema import HTML_NAME, JSON_NAME
    from fedpriv.core.report_schema import load as load_report
    from fedpriv.privacy.report import save_report

    run_dir = Path(run_dir)
    with run_dir_lock(run_dir):
        data = load_report(run_dir)  # re-read: keep whatever else changed meanwhile
        data[AUDIT_KEY] = dict(audit)
        save_report(run_dir, data)
        html = run_dir / HTML_NAME
        if html.exists():
            from fedpriv.privacy.html_report import render_html

            render_html([data], html)
    return run_dir / JSON_NAME
