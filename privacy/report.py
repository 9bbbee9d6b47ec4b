"""The privacy-budget report of a run, in memory: what strategies record into and the coordinator persists.

:class:`RunReport` accumulates a run's privacy and utility facts (``record_*``); :meth:`RunReport.write`
persists it through the one report schema (:mod:`fedpriv.core.report_schema`: ``privacy_report.json``,
atomically, after every round, so a crash never loses the rounds already done) with its Markdown
(:mod:`fedpriv.privacy.report_markdown`), and :meth:`RunReport.restore` reads a saved one back for a
resumed run. What the report means is decided in :mod:`fedpriv.privacy.report_view`.
"""

from __future__ import annotations

import calendar
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from fedpriv.core import report_schema
from fedpriv.core.report_schema import SCHEMA_VERSION, TOP_LEVEL_KEYS
from fedpriv.privacy.accountant import Entry, cross_check_accountant, epsilon_of
from fedpriv.privacy.report_markdown import render_markdown
from fedpriv.privacy.report_view import ReportView, budget_left, one_line, redact_paths


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
    privacy_unit: str | None = None  # whom the region's ε protects: "author" or "post" (its policy's; None: not said)


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
        self.status = report_schema.RUNNING
        self.status_reason = ""  # one line: why the status is not "completed"
        self.run_id = ""
        self.started = time.time()
        self.extra: dict[str, Any] = {}

    # -- recording ---------------------------------------------------------
    def record_training(self, region: str, server_round: int, metrics: dict[str, float], history: list[Entry],
                        unit: str | None = None) -> None:
        rec = self.regions.setdefault(region, RegionRecord())
        if server_round in rec.rounds_participated:  # a retried round is recorded once
            return
        rec.privacy_unit = unit or rec.privacy_unit
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
        """A refusal or failure: its reason on one line, file paths redacted (listed as not private)."""
        self.regions.setdefault(region, RegionRecord()).enforcement.append(
            {"round": server_round, "action": action, "reason": one_line(redact_paths(reason))})

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
            d["budget_left"] = budget_left(rec.max_epsilon, rec.target_epsilon, d["epsilon"], rec.lifetime_epsilon)
            regions[name] = d
        data = {
            "schema_version": SCHEMA_VERSION,
            "run_id": self.run_id,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "status": self.status,
            "status_reason": self.status_reason,
            "accountant": self.accountant,
            "cross_check_accountant": cross_check_accountant(self.accountant),
            "delta": self.delta,
            "unit_of_privacy": unit_of_privacy(self.regions),
            "secure_aggregation": self.secure_aggregation,
            "config": self.config,
            "regions": regions,
            "rounds": self.rounds,
            "partition": declared_partition(self.partition, self.regions, self.run_info.get("server_test_examples")),
            "run_info": self.run_info,
            **self.extra,
        }
        return data | {"released": ReportView(data).computed_released()}

    def write(self) -> Path:
        """Persist the report (JSON, then its Markdown), each atomically; returns the JSON's path."""
        data = self.to_dict()
        return report_schema.save(self.run_dir, data, render_markdown(data))

    def restore(self, data: Mapping[str, Any], upto_round: int) -> None:
        """Continue from ``data`` (a loaded report) as it stood after round ``upto_round``; see ``report_schema.truncate``.

        Every per-region field of :class:`RegionRecord` that was saved is restored (ε history, steps,
        enforcement, the region's own δ, the deterministic-noise flag, values released as not private,
        ...), rounds and the secure-aggregation record up to ``upto_round``, the start time, and extra
        top-level keys (e.g. the list of Flower runs); derived values are recomputed by :meth:`to_dict`.
        """
        data = report_schema.truncate(data, upto_round)
        self.rounds = [dict(r) for r in data.get("rounds", [])]
        for name, saved in (data.get("regions") or {}).items():
            rec = self.regions.setdefault(name, RegionRecord())
            for f in dataclasses.fields(RegionRecord):
                if f.name in saved and (saved[f.name] is not None or f.name == "target_epsilon"):
                    setattr(rec, f.name, _restored(f.name, saved[f.name]))
        if data.get("created"):
            try:
                self.started = float(calendar.timegm(time.strptime(data["created"], "%Y-%m-%dT%H:%M:%SZ")))
            except ValueError:
                pass
        if isinstance(data.get("secure_aggregation"), dict):
            self.secure_aggregation = dict(data["secure_aggregation"])
        for key, value in data.items():
            if key not in TOP_LEVEL_KEYS and key not in self.extra:
                self.extra[key] = value


