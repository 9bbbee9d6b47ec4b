"""Empirical privacy audit: a loss-threshold membership-inference attack on a run's final model.

The attack is Yeom et al. (2018), "Privacy Risk in Machine Learning: Analyzing the
Connection to Overfitting": a model tends to have lower loss on the records it was
trained on, so ``score = −loss`` ranks members above non-members when the model
memorises. Sweeping the threshold gives a ROC curve; we report its AUC and the
true-positive rate at 1% and 10% false-positive rate (the low-FPR regime is what
matters for privacy: an attack that is confident about a few records is a real
leak even at AUC ≈ 0.5), plus Yeom's membership advantage max(TPR − FPR).

Members are the regions' *training* records; non-members are the server's held-out
records, which no region ever trained on. Both sets have the same size and the same
label and domain mix (each non-member is paired with a random member of the same label and
domain), so the attack cannot win by spotting that the regions' non-IID shards lean towards
other labels or domains (with a different typical loss) than the held-out set.

For context the audit records what (ε, δ)-DP allows: any membership test against an
(ε, δ)-DP mechanism has TPR ≤ e^ε · FPR + δ (and advantage ≤ e^ε − 1 + δ). The audit
is evidence, not proof: an attack near chance is consistent with ε but does not certify
it, while an attack that beats the bound points to a bug in the accounting.

The audit needs the members' data, so it runs where every region's shard is readable
(a simulation, or an auditor trusted with all shards); nothing here is sent anywhere.

**At the unit of privacy, the author.** The guarantee that matters is per person, so the audit
also attacks whole authors (:func:`author_attack`): members are authors all of whose posts the
regions trained on, non-members authors all of whose posts are held out (whole by construction
under ``split-unit = "author"``; an author with posts on both sides makes the test meaningless, so
:func:`straddling_authors` finds them and the audit refuses the author level). An author's score
aggregates its posts' per-post scores (:data:`AUTHOR_AGGREGATES`); member and non-member authors are
paired on domain, post count and label mix (:func:`author_match_key`), so the attack cannot win on
who the authors are rather than on whether the model saw them. Its bound is the ε that protects a
whole author: the run's ε for an author-level run, and for a post-level run the exact group ε of
the largest audited author (:func:`author_epsilon`, via :func:`fedpriv.privacy.group_privacy.group_epsilon`).

This module is the attack alone: statistics on scores and losses, and the member/non-member
pairing, given plain data. Finding a run's final model and shards, and writing the result into
its report, is :mod:`fedpriv.server.audit_run` (it reads the coordinator's checkpoints).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

__all__ = [
    "AUDIT_KEY",
    "AUTHOR_AGGREGATES",
    "AUTHOR_KEY",
    "DEFAULT_AUTHOR_AGGREGATE",
    "attack_metrics",
    "author_attack",
    "author_epsilon",
    "author_match_key",
    "bound_check",
    "dp_bounds",
    "format_audit",
    "group_by_author",
    "loss_attack",
    "match_key",
    "pair_members",
    "per_example_losses",
    "region_unit",
    "roc_curve",
    "size_bucket",
    "straddling_authors",
    "tpr_at_fpr",
]

AUDIT_KEY = "audit"
AUTHOR_KEY = "author_level"
"""Inside the ``audit`` dict: the attack on whole authors (or ``{"skipped": why}``); the top-level keys are the post-level attack."""
ATTACK_NAME = "loss-threshold membership inference (Yeom et al. 2018)"
DEFAULT_MAX_EXAMPLES = 1000
BOUND_VERDICTS = {
    "consistent": "consistent (no reported operating point is above it)",
    "within sampling error": "above it at a reported point, but within sampling error (95% Clopper–Pearson)",
    "violated": "VIOLATED beyond sampling error (95% Clopper–Pearson): check the accounting",
    "no bound": "no finite ε, so DP bounds nothing",
}


# -- the attack's statistics ----------------------------------------------------------------


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) with one operating point per distinct score ("member" if score >= t).

    The first point is (0, 0) at threshold +inf; tied scores move together, as in sklearn's
    ``roc_curve(..., drop_intermediate=False)``.
    """
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last_of_group = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]
    tp = np.cumsum(y)[last_of_group]
    fp = (last_of_group + 1) - tp
    pos, neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    return (np.r_[0.0, fp / neg], np.r_[0.0, tp / pos], np.r_[np.inf, s[last_of_group]])


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """Highest TPR among ROC operating points whose FPR is at most ``target`` (no interpolation)."""
    ok = np.asarray(fpr) <= target + 1e-12
    return float(np.max(np.asarray(tpr)[ok])) if ok.any() else 0.0


