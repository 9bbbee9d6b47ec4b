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
from fedpriv.privacy.audit import (AUDIT_KEY, AUTHOR_KEY, DEFAULT_MAX_EXAMPLES, author_attack, author_epsilon,
                                   author_match_key, group_by_author, loss_attack, pair_members, per_example_losses,
                                   straddling_authors)
from fedpriv.server.resume import LOCK_NAME

__all__ = ["audit_run", "author_pairs", "load_final_model", "run_config", "run_dir_lock", "save_audit"]

DEFAULT_MAX_AUTHORS = 1000
AUTHOR_MATCH = "domain, post count (1, 2, 3-4, 5-8, ...), share of positive posts (to the nearest quarter)"


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


def author_pairs(shards: Mapping[str, Any], server: list, max_authors: int, seed: int,
                 split_unit: str | None = None) -> tuple[list[list[int]], list[list[int]]] | str:
    """Whole member and non-member authors to attack, or why there are none.

    Members are authors of the regions' training posts (indices into the regions' ``train``
    concatenated in ``shards`` order), non-members authors of the held-out posts (indices into
    ``server``). An author with posts on two sides of any split (regions' train / test, held-out)
    is neither in nor out, so the author level is refused (str) if there is one; a held-out
    author with an exact copy of a training post is dropped. Pairs share :func:`author_match_key`;
    multi-post authors are paired first, since they are where the author differs from the post.
    """
    places = {f"{r}/{side}": getattr(shard, side) for r, shard in shards.items() for side in ("train", "test")}
    places["server"] = server
    straddle = straddling_authors(places)
    if straddle:
        key, where = next(iter(sorted(straddle.items())))
        how = {"post": "the shards were split with split-unit = 'post'",
               None: "the shards were split post by post (prepared before split-unit)"}.get(
            split_unit, f"the shards do not keep authors whole although the run's split-unit is {split_unit!r} "
                        "(were they changed after the run?)")
        return (f"{len(straddle)} authors have posts on more than one side of the split (e.g. {key!r} in "
                f"{' and '.join(where)}): {how}; an author neither wholly in nor wholly out of training cannot be "
                "attacked as a whole (prepare the data and run with split-unit = \"author\")")
    pool = [e for shard in shards.values() for e in shard.train]
    member_texts = {e.text for e in pool}
    members = list(group_by_author(pool).values())
    non_members = [g for g in group_by_author(server).values() if not any(server[j].text in member_texts for j in g)]
    m_posts, n_posts = [[pool[i] for i in g] for g in members], [[server[j] for j in g] for g in non_members]
    chosen_m: list[list[int]] = []
    chosen_n: list[list[int]] = []
    for multi in (True, False):  # sizes never match across the two passes, so no member is taken twice
        n_idx = [j for j, g in enumerate(n_posts) if (len(g) > 1) == multi]
        mi, ni = pair_members(m_posts, [n_posts[j] for j in n_idx], max_authors - len(chosen_m), seed,
                              key=author_match_key)
        chosen_m += [members[i] for i in mi]
        chosen_n += [non_members[n_idx[j]] for j in ni]
    if not chosen_m:
        return (f"no held-out author matches a training author on {AUTHOR_MATCH} "
                f"({len(members)} training and {len(non_members)} held-out authors)")
    return chosen_m, chosen_n


