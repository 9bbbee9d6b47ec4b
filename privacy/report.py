"""The privacy-budget report every run leaves behind, and its Markdown rendering.

``privacy_report.json`` is the record (schema documented in the README and
versioned by ``schema_version``); ``privacy_report.md`` is rendered from it and
can always be re-rendered with ``fedpriv report RUN_DIR``. The JSON is rewritten
atomically after every round, so a crash never loses the rounds already done.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpriv.core.errors import FedprivError
from fedpriv.privacy.accountant import Entry, cross_check_accountant, epsilon_of

SCHEMA_VERSION = 1
JSON_NAME = "privacy_report.json"
MD_NAME = "privacy_report.md"


@dataclass
class RegionRecord:
    """What the coordinator learned about one region's privacy spending."""

    dp: bool = True  # False: the region trained without DP noise (every ε is then ∞, recorded as null)
    epsilon_by_round: list[float | None] = field(default_factory=list)
    steps_by_round: list[int] = field(default_factory=list)
    rounds_participated: list[int] = field(default_factory=list)
    history: list[Entry] = field(default_factory=list)
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    max_grad_norm: float | None = None
    num_examples: int | None = None
    target_epsilon: float | None = None
    max_epsilon: float | None = None
    lifetime_epsilon: float | None = None
    epsilon_check: float | None = None  # ε this run by the cross-check accountant, recomputed here from the history
    enforcement: list[dict] = field(default_factory=list)
    local_accuracy_by_round: list[float] = field(default_factory=list)
    peak_memory_mb: float | None = None
    delta: float | None = None  # the region's own δ: every ε of this region is at it
    deterministic_noise: bool = False  # ran under insecure-deterministic-noise: no DP guarantee
    not_private: list[str] = field(default_factory=list)  # non-DP values the region's policy released
    train_loss_by_round: list[float] = field(default_factory=list)  # only if released (not private)
    train_accuracy_by_round: list[float] = field(default_factory=list)


