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

from fedpriv.errors import FedprivError
from privacy.accountant import Entry

SCHEMA_VERSION = 1
JSON_NAME = "privacy_report.json"
MD_NAME = "privacy_report.md"


@dataclass
class RegionRecord:
    """What the coordinator learned about one region's privacy spending."""

    epsilon_by_round: list[float] = field(default_factory=list)
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
    enforcement: list[dict] = field(default_factory=list)
    local_accuracy_by_round: list[float] = field(default_factory=list)
    peak_memory_mb: float | None = None


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
        rec.epsilon_by_round.append(float(metrics["epsilon"]))
        rec.steps_by_round.append(int(metrics["steps"]))
        rec.history = [tuple(h) for h in history]  # type: ignore[misc]
        rec.noise_multiplier = float(metrics["noise-multiplier"])
        rec.sample_rate = float(metrics["sample-rate"])
        rec.max_grad_norm = float(metrics["max-grad-norm"])
        rec.num_examples = int(metrics["num-examples"])
        rec.peak_memory_mb = max(rec.peak_memory_mb or 0.0, float(metrics.get("peak-memory-mb", 0.0)))
        if "lifetime-epsilon" in metrics:
            rec.lifetime_epsilon = float(metrics["lifetime-epsilon"])
        if metrics.get("max-epsilon", 0) > 0:
            rec.max_epsilon = float(metrics["max-epsilon"])

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
            d["epsilon"] = rec.epsilon_by_round[-1] if rec.epsilon_by_round else 0.0
            d["target_epsilon"] = rec.target_epsilon
            budget = rec.max_epsilon or rec.target_epsilon
            d["budget_left"] = None if budget is None else round(budget - (rec.lifetime_epsilon or d["epsilon"]), 6)
            regions[name] = d
        return {
            "schema_version": SCHEMA_VERSION,
            "run_id": self.run_id,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "status": self.status,
            "accountant": self.accountant,
            "delta": self.delta,
            "unit_of_privacy": "one record (post) of one region",
            "secure_aggregation": self.secure_aggregation,
            "config": self.config,
            "regions": regions,
            "rounds": self.rounds,
            "partition": self.partition,
            "run_info": self.run_info,
            **self.extra,
        }

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


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def render_markdown(data: dict[str, Any]) -> str:
    """A page a privacy officer can read and hand on."""
    delta, acct = data["delta"], data["accountant"]
    secagg = data.get("secure_aggregation", {})
    lines = [
        f"# fedpriv privacy-budget report — run {data.get('run_id') or '(unnamed)'}",
        "",
        f"Status: **{data['status']}** · created {data['created']} · accountant **{acct.upper()}** · δ = {delta:g}",
        "",
        "## What the guarantee means",
        "",
        f"Each region's released model updates are **record-level ({'ε'}, δ)-differentially private** with respect to "
        f"that region's own users: adding or removing any one post changes the probability of anything the region "
        f"released by at most a factor e^ε (plus δ = {delta:g}). ε below is cumulative over all rounds of this run, "
        f"computed by the {acct.upper()} accountant over the region's whole DP-SGD history (Poisson sampling, Gaussian noise, "
        f"per-example clipping). The final global model inherits each region's guarantee (post-processing).",
        "",
        ("Secure aggregation was **on**: the coordinator saw only the sum of the regions' updates, never one region's update. "
         if secagg.get("enabled") else "Secure aggregation was **off**: the coordinator saw each region's (DP-noised) update. ")
        + "Not protected: which regions took part in each round, their plaintext training metrics, and anything the final "
          "model reveals within its ε.",
        "",
        "## Per region",
        "",
        "| region | examples | noise σ | sample rate | clip C | steps | ε (this run) | budget | budget left | enforcement |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in data["regions"].items():
        budget = r.get("max_epsilon") or r.get("target_epsilon")
        enforcement = "; ".join(f"round {e['round']}: {e['action']} ({e['reason']})" for e in r.get("enforcement", [])) or "none needed"
        steps = r["steps_by_round"][-1] if r.get("steps_by_round") else 0
        lines.append(
            f"| {name} | {_fmt(r.get('num_examples'))} | {_fmt(r.get('noise_multiplier'))} | {_fmt(r.get('sample_rate'), 4)} | "
            f"{_fmt(r.get('max_grad_norm'))} | {steps} | {_fmt(r.get('epsilon'))} | {_fmt(budget)} | {_fmt(r.get('budget_left'))} | {enforcement} |")
    lines += ["", "## ε after each round (cumulative)", ""]
    names = list(data["regions"])
    max_round = max((r["round"] for r in data["rounds"]), default=0)
    lines.append("| round | " + " | ".join(names) + " | global accuracy | global loss |")
    lines.append("|---:|" + "---:|" * len(names) + "---:|---:|")
    for rnd in range(1, max_round + 1):
        cells = []
        for name in names:
            r = data["regions"][name]
            rounds = r.get("rounds_participated", [])
            cells.append(_fmt(r["epsilon_by_round"][rounds.index(rnd)]) if rnd in rounds else "–")
        g = next((x for x in data["rounds"] if x["round"] == rnd), {})
        lines.append(f"| {rnd} | " + " | ".join(cells) + f" | {_fmt(g.get('accuracy'))} | {_fmt(g.get('loss'))} |")
    base = next((x for x in data["rounds"] if x["round"] == 0), None)
    if base:
        lines += ["", f"Global model before training: accuracy {_fmt(base.get('accuracy'))}, loss {_fmt(base.get('loss'))}."]
    if data.get("audit"):
        a = data["audit"]
        lines += ["", "## Empirical audit (loss-threshold membership inference)", "",
                  f"AUC {_fmt(a.get('auc'))}, TPR at 1% FPR {_fmt(a.get('tpr_at_1pct_fpr'))}, TPR at 10% FPR "
                  f"{_fmt(a.get('tpr_at_10pct_fpr'))} ({a.get('members')} members vs {a.get('non_members')} non-members). "
                  "An AUC near 0.5 means the attack cannot tell training posts from unseen ones."]
    if data.get("partition"):
        lines += ["", "## Data partition", "", "| region | train | test | positive fraction | domains |", "|---|---:|---:|---:|---|"]
        for name, p in data["partition"].items():
            if name == "server":
                continue
            lines.append(f"| {name} | {p.get('train')} | {p.get('test')} | {_fmt(p.get('positive_fraction'))} | "
                         + ", ".join(f"{k} {v}" for k, v in p.get("domains", {}).items()) + " |")
        if "server" in data["partition"]:
            lines.append(f"\nServer held-out test set (never trained on): {data['partition']['server'].get('test')} posts.")
    if data.get("run_info"):
        lines += ["", "## Run", ""] + [f"- {k}: {_fmt(v)}" for k, v in data["run_info"].items()]
    return "\n".join(lines) + "\n"


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