def _scores(member_scores, non_member_scores) -> tuple[np.ndarray, np.ndarray]:
    m = np.asarray(member_scores, dtype=np.float64).ravel()
    n = np.asarray(non_member_scores, dtype=np.float64).ravel()
    if len(m) == 0 or len(n) == 0:
        raise ValueError(f"need at least one member and one non-member score (got {len(m)} and {len(n)})")
    if not (np.isfinite(m).all() and np.isfinite(n).all()):
        raise ValueError("membership scores must be finite")
    return np.r_[np.ones(len(m)), np.zeros(len(n))], np.r_[m, n]


def attack_metrics(member_scores: Sequence[float], non_member_scores: Sequence[float]) -> dict[str, float]:
    """ROC statistics of a membership score (higher = "member").

    Returns ``auc`` (ties count ½, i.e. the Mann–Whitney statistic), ``tpr_at_1pct_fpr``,
    ``tpr_at_10pct_fpr`` and Yeom's membership ``advantage`` = max over thresholds of TPR − FPR.
    """
    fpr, tpr, _ = roc_curve(*_scores(member_scores, non_member_scores))
    return {
        "auc": float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0)),
        "tpr_at_1pct_fpr": tpr_at_fpr(fpr, tpr, 0.01),
        "tpr_at_10pct_fpr": tpr_at_fpr(fpr, tpr, 0.10),
        "advantage": float(np.max(tpr - fpr)),
    }


def _clopper_pearson(k: int, n: int, alpha: float) -> tuple[float, float]:
    from scipy.stats import beta

    lo = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


EXP_SAFE_EPSILON = 700.0
"""ε above this is clamped before exponentiating (e^710 overflows a float). Exact: e^700·FPR ≥ 1 for every FPR the
audit can report (0 or at least 1/n), and the bound at FPR = 0 is δ whatever ε. Group ε of long-posting authors under
a post-level run reach hundreds."""


def _finite_for_exp(epsilon: float) -> float:
    return min(float(epsilon), EXP_SAFE_EPSILON)


def bound_check(member_scores: Sequence[float], non_member_scores: Sequence[float], epsilon: float | None,
                delta: float, confidence: float = 0.95) -> str:
    """Does the attack beat TPR ≤ e^ε·FPR + δ at 1% or 10% FPR, beyond sampling error?

    ``"consistent"``: no reported operating point is above the bound; ``"within sampling error"``:
    a point is above it, but its Clopper–Pearson TPR lower limit is not above the bound at the FPR
    upper limit; ``"violated"``: it is, at ``confidence`` (two-sided, per point) — then suspect the
    accounting, not the attack. ``"no bound"`` without a finite ε.
    """
    from fedpriv.privacy.html_report import tpr_bound

    if epsilon is None or not math.isfinite(epsilon):
        return "no bound"
    epsilon = _finite_for_exp(epsilon)
    labels, scores = _scores(member_scores, non_member_scores)
    fpr, tpr, _ = roc_curve(labels, scores)
    pos, neg = int(labels.sum()), int(len(labels) - labels.sum())
    verdict = "consistent"
    for target in (0.01, 0.10):
        ok = np.flatnonzero(fpr <= target + 1e-12)
        i = ok[np.argmax(tpr[ok])]
        if tpr[i] <= tpr_bound(fpr[i], epsilon, delta) + 1e-12:
            continue
        tpr_lo, _ = _clopper_pearson(int(round(tpr[i] * pos)), pos, 1 - confidence)
        _, fpr_hi = _clopper_pearson(int(round(fpr[i] * neg)), neg, 1 - confidence)
        if tpr_lo > tpr_bound(fpr_hi, epsilon, delta):
            return "violated"
        verdict = "within sampling error"
    return verdict


