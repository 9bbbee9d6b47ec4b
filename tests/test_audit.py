"""Membership-inference audit: the ROC maths, member/non-member sampling, the attack against an
overfit and a DP-trained tiny model, the attack on whole authors (grouping, pairing, the group-ε
bound), and ``fedpriv audit`` on a run directory."""

from __future__ import annotations

import json
import math
import random
import warnings

import numpy as np
import pytest
import torch

from conftest import independent_epsilon
from fedpriv.cli import main
from fedpriv.core.config import resolve_config
from fedpriv.privacy.audit import (AUTHOR_AGGREGATES, attack_metrics, author_attack, author_epsilon, author_match_key,
                                   bound_check, dp_bounds, format_audit, group_by_author, pair_members,
                                   per_example_losses, region_unit, roc_curve, size_bucket, straddling_authors,
                                   tpr_at_fpr)
from fedpriv.privacy.group_privacy import group_epsilon
from fedpriv.server.audit_run import audit_run, author_pairs, save_audit
from fedpriv.privacy.html_report import tpr_bound
from fedpriv.task.data import Example, write_jsonl
from fedpriv.task.model import load_tokenizer
from fedpriv.task.partition import TEST_FILE, TRAIN_FILE, region_shard_dir, server_test_path

DELTA = 1e-5


# -- ROC maths on synthetic scores ----------------------------------------------------------------


def test_metrics_on_hand_made_scores():
    members, non_members = [0.9, 0.8, 0.7, 0.3], [0.6, 0.5, 0.4, 0.2, 0.1]
    m = attack_metrics(members, non_members)
    assert m["auc"] == pytest.approx(17 / 20)  # 3·5 + 2 of the 20 (member, non-member) pairs ranked right
    assert m["tpr_at_1pct_fpr"] == pytest.approx(0.75)  # at FPR 0 the top 3 members are already found
    assert m["tpr_at_10pct_fpr"] == pytest.approx(0.75)  # with 5 non-members the next FPR step is 20%
    assert m["advantage"] == pytest.approx(0.75)  # threshold 0.7: TPR 3/4 at FPR 0 (0.3 gives only 1 - 2/5)


@pytest.mark.parametrize("members, non_members, auc, tpr1, adv", [
    ([3.0, 4.0, 5.0], [0.0, 1.0, 2.0], 1.0, 1.0, 1.0),      # perfectly separated
    ([0.0, 1.0, 2.0], [3.0, 4.0, 5.0], 0.0, 0.0, 0.0),      # perfectly wrong way round
    ([1.0] * 5, [1.0] * 7, 0.5, 0.0, 0.0),                  # all tied: chance, no confident point
])
def test_metrics_extremes(members, non_members, auc, tpr1, adv):
    m = attack_metrics(members, non_members)
    assert m["auc"] == pytest.approx(auc)
    assert m["tpr_at_1pct_fpr"] == pytest.approx(tpr1)
    assert m["advantage"] == pytest.approx(adv)


def test_roc_matches_sklearn_with_ties():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for trial in range(50):
        nm, nn = rng.integers(1, 60, size=2)
        if trial % 2:  # heavy ties
            m, n = rng.integers(0, 4, nm).astype(float), rng.integers(0, 4, nn).astype(float)
        else:
            m, n = rng.normal(0.5, 1, nm), rng.normal(0, 1, nn)
        y, s = np.r_[np.ones(nm), np.zeros(nn)], np.r_[m, n]
        fpr, tpr, _ = roc_curve(y, s)
        ref_fpr, ref_tpr, _ = sklearn_metrics.roc_curve(y, s, drop_intermediate=False)
        np.testing.assert_allclose(fpr, ref_fpr)
        np.testing.assert_allclose(tpr, ref_tpr)
        got = attack_metrics(m, n)
        assert got["auc"] == pytest.approx(sklearn_metrics.roc_auc_score(y, s), abs=1e-12)
        assert got["tpr_at_10pct_fpr"] == pytest.approx(tpr_at_fpr(ref_fpr, ref_tpr, 0.10))


def test_large_sample_of_indistinguishable_scores_is_near_chance():
    rng = np.random.default_rng(1)
    m = attack_metrics(rng.normal(size=5000), rng.normal(size=5000))
    assert abs(m["auc"] - 0.5) < 0.02
    assert m["tpr_at_1pct_fpr"] < 0.03 and abs(m["tpr_at_10pct_fpr"] - 0.10) < 0.03


def test_tpr_at_fpr_takes_no_point_beyond_the_target():
    fpr, tpr = np.array([0.0, 0.005, 0.02, 0.1, 1.0]), np.array([0.0, 0.3, 0.6, 0.7, 1.0])
    assert tpr_at_fpr(fpr, tpr, 0.01) == pytest.approx(0.3)
    assert tpr_at_fpr(fpr, tpr, 0.10) == pytest.approx(0.7)


