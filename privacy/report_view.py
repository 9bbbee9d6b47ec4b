"""What a privacy report *means*, decided once: every renderer (Markdown, HTML, plots) asks here.

A loaded report (``fedpriv.core.report_schema.load``) is plain data; :class:`ReportView` answers
the questions a reader of the report asks of it, with one rule each:

* **DP off**: a region whose record says ``dp: false`` (the schema turns older forms -- ε = -1,
  ε = ∞ -- into that); its ε is ∞ everywhere. The run config's ``dp`` is the coordinator's
  request, not what a region did (each region's own policy decides), so it is not a signal.
* **No DP guarantee at all**: a region that ran with ``insecure-deterministic-noise``.
* **Budget** and **over budget**: a region's budget is its lifetime cap ``max_epsilon`` if it
  declared one, else the run's ``target_epsilon``; it is over budget when its ε (this run's or
  its ledger's, whichever is larger) exceeds its cap.
* **What the coordinator saw**: per round, ``secure`` (only the sum), ``plain`` (one region: in the
  clear), ``aborted`` (nothing unmasked); all rounds are plain when secure aggregation is off.
* **What left each region** (``released``): the rows stored in the report, or rebuilt from it.
* **How the run ended** (:func:`run_verdict`): ``failed`` when no round updated the model or the run ended
  early / below min-train-regions, ``completed with failures`` when a region refused or failed in every round
  or some rounds changed nothing, else ``completed``; a round a region refused, declined or failed in is
  **skipped** (:func:`skipped_rounds`): it released nothing and spent no ε.

Pure functions over dicts: no I/O, no matplotlib, no torch, so the coordinator renders its
Markdown every round with it and ``fedpriv report`` its HTML and plots.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

from fedpriv.core.report_schema import normalise

Report = Mapping[str, Any]

DP_AT_EPSILON = "DP at ε"
PUBLIC_BY_POLICY = "public by policy"
NOT_PRIVATE = "not private, allowed by policy"
NO_GUARANTEE = "no DP guarantee"
NOT_PRIVATE_ERRORS = "not private: a region's own error text, not a DP release"
DP_OFF_TEXT = "∞ (DP off)"

_NOT_PRIVATE_ROWS = (
    (("train-loss", "train-accuracy", "peak-memory-mb"), "train loss / accuracy on the private batches, peak memory",
     "release-train-metrics"),
    (("lifetime-epsilon",), "ε over the region's whole ledger (reveals other jobs' use of the data)",
     "release-lifetime-epsilon"),
    (("eval-loss", "eval-accuracy"), "loss / accuracy of the coordinator's model on the local test split",
     "release-local-evaluation"),
)


# -- numbers and plain text ---------------------------------------------------------------------------------


def number(x: Any) -> float | None:
    """A finite-or-infinite float, or None for missing / non-numeric values."""
    if isinstance(x, bool) or x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


epsilon_value = number  # an ε as a number (older files' -1 sentinel is gone after report_schema.normalise)


def fmt(x: Any, digits: int = 3) -> str:
    """A value for plain text: ``–`` when unknown, ``∞`` for infinity."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float):
        return "∞" if math.isinf(x) else f"{x:.{digits}f}"
    return str(x)


def rounds_text(rounds: list[int]) -> str:
    return ", ".join(str(r) for r in rounds)


def epsilon_text(region: Mapping[str, Any], key: str = "epsilon", digits: int = 3) -> str:
    """A region's ε for people: ``∞ (DP off)`` for a non-private region, ``–`` when unknown."""
    if is_dp_off(region):
        return DP_OFF_TEXT
    return fmt(region.get(key), digits)


def enforcement_text(event: Mapping[str, Any]) -> str:
    """``round 3: refused by region policy: max-job-epsilon: ...`` or ``round 3: failed (reason)``."""
    from fedpriv.core.contract import POLICY

    if event["action"] == POLICY:
        return f"round {event['round']}: {POLICY}: {event['reason']}"
    return f"round {event['round']}: {event['action']} ({event['reason']})"


# -- one region ---------------------------------------------------------------------------------------------


def is_dp_off(region: Mapping[str, Any]) -> bool:
    """The region trained without DP noise (ε = ∞). Apply to normalised regions (the schema's ``load``)."""
    return region.get("dp") is False


def display_region(region: Mapping[str, Any]) -> dict[str, Any]:
    """The region with ε = ∞ everywhere if it trained without DP (the JSON stores null), for plotting."""
    out = dict(region)
    if is_dp_off(region):
        out["epsilon_by_round"] = [math.inf for _ in region.get("epsilon_by_round") or []]
        out["epsilon"] = out["lifetime_epsilon"] = math.inf
    return out