def dp_bounds(epsilon: float | None, delta: float) -> dict[str, float | None]:
    """What any membership test can reach against (ε, δ)-DP, at the FPRs the audit reports."""
    from fedpriv.privacy.html_report import tpr_bound

    if epsilon is None:
        return {"tpr_bound_at_1pct_fpr": None, "tpr_bound_at_10pct_fpr": None, "advantage_bound": None}
    if math.isfinite(epsilon):
        epsilon = _finite_for_exp(epsilon)
    adv = 1.0 if not math.isfinite(epsilon) else min(1.0, math.expm1(epsilon) + delta)
    return {"tpr_bound_at_1pct_fpr": tpr_bound(0.01, epsilon, delta),
            "tpr_bound_at_10pct_fpr": tpr_bound(0.10, epsilon, delta),
            "advantage_bound": adv}


# -- members and non-members ------------------------------------------------------------------


def match_key(example: Any) -> tuple[int, str]:
    """What a member and its non-member share: label and domain (tweets, reviews, ...)."""
    return (example.label, example.domain)


def pair_members(members: Sequence[Any], non_members: Sequence[Any], max_pairs: int, seed: int,
                 key=match_key) -> tuple[list[int], list[int]]:
    """Pick up to ``max_pairs`` (member, non-member) index pairs with equal ``key(example)``, at random.

    Non-members are visited in random order; each takes a random not-yet-used member with the
    same key, so the two sets end up the same size with the same label (and domain) counts.
    """
    rng = np.random.default_rng(seed)
    queues: dict[Any, list[int]] = {}
    for i in rng.permutation(len(members)):
        queues.setdefault(key(members[int(i)]), []).append(int(i))
    chosen_m, chosen_n = [], []
    for j in rng.permutation(len(non_members)):
        if len(chosen_m) >= max_pairs:
            break
        queue = queues.get(key(non_members[int(j)]))
        if queue:
            chosen_m.append(queue.pop())
            chosen_n.append(int(j))
    return chosen_m, chosen_n


# -- whole authors ------------------------------------------------------------------------------


def group_by_author(examples: Sequence[Any]) -> dict[str, list[int]]:
    """Indices of ``examples`` by author (:func:`fedpriv.task.data.author_key`), in order of first appearance."""
    from fedpriv.task.data import author_key

    groups: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        groups.setdefault(author_key(e), []).append(i)
    return groups


def straddling_authors(places: Mapping[str, Sequence[Any]]) -> dict[str, list[str]]:
    """Authors with posts in more than one of ``places`` (e.g. ``us-east/train``, ``server``), with those places.

    Such an author is neither wholly in nor wholly out of training: attacking its membership
    measures nothing. Under ``split-unit = "author"`` there are none; under ``"post"`` most
    multi-post authors straddle.
    """
    from fedpriv.task.data import author_key

    seen: dict[str, list[str]] = {}
    for place, examples in places.items():
        for key in {author_key(e) for e in examples}:
            seen.setdefault(key, []).append(place)
    return {k: v for k, v in seen.items() if len(v) > 1}


def size_bucket(k: int) -> str:
    """Post-count class for pairing: 1, 2, 3–4, 5–8, 9–16, … (a factor of two apart at most)."""
    if k <= 2:
        return str(k)
    hi = 1 << (k - 1).bit_length()
    return f"{hi // 2 + 1}-{hi}"