class RunReport:
    """Accumulates a run's privacy and utility facts; ``write()`` persists JSON + Markdown."""

    def __init__(self, run_dir: Path, config: dict[str, Any], accountant: str, delta: float, regions: list[str]):
        self.run_dir = Path(run_dir)
        self.config = dict(config)
        self.accountant = accountant
        self.delta = delta
        self.regions: dict[str, RegionRecord] = {r: RegionRecord() for r in regions}
        self.rounds: list[dict[str, Any]] = []
        self.partition: dict[str, Any] = {}
        self.run_info: dict[str, Any] = {}
        self.secure_aggregation: dict[str, Any] = {"enabled": False}
        self.status = "running"
        self.run_id = ""
        self.started = time.time()
        self.extra: dict[str, Any] = {}

    # -- recording ---------------------------------------------------------
    def record_training(self, region: str, server_round: int, metrics: dict[str, float], history: list[Entry]) -> None:
        rec = self.regions.setdefault(region, RegionRecord())
        if server_round in rec.rounds_participated:  # a retried round is recorded once
            return
        rec.rounds_participated.append(server_round)
        rec.dp = is_private(metrics)
        rec.epsilon_by_round.append(max(0.0, float(metrics["epsilon"])) if rec.dp else None)  # ε is never negative
        rec.steps_by_round.append(int(metrics["steps"]))
        rec.history = [tuple(h) for h in history]  # type: ignore[misc]
        rec.epsilon_check = epsilon_of(rec.history, float(metrics.get("delta", self.delta)),
                                       cross_check_accountant(self.accountant)) if rec.dp else None
        rec.noise_multiplier = float(metrics["noise-multiplier"])
        rec.sample_rate = float(metrics["sample-rate"])
        rec.max_grad_norm = float(metrics["max-grad-norm"])
        rec.num_examples = int(metrics["num-examples"])
        if "delta" in metrics:
            rec.delta = float(metrics["delta"])
        rec.deterministic_noise = rec.deterministic_noise or bool(metrics.get("deterministic-noise", 0))
        if "peak-memory-mb" in metrics:
            rec.peak_memory_mb = max(rec.peak_memory_mb or 0.0, float(metrics["peak-memory-mb"]))
        if "train-loss" in metrics:
            rec.train_loss_by_round.append(float(metrics["train-loss"]))
        if "train-accuracy" in metrics:
            rec.train_accuracy_by_round.append(float(metrics["train-accuracy"]))
        if rec.dp and "lifetime-epsilon" in metrics:
            rec.lifetime_epsilon = max(0.0, float(metrics["lifetime-epsilon"]))
        if metrics.get("max-epsilon", 0) > 0:
            rec.max_epsilon = float(metrics["max-epsilon"])
        from fedpriv.core.contract import NOT_PRIVATE_TRAIN_METRICS

        rec.not_private = sorted(set(rec.not_private) | {k for k in metrics if k in NOT_PRIVATE_TRAIN_METRICS})

    def record_local_evaluation(self, region: str, accuracy: float) -> None:
        """Local test-split accuracy a region's policy released (not private)."""
        rec = self.regions.setdefault(region, RegionRecord())
        rec.local_accuracy_by_round.append(float(accuracy))
        rec.not_private = sorted(set(rec.not_private) | {"eval-loss", "eval-accuracy"})

    def record_enforcement(self, region: str, server_round: int, action: str, reason: str) -> None:
        self.regions.setdefault(region, RegionRecord()).enforcement.append(
            {"round": server_round, "action": action, "reason": reason})

    def record_round(self, server_round: int, **fields: Any) -> None:
        existing = next((r for r in self.rounds if r["round"] == server_round), None)
        if existing is None:
            existing = {"round": server_round}
            self.rounds.append(existing)
            self.rounds.sort(key=lambda r: r["round"])
        existing.update(fields)

    # -- output ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        regions = {}
        for name, rec in self.regions.items():
            d = {k: v for k, v in rec.__dict__.items() if k != "history"}
            d["history"] = [list(h) for h in rec.history]
            d["epsilon"] = (rec.epsilon_by_round[-1] if rec.epsilon_by_round else 0.0) if rec.dp else None
            d["target_epsilon"] = rec.target_epsilon
            budget = rec.max_epsilon or rec.target_epsilon
            # Against the region's lifetime cap only the ledger's ε counts; the region tells it only if its
            # policy releases it (otherwise "budget left" is the region's to know).
            spent = rec.lifetime_epsilon if rec.lifetime_epsilon is not None else (
                None if rec.max_epsilon else d["epsilon"])
            d["budget_left"] = None if budget is None or spent is None else round(budget - spent, 6)
            regions[name] = d
        return {
            "schema_version": SCHEMA_VERSION,
            "run_id": self.run_id,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "status": self.status,
            "accountant": self.accountant,
            "cross_check_accountant": cross_check_accountant(self.accountant),
            "delta": self.delta,
            "unit_of_privacy": "one record (post) of one region",
            "secure_aggregation": self.secure_aggregation,
            "config": self.config,
            "regions": regions,
            "rounds": self.rounds,
            "partition": self.partition,
            "run_info": self.run_info,
            **self.extra,
        } | {"released": released_values({"regions": regions, "secure_aggregation": self.secure_aggregation,
                                           "config": self.config})}

    def write(self) -> Path:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        _atomic_write(self.run_dir / JSON_NAME, json.dumps(data, indent=2, default=_json_default))
        _atomic_write(self.run_dir / MD_NAME, render_markdown(data))
        return self.run_dir / JSON_NAME