def test_metrics_reject_empty_or_non_finite_scores():
    with pytest.raises(ValueError):
        attack_metrics([], [1.0])
    with pytest.raises(ValueError):
        attack_metrics([math.nan], [1.0])


def test_dp_bounds_and_bound_check():
    bounds = dp_bounds(0.5, DELTA)
    assert bounds["tpr_bound_at_1pct_fpr"] == pytest.approx(math.exp(0.5) * 0.01 + DELTA)
    assert bounds["tpr_bound_at_10pct_fpr"] == pytest.approx(tpr_bound(0.10, 0.5, DELTA))
    assert bounds["advantage_bound"] == pytest.approx(math.exp(0.5) - 1 + DELTA)
    assert dp_bounds(1.0, DELTA)["advantage_bound"] == 1.0  # e^ε - 1 > 1 bounds nothing
    assert dp_bounds(math.inf, DELTA)["tpr_bound_at_1pct_fpr"] == 1.0
    rng = np.random.default_rng(2)
    separated = (rng.normal(4, 1, 500), rng.normal(0, 1, 500))
    same = (rng.normal(0, 1, 500), rng.normal(0, 1, 500))
    assert bound_check(*separated, epsilon=0.5, delta=DELTA) == "violated"  # TPR ≫ e^0.5 · FPR
    assert bound_check(*separated, epsilon=8.0, delta=DELTA) == "consistent"  # e^8 · 1% > 1: nothing to beat
    assert bound_check(*same, epsilon=1.0, delta=DELTA) in ("consistent", "within sampling error")
    assert bound_check([1.0], [0.0], epsilon=0.1, delta=DELTA) == "within sampling error"  # one pair proves nothing
    assert bound_check(*separated, epsilon=math.inf, delta=DELTA) == "no bound"
    # group ε of a long-posting author under a post-level run reach hundreds: e^ε overflows past 709
    assert dp_bounds(1500.0, DELTA) == {"tpr_bound_at_1pct_fpr": 1.0, "tpr_bound_at_10pct_fpr": 1.0,
                                        "advantage_bound": 1.0}
    assert bound_check(*separated, epsilon=1500.0, delta=DELTA) == "consistent"
    # at FPR 0 the bound is δ whatever ε: two perfectly separated pairs are above it, within sampling error
    assert bound_check([1.0, 2.0], [0.0, 0.5], epsilon=1500.0, delta=DELTA) == "within sampling error"


def test_pair_members_matches_labels_and_never_reuses():
    members = [Example(f"m{i}", f"m{i}", int(i < 30), "tweets", 1.0) for i in range(100)]  # 30 positive
    non_members = [Example(f"n{i}", f"n{i}", i % 2, "tweets", 1.0) for i in range(80)]  # 40 positive
    mi, ni = pair_members(members, non_members, max_pairs=1000, seed=0)
    assert len(mi) == len(ni) == 70  # all 30 positive members + 40 of the 70 negatives
    assert len(set(mi)) == len(mi) and len(set(ni)) == len(ni)
    assert [members[i].label for i in mi] == [non_members[j].label for j in ni]
    small = pair_members(members, non_members, max_pairs=20, seed=3)
    assert len(small[0]) == 20 and small == pair_members(members, non_members, max_pairs=20, seed=3)
    assert small != pair_members(members, non_members, max_pairs=20, seed=4)


# -- the attack against real (tiny) models ----------------------------------------------------------

N = 128  # members, and as many non-members
HIDDEN = 512
DP_SIGMA, DP_EPOCHS = 1.7, 20  # q = 32/128, 80 steps: ε = 7.8 at δ = 1e-5


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def random_posts(tokenizer, n: int, seed: int) -> list[Example]:
    """Random word salad with balanced, arbitrary labels: nothing to learn, everything to memorise."""
    words = sorted(w for w in tokenizer.vocab if w.isascii() and w.isalpha() and len(w) >= 5)
    rng = random.Random(seed)
    return [Example(f"r{seed}-{i}", " ".join(rng.choice(words) for _ in range(8)), i % 2, "tweets", 1.0)
            for i in range(n)]