def author_match_key(posts: Sequence[Any]) -> tuple[tuple[str, ...], str, int]:
    """What a member author and its non-member share: domain(s), post-count class, and label mix (in quarters).

    The loss of a post depends on its domain and label, and the spread of an author's mean on
    its post count: pairing on all three leaves the attack only membership to go by.
    """
    k = len(posts)
    positive = sum(int(e.label) for e in posts)
    return (tuple(sorted({e.domain for e in posts})), size_bucket(k), int(round(4 * positive / k)))


def _logit_confidence(loss: np.ndarray) -> np.ndarray:
    # log(p / (1 − p)) of the true label, p = e^{−loss}: Carlini et al.'s (2022) scaling, which spreads the
    # confident end (loss → 0) where −loss saturates; clipped so a loss of exactly 0 stays finite
    loss = np.maximum(np.asarray(loss, dtype=np.float64), 1e-12)
    return -loss - np.log(-np.expm1(-loss))


AUTHOR_AGGREGATES = {
    "mean-loss": lambda loss: float(np.mean(-loss)),
    "median-loss": lambda loss: float(np.median(-loss)),
    "min-loss": lambda loss: float(np.max(-loss)),
    "mean-logit": lambda loss: float(np.mean(_logit_confidence(loss))),
}
"""An author's membership score from its posts' losses (higher = "member"). ``mean-loss`` is −(mean loss);
``median-loss`` ignores an author's few outlying posts; ``min-loss`` bets on its single best-remembered
post; ``mean-logit`` averages the posts' logit confidence log(p/(1−p)), which, unlike −loss, keeps
growing as a memorised post's loss goes to 0."""

DEFAULT_AUTHOR_AGGREGATE = "mean-loss"
"""The headline author score. DP-SGD's membership signal is a small loss shift spread over an author's posts, and
for a shift the mean is the natural statistic (the likelihood-ratio test for Gaussian scores). On the default
simulation (author split, ε = 8, 119 multi-post author pairs) it was the strongest by AUC and advantage
(0.561 / 0.168; median 0.554 / 0.151, mean-logit 0.556 / 0.134, min-loss 0.524 / 0.101); the others stay
reported in ``by_aggregate``."""

AUTHOR_SCORES = {
    "mean-loss": "-mean over the author's posts of the final model's cross-entropy",
    "median-loss": "-median over the author's posts of the final model's cross-entropy",
    "min-loss": "-smallest cross-entropy among the author's posts",
    "mean-logit": "mean over the author's posts of log(p/(1-p)), p = the final model's probability of the true label",
}


def region_unit(report: Mapping[str, Any], region: Mapping[str, Any]) -> str:
    """``"author"`` when the report says this region's DP-SGD protected whole authors, else ``"post"``.

    Read defensively: a report that records no unit (every report before author-level DP) is a
    post-level run, and treating a run as post-level can only make the author bound looser.
    """
    for where in (region, report):
        for key in ("privacy_unit", "unit"):
            if str(where.get(key) or "").strip().lower() == "author":
                return "author"
    stated = report.get("unit_of_privacy")
    if isinstance(stated, Mapping):
        stated = stated.get("unit")
    text = str(stated or "").strip().lower()
    return "author" if text == "author" or text.startswith(("one author", "author")) else "post"


@functools.lru_cache(maxsize=64)
def _group_epsilon(history: tuple, delta: float, k: int) -> float:
    # regions often share a schedule, and by_size asks again for the same k: a group ε of a few dozen
    # posts takes tens of seconds, so each (history, δ, k) is computed once (compacted: composition commutes)
    from fedpriv.privacy.group_privacy import group_epsilon

    return group_epsilon(history, delta, k)