def load_report(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / JSON_NAME
    if not path.exists():
        raise FedprivError(f"{path} does not exist: expected a run directory written by `fedpriv simulate` or `fedpriv run`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FedprivError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if data.get("schema_version") != SCHEMA_VERSION:
        raise FedprivError(f"{path} has schema_version {data.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    return data


def is_private(metrics: dict[str, Any]) -> bool:
    """Whether a region's training reply came from a DP run.

    The ``dp`` flag decides (a DP region whose ε came out negative -- an RDP conversion at a huge δ --
    is still DP, at ε = 0); only older clients without the flag sent ε = -1 for DP off.
    """
    if "dp" in metrics:
        return bool(metrics["dp"]) and "epsilon" in metrics
    return "epsilon" in metrics and float(metrics["epsilon"]) >= 0


def epsilon_text(region: dict[str, Any], key: str = "epsilon", digits: int = 3) -> str:
    """A region's ε for people: ``∞ (DP off)`` for a non-private region, ``–`` when unknown."""
    if region.get("dp") is False:
        return "∞ (DP off)"
    return _fmt(region.get(key), digits)


def enforcement_text(event: dict[str, Any]) -> str:
    """``round 3: refused by region policy: max-job-epsilon: ...`` or ``round 3: failed (reason)``."""
    from fedpriv.core.contract import POLICY

    if event["action"] == POLICY:
        return f"round {event['round']}: {POLICY}: {event['reason']}"
    return f"round {event['round']}: {event['action']} ({event['reason']})"


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float):
        return "∞" if math.isinf(x) else f"{x:.{digits}f}"
    return str(x)


def _rounds_text(rounds: list[int]) -> str:
    return ", ".join(str(r) for r in rounds)


# -- what left each region ----------------------------------------------------------------------------------

DP_AT_EPSILON = "DP at ε"
PUBLIC_BY_POLICY = "public by policy"
NOT_PRIVATE = "not private, allowed by policy"
NO_GUARANTEE = "no DP guarantee"

_NOT_PRIVATE_ROWS = (
    (("train-loss", "train-accuracy", "peak-memory-mb"), "train loss / accuracy on the private batches, peak memory",
     "release-train-metrics"),
    (("lifetime-epsilon",), "ε over the region's whole ledger (reveals other jobs' use of the data)",
     "release-lifetime-epsilon"),
    (("eval-loss", "eval-accuracy"), "loss / accuracy of the coordinator's model on the local test split",
     "release-local-evaluation"),
)


def no_dp_guarantee(data: dict[str, Any]) -> list[str]:
    """Regions whose run gives no DP guarantee at all because the noise was deterministic (the testing key)."""
    config = data.get("config") or {}
    regions = data.get("regions") or {}
    flagged = sorted(name for name, r in regions.items() if r.get("deterministic_noise"))
    if config.get("insecure-deterministic-noise") and not flagged:
        flagged = sorted(name for name, r in regions.items() if r.get("rounds_participated")) or ["every region"]
    return flagged


def released_values(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per kind of value that left a region, with its guarantee (the report's "What left each region").

    Built from what the coordinator actually received, so a value a region did not send has no row.
    """
    regions = {n: r for n, r in (data.get("regions") or {}).items() if r.get("rounds_participated")}
    if not regions:
        return []
    section = data.get("secure_aggregation") or {}
    plain_rounds = {int(e["round"]): set(e.get("participants", [])) for e in section.get("rounds", [])
                    if isinstance(e, dict) and e.get("mode") == "plain" and not e.get("aborted")}
    deterministic = set(no_dp_guarantee(data))
    update: dict[str, str] = {}
    for name, r in regions.items():
        if name in deterministic or "every region" in deterministic:
            why = f"{NO_GUARANTEE}: insecure-deterministic-noise (noise reproducible from the config)"
        elif r.get("dp") is False:
            why = f"{NO_GUARANTEE}: DP off (ε = ∞)"
        else:
            eps = (r.get("epsilon_by_round") or [None])[-1]
            delta = r.get("delta") if r.get("delta") is not None else data.get("delta")
            why = f"{DP_AT_EPSILON} = {_fmt(eps)} (δ = {delta:g})" if delta is not None else f"{DP_AT_EPSILON} = {_fmt(eps)}"
        if not section.get("enabled"):
            how = "in the clear (secure aggregation off)"
        else:
            clear = sorted(rnd for rnd, who in plain_rounds.items() if name in who)
            how = "masked: the coordinator saw only sums" + (
                f"; in the clear in plain round(s) {_rounds_text(clear)}" if clear else "")
        update[name] = f"{why}; {how}"
    everyone = {name: "" for name in regions}
    rows: list[dict[str, Any]] = [
        {"value": "model update (clipped, DP-noised)", "guarantee": DP_AT_EPSILON, "regions": update},
        {"value": "DP mechanism: σ, q, C, steps, δ, accountant, history, and ε of this job (a function of them)",
         "guarantee": PUBLIC_BY_POLICY, "regions": dict(everyone)},
        {"value": "N, the region's number of training posts (as the region declares it)",
         "guarantee": PUBLIC_BY_POLICY, "regions": dict(everyone)},
        {"value": "the region's lifetime ε cap (max-lifetime-epsilon)", "guarantee": PUBLIC_BY_POLICY,
         "regions": {n: _fmt(r.get("max_epsilon")) for n, r in regions.items() if r.get("max_epsilon")}},
    ]
    for keys, what, rule in _NOT_PRIVATE_ROWS:
        who = {n: rule for n, r in (data.get("regions") or {}).items() if set(keys) & set(r.get("not_private") or [])}
        if who:
            rows.append({"value": what, "guarantee": NOT_PRIVATE, "regions": who})
    return [row for row in rows if row["regions"]]


def _released_table(data: dict[str, Any]) -> list[str]:
    rows = data.get("released")
    if rows is None:
        rows = released_values(data)
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


# -- secure aggregation: what the coordinator saw, round by round -----------------------------------------


def secure_aggregation_rounds(data: dict[str, Any]) -> dict[str, list[int]] | None:
    """Trained rounds split by how they were aggregated: ``secure``, ``plain`` (1 region: in the clear), ``aborted``.

    None when the report does not say (no per-round record, as in hand-written or pre-release reports).
    """
    section = data.get("secure_aggregation") or {}
    if not isinstance(section.get("rounds"), list):
        return None
    entries = {int(e["round"]): e for e in section.get("rounds", []) if isinstance(e, dict) and "round" in e}
    out: dict[str, list[int]] = {"secure": [], "plain": [], "aborted": []}
    for rnd, e in sorted(entries.items()):
        out["aborted" if e.get("aborted") else ("plain" if e.get("mode") == "plain" else "secure")].append(rnd)
    return out


def coordinator_view(data: dict[str, Any]) -> str:
    """One honest paragraph on what the coordinator saw of the regions' updates in this run."""
    section = data.get("secure_aggregation") or {}
    if not section.get("enabled"):
        return ("Secure aggregation was **off**: the coordinator saw each region's (DP-noised, clipped) update "
                "individually. The ε above still holds, because the noise is added inside each region.")
    by_mode = secure_aggregation_rounds(data)
    text = "Secure aggregation was **on**"
    if by_mode is None:
        text += (": the coordinator learns only the **sum** of the regions' updates in a securely aggregated round "
                 "(this report does not record round by round how each round was aggregated).")
    elif by_mode["secure"]:
        text += (f": in round(s) {_rounds_text(by_mode['secure'])} the coordinator learned only the **sum** of the "
                 "participating regions' updates, never one region's update.")
    else:
        text += ", but no round was securely aggregated."
    if by_mode and by_mode["plain"]:
        text += (f" In round(s) {_rounds_text(by_mode['plain'])} only one region trained, so there was no sum to hide "
                 "in: those rounds fell back to plain FedAvg and **the coordinator saw that region's update** "
                 "(still DP-noised).")
    if by_mode and by_mode["aborted"]:
        text += (f" Round(s) {_rounds_text(by_mode['aborted'])} aborted (too few regions survived the protocol): "
                 "nothing was unmasked and the global model did not change.")
    return text + (" Secure aggregation does not lower ε: ε is computed as if every update were published.")


def _secure_aggregation_table(data: dict[str, Any]) -> list[str]:
    section = data.get("secure_aggregation") or {}
    entries = [e for e in section.get("rounds", []) if isinstance(e, dict)]
    if not section.get("enabled") or not entries:
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
            f"{', '.join(e.get('survivors', [])) or '–'} | {dropped} | {_fmt(e.get('threshold'))} | "
            f"{'–' if e.get('error_bound') is None else format(e['error_bound'], '.2g')} | "
            f"{_fmt(e.get('seconds'), 1)} | {e.get('reason', '')} |")
    return lines


# -- Markdown ----------------------------------------------------------------------------------------------


def render_markdown(data: dict[str, Any]) -> str:
    """A page a privacy officer can read and hand on."""
    sections = (_header, _guarantee, _released_table, _region_table, _round_table, _secure_aggregation_table, _audit,
                _partition, _run_info)
    return "\n".join(line for section in sections for line in section(data)) + "\n"


def _header(data: dict[str, Any]) -> list[str]:
    flagged = no_dp_guarantee(data)
    warning = ([f"**THIS RUN GIVES NO DIFFERENTIAL-PRIVACY GUARANTEE: {', '.join(flagged)} ran with "
                "insecure-deterministic-noise (DP noise reproducible from the run config, so it can be subtracted). "
                "Every ε below is void.**", ""] if flagged else [])
    return warning + [f"# fedpriv privacy-budget report — run {data.get('run_id') or '(unnamed)'}", "",
            f"Status: **{data['status']}** · created {data['created']} · accountant **{data['accountant'].upper()}** · "
            f"δ = {data['delta']:g}"]


def _guarantee(data: dict[str, Any]) -> list[str]:
    delta, acct = data["delta"], data["accountant"].upper()
    off = [name for name, r in data["regions"].items() if r.get("dp") is False]
    lines = ["", "## What the guarantee means", ""]
    if off:
        lines += [f"**No differential privacy for {', '.join(off)}**: DP was off (`dp = false`), so ε = ∞ — nothing "
                  "bounds what those regions' updates, or any model built from them, reveal about their posts.", ""]
    own = sorted({float(r["delta"]) for r in data["regions"].values() if r.get("delta") is not None})
    delta_text = (f"plus δ = {delta:g}" if not own or own == [float(delta)] else
                  "plus the region's own δ: " + ", ".join(f"{n} {r['delta']:g}" for n, r in data["regions"].items()
                                                         if r.get("delta") is not None))
    lines += [
        f"Each DP region's released model updates are **record-level (ε, δ)-differentially private** with respect to "
        f"that region's own users: adding or removing any one post changes the probability of the model updates the "
        f"region released by at most a factor e^ε ({delta_text}). ε below is cumulative over all rounds of this run, "
        f"computed by the {acct} accountant over the region's whole DP-SGD history (Poisson sampling, Gaussian noise, "
        f"per-example clipping). The final global model inherits each region's guarantee (post-processing). Each "
        f"region enforces its own policy (δ, caps on ε, DP and secure aggregation required or not, what else it "
        f"releases); \"What left each region\" below lists every value the coordinator received and its guarantee.",
        "",
        coordinator_view(data) + " Not protected: which regions took part in each round, the public facts listed "
        "below (N as declared, the DP mechanism's parameters), any value listed as not private, and anything the "
        "final model reveals within its ε.",
    ]
    return lines


def _region_table(data: dict[str, Any]) -> list[str]:
    lines = ["", "## Per region", "",
             "| region | examples | noise σ | sample rate | clip C | steps | ε (this run) | "
             f"ε (this run, {str(data.get('cross_check_accountant', '–')).upper()} cross-check) | ε (lifetime, ledger) | "
             "budget | budget left | enforcement |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in data["regions"].items():
        budget = r.get("max_epsilon") or r.get("target_epsilon")
        enforcement = "; ".join(enforcement_text(e) for e in r.get("enforcement", [])) or "none needed"
        steps = r["steps_by_round"][-1] if r.get("steps_by_round") else 0
        lines.append(
            f"| {name} | {_fmt(r.get('num_examples'))} | {_fmt(r.get('noise_multiplier'))} | "
            f"{_fmt(r.get('sample_rate'), 4)} | {_fmt(r.get('max_grad_norm'))} | {steps} | {epsilon_text(r)} | "
            f"{epsilon_text(r, 'epsilon_check')} | "
            f"{epsilon_text(r, 'lifetime_epsilon')} | {_fmt(budget)} | {_fmt(r.get('budget_left'))} | {enforcement} |")
    return lines


def _round_table(data: dict[str, Any]) -> list[str]:
    names = list(data["regions"])
    by_mode = {rnd: mode for mode, rounds in (secure_aggregation_rounds(data) or {}).items() for rnd in rounds}
    secagg_on = bool((data.get("secure_aggregation") or {}).get("enabled"))
    lines = ["", "## ε after each round (cumulative)", "",
             "| round | " + " | ".join(names) + " | aggregation | global accuracy | global loss |",
             "|---:|" + "---:|" * len(names) + "---|---:|---:|"]
    for rnd in range(1, max((r["round"] for r in data["rounds"]), default=0) + 1):
        cells = []
        for name in names:
            r = data["regions"][name]
            rounds = r.get("rounds_participated", [])
            cells.append(("∞" if r.get("dp") is False else _fmt(r["epsilon_by_round"][rounds.index(rnd)]))
                         if rnd in rounds else "–")
        g = next((x for x in data["rounds"] if x["round"] == rnd), {})
        how = by_mode.get(rnd, "–") if secagg_on else "plain"
        lines.append(f"| {rnd} | " + " | ".join(cells) + f" | {how} | {_fmt(g.get('accuracy'))} | {_fmt(g.get('loss'))} |")
    base = next((x for x in data["rounds"] if x["round"] == 0), None)
    if base:
        lines += ["", f"Global model before training: accuracy {_fmt(base.get('accuracy'))}, loss {_fmt(base.get('loss'))}."]
    return lines


def _audit(data: dict[str, Any]) -> list[str]:
    a = data.get("audit")
    if not a:
        return []
    return ["", "## Empirical audit (loss-threshold membership inference)", "",
            f"AUC {_fmt(a.get('auc'))}, TPR at 1% FPR {_fmt(a.get('tpr_at_1pct_fpr'))}, TPR at 10% FPR "
            f"{_fmt(a.get('tpr_at_10pct_fpr'))} ({a.get('members')} members vs {a.get('non_members')} non-members). "
            "An AUC near 0.5 means the attack cannot tell training posts from unseen ones."]


def _partition(data: dict[str, Any]) -> list[str]:
    part = data.get("partition")
    if not part:
        return []
    lines = ["", "## Data partition", "", "| region | train | test | positive fraction | domains |",
             "|---|---:|---:|---:|---|"]
    for name, p in part.items():
        if name != "server":
            lines.append(f"| {name} | {p.get('train')} | {p.get('test')} | {_fmt(p.get('positive_fraction'))} | "
                         + ", ".join(f"{k} {v}" for k, v in p.get("domains", {}).items()) + " |")
    if "server" in part:
        lines.append(f"\nServer held-out test set (never trained on): {part['server'].get('test')} posts.")
    return lines


def _run_info(data: dict[str, Any]) -> list[str]:
    info = data.get("run_info")
    return ["", "## Run", ""] + [f"- {k}: {_fmt(v)}" for k, v in info.items()] if info else []


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
