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

This module is the attack alone: statistics on scores and losses, and the member/non-member
pairing, given plain data. Finding a run's final model and shards, and writing the result into
its report, is :mod:`fedpriv.server.audit_run` (it reads the coordinator's checkpoints).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "AUDIT_KEY",
    "attack_metrics",
    "bound_check",
    "dp_bounds",
    "format_audit",
    "loss_attack",
    "match_key",
    "pair_members",
    "per_example_losses",
    "roc_curve",
    "tpr_at_fpr",
]

AUDIT_KEY = "audit"
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


# -- output ------------------------------------------------------------------------------------


def _f(x: Any, spec: str = ".3f") -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return format(x, spec)


def format_audit(audit: Mapping[str, Any]) -> str:
    """The short table ``fedpriv audit`` prints."""
    eps = audit.get("epsilon")
    eps_txt = "∞ (no DP)" if isinstance(eps, float) and math.isinf(eps) else _f(eps)
    by_region = ", ".join(f"{k} {v}" for k, v in (audit.get("members_by_region") or {}).items())
    lines = [
        f"Membership-inference audit: {audit.get('attack', ATTACK_NAME)}",
        f"  {audit['members']} members ({by_region}) vs {audit['non_members']} held-out non-members, "
        f"label- and domain-matched; model of round {audit.get('model_round') if audit.get('model_round') is not None else 'final'}",
        "",
        f"  {'metric':<18} {'attack':>8}   {'(ε, δ)-DP allows at most':<26}",
        f"  {'AUC':<18} {_f(audit['auc']):>8}   (0.5 = chance)",
        f"  {'TPR at 1% FPR':<18} {_f(audit['tpr_at_1pct_fpr']):>8}   {_f(audit.get('tpr_bound_at_1pct_fpr'))}",
        f"  {'TPR at 10% FPR':<18} {_f(audit['tpr_at_10pct_fpr']):>8}   {_f(audit.get('tpr_bound_at_10pct_fpr'))}",
        f"  {'advantage TPR−FPR':<18} {_f(audit['advantage']):>8}   {_f(audit.get('advantage_bound'))}",
        "",
        f"  mean loss: members {_f(audit.get('member_loss'), '.4f')}, non-members {_f(audit.get('non_member_loss'), '.4f')}; "
        f"accuracy: members {_f(audit.get('member_accuracy'))}, non-members {_f(audit.get('non_member_accuracy'))}",
        f"  bounds use the run's largest region ε = {eps_txt} at δ = {_f(audit.get('delta'), 'g')}: "
        "TPR ≤ e^ε·FPR + δ.",
    ]
    verdict = audit.get("bound_check")
    if verdict:
        lines.append(f"  against the bound: {BOUND_VERDICTS.get(verdict, verdict)}")
    return "\n".join(lines)