def author_epsilon(report: Mapping[str, Any], delta: float, largest_author: int) -> tuple[float | None, dict[str, Any]]:
    """ε protecting every audited author (the largest has ``largest_author`` posts), and each region's part.

    A region whose unit is the author: its own ε. A post-level region: the exact group ε of its
    DP-SGD history for ``largest_author`` posts (:func:`~fedpriv.privacy.group_privacy.group_epsilon`),
    which bounds every smaller author too (removing fewer posts moves the sum less) — for one post
    it is the region's own ε. The bound is the largest over regions, as for posts: an audited
    author could have been trained in any region. ∞ for a region without DP; None (no bound)
    when a post-level region's history is missing.
    """
    from fedpriv.privacy.accountant import compact
    from fedpriv.privacy.report_view import display_regions, is_dp_off, region_final_epsilon

    per_region: dict[str, Any] = {}
    for name, region in display_regions(report).items():
        unit = region_unit(report, region)
        eps = region_final_epsilon(region)
        if is_dp_off(region) or unit == "author" or largest_author <= 1 or eps is None or eps == 0:
            per_region[name] = {"unit": unit, "epsilon": eps, "basis": "the region's ε"}
            continue
        history = region.get("history") or []
        try:
            triples = [(float(s), float(q), int(n)) for s, q, n in history]
        except (TypeError, ValueError):
            triples = []
        value = _group_epsilon(tuple(compact(triples)), float(delta), int(largest_author)) if triples else None
        per_region[name] = {"unit": unit, "epsilon": value,
                            "basis": f"group ε of the post-level history for {largest_author} posts" if triples
                            else "unknown: the report has no DP-SGD history for this region"}
    values = [r["epsilon"] for r in per_region.values()]
    if not values or any(v is None for v in values):
        return None, per_region
    return float(max(values)), per_region


# -- losses -----------------------------------------------------------------------------------


def per_example_losses(model, trainable: str, examples: Sequence[Any], tokenizer, max_length: int, device,
                       batch_size: int = 256) -> np.ndarray:
    """Cross-entropy of ``model`` on each example (eval mode), computed through the split classifier."""
    import torch
    import torch.nn.functional as F

    from fedpriv.task.encoding import encode
    from fedpriv.task.features import SplitClassifier, collate_features

    if not examples:
        return np.zeros(0)
    split = SplitClassifier(model, trainable)
    data = split.features(encode(examples, tokenizer, max_length), device)
    was_training = split.top.training
    split.top.eval()
    losses = np.zeros(len(data))
    order = sorted(range(len(data)), key=lambda i: data.features[i].shape[0])
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start: start + batch_size]
            batch = {k: v.to(device) for k, v in collate_features([data[i] for i in idx]).items()}
            out = split.top(hidden=batch["hidden"], attention_mask=batch["attention_mask"])
            losses[idx] = F.cross_entropy(out.logits.float(), batch["labels"], reduction="none").cpu().numpy()
    split.top.train(was_training)
    return losses


def _accuracy_from_losses(losses: np.ndarray) -> float:
    # binary classification: the true label's probability > 1/2  ⇔  loss < ln 2
    return float(np.mean(losses < math.log(2))) if len(losses) else float("nan")


def loss_attack(member_losses: np.ndarray, non_member_losses: np.ndarray, epsilon: float | None,
                delta: float) -> dict[str, Any]:
    """The attack's part of the ``audit`` dict: score = −loss, its ROC statistics, and the (ε, δ)-DP bounds.

    ``epsilon`` is the largest region ε of the run (``math.inf`` for a run without DP, ``None``
    when unknown). Values are rounded as the report stores them.
    """
    m_loss = np.asarray(member_losses, dtype=np.float64)
    n_loss = np.asarray(non_member_losses, dtype=np.float64)
    out: dict[str, Any] = {
        **{k: round(v, 6) for k, v in attack_metrics(-m_loss, -n_loss).items()},
        "member_loss": round(float(np.mean(m_loss)), 6),
        "non_member_loss": round(float(np.mean(n_loss)), 6),
        "member_accuracy": round(_accuracy_from_losses(m_loss), 6),
        "non_member_accuracy": round(_accuracy_from_losses(n_loss), 6),
        "epsilon": epsilon,
        "delta": delta,
        **{k: None if v is None else round(v, 6) for k, v in dp_bounds(epsilon, delta).items()},
        "bound_check": bound_check(-m_loss, -n_loss, epsilon, delta),
        "attack": ATTACK_NAME,
        "score": "-per-example cross-entropy of the final model",
    }
    return out


