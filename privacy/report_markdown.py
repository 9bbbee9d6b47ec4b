"""The privacy report as Markdown (``privacy_report.md``): a page a privacy officer can read and hand on.

Written by the coordinator after every round (next to the JSON) and by ``fedpriv report``.
Every statement of meaning (DP off, over budget, what the coordinator saw, what left each
region) comes from :class:`~fedpriv.privacy.report_view.ReportView`; this module only lays it out.
"""

from __future__ import annotations

from typing import Any, Mapping

from fedpriv.privacy.report_view import ReportView, enforcement_text, fmt, guarantee_level, rounds_text, skipped_rounds, unit_phrase

__all__ = ["coordinator_view", "render_markdown"]


def render_markdown(report: "Mapping[str, Any] | ReportView") -> str:
    """The whole page for ``report`` (a report dict as written or loaded, or its view)."""
    view = ReportView.of(report)
    sections = (_header, _guarantee, _released_table, _region_table, _round_table, _secure_aggregation_table, _audit,
                _partition, _run_info)
    return "\n".join(line for section in sections for line in section(view)) + "\n"


def coordinator_view(report: "Mapping[str, Any] | ReportView") -> str:
    """One honest paragraph on what the coordinator saw of the regions' updates in this run."""
    view = ReportView.of(report)
    if not view.secagg_enabled:
        return ("Secure aggregation was **off**: the coordinator saw each region's (DP-noised, clipped) update "
                "individually. The ε above still holds, because the noise is added inside each region.")
    by_mode = view.aggregation_rounds
    text = "Secure aggregation was **on**"
    if by_mode is None:
        text += (": the coordinator learns only the **sum** of the regions' updates in a securely aggregated round "
                 "(this report does not record round by round how each round was aggregated).")
    elif by_mode["secure"]:
        text += (f": in round(s) {rounds_text(by_mode['secure'])} the coordinator learned only the **sum** of the "
                 "participating regions' updates, never one region's update.")
    else:
        text += ", but no round was securely aggregated."
    if by_mode and by_mode["plain"]:
        text += (f" In round(s) {rounds_text(by_mode['plain'])} only one region trained, so there was no sum to hide "
                 "in: those rounds fell back to plain FedAvg and **the coordinator saw that region's update** "
                 "(still DP-noised).")
    if by_mode and by_mode["aborted"]:
        text += (f" Round(s) {rounds_text(by_mode['aborted'])} aborted (too few regions survived the protocol): "
                 "nothing was unmasked and the global model did not change.")
    return text + (" Secure aggregation does not lower ε: ε is computed as if every update were published.")


def _header(view: ReportView) -> list[str]:
    data, flagged = view.data, view.no_dp_guarantee
    warning = ([f"**THIS RUN GIVES NO DIFFERENTIAL-PRIVACY GUARANTEE: {', '.join(flagged)} ran with "
                "insecure-deterministic-noise (DP noise reproducible from the run config, so it can be subtracted). "
                "Every ε below is void.**", ""] if flagged else [])
    reason = f" ({data['status_reason']})" if data.get("status_reason") else ""
    return warning + [f"# fedpriv privacy-budget report — {view.run_name}", "",
            f"Status: **{data['status']}**{reason} · Flower run {data.get('run_id') or '–'} · created {data['created']} · "
            f"accountant **{data['accountant'].upper()}** · δ = {data['delta']:g}"]