def audit_run(run_dir: str | Path, max_examples: int = DEFAULT_MAX_EXAMPLES, seed: int | None = None,
              data_dir: str | Path | None = None, report: Mapping[str, Any] | None = None,
              max_authors: int = DEFAULT_MAX_AUTHORS) -> dict[str, Any]:
    """Run the attack on ``run_dir``'s final model, on posts and on whole authors; returns the ``audit`` dict (does not write it)."""
    from fedpriv.core.report_schema import load as load_report
    from fedpriv.privacy.report_view import max_region_epsilon
    from fedpriv.task.device import select_device
    from fedpriv.task.model import load_tokenizer
    from fedpriv.task.partition import load_region, load_server_test, server_test_path

    run_dir = Path(run_dir)
    if max_examples < 1:
        raise FedprivError(f"--max-examples = {max_examples}: expected a number of members >= 1")
    if max_authors < 1:
        raise FedprivError(f"--max-authors = {max_authors}: expected a number of member authors >= 1")
    report = dict(report) if report is not None else load_report(run_dir)
    if not isinstance(report.get("config"), Mapping):
        raise FedprivError(f"{run_dir}/privacy_report.json has no run config: expected a report written by fedpriv")
    cfg = run_config(report)
    root = Path(data_dir).expanduser() if data_dir else cfg.data_dir
    seed = cfg.seed if seed is None else int(seed)
    started = time.time()

    shards = {region: load_region(root, region) for region in cfg.regions}
    pool, origin = [], []
    for region, shard in shards.items():
        pool += shard.train
        origin += [region] * len(shard.train)
    try:
        server = load_server_test(root)
    except DataError:
        raise DataError(f"no held-out non-members under {root}: expected {server_test_path(root)} "
                        "(the shard root the run trained from; pass --data-dir if it moved)") from None
    member_texts = {e.text for e in pool}
    held = [j for j, e in enumerate(server) if e.text not in member_texts]  # a copy of a training post is no non-member
    held_out = [server[j] for j in held]
    if not pool or not held_out:
        raise DataError(f"cannot audit: {len(pool)} training examples and {len(held_out)} held-out examples under {root}")
    mi, ni = pair_members(pool, held_out, max_examples, seed)
    if not mi:
        raise DataError(f"cannot audit: no (label, domain) appears both among the {len(pool)} training and the "
                        f"{len(held_out)} held-out examples under {root}")
    authors = author_pairs(shards, server, max_authors, seed, (report["config"] or {}).get("split-unit"))

    # one forward pass over every post either attack needs
    need_p = sorted(set(mi) | ({i for g in authors[0] for i in g} if not isinstance(authors, str) else set()))
    need_s = sorted({held[j] for j in ni} | ({j for g in authors[1] for j in g} if not isinstance(authors, str) else set()))
    model, model_round = load_final_model(run_dir, cfg)
    device = select_device(cfg.num_threads)
    model = model.to(device)
    losses = per_example_losses(model, cfg.trainable, [pool[i] for i in need_p] + [server[j] for j in need_s],
                                load_tokenizer(), cfg.max_length, device)
    loss_p = dict(zip(need_p, losses[: len(need_p)]))
    loss_s = dict(zip(need_s, losses[len(need_p):]))

    epsilon = max_region_epsilon(report)  # ∞ if any region trained without DP (the report view decides)
    delta = float(report.get("delta") or cfg.delta)
    members = [pool[i] for i in mi]
    attack = loss_attack(np.array([loss_p[i] for i in mi]), np.array([loss_s[held[j]] for j in ni]), epsilon, delta)
    out = {
        **attack,
        "members": len(mi),
        "non_members": len(ni),
        "members_by_region": dict(sorted(Counter(origin[i] for i in mi).items())),
        "positive_fraction": round(float(np.mean([e.label for e in members])), 4),
        "matched_on": "label, domain",
        "model_round": model_round,
        "max_examples": int(max_examples),
        "seed": seed,
    }
    if isinstance(authors, str):
        out[AUTHOR_KEY] = {"skipped": authors}
    else:
        out[AUTHOR_KEY] = _author_level(report, delta, authors, pool, server, origin, loss_p, loss_s, max_authors)
    out["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out["wall_time_s"] = round(time.time() - started, 1)
    return out


def _author_level(report: Mapping[str, Any], delta: float, authors: tuple[list[list[int]], list[list[int]]],
                  pool: list, server: list, origin: list[str], loss_p: Mapping[int, float], loss_s: Mapping[int, float],
                  max_authors: int) -> dict[str, Any]:
    """The author attack on the chosen pairs, with the ε that applies to authors of their size."""
    member_groups, non_member_groups = authors
    found: dict[int, tuple[float | None, dict[str, Any]]] = {}

    def epsilon_for(k: int) -> float | None:
        if k not in found:
            found[k] = author_epsilon(report, delta, k)
        return found[k][0]

    attack = author_attack([np.array([loss_p[i] for i in g]) for g in member_groups],
                           [np.array([loss_s[j] for j in g]) for g in non_member_groups], epsilon_for, delta)
    largest = attack["largest_author_posts"]
    per_region = found[largest][1]
    units = {r["unit"] for r in per_region.values()}
    if units == {"author"}:
        basis = "author-level run: each region's ε protects a whole author"
    elif largest == 1:
        basis = "every audited author has one post: the post-level ε"
    else:
        basis = (f"exact group ε of the post-level DP-SGD history for {largest} posts, the largest audited author "
                 "(it bounds every smaller author too), largest over regions")
    named = sum(pool[g[0]].author is not None for g in member_groups) + sum(
        server[g[0]].author is not None for g in non_member_groups)
    return {
        **attack,
        "epsilon_basis": basis,
        "epsilon_by_region": {name: {k: v for k, v in r.items() if k != "basis"} for name, r in per_region.items()},
        "units": sorted(units),
        "members_by_region": dict(sorted(Counter(origin[g[0]] for g in member_groups).items())),
        "named_authors": int(named),
        "matched_on": AUTHOR_MATCH,
        "max_authors": int(max_authors),
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