def author_attack(member_losses: Sequence[np.ndarray], non_member_losses: Sequence[np.ndarray],
                  epsilon_for: Callable[[int], float | None], delta: float,
                  aggregate: str = DEFAULT_AUTHOR_AGGREGATE) -> dict[str, Any]:
    """The author-level part of the ``audit`` dict: one loss array per author (its posts), members and non-members.

    ``epsilon_for(k)`` is the ε protecting authors of up to ``k`` posts (:func:`author_epsilon`);
    the headline bound uses the largest audited author (one conservative bound for all: every
    author's ε is at most it), and ``by_size`` repeats the attack and its bound for one-post and
    multi-post authors separately. Every aggregate of :data:`AUTHOR_AGGREGATES` is scored
    (``by_aggregate``); the headline and the bound check use ``aggregate``.
    """
    if aggregate not in AUTHOR_AGGREGATES:
        raise ValueError(f"aggregate = {aggregate!r}: expected one of {', '.join(AUTHOR_AGGREGATES)}")
    members = [np.asarray(x, dtype=np.float64).ravel() for x in member_losses]
    non_members = [np.asarray(x, dtype=np.float64).ravel() for x in non_member_losses]
    if any(len(x) == 0 for x in members + non_members):
        raise ValueError("every author needs at least one post")

    def scores(groups, how):
        return np.array([AUTHOR_AGGREGATES[how](g) for g in groups])

    def part(m_groups, n_groups) -> dict[str, Any]:
        largest = max(len(g) for g in m_groups + n_groups)
        eps = epsilon_for(largest)
        m, n = scores(m_groups, aggregate), scores(n_groups, aggregate)
        return {**{k: round(v, 6) for k, v in attack_metrics(m, n).items()},
                "members": len(m_groups), "non_members": len(n_groups), "largest_author_posts": largest,
                "epsilon": eps,
                **{k: None if v is None else round(v, 6) for k, v in dp_bounds(eps, delta).items()},
                "bound_check": bound_check(m, n, eps, delta),
                "by_aggregate": {how: {k: round(v, 6) for k, v in attack_metrics(scores(m_groups, how),
                                                                                  scores(n_groups, how)).items()}
                                 for how in AUTHOR_AGGREGATES}}

    out = part(members, non_members)
    m_all, n_all = np.concatenate(members), np.concatenate(non_members)
    sizes = np.array([len(g) for g in members + non_members])
    out.update({
        "delta": delta,
        "member_posts": int(len(m_all)),
        "non_member_posts": int(len(n_all)),
        "posts_per_author_mean": round(float(sizes.mean()), 3),
        "member_loss": round(float(np.mean(m_all)), 6),
        "non_member_loss": round(float(np.mean(n_all)), 6),
        "aggregate": aggregate,
        "score": AUTHOR_SCORES[aggregate],
        "attack": ATTACK_NAME + ", per author",
    })
    by_size = {}
    for label, test in (("1 post", lambda g: len(g) == 1), ("2+ posts", lambda g: len(g) > 1)):
        m, n = [g for g in members if test(g)], [g for g in non_members if test(g)]
        if m and n:
            by_size[label] = part(m, n)
    out["by_size"] = by_size
    return out


# -- output ------------------------------------------------------------------------------------


def _f(x: Any, spec: str = ".3f") -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return format(x, spec)