def display_regions(report: Report) -> dict[str, dict[str, Any]]:
    """Every region of ``report`` in :func:`display_region` form (non-object entries become empty)."""
    regions = normalise(report).get("regions") or {}
    if not isinstance(regions, Mapping):
        return {}
    return {str(k): display_region(v) if isinstance(v, Mapping) else {} for k, v in regions.items()}


def region_epsilon_series(region: Mapping[str, Any]) -> tuple[list[float], list[float]]:
    """(round numbers, cumulative ε) for one region; unknown ε (null) are left out.

    ``epsilon_by_round[i]`` belongs to ``rounds_participated[i]`` when both have the same
    length; otherwise rounds are numbered 1, 2, ...
    """
    eps = [number(e) for e in (region.get("epsilon_by_round") or [])]
    rounds = list(region.get("rounds_participated") or [])
    if len(rounds) != len(eps) or not all(number(r) is not None for r in rounds):
        rounds = list(range(1, len(eps) + 1))
    pairs = [(float(r), e) for r, e in zip(rounds, eps) if e is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def region_budget(region: Mapping[str, Any]) -> tuple[float | None, str]:
    """The region's budget: its lifetime cap ``max_epsilon`` if set, else the run's ``target_epsilon``."""
    for key, label in (("max_epsilon", "max ε"), ("target_epsilon", "target ε")):
        v = number(region.get(key))
        if v is not None and v > 0 and math.isfinite(v):
            return (region[key] if isinstance(region[key], (int, float)) else v), label
    return None, ""


def region_final_epsilon(region: Mapping[str, Any]) -> float | None:
    """ε of this run at its end (∞ for DP off), or None if unknown."""
    if is_dp_off(region):
        return math.inf
    v = number(region.get("epsilon"))
    if v is None:
        _, eps = region_epsilon_series(region)
        v = eps[-1] if eps else None
    return v


def region_lifetime_epsilon(region: Mapping[str, Any]) -> float | None:
    """ε over the region's whole ledger, if it released it (∞ for DP off)."""
    return math.inf if is_dp_off(region) else number(region.get("lifetime_epsilon"))


def budget_left(max_epsilon: float | None, target_epsilon: float | None, epsilon: float | None,
                lifetime_epsilon: float | None) -> float | None:
    """What is left of a region's budget, or None when the coordinator cannot know it.

    Against the region's lifetime cap only the ledger's ε counts; the region tells it only if its
    policy releases it (otherwise "budget left" is the region's to know).
    """
    budget = max_epsilon or target_epsilon
    spent = lifetime_epsilon if lifetime_epsilon is not None else (None if max_epsilon else epsilon)
    return None if budget is None or spent is None else round(budget - spent, 6)


def over_budget(region: Mapping[str, Any]) -> tuple[float, float] | None:
    """(ε, cap) if the region ended above its lifetime cap (this run's or the ledger's ε), else None."""
    spent = [v for v in (region_final_epsilon(region), region_lifetime_epsilon(region)) if v is not None]
    eps, cap = (max(spent) if spent else None), number(region.get("max_epsilon"))
    return (eps, cap) if eps is not None and cap is not None and eps > cap else None


# -- the whole report ---------------------------------------------------------------------------------------


def max_region_epsilon(report: Report) -> float | None:
    """The largest final ε over the report's regions (the run's worst-case guarantee)."""
    return ReportView.of(report).max_epsilon


def final_accuracy(report: Report) -> float | None:
    """Global accuracy of the last round that reported one."""
    return ReportView.of(report).final_accuracy


def no_dp_guarantee(report: Report) -> list[str]:
    """Regions whose run gives no DP guarantee at all because the noise was deterministic (the testing key)."""
    return ReportView.of(report).no_dp_guarantee


def secure_aggregation_rounds(report: Report) -> dict[str, list[int]] | None:
    """Trained rounds split by how they were aggregated: ``secure``, ``plain`` (1 region: in the clear), ``aborted``.

    None when the report does not say (no per-round record, as in hand-written or pre-release reports).
    """
    return ReportView.of(report).aggregation_rounds


class ReportView:
    """The meanings of one report (a dict as written or loaded); see the module docstring for the rules."""

    def __init__(self, data: Report):
        self.data: dict[str, Any] = normalise(data)
        regions = self.data.get("regions")
        self.regions: dict[str, Mapping[str, Any]] = (
            {str(k): (v if isinstance(v, Mapping) else {}) for k, v in regions.items()}
            if isinstance(regions, Mapping) else {})
        rounds = self.data.get("rounds")
        self.rounds: list[Mapping[str, Any]] = [r for r in rounds if isinstance(r, Mapping)] if isinstance(rounds, list) else []
        config = self.data.get("config")
        self.config: Mapping[str, Any] = config if isinstance(config, Mapping) else {}
        section = self.data.get("secure_aggregation")
        self.secure_aggregation: Mapping[str, Any] = section if isinstance(section, Mapping) else {}

    @classmethod
    def of(cls, report: "Report | ReportView") -> "ReportView":
        return report if isinstance(report, ReportView) else cls(report)

    @property
    def run_name(self) -> str:
        """A name people can tell runs apart by: the run dir's name, else the job id, else Flower's run id.

        Flower's run ids are 19-digit numbers; comparisons and plots label runs with this instead.
        """
        run_dir = str(self.config.get("run-dir") or "").rstrip("/")
        if run_dir:
            return run_dir.rsplit("/", 1)[-1]
        return str(self.config.get("job-id") or self.data.get("run_id") or "?")

    # -- DP on or off -------------------------------------------------------------------------------------
    @property
    def display_regions(self) -> dict[str, dict[str, Any]]:
        return {name: display_region(r) for name, r in self.regions.items()}

    @property
    def dp_off_regions(self) -> list[str]:
        """Regions that trained without DP (ε = ∞), in report order."""
        return [name for name, r in self.regions.items() if is_dp_off(r)]

    @property
    def all_dp_off(self) -> bool:
        """Every region trained without DP: the run has no DP guarantee for anyone."""
        return bool(self.regions) and len(self.dp_off_regions) == len(self.regions)

    @property
    def no_dp_guarantee(self) -> list[str]:
        """Regions that ran with insecure-deterministic-noise (noise reproducible from the config): every ε is void."""
        flagged = sorted(name for name, r in self.regions.items() if r.get("deterministic_noise"))
        if self.config.get("insecure-deterministic-noise") and not flagged:
            flagged = sorted(name for name, r in self.regions.items() if r.get("rounds_participated")) or ["every region"]
        return flagged

    # -- ε and budgets ------------------------------------------------------------------------------------
    def final_epsilon(self, name: str) -> float | None:
        return region_final_epsilon(self.regions[name])

    def lifetime_epsilon(self, name: str) -> float | None:
        return region_lifetime_epsilon(self.regions[name])

    def epsilon_text(self, name: str, key: str = "epsilon", digits: int = 3) -> str:
        return epsilon_text(self.regions[name], key, digits)

    @property
    def max_epsilon(self) -> float | None:
        values = [v for v in (region_final_epsilon(r) for r in self.regions.values()) if v is not None]
        return max(values) if values else None

    @property
    def final_accuracy(self) -> float | None:
        for r in reversed(self.rounds):
            acc = number(r.get("accuracy"))
            if acc is not None:
                return acc
        return None

    def budget(self, name: str) -> tuple[float | None, str]:
        return region_budget(self.regions[name])

    @property
    def over_budget(self) -> list[tuple[str, float, float]]:
        """(region, ε, cap) for every region that ended above its lifetime cap, by name."""
        return [(name, *found) for name, r in sorted(self.regions.items()) if (found := over_budget(r))]

    # -- what the coordinator saw -------------------------------------------------------------------------
    @property
    def secagg_enabled(self) -> bool:
        return bool(self.secure_aggregation.get("enabled"))

    @property
    def aggregation_rounds(self) -> dict[str, list[int]] | None:
        """See :func:`secure_aggregation_rounds`."""
        if not isinstance(self.secure_aggregation.get("rounds"), list):
            return None
        entries = {int(e["round"]): e for e in self.secure_aggregation["rounds"] if isinstance(e, Mapping) and "round" in e}
        out: dict[str, list[int]] = {"secure": [], "plain": [], "aborted": []}
        for rnd, e in sorted(entries.items()):
            out[_mode(e)].append(rnd)
        return out

    def aggregation_of(self, server_round: int) -> str:
        """How round ``server_round`` was aggregated: secure / plain / aborted, ``–`` if unrecorded."""
        if not self.secagg_enabled:
            return "plain"
        by_round = {rnd: mode for mode, rounds in (self.aggregation_rounds or {}).items() for rnd in rounds}
        return by_round.get(server_round, "–")

    def clear_rounds(self, name: str) -> list[int]:
        """Rounds in which the coordinator saw this region's update in the clear (secure aggregation on)."""
        return sorted(int(e["round"]) for e in self.secure_aggregation.get("rounds") or []
                      if isinstance(e, Mapping) and _mode(e) == "plain" and name in (e.get("participants") or []))

    # -- what left each region ----------------------------------------------------------------------------
    @property
    def released(self) -> list[dict[str, Any]]:
        """The rows the report stores, or (for reports without them) rebuilt."""
        rows = self.data.get("released")
        return [r for r in rows if isinstance(r, Mapping)] if isinstance(rows, list) else self.computed_released()

    def computed_released(self) -> list[dict[str, Any]]:
        regions = {n: r for n, r in self.regions.items() if r.get("rounds_participated")}
        if not regions and not any(r.get("enforcement") for r in self.regions.values()):
            return []
        deterministic = set(self.no_dp_guarantee)
        delta_run = self.data.get("delta")
        update: dict[str, str] = {}
        for name, r in regions.items():
            if name in deterministic or "every region" in deterministic:
                why = f"{NO_GUARANTEE}: insecure-deterministic-noise (noise reproducible from the config)"
            elif is_dp_off(r):
                why = f"{NO_GUARANTEE}: DP off (ε = ∞)"
            else:
                eps = (r.get("epsilon_by_round") or [None])[-1]
                delta = r.get("delta") if r.get("delta") is not None else delta_run
                why = f"{DP_AT_EPSILON} = {fmt(eps)} (δ = {delta:g})" if delta is not None else f"{DP_AT_EPSILON} = {fmt(eps)}"
            if not self.secagg_enabled:
                how = "in the clear (secure aggregation off)"
            else:
                clear = self.clear_rounds(name)
                how = "masked: the coordinator saw only sums" + (
                    f"; in the clear in plain round(s) {rounds_text(clear)}" if clear else "")
            update[name] = f"{why}; {how}"
        everyone = {name: "" for name in regions}
        rows: list[dict[str, Any]] = [
            {"value": "model update (clipped, DP-noised)", "guarantee": DP_AT_EPSILON, "regions": update},
            {"value": "DP mechanism: σ, q, C, steps, δ, accountant, history, and ε of this job (a function of them)",
             "guarantee": PUBLIC_BY_POLICY, "regions": dict(everyone)},
            {"value": "N, the region's number of training posts (as the region declares it)",
             "guarantee": PUBLIC_BY_POLICY, "regions": dict(everyone)},
            {"value": "the region's lifetime ε cap (max-lifetime-epsilon)", "guarantee": PUBLIC_BY_POLICY,
             "regions": {n: fmt(r.get("max_epsilon")) for n, r in regions.items() if r.get("max_epsilon")}},
        ]
        rows.append({"value": "whether the region's DP noise was deterministic (insecure-deterministic-noise, a "
                              "testing key that voids every ε)", "guarantee": PUBLIC_BY_POLICY,
                     "regions": {n: ("on: no DP guarantee" if n in deterministic or "every region" in deterministic
                                     else "off") for n in regions}})
        for keys, what, rule in _NOT_PRIVATE_ROWS:
            who = {n: rule for n, r in self.regions.items() if set(keys) & set(r.get("not_private") or [])}
            if who:
                rows.append({"value": what, "guarantee": NOT_PRIVATE, "regions": who})
        errors = {n: "round(s) " + rounds_text(sorted({int(number(e.get("round")) or 0) for e in r["enforcement"]
                                                       if isinstance(e, Mapping)}))
                  for n, r in self.regions.items() if isinstance(r.get("enforcement"), list) and r["enforcement"]}
        if errors:
            rows.append({"value": "the text of the region's refusals and errors (may describe its data or files; "
                                  "file paths are redacted in this report)", "guarantee": NOT_PRIVATE_ERRORS,
                         "regions": errors})
        return [row for row in rows if row["regions"]]


# -- how the run ended ---------------------------------------------------------------------------------------


def region_problem(region: Mapping[str, Any]) -> str | None:
    """The first refusal or failure of a region, as one line (``refused by region policy: delta: ...``)."""
    for event in region.get("enforcement") or []:
        if isinstance(event, Mapping):
            return f"{event.get('action')}: {one_line(event.get('reason'))}"
    return None


def one_line(text: Any, limit: int = 300) -> str:
    """``text`` on one line (whitespace runs, newlines included, become one space), at most ``limit`` characters."""
    flat = " ".join(str(text if text is not None else "").split())
    return flat if len(flat) <= limit else flat[:limit - 1] + "…"


_PATH = re.compile(r"(?<![\w.~/])(?:~|\.{1,2})?/(?:[^\s/'\"(),;:]+/)*[^\s/'\"(),;:]+")


def redact_paths(text: str) -> str:
    """``text`` with file paths (``/srv/eu/data/train.jsonl``, ``~/x``, ``./y``) replaced by ``<path>``.

    A region's error text is not private (it is not a DP release) and may name the region's files; the
    report keeps the error, not where the region keeps its data.
    """
    return _PATH.sub("<path>", str(text))


def skipped_rounds(region: Mapping[str, Any]) -> dict[int, str]:
    """Rounds in which the region was asked to train and did not (round -> why): refused, declined, failed, lost.

    Such a round released nothing and spent no ε (a refusal is decided before training; a failure's partial
    work never leaves the region); the report and plots show it as skipped, never on the ε curve or the cap.
    """
    trained = {int(r) for r in region.get("rounds_participated") or [] if number(r) is not None}
    out: dict[int, str] = {}
    for event in region.get("enforcement") or []:
        if not isinstance(event, Mapping) or number(event.get("round")) is None:
            continue
        rnd = int(event["round"])
        action = str(event.get("action", ""))
        if rnd > 0 and rnd not in trained and not action.endswith("to evaluate"):
            out.setdefault(rnd, "failed" if action.startswith("failed") else "skipped")
    return out


def run_verdict(report: Report, aborted: str | None = None) -> tuple[str, str]:
    """(status, reason) of a run whose coordinator finished (``aborted``: why it ended before its last round).

    ``failed``: no round updated the global model, or the run ended early or with a round below
    min-train-regions; ``completed with failures``: a model was trained, but some region refused or failed
    in every round it was asked, or some rounds left the model unchanged; else ``completed`` (reason "").
    """
    from fedpriv.core.report_schema import COMPLETED, COMPLETED_WITH_FAILURES, FAILED

    view = ReportView.of(report)
    rounds = sorted((r for r in view.rounds if number(r.get("round")) is not None and int(r["round"]) > 0),
                    key=lambda r: int(r["round"]))
    updated = [int(r["round"]) for r in rounds if r.get("model_updated")]
    unchanged = [int(r["round"]) for r in rounds if r.get("model_updated") is False]
    never = {name: region_problem(r) for name, r in view.regions.items()
             if not r.get("rounds_participated") and region_problem(r)}
    who = "; ".join(f"{name}: {why}" for name, why in sorted(never.items()))
    if not updated:
        why = aborted or "no round updated the global model"
        return FAILED, one_line(f"{why}" + (f" ({who})" if who else ""), 600)
    if aborted:
        return FAILED, one_line(f"ended after round {rounds[-1]['round']}: {aborted}", 600)
    if rounds and rounds[-1].get("model_updated") is False:
        return FAILED, one_line(f"the run ended below min-train-regions: round {rounds[-1]['round']} had too few "
                                f"usable updates and left the global model unchanged" + (f" ({who})" if who else ""), 600)
    problems = []
    if never:
        problems.append(f"{', '.join(sorted(never))} refused or failed in every round ({who})")
    if unchanged:
        problems.append(f"round(s) {rounds_text(unchanged)} left the global model unchanged (too few usable updates)")
    if problems:
        return COMPLETED_WITH_FAILURES, one_line("; ".join(problems), 600)
    return COMPLETED, ""


def _mode(entry: Mapping[str, Any]) -> str:
    return "aborted" if entry.get("aborted") else ("plain" if entry.get("mode") == "plain" else "secure")


def guarantee_level(unit: str) -> str:
    """"author-level" / "record-level" for the report's ``unit_of_privacy`` text (mixed: per region)."""
    return _by_unit(unit, "author-level", "per-region (author- or record-) level", "record-level")


def unit_phrase(unit: str) -> str:
    """What adding or removing one unit means, for the report's guarantee sentence."""
    return _by_unit(unit, "all the posts of any one person", "any one such unit (per region, above)", "any one post")


def _by_unit(unit: str, author: str, mixed: str, post: str) -> str:
    return author if unit.startswith("one author") else mixed if unit.startswith("per region") else post


__all__ = ["DP_AT_EPSILON", "DP_OFF_TEXT", "NOT_PRIVATE", "NOT_PRIVATE_ERRORS", "NO_GUARANTEE", "PUBLIC_BY_POLICY", "ReportView",
           "budget_left", "display_region", "display_regions", "enforcement_text", "epsilon_text", "epsilon_value",
           "final_accuracy", "fmt", "guarantee_level", "unit_phrase", "is_dp_off", "max_region_epsilon", "no_dp_guarantee", "number", "over_budget",
           "region_budget", "region_epsilon_series", "region_final_epsilon", "region_lifetime_epsilon",
           "one_line", "redact_paths", "region_problem", "rounds_text", "run_verdict", "secure_aggregation_rounds",
           "skipped_rounds"]