def small_classifier(tokenizer, seed: int = 0):
    """A small mean-pooling BERT: 1 frozen random encoder layer, a wide trainable head (trainable=head)."""
    from transformers import BertConfig

    from fedpriv.task.model import set_trainable
    from fedpriv.task.modeling_fedpriv import MeanPoolingBertForSequenceClassification

    torch.manual_seed(seed)
    model = MeanPoolingBertForSequenceClassification(BertConfig(
        vocab_size=tokenizer.vocab_size, num_labels=2, hidden_size=HIDDEN, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=2 * HIDDEN, max_position_embeddings=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    set_trainable(model, "head")
    return model


def train(model, tokenizer, members, *, dp: bool, epochs: int, seed: int = 0):
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader

    from fedpriv.task.encoding import encode
    from fedpriv.task.features import SplitClassifier, collate_features

    split = SplitClassifier(model, "head")
    data = split.features(encode(members, tokenizer, 32), torch.device("cpu"))
    params = [p for p in split.top.parameters() if p.requires_grad]
    torch.manual_seed(seed)
    epsilon = math.inf
    if dp:  # DP-SGD as the regions run it: Poisson batches of 32, C = 1, SGD lr 0.5 with momentum 0.9
        batch = 32
        loader = DataLoader(data, batch_size=batch, collate_fn=collate_features, generator=torch.Generator().manual_seed(seed))
        engine = PrivacyEngine()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            top, optimizer, loader = engine.make_private(
                module=split.top, optimizer=torch.optim.SGD(params, lr=0.5, momentum=0.9), data_loader=loader,
                noise_multiplier=DP_SIGMA, max_grad_norm=1.0, poisson_sampling=True)
    else:  # deliberately overfit: full-batch Adam until every member is memorised
        loader = DataLoader(data, batch_size=len(data), collate_fn=collate_features)
        top, optimizer = split.top, torch.optim.Adam(params, lr=3e-3)
    top.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(epochs):
            for b in loader:
                if len(b["labels"]) == 0:
                    continue
                top(**b).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
    if dp:
        epsilon = independent_epsilon(engine.accountant.history, DELTA, "rdp")
        top._close()
    return epsilon


def attack(model, tokenizer, members, non_members):
    device = torch.device("cpu")
    m = per_example_losses(model, "head", members, tokenizer, 32, device)
    n = per_example_losses(model, "head", non_members, tokenizer, 32, device)
    return attack_metrics(-m, -n), m, n


@pytest.fixture(scope="module")
def posts(tokenizer):
    return random_posts(tokenizer, N, seed=1), random_posts(tokenizer, N, seed=2)


@pytest.fixture(scope="module")
def overfit(tokenizer, posts):
    """The tiny model, deliberately overfit on the members until every one is memorised (non-private)."""
    model = small_classifier(tokenizer)
    train(model, tokenizer, posts[0], dp=False, epochs=100)
    return model


def test_overfit_non_private_model_is_caught(tokenizer, posts, overfit):
    members, non_members = posts
    metrics, m_loss, n_loss = attack(overfit, tokenizer, members, non_members)
    assert np.mean(m_loss < math.log(2)) == 1.0  # memorised: every member classified right
    assert metrics["auc"] > 0.75, metrics
    assert metrics["tpr_at_10pct_fpr"] > 0.2, metrics
    assert metrics["advantage"] > 0.4, metrics


def test_dp_model_at_epsilon_8_stays_near_chance(tokenizer, posts):
    """Same data, model and attack, trained with DP-SGD at ε = 7.8.

    Near chance is an empirical outcome, not a theorem: at ε = 8 the (ε, δ) bound allows
    TPR ≤ e^8·FPR, i.e. nearly anything. On this canary-like data (random labels, a wide head)
    five seeds of this schedule gave AUC 0.53–0.59, and other ε ≈ 8 schedules up to 0.65, so
    the seed is pinned; what always holds is that the bound is not beaten.
    """
    members, non_members = posts
    model = small_classifier(tokenizer)
    epsilon = train(model, tokenizer, members, dp=True, epochs=DP_EPOCHS)
    assert 7.0 < epsilon <= 8.0
    metrics, m_loss, n_loss = attack(model, tokenizer, members, non_members)
    assert abs(metrics["auc"] - 0.5) < 0.1, metrics
    assert metrics["tpr_at_10pct_fpr"] < 0.3, metrics
    assert bound_check(-m_loss, -n_loss, epsilon, DELTA) != "violated"


# -- fedpriv audit on a run directory -------------------------------------------------------------


@pytest.fixture
def run_dir(tmp_path, tokenizer):
    """A run directory as fedpriv writes it: shards, a report, a last checkpoint of the tiny model."""
    from fedpriv.server.checkpoints import save_checkpoint
    from fedpriv.task.model import build_model, get_trainable

    root = tmp_path / "shards"
    pool = random_posts(tokenizer, 80, seed=5)  # 40 / 40 labels
    for seed, (name, part) in enumerate((("us-east", pool[:50]), ("eu-west", pool[50:])), start=10):
        write_jsonl(region_shard_dir(root, name) / TRAIN_FILE, part)
        write_jsonl(region_shard_dir(root, name) / TEST_FILE, random_posts(tokenizer, 2, seed=seed))
    held_out = random_posts(tokenizer, 100, seed=6)  # 50 / 50 labels
    write_jsonl(server_test_path(root), held_out)
    flat, cfg = resolve_config({"model": "tiny", "trainable": "all", "regions": "us-east,eu-west",
                                "data-dir": str(root), "run-dir": str(tmp_path / "run"), "seed": 7})
    model = build_model(cfg.model, cfg.trainable, cfg.seed, cfg.pooling)
    rng = np.random.default_rng(0)
    values = {k: v + rng.normal(0, 0.5, v.shape).astype(np.float32) for k, v in get_trainable(model).items()}
    run = tmp_path / "run"
    save_checkpoint(run, 1, {k: v * 0 for k, v in values.items()})
    save_checkpoint(run, 2, values)  # the final model: the audit must use this one
    report = {"schema_version": 1, "run_id": "r1", "created": "2026-01-01T00:00:00Z", "status": "completed",
              "accountant": "rdp", "delta": DELTA, "config": flat, "rounds": [{"round": 1}, {"round": 2}],
              "regions": {"us-east": {"epsilon": 1.5, "epsilon_by_round": [1.0, 1.5]},
                          "eu-west": {"epsilon": 2.0, "epsilon_by_round": [1.4, 2.0]}}}
    (run / "privacy_report.json").write_text(json.dumps(report))
    return run, values, pool


def test_audit_run_attacks_the_last_checkpoint(run_dir, tokenizer):
    from fedpriv.task.model import build_model, set_trainable_values

    run, values, pool = run_dir
    audit = audit_run(run, max_examples=1000)
    # 80 members (40 per label); the 100 held-out posts cover both labels, so every member is paired
    assert audit["members"] == audit["non_members"] == 80
    assert audit["members_by_region"] == {"eu-west": 30, "us-east": 50}
    assert audit["positive_fraction"] == 0.5
    assert audit["model_round"] == 2 and audit["seed"] == 7
    assert audit["epsilon"] == 2.0 and audit["delta"] == DELTA  # the largest region ε of the run
    assert audit["tpr_bound_at_1pct_fpr"] == pytest.approx(tpr_bound(0.01, 2.0, DELTA), abs=1e-6)
    for key in ("auc", "tpr_at_1pct_fpr", "tpr_at_10pct_fpr", "advantage"):
        assert 0.0 <= audit[key] <= 1.0
    assert audit["bound_check"] in ("consistent", "within sampling error", "violated")
    # no post names an author, so each is its own: the author level pairs the same 80 one-post authors,
    # and an author of one post gets exactly the post-level ε
    authors = audit["author_level"]
    assert authors["members"] == authors["non_members"] == 80 and authors["named_authors"] == 0
    assert authors["largest_author_posts"] == 1 and authors["epsilon"] == audit["epsilon"] == 2.0
    assert authors["tpr_bound_at_1pct_fpr"] == audit["tpr_bound_at_1pct_fpr"]
    # the losses are those of the last checkpoint's model (not round 1's, not the initial model's)
    model = build_model("tiny", "all", 7, "mean")
    set_trainable_values(model, values)
    losses = per_example_losses(model, "all", pool, tokenizer, 64, torch.device("cpu"))
    assert audit["member_loss"] == pytest.approx(float(np.mean(losses)), abs=1e-5)
    again = audit_run(run, max_examples=20, seed=3)
    assert again["members"] == again["non_members"] == 20 and again["seed"] == 3


def test_audit_drops_held_out_copies_of_training_posts(run_dir, tokenizer):
    run, _, pool = run_dir
    tight = random_posts(tokenizer, 80, seed=8)  # 40 per label, as many as the members
    tight[1] = Example("dup", pool[7].text, tight[1].label, "tweets", 1.0)  # a "non-member" that was trained on
    write_jsonl(server_test_path(run.parent / "shards"), tight)
    audit = audit_run(run)
    assert audit["members"] == audit["non_members"] == 79


def test_fedpriv_audit_writes_the_report(run_dir, capsys):
    run, _, _ = run_dir
    assert main(["audit", str(run), "--max-examples", "16"]) == 0
    out = capsys.readouterr().out
    assert "AUC" in out and "TPR at 1% FPR" in out and "16 members" in out
    data = json.loads((run / "privacy_report.json").read_text())
    assert data["audit"]["members"] == 16 and data["run_id"] == "r1" and data["regions"]["eu-west"]["epsilon"] == 2.0
    md = (run / "privacy_report.md").read_text()
    assert "Empirical audit" in md and "16 members vs 16 non-members" in md
    assert main(["audit", str(run), "--max-examples", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["members"] == 8
    assert json.loads((run / "privacy_report.json").read_text())["audit"]["members"] == 8  # replaced, not appended


def test_audit_errors_are_one_line(run_dir, tmp_path, capsys):
    run, _, _ = run_dir
    cases = [
        (["audit", str(tmp_path / "missing")], "does not exist"),
        (["audit", str(run), "--max-examples", "0"], "--max-examples = 0"),
        (["audit", str(run), "--data-dir", str(tmp_path / "nowhere")], "no data for region"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err and "Traceback" not in err, err
    for ckpt in (run / "checkpoints").iterdir():
        ckpt.unlink()
    assert main(["audit", str(run)]) == 2
    assert "no model to audit" in capsys.readouterr().err


def test_save_audit_keeps_the_rest_of_the_report(run_dir):
    run, _, _ = run_dir
    before = json.loads((run / "privacy_report.json").read_text())
    audit = {"auc": 0.5, "tpr_at_1pct_fpr": 0.01, "tpr_at_10pct_fpr": 0.1, "members": 3, "non_members": 3,
             "advantage": 0.0, "epsilon": math.inf}
    save_audit(run, audit)
    after = json.loads((run / "privacy_report.json").read_text())
    assert {k: v for k, v in after.items() if k != "audit"} == before
    assert after["audit"]["epsilon"] is None  # strict JSON: ∞ (no DP) is written as null
    text = format_audit({**audit, "members_by_region": {"us-east": 3}})
    assert "∞ (no DP)" in text and "AUC" in text


# -- whole authors ----------------------------------------------------------------------------------


def authored(prefix: str, sizes: list[int], domain: str = "amazon", label_of=lambda a: a % 2) -> list[Example]:
    """Posts of authors ``{prefix}a0, {prefix}a1, ...`` with ``sizes[a]`` posts each, one label per author."""
    return [Example(f"{prefix}a{a}-{i}", f"{prefix} author {a} post {i}", label_of(a), domain, 1.0,
                    author=f"{prefix}a{a}") for a, k in enumerate(sizes) for i in range(k)]


def test_group_by_author_and_straddlers():
    posts = authored("m", [3, 1, 2]) + [Example("t1", "a tweet", 1, "tweets", 1.0)]  # author None: its own author
    groups = group_by_author(posts)
    assert list(groups.values()) == [[0, 1, 2], [3], [4, 5], [6]]
    assert list(groups)[-1] == "post:t1"
    held = authored("h", [2])
    assert straddling_authors({"us-east/train": posts, "server": held}) == {}
    leaked = held + [posts[4]]  # one of author ma2's two posts ended up held out
    assert straddling_authors({"us-east/train": posts, "us-east/test": [], "server": leaked}) == {
        "ma2": ["us-east/train", "server"]}


def test_author_match_key_pairs_like_with_like():
    assert [size_bucket(k) for k in (1, 2, 3, 4, 5, 8, 9, 16, 17, 70)] == [
        "1", "2", "3-4", "3-4", "5-8", "5-8", "9-16", "9-16", "17-32", "65-128"]
    a = authored("m", [4], label_of=lambda a: 1)
    assert author_match_key(a) == (("amazon",), "3-4", 4)
    mixed = [Example(f"x{i}", "t", int(i < 1), "nyt", 1.0, author="x") for i in range(4)]  # 1 of 4 positive
    assert author_match_key(mixed) == (("nyt",), "3-4", 1)
    members = [authored("m", [k])[:k] for k in (1, 1, 6, 6, 20)]
    non_members = [authored("h", [k]) for k in (6, 1, 30, 2)]
    mi, ni = pair_members(members, non_members, 100, seed=0, key=author_match_key)
    pairs = sorted((len(members[i]), len(non_members[j])) for i, j in zip(mi, ni))
    assert pairs == [(1, 1), (6, 6), (20, 30)]  # the 2-post author has no partner; 20 and 30 share a class


def planted_losses(members: list[list[float]], rng, shift: float, k: int, n: int):
    """Per-post losses 0.7·exp(0.4·z), members' lowered by the factor exp(−shift): weak per post, strong per author."""
    def author():
        return 0.7 * np.exp(0.4 * rng.normal(size=k))
    m = [author() * math.exp(-shift) for _ in range(n)]
    return m, [author() for _ in range(n)]


def test_author_attack_sums_up_an_authors_posts():
    rng = np.random.default_rng(0)
    m, n = planted_losses([], rng, shift=0.25, k=8, n=200)
    eps_seen = []
    out = author_attack(m, n, lambda k: eps_seen.append(k) or 3.0, DELTA)
    post = attack_metrics(-np.concatenate(m), -np.concatenate(n))
    assert 0.62 < post["auc"] < 0.72  # each post gives little away
    assert out["auc"] > 0.85 and out["auc"] > post["auc"] + 0.15, (out["auc"], post["auc"])  # its author does
    assert out["tpr_at_10pct_fpr"] > 0.5 and out["members"] == out["non_members"] == 200
    assert out["largest_author_posts"] == 8 and eps_seen[0] == 8 and out["epsilon"] == 3.0
    assert out["member_posts"] == out["non_member_posts"] == 1600
    assert set(out["by_aggregate"]) == set(AUTHOR_AGGREGATES)
    for how, res in out["by_aggregate"].items():
        want = attack_metrics([AUTHOR_AGGREGATES[how](x) for x in m], [AUTHOR_AGGREGATES[how](x) for x in n])
        assert res["auc"] == pytest.approx(want["auc"], abs=1e-6)
    # the same posts scored one by one (what a broken grouping attacks) do no better than the post attack
    singles = author_attack([x[i:i + 1] for x in m for i in range(8)], [x[i:i + 1] for x in n for i in range(8)],
                            lambda k: 3.0, DELTA)
    assert singles["auc"] < post["auc"] + 0.03
    # nothing planted: near chance
    m0, n0 = planted_losses([], rng, shift=0.0, k=8, n=400)
    null = author_attack(m0, n0, lambda k: 3.0, DELTA)
    assert abs(null["auc"] - 0.5) < 0.06 and null["tpr_at_1pct_fpr"] < 0.06
    with pytest.raises(ValueError):
        author_attack(m, n, lambda k: 3.0, DELTA, aggregate="sum")


def test_author_attack_by_size_uses_each_sizes_epsilon():
    rng = np.random.default_rng(1)
    m = [rng.random(1) for _ in range(30)] + [rng.random(5) for _ in range(30)]
    n = [rng.random(1) for _ in range(30)] + [rng.random(3) for _ in range(30)]
    out = author_attack(m, n, lambda k: float(k), DELTA)
    assert out["epsilon"] == 5.0 and out["largest_author_posts"] == 5  # one conservative bound: the largest author
    assert out["by_size"]["1 post"]["epsilon"] == 1.0 and out["by_size"]["1 post"]["members"] == 30
    assert out["by_size"]["2+ posts"]["epsilon"] == 5.0
    assert out["tpr_bound_at_1pct_fpr"] == pytest.approx(tpr_bound(0.01, 5.0, DELTA), abs=1e-6)


HISTORIES = {"us-east": [[1.1, 0.05, 20]], "eu-west": [[1.3, 0.1, 30]]}


@pytest.fixture(scope="module")
def group_eps():
    """Independent reference: group_epsilon per region for the sizes the tests audit (computed once)."""
    return {(r, k): group_epsilon([tuple(h) for h in hist], DELTA, k) for r, hist in HISTORIES.items() for k in (6,)}


def post_report(unit: str | None = None) -> dict:
    regions = {r: {"dp": True, "epsilon": eps, "history": HISTORIES[r]}
               for r, eps in (("us-east", 1.5), ("eu-west", 2.0))}
    if unit:
        for region in regions.values():
            region["privacy_unit"] = unit
    return {"delta": DELTA, "regions": regions}


def test_author_epsilon_is_the_group_epsilon_of_the_largest_author(group_eps):
    eps, per_region = author_epsilon(post_report(), DELTA, 6)
    assert per_region["us-east"]["epsilon"] == pytest.approx(group_eps[("us-east", 6)], rel=1e-9)
    assert eps == pytest.approx(max(group_eps[("us-east", 6)], group_eps[("eu-west", 6)]), rel=1e-9)
    assert eps > 6 * 2.0 * 0.5 and per_region["eu-west"]["unit"] == "post"
    # an author of one post is a post: the run's own ε, exactly
    assert author_epsilon(post_report(), DELTA, 1)[0] == 2.0
    # an author-level run: its ε already protects whole authors, whatever their size
    assert author_epsilon(post_report("author"), DELTA, 6)[0] == 2.0
    # no DP anywhere: no bound; a post-level report without its history: unknown, so no bound claimed
    off = post_report()
    off["regions"]["us-east"] = {"dp": False, "epsilon": None}
    assert author_epsilon(off, DELTA, 6)[0] == math.inf
    lost = post_report()
    del lost["regions"]["eu-west"]["history"]
    assert author_epsilon(lost, DELTA, 6)[0] is None


def test_region_unit_reads_the_report_defensively():
    assert region_unit({}, {}) == "post"  # nothing recorded: a post-level run
    assert region_unit({"unit_of_privacy": "one record (post) of one region"}, {}) == "post"
    assert region_unit({}, {"privacy_unit": "author"}) == "author"
    assert region_unit({"privacy_unit": "author"}, {}) == "author"
    assert region_unit({"unit_of_privacy": {"unit": "author"}}, {}) == "author"
    assert region_unit({"unit_of_privacy": "one author (all their posts) of one region"}, {}) == "author"
    assert region_unit({}, {"privacy_unit": "authors-ish"}) == "post"


# -- the author attack on a real (tiny) model -------------------------------------------------------


def test_author_attack_catches_a_model_that_memorised_its_authors(tokenizer, posts, overfit):
    """The tiny model memorised its members' posts: grouped into authors of 4, they are told apart from
    held-out authors better than posts are; two sets of unseen authors stay near chance."""
    members, non_members = posts
    device = torch.device("cpu")
    m = per_example_losses(overfit, "head", members, tokenizer, 32, device)
    n = per_example_losses(overfit, "head", non_members, tokenizer, 32, device)
    unseen = per_example_losses(overfit, "head", random_posts(tokenizer, 2 * N, seed=3), tokenizer, 32, device)
    by4 = lambda x: [x[i:i + 4] for i in range(0, len(x), 4)]  # noqa: E731
    caught = author_attack(by4(m), by4(n), lambda k: math.inf, DELTA)
    assert caught["auc"] > 0.9 and caught["tpr_at_10pct_fpr"] > 0.5, caught
    assert caught["auc"] >= attack_metrics(-m, -n)["auc"]
    null = author_attack(by4(unseen[:N]), by4(unseen[N:]), lambda k: math.inf, DELTA)
    assert abs(null["auc"] - 0.5) < 0.15 and null["tpr_at_10pct_fpr"] < 0.35, null


# -- fedpriv audit at the author level on a run directory -------------------------------------------

SIZES = [4, 5, 6, 3, 5, 6] * 10  # 60 authors a side, up to 6 posts each


def write_author_run(tmp_path, report_extra: dict | None = None, leak: bool = False):
    """Shards with named authors (members m…, held-out h…) plus one-post tweets, a report with DP histories."""
    from fedpriv.server.checkpoints import save_checkpoint
    from fedpriv.task.model import build_model, get_trainable

    root = tmp_path / "shards"
    members = authored("m", SIZES) + [Example(f"mt{i}", f"member tweet {i}", i % 2, "tweets", 1.0) for i in range(40)]
    held = authored("h", SIZES) + [Example(f"ht{i}", f"held tweet {i}", i % 2, "tweets", 1.0) for i in range(40)]
    if leak:  # author ma0's last post is held out: the shards were split post by post
        held.append(members.pop(SIZES[0] - 1))
    east = [e for e in members if int((e.author or e.id)[2:]) % 2 == 0]  # whole authors: even ones in us-east
    west = [e for e in members if int((e.author or e.id)[2:]) % 2 == 1]
    for name, part in (("us-east", east), ("eu-west", west)):
        write_jsonl(region_shard_dir(root, name) / TRAIN_FILE, part)
        write_jsonl(region_shard_dir(root, name) / TEST_FILE, [Example(f"{name}-t", f"{name} test", 0, "tweets", 1.0)])
    write_jsonl(server_test_path(root), held)
    flat, cfg = resolve_config({"model": "tiny", "trainable": "all", "regions": "us-east,eu-west",
                                "data-dir": str(root), "run-dir": str(tmp_path / "run"), "seed": 7})
    run = tmp_path / "run"
    save_checkpoint(run, 1, get_trainable(build_model(cfg.model, cfg.trainable, cfg.seed, cfg.pooling)))
    report = {"schema_version": 1, "run_id": "r2", "created": "2026-01-01T00:00:00Z", "status": "completed",
              "accountant": "rdp", "delta": DELTA, "config": flat, "rounds": [{"round": 1}],
              **post_report(), **(report_extra or {})}
    (run / "privacy_report.json").write_text(json.dumps(report))
    return run, members, held


@pytest.fixture
def planted(monkeypatch):
    """The final model's losses, planted: a member post's loss is e^−0.25 times a held-out one's (0.7·e^{0.4 z})."""
    import zlib

    def losses(model, trainable, examples, tokenizer, max_length, device, batch_size=256):
        out = []
        for e in examples:
            z = np.random.default_rng(zlib.crc32(e.id.encode())).normal()
            out.append(0.7 * math.exp(0.4 * z) * (math.exp(-0.25) if e.id.startswith("m") else 1.0))
        return np.array(out)

    monkeypatch.setattr("fedpriv.server.audit_run.per_example_losses", losses)


def test_audit_attacks_whole_authors_and_bounds_them_by_group_epsilon(tmp_path, planted, group_eps, capsys):
    run, members, held = write_author_run(tmp_path)
    audit = audit_run(run)
    authors = audit["author_level"]
    # every author paired whole: 60 named authors (all 6 sizes and both labels on each side) + 40 tweets
    assert authors["members"] == authors["non_members"] == 100 and authors["named_authors"] == 120
    assert authors["member_posts"] == authors["non_member_posts"] == sum(SIZES) + 40
    assert authors["members_by_region"] == {"eu-west": 50, "us-east": 50}
    # planted: a post gives little away, its whole author a lot (fails if authors were split up or mixed)
    multi = authors["by_size"]["2+ posts"]
    assert audit["auc"] < 0.75 and multi["auc"] > 0.8 and multi["auc"] > audit["auc"] + 0.1, (audit["auc"], multi)
    assert authors["by_size"]["1 post"]["members"] == 40
    assert authors["aggregate"] == "mean-loss" and set(multi["by_aggregate"]) == set(AUTHOR_AGGREGATES)
    # the bound: post-level run, so the exact group ε of the largest audited author (6 posts), over regions
    assert authors["largest_author_posts"] == 6
    assert authors["epsilon"] == pytest.approx(max(group_eps[("us-east", 6)], group_eps[("eu-west", 6)]), rel=1e-9)
    assert authors["epsilon_by_region"]["us-east"]["epsilon"] == pytest.approx(group_eps[("us-east", 6)], rel=1e-9)
    assert authors["by_size"]["1 post"]["epsilon"] == audit["epsilon"] == 2.0  # one post: the post-level ε
    assert authors["tpr_bound_at_1pct_fpr"] == pytest.approx(tpr_bound(0.01, authors["epsilon"], DELTA), abs=1e-6)
    assert "group ε" in authors["epsilon_basis"]
    text = format_audit(audit)
    assert "authors: 100 member authors" in text and "authors of 2+ posts" in text and "group ε" in text


def test_author_pairs_keep_authors_whole_and_apart(tmp_path):
    from fedpriv.task.partition import load_region, load_server_test

    run, members, held = write_author_run(tmp_path)
    root = tmp_path / "shards"
    shards = {r: load_region(root, r) for r in ("us-east", "eu-west")}
    server = load_server_test(root)
    pool = [e for s in shards.values() for e in s.train]
    m_groups, n_groups = author_pairs(shards, server, 1000, seed=0)
    m_authors = [{pool[i].author or pool[i].id for i in g} for g in m_groups]
    n_authors = [{server[j].author or server[j].id for j in g} for g in n_groups]
    assert all(len(a) == 1 for a in m_authors + n_authors)  # a group is one author ...
    for g, (a,) in zip(m_groups, m_authors):  # ... with all of its posts
        assert sorted(g) == [i for i, e in enumerate(pool) if (e.author or e.id) == a]
    assert not set().union(*m_authors) & set().union(*n_authors)
    assert [author_match_key([pool[i] for i in g]) for g in m_groups] == [
        author_match_key([server[j] for j in g]) for g in n_groups]
    few = author_pairs(shards, server, 7, seed=0)
    assert len(few[0]) == 7 and all(len(g) > 1 for g in few[0])  # multi-post authors first


def test_audit_refuses_authors_that_straddle_the_split(tmp_path, planted, capsys):
    run, members, held = write_author_run(tmp_path, leak=True)
    audit = audit_run(run)
    skipped = audit["author_level"]["skipped"]
    assert "1 authors have posts on more than one side" in skipped and "'ma0'" in skipped
    assert "split-unit" in skipped and "\n" not in skipped
    assert audit["members"] > 0 and "auc" in audit  # the post level still runs
    assert main(["audit", str(run)]) == 0
    out = capsys.readouterr().out
    assert "authors: not audited: 1 authors have posts on more than one side" in out
    assert json.loads((run / "privacy_report.json").read_text())["audit"]["author_level"] == {"skipped": skipped}


def test_author_level_run_uses_its_own_epsilon(tmp_path, planted):
    run, _, _ = write_author_run(tmp_path, report_extra=post_report("author"))
    authors = audit_run(run, max_authors=30)["author_level"]
    assert authors["units"] == ["author"] and authors["epsilon"] == 2.0
    assert authors["members"] == authors["non_members"] == 30 and authors["by_size"].keys() == {"2+ posts"}
    assert "author-level run" in authors["epsilon_basis"]


def test_fedpriv_audit_reports_both_units(tmp_path, planted, capsys):
    run, _, _ = write_author_run(tmp_path)
    assert main(["audit", str(run), "--max-authors", "12", "--max-examples", "50"]) == 0
    out = capsys.readouterr().out
    assert "posts" in out and "authors" in out and "12 member authors" in out
    data = json.loads((run / "privacy_report.json").read_text())["audit"]
    assert data["members"] == 50 and data["author_level"]["members"] == 12
    md = (run / "privacy_report.md").read_text()
    assert "12 member authors vs 12 held-out authors" in md and "Authors of 2+ posts: AUC" in md
    assert main(["audit", str(run), "--max-authors", "0"]) == 2
    assert "--max-authors = 0" in capsys.readouterr().err