def _guarantee(view: ReportView) -> list[str]:
    data = view.data
    delta, acct = data["delta"], data["accountant"].upper()
    off = view.dp_off_regions
    lines = ["", "## What the guarantee means", ""]
    if off:
        lines += [f"**No differential privacy for {', '.join(off)}**: DP was off (`dp = false`), so ε = ∞ — nothing "
                  "bounds what those regions' updates, or any model built from them, reveal about their posts.", ""]
    over = view.over_budget
    if over:
        lines += ["**Over budget**: " + ", ".join(f"{name} (ε = {fmt(eps)} > max ε = {cap:g})" for name, eps, cap in over)
                  + " ended this run above their privacy budget; budget enforcement should have refused their last "
                  "release: investigate before training on their data again.", ""]
    own = sorted({float(r["delta"]) for r in view.regions.values() if r.get("delta") is not None})
    delta_text = (f"plus δ = {delta:g}" if not own or own == [float(delta)] else
                  "plus the region's own δ: " + ", ".join(f"{n} {r['delta']:g}" for n, r in view.regions.items()
                                                         if r.get("delta") is not None))
    unit = str(data.get("unit_of_privacy") or "one training record of one region")
    lines += [
        f"The unit of privacy is **{unit}**: ε bounds what the released values reveal about any one such unit.", "",
        f"Each DP region's released model updates are **{guarantee_level(unit)} (ε, δ)-differentially private** with "
        f"respect to that region's own users: adding or removing {unit_phrase(unit)} changes the probability of the model updates the "
        f"region released by at most a factor e^ε ({delta_text}). ε below is cumulative over all rounds of this run, "
        f"computed by the {acct} accountant over the region's whole DP-SGD history (Poisson sampling, Gaussian noise, "
        f"per-example clipping). The final global model inherits each region's guarantee (post-processing). Each "
        f"region enforces its own policy (δ, caps on ε, DP and secure aggregation required or not, what else it "
        f"releases); \"What left each region\" below lists every value the coordinator received and its guarantee.",
        "",
        coordinator_view(view) + " Not protected: which regions took part in each round, the public facts listed "
        "below (N as declared, the DP mechanism's parameters), any value listed as not private, and anything the "
        "final model reveals within its ε.",
    ]
    return lines


def _released_table(view: ReportView) -> list[str]:
    rows = view.released
    if not rows:
        return []
    lines = ["", "## What left each region", "",
             "Everything the coordinator received from the regions, one row per kind of value, with its guarantee. "
             "Nothing else derived from a region's data left it.", "",
             "| value | guarantee | regions |", "|---|---|---|"]
    for row in rows:
        who = "; ".join(f"{n}: {d}" if d else n for n, d in row["regions"].items())
        lines.append(f"| {row['value']} | {row['guarantee']} | {who} |")
    return lines