def format_audit(audit: Mapping[str, Any]) -> str:
    """The short table ``fedpriv audit`` prints: the post-level attack, and beside it the attack on whole authors."""
    eps = audit.get("epsilon")
    eps_txt = "∞ (no DP)" if isinstance(eps, float) and math.isinf(eps) else _f(eps)
    by_region = ", ".join(f"{k} {v}" for k, v in (audit.get("members_by_region") or {}).items())
    authors = audit.get(AUTHOR_KEY)
    a = authors if isinstance(authors, Mapping) and "auc" in authors else None
    metrics = (("AUC", "auc", None), ("TPR at 1% FPR", "tpr_at_1pct_fpr", "tpr_bound_at_1pct_fpr"),
               ("TPR at 10% FPR", "tpr_at_10pct_fpr", "tpr_bound_at_10pct_fpr"),
               ("advantage TPR−FPR", "advantage", "advantage_bound"))

    def row(d: Mapping[str, Any], key: str, bound: str | None) -> str:
        return f"{_f(d.get(key)):>8}   {(_f(d.get(bound)) if bound else '(0.5 = chance)'):<16}"

    head = f"  {'metric':<18} {'posts':>8}   {'DP allows ≤':<16}" + (f" {'authors':>8}   {'DP allows ≤':<16}" if a else "")
    lines = [
        f"Membership-inference audit: {audit.get('attack', ATTACK_NAME)}",
        f"  posts: {audit['members']} members ({by_region}) vs {audit['non_members']} held-out non-members, "
        f"label- and domain-matched; model of round {audit.get('model_round') if audit.get('model_round') is not None else 'final'}",
    ]
    if a:
        lines.append(f"  authors: {a.get('members')} member authors ({a.get('member_posts')} posts) vs {a.get('non_members')} "
                     f"held-out authors ({a.get('non_member_posts')} posts), matched on {a.get('matched_on', 'domain, size, label mix')}; "
                     f"score: {a.get('score')}")
        if a.get("named_authors") == 0:
            lines.append("  (no audited post names its author: each is its own, so the author attack is a post attack)")
    lines += ["", head]
    for name, key, bound in metrics:
        lines.append(f"  {name:<18} {row(audit, key, bound)}" + (f" {row(a, key, bound)}" if a else ""))
    lines += [
        "",
        f"  mean loss: members {_f(audit.get('member_loss'), '.4f')}, non-members {_f(audit.get('non_member_loss'), '.4f')}; "
        f"accuracy: members {_f(audit.get('member_accuracy'))}, non-members {_f(audit.get('non_member_accuracy'))}",
        f"  post bounds use the run's largest region ε = {eps_txt} at δ = {_f(audit.get('delta'), 'g')}: "
        "TPR ≤ e^ε·FPR + δ.",
    ]
    verdict = audit.get("bound_check")
    if verdict:
        lines.append(f"  posts against the bound: {BOUND_VERDICTS.get(verdict, verdict)}")
    if a:
        lines.append(f"  author bounds use ε = {_f(a.get('epsilon'))} for authors of up to {a.get('largest_author_posts')} posts "
                     f"({a.get('epsilon_basis', '')})")
        if a.get("bound_check"):
            lines.append(f"  authors against the bound: {BOUND_VERDICTS.get(a['bound_check'], a['bound_check'])}")
        for label, part in (a.get("by_size") or {}).items():
            lines.append(f"  authors of {label}: {part.get('members')} vs {part.get('non_members')}, AUC {_f(part.get('auc'))}, "
                         f"TPR at 1% / 10% FPR {_f(part.get('tpr_at_1pct_fpr'))} / {_f(part.get('tpr_at_10pct_fpr'))} "
                         f"(ε = {_f(part.get('epsilon'))}: ≤ {_f(part.get('tpr_bound_at_1pct_fpr'))} / "
                         f"{_f(part.get('tpr_bound_at_10pct_fpr'))})")
        for label, part in (("all authors", a), *((f"authors of {k}", v) for k, v in (a.get("by_size") or {}).items())):
            others = ", ".join(f"{k} {_f(v.get('auc'))} / {_f(v.get('tpr_at_10pct_fpr'))}"
                               for k, v in (part.get("by_aggregate") or {}).items())
            if others:
                lines.append(f"  AUC / TPR at 10% FPR by author score, {label}: {others}")
    elif isinstance(authors, Mapping) and authors.get("skipped"):
        lines.append(f"  authors: not audited: {authors['skipped']}")
    return "\n".join(lines)