UNIT_TEXT = {"author": "one author (every post of one person) of one region", "post": "one record (post) of one region"}


def unit_of_privacy(regions: Mapping[str, RegionRecord]) -> str:
    """Whom ε protects, as the regions said (each region's policy decides its unit; a region that did not say
    trained per post)."""
    units = {name: rec.privacy_unit or "post" for name, rec in regions.items() if rec.rounds_participated}
    if len(set(units.values())) > 1:
        return "per region: " + ", ".join(f"{name} {UNIT_TEXT[unit].split(' of ')[0]}" for name, unit in sorted(units.items()))
    return UNIT_TEXT[next(iter(units.values()), "post")]


def _restored(name: str, value: Any) -> Any:
    """A saved per-region value in the type :class:`RegionRecord` holds it in."""
    if name == "history":
        return [(float(h[0]), float(h[1]), int(h[2])) for h in value]
    if name in ("rounds_participated", "steps_by_round"):
        return [int(v) for v in value]
    if name == "epsilon_by_round":
        return [None if v is None else float(v) for v in value]
    if name == "enforcement":
        return [dict(e) for e in value]
    if isinstance(value, list):
        return list(value)
    return value


def save_report(run_dir: Path, data: Mapping[str, Any]) -> Path:
    """Rewrite a loaded report (e.g. with an ``audit`` added) and its Markdown, each atomically."""
    return report_schema.save(run_dir, data, render_markdown(data))


def declared_partition(prepared: Mapping[str, Any], regions: Mapping[str, RegionRecord],
                       server_test: int | None) -> dict[str, Any]:
    """The report's "Data partition": each region's data as the region declared it, not the coordinator's files.

    ``train`` is N as the region declared it in its train replies (the posts it actually used, after its own
    ``max-examples-per-region`` cap; null until it trained). The coordinator's prepared stats (``prepared``:
    its ``partition.json``, e.g. a simulation's shards or ``fedpriv prepare-data --out``) add a region's test
    size, label mix and domains only where they describe that region's data as declared (same N); a region of
    that file that is not in the run is not listed. ``server``: the coordinator's own held-out set.
    """
    out: dict[str, Any] = {}
    for name, rec in regions.items():
        row: dict[str, Any] = {"train": rec.num_examples, "source": "declared by the region"}
        files = prepared.get(name) if isinstance(prepared, Mapping) else None
        if isinstance(files, Mapping) and rec.num_examples is not None and files.get("train") == rec.num_examples:
            row.update({k: files[k] for k in ("test", "positive_fraction", "domains") if k in files})
            row["source"] = "declared by the region; test split and label mix from the coordinator's prepared copy"
        out[name] = row
    if server_test is not None:
        out["server"] = {"test": int(server_test), "source": "the coordinator's held-out set"}
    return out


def settle_unfinished(run_dir: Path, status: str, reason: str) -> str | None:
    """Give a report still saying ``running`` its real end (``stopped``/``failed``, with ``reason``); returns the
    status the report has afterwards (None without a readable report).

    For the command that owns a run dir, once the run's processes are gone: a coordinator killed (Ctrl-C of
    ``fedpriv simulate`` stops its whole process tree, SIGKILL, a lost machine) never wrote its end itself.
    """
    data = report_schema.peek(run_dir)
    if data is None:
        return None
    if data.get("status") == report_schema.RUNNING:
        data["status"], data["status_reason"] = status, one_line(reason)
        save_report(run_dir, data)
    return str(data.get("status"))


def is_private(metrics: dict[str, Any]) -> bool:
    """Whether a region's training reply came from a DP run.

    The ``dp`` flag decides (a DP region whose ε came out negative -- an RDP conversion at a huge δ --
    is still DP, at ε = 0); only older clients without the flag sent ε = -1 for DP off.
    """
    if "dp" in metrics:
        return bool(metrics["dp"]) and "epsilon" in metrics
    return "epsilon" in metrics and float(metrics["epsilon"]) >= 0


__all__ = ["RegionRecord", "RunReport", "declared_partition", "is_private", "save_report", "settle_unfinished"]