def _region_table(view: ReportView) -> list[str]:
    data = view.data
    lines = ["", "## Per region", "",
             "| region | examples | noise σ | sample rate | clip C | steps | ε (this run) | "
             f"ε (this run, {str(data.get('cross_check_accountant', '–')).upper()} cross-check) | ε (lifetime, ledger) | "
             "budget | budget left | enforcement |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in data["regions"].items():
        budget, _ = view.budget(name)
        enforcement = "; ".join(enforcement_text(e) for e in r.get("enforcement", [])) or "none needed"
        steps = r["steps_by_round"][-1] if r.get("steps_by_round") else 0
        lines.append(
            f"| {name} | {fmt(r.get('num_examples'))} | {fmt(r.get('noise_multiplier'))} | "
            f"{fmt(r.get('sample_rate'), 4)} | {fmt(r.get('max_grad_norm'))} | {steps} | {view.epsilon_text(name)} | "
            f"{view.epsilon_text(name, 'epsilon_check')} | "
            f"{view.epsilon_text(name, 'lifetime_epsilon')} | {fmt(budget)} | {fmt(r.get('budget_left'))} | {enforcement} |")
    return lines


def _round_table(view: ReportView) -> list[str]:
    data = view.data
    names = list(data["regions"])
    lines = ["", "## ε after each round (cumulative)", "",
             "\"skipped\": the region was asked and refused or declined (nothing released, no ε spent); "
             "\"failed\": it failed (nothing released); \"–\": not asked.", "",
             "| round | " + " | ".join(names) + " | aggregation | global accuracy | global loss |",
             "|---:|" + "---:|" * len(names) + "---|---:|---:|"]
    for rnd in range(1, max((r["round"] for r in data["rounds"]), default=0) + 1):
        cells = []
        for name in names:
            r = view.display_regions[name]
            rounds = r.get("rounds_participated", [])
            skipped = skipped_rounds(r).get(rnd)  # refused / declined / failed: nothing released, no ε spent
            cells.append(fmt(r["epsilon_by_round"][rounds.index(rnd)]) if rnd in rounds else skipped or "–")
        g = next((x for x in data["rounds"] if x["round"] == rnd), {})
        lines.append(f"| {rnd} | " + " | ".join(cells) + f" | {view.aggregation_of(rnd)} | {fmt(g.get('accuracy'))} | "
                     f"{fmt(g.get('loss'))} |")
    base = next((x for x in data["rounds"] if x["round"] == 0), None)
    if base:
        lines += ["", f"Global model before training: accuracy {fmt(base.get('accuracy'))}, loss {fmt(base.get('loss'))}."]
    return lines


def _secure_aggregation_table(view: ReportView) -> list[str]:
    section = view.secure_aggregation
    entries = [e for e in section.get("rounds", []) if isinstance(e, Mapping)]
    if not view.secagg_enabled or not entries:
        return []
    lines = ["", "## Secure aggregation, round by round", "",
             f"Protocol {section.get('protocol', 'SecAgg')}, threshold {section.get('threshold')}, neighbours "
             f"{section.get('neighbours')}, {section.get('quant_bits')}-bit quantisation of updates clipped to "
             f"±{section.get('clip_range')}.", "",
             "| round | aggregation | trained | survived | dropped (stage) | threshold | error bound | seconds | note |",
             "|---:|---|---|---|---|---:|---:|---:|---|"]
    for e in sorted(entries, key=lambda e: int(e.get("round", 0))):
        mode = "aborted" if e.get("aborted") else ("plain (in the clear)" if e.get("mode") == "plain" else "secure")
        dropped = "; ".join(f"{k} ({v})" for k, v in (e.get("dropped_at") or {}).items()) or "–"
        lines.append(
            f"| {e.get('round')} | {mode} | {', '.join(e.get('participants', [])) or '–'} | "
            f"{', '.join(e.get('survivors', [])) or '–'} | {dropped} | {fmt(e.get('threshold'))} | "
            f"{'–' if e.get('error_bound') is None else format(e['error_bound'], '.2g')} | "
            f"{fmt(e.get('seconds'), 1)} | {e.get('reason', '')} |")
    return lines


def _audit(view: ReportView) -> list[str]:
    a = view.data.get("audit")
    if not a:
        return []
    return ["", "## Empirical audit (loss-threshold membership inference)", "",
            f"AUC {fmt(a.get('auc'))}, TPR at 1% FPR {fmt(a.get('tpr_at_1pct_fpr'))}, TPR at 10% FPR "
            f"{fmt(a.get('tpr_at_10pct_fpr'))} ({a.get('members')} members vs {a.get('non_members')} non-members). "
            "An AUC near 0.5 means the attack cannot tell training posts from unseen ones."] + _audit_authors(a)


def _audit_authors(a: dict) -> list[str]:
    w = a.get("author_level")
    if not isinstance(w, dict):
        return []
    if "auc" not in w:
        return ["", f"Whole authors: not audited ({w.get('skipped', 'no pairs')})."]
    return ["", f"Whole authors (all of an author's posts in or out): AUC {fmt(w.get('auc'))}, TPR at 1% FPR "
            f"{fmt(w.get('tpr_at_1pct_fpr'))}, TPR at 10% FPR {fmt(w.get('tpr_at_10pct_fpr'))} "
            f"({w.get('members')} member authors vs {w.get('non_members')} held-out authors, up to "
            f"{w.get('largest_author_posts')} posts each); ε for these authors {fmt(w.get('epsilon'))} "
            f"({w.get('epsilon_basis', '')})." + "".join(
                f" Authors of {k}: AUC {fmt(v.get('auc'))}, TPR at 10% FPR {fmt(v.get('tpr_at_10pct_fpr'))} "
                f"({v.get('members')} vs {v.get('non_members')}, ε {fmt(v.get('epsilon'))})."
                for k, v in (w.get("by_size") or {}).items() if isinstance(v, dict))]


def _partition(view: ReportView) -> list[str]:
    part = view.data.get("partition")
    if not part:
        return []
    lines = ["", "## Data partition", "",
             "Each region's training posts as the region declared them (N, after its own max-examples-per-region "
             "cap); the rest only where the coordinator's prepared copy describes the same data.", "",
             "| region | train (declared) | test | positive fraction | domains |", "|---|---:|---:|---:|---|"]
    for name, p in part.items():
        if name != "server" and isinstance(p, Mapping):
            lines.append(f"| {name} | {fmt(p.get('train'))} | {fmt(p.get('test'))} | {fmt(p.get('positive_fraction'))} | "
                         + (", ".join(f"{k} {v}" for k, v in (p.get("domains") or {}).items()) or "–") + " |")
    if "server" in part:
        lines.append(f"\nServer held-out test set (never trained on): {part['server'].get('test')} posts.")
    return lines


def _run_info(view: ReportView) -> list[str]:
    info = view.data.get("run_info")
    return ["", "## Run", ""] + [f"- {k}: {fmt(v)}" for k, v in info.items()] if info else []
