"""The privacy report's file format: names, version, keys; load, save and truncate it, in one place.

``RUN_DIR/privacy_report.json`` is the run's record (schema documented in the README and
versioned by :data:`SCHEMA_VERSION`); ``privacy_report.md`` is rendered from it. Everything
that reads the file -- the coordinator resuming a run, ``fedpriv report``, ``fedpriv audit``,
``fedpriv run``'s summary, bench -- goes through :func:`load` (or :func:`peek`), so every reader
sees the same checks, the same one-line errors and the same normalisation of older files
(:func:`normalise`: the legacy ``ε = -1`` "DP off" sentinel becomes ``dp: false`` with null ε,
the form fedpriv writes today). Every writer goes through :func:`save` (atomic, via
:mod:`fedpriv.core.files`), so a reader never sees half a report.

This module knows the format, not its meaning: what counts as DP off, over budget or seen by
the coordinator is decided in :mod:`fedpriv.privacy.report_view`.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Mapping

from fedpriv.core.errors import FedprivError
from fedpriv.core.files import atomic_write_text

SCHEMA_VERSION = 1
JSON_NAME = "privacy_report.json"
MD_NAME = "privacy_report.md"
HTML_NAME = "privacy_report.html"

#: Top-level keys fedpriv writes (``fedpriv.privacy.report.RunReport.to_dict``); any other top-level
#: key (``runs``, ``audit``, ...) is an extra that readers keep as it is.
TOP_LEVEL_KEYS = ("schema_version", "run_id", "created", "status", "status_reason", "accountant", "cross_check_accountant", "delta",
                  "unit_of_privacy", "secure_aggregation", "config", "regions", "rounds", "partition", "run_info",
                  "released")
#: A report's ``status``: ``running`` while the coordinator works, then one of the four final ones, with
#: ``status_reason`` (one line) saying why whenever it is not ``completed``:
RUNNING = "running"
COMPLETED = "completed"  # every round ran, the model was updated, every region that was asked took part
COMPLETED_WITH_FAILURES = "completed with failures"  # a model was trained, but a region refused or failed in every
#                                                      round, or some rounds left the model unchanged
FAILED = "failed"  # no round updated the model, the run ended below min-train-regions, or the coordinator crashed
STOPPED = "stopped"  # interrupted: Ctrl-C, SIGTERM, `flwr stop`, the coordinator's process killed
FINAL_STATUSES = (COMPLETED, COMPLETED_WITH_FAILURES, FAILED, STOPPED)

#: Per-region keys derived from the others when the report is written (recomputed, never restored).
DERIVED_REGION_KEYS = ("epsilon", "budget_left")
#: Per-region lists indexed like ``rounds_participated`` (one entry per round the region trained in).
PER_ROUND_REGION_KEYS = ("rounds_participated", "epsilon_by_round", "steps_by_round")
#: Per-region lists with one entry per trained round only when the region released them (not private).
RELEASED_PER_ROUND_REGION_KEYS = ("train_loss_by_round", "train_accuracy_by_round")
#: Per-region ε values: null when the region trained without DP.
EPSILON_REGION_KEYS = ("epsilon", "lifetime_epsilon", "epsilon_check", "budget_left")

#: Keys (and JSON types) a complete report has: what renderers need.
REQUIRED: dict[str, tuple[type, ...]] = {
    "status": (str,), "created": (str,), "accountant": (str,), "delta": (int, float),
    "regions": (dict,), "rounds": (list,),
}
#: Keys a resumable report must have (``fedpriv run --resume`` reads the config and the rounds so far).
RESUME_REQUIRED: dict[str, tuple[type, ...]] = {"regions": (dict,), "rounds": (list,)}

_WRITTEN_BY = "expected a run directory written by `fedpriv simulate` or `fedpriv run`"


def report_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / JSON_NAME


def load(run_dir: str | Path, required: Mapping[str, tuple[type, ...]] = REQUIRED) -> dict[str, Any]:
    """``RUN_DIR/privacy_report.json``, checked and normalised; every problem is a one-line :class:`FedprivError`.

    ``required``: the top-level keys (and types) the caller needs; :data:`REQUIRED` for rendering,
    :data:`RESUME_REQUIRED` for resuming.
    """
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise FedprivError(f"{run_dir} does not exist: {_WRITTEN_BY}")
    if not run_dir.is_dir():
        raise FedprivError(f"{run_dir} is not a directory: {_WRITTEN_BY}")
    path = run_dir / JSON_NAME
    if not path.is_file():
        raise FedprivError(f"{run_dir} is not a run directory: it has no {JSON_NAME} "
                           "(expected one written by `fedpriv simulate` or `fedpriv run`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FedprivError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except UnicodeDecodeError:
        raise FedprivError(f"{path} is not UTF-8 text: expected the JSON report fedpriv writes") from None
    except OSError as exc:
        raise FedprivError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not isinstance(data, dict):
        raise FedprivError(f"{path} holds a JSON {type(data).__name__}, expected an object (a fedpriv privacy report)")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise FedprivError(f"{path} has schema_version {version!r}, expected {SCHEMA_VERSION}"
                           + (" (written by a newer fedpriv: upgrade to read it)"
                              if isinstance(version, int) and version > SCHEMA_VERSION else ""))
    for key, types in required.items():
        if key not in data:
            raise FedprivError(f"{path} lacks key {key!r}: not a complete schema_version {SCHEMA_VERSION} report")
        value = data[key]
        if not isinstance(value, types) or isinstance(value, bool):
            raise FedprivError(f"{path}: {key!r} is a {type(value).__name__}, expected a "
                               f"{' or '.join(t.__name__ for t in types)}")
    if isinstance(data.get("regions"), dict):
        for name, region in data["regions"].items():
            if not isinstance(region, dict):
                raise FedprivError(f"{path}: regions[{name!r}] is a {type(region).__name__}, expected an object")
    if isinstance(data.get("rounds"), list):
        for i, rnd in enumerate(data["rounds"]):
            if not isinstance(rnd, dict) or isinstance(rnd.get("round"), bool) or not isinstance(rnd.get("round"), int):
                raise FedprivError(f"{path}: rounds[{i}] is not an object with an integer 'round'")
    return normalise(data)


def peek(run_dir: str | Path) -> dict[str, Any] | None:
    """The report as far as it can be read, unchecked (None if there is none): for status lines, never for decisions."""
    try:
        data = json.loads(report_path(run_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return normalise(data) if isinstance(data, dict) else None


def normalise(data: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``data`` in today's form; idempotent, and the only place older forms are understood.

    A region that trained without DP is written as ``dp: false`` with every ε null. Reports from
    before the ``dp`` flag (and hand-built ones) say the same with ε = -1 (the legacy sentinel) or
    ε = ∞; both become ``dp: false`` with null ε here, so no reader ever sees a negative ε.
    """
    out = dict(data)
    regions = data.get("regions")
    if isinstance(regions, Mapping):
        out["regions"] = {name: _normalise_region(r) if isinstance(r, Mapping) else r for name, r in regions.items()}
    return out


def _normalise_region(region: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(region)
    series = region.get("epsilon_by_round")
    values = [*(series if isinstance(series, list) else []), *(region.get(k) for k in ("epsilon", "lifetime_epsilon"))]
    no_dp = region.get("dp") is False or any(_sentinel(v) for v in values)
    if no_dp:
        out["dp"] = False
        if isinstance(series, list):
            out["epsilon_by_round"] = [None] * len(series)
        for key in EPSILON_REGION_KEYS:
            if key in out:
                out[key] = None
    return out


def _sentinel(value: Any) -> bool:
    """ε < 0 (legacy "DP off") or ε = ∞: no DP."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and (value < 0 or math.isinf(value)))


def save(run_dir: str | Path, data: Mapping[str, Any], markdown: str | None = None) -> Path:
    """Write ``data`` as ``RUN_DIR/privacy_report.json`` (and ``markdown`` as ``privacy_report.md``), each atomically.

    The JSON comes first: a reader that finds the Markdown finds at least as new a JSON. The JSON is strict
    (RFC 8259): a non-finite number (∞, NaN: which Python's ``json`` would write as ``Infinity``/``NaN``, and
    strict parsers reject) is written as ``null`` (:func:`finite_only`); the README says what null means
    for each key (unknown, not applicable, or ε = ∞ for a region with ``dp: false``).
    """
    run_dir = Path(run_dir)
    text = json.dumps(finite_only(data), indent=2, default=json_default, allow_nan=False)
    path = atomic_write_text(run_dir / JSON_NAME, text)
    if markdown is not None:
        atomic_write_text(run_dir / MD_NAME, markdown)
    return path


def finite_only(value: Any) -> Any:
    """``value`` with every non-finite float (also numpy's, inside lists and dicts) replaced by None."""
    if isinstance(value, Mapping):
        return {k: finite_only(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_only(v) for v in value]
    if isinstance(value, float) or (hasattr(value, "dtype") and getattr(value, "shape", None) == ()):
        number = value.item() if hasattr(value, "item") else value
        if isinstance(number, float) and not math.isfinite(number):
            return None
        return number
    return value


def json_default(obj: Any) -> Any:
    """Paths as strings, numpy scalars as Python numbers."""
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def truncate(data: Mapping[str, Any], upto_round: int) -> dict[str, Any]:
    """``data`` as it stood after round ``upto_round``: what a resumed run continues from.

    Per-region per-round lists stay aligned (indexed by participation) and the DP-SGD history
    is cut to the steps of the kept rounds; later enforcement records, round entries and
    secure-aggregation records are dropped. Derived values (ε, budget left, released) are
    recomputed by the writer. An earlier ``audit`` is dropped: it attacked the model as it was
    then, and the resumed run trains it further.
    """
    out = copy.deepcopy(normalise(data))
    out.pop("audit", None)
    out["rounds"] = [r for r in out.get("rounds") or [] if int(r.get("round", 0)) <= upto_round]
    for region in (out.get("regions") or {}).values():
        rounds = list(region.get("rounds_participated") or [])
        keep = [i for i, rnd in enumerate(rounds) if int(rnd) <= upto_round]
        for key in PER_ROUND_REGION_KEYS:
            if isinstance(region.get(key), list):
                region[key] = [region[key][i] for i in keep if i < len(region[key])]
        for key in RELEASED_PER_ROUND_REGION_KEYS:  # aligned only when released every round
            if isinstance(region.get(key), list) and len(region[key]) == len(rounds):
                region[key] = [region[key][i] for i in keep]
        region["enforcement"] = [e for e in region.get("enforcement") or [] if int(e.get("round", 0)) <= upto_round]
        history = [(float(h[0]), float(h[1]), int(h[2])) for h in region.get("history") or []]
        if len(keep) < len(rounds):  # the saved history includes a dropped round
            steps = region.get("steps_by_round") or []
            history = truncate_history(history, int(steps[-1]) if steps else 0)
            region["epsilon_check"] = None  # it covered the dropped round; recomputed at the next one
        region["history"] = [list(h) for h in history]
    section = out.get("secure_aggregation")
    if isinstance(section, dict):
        if isinstance(section.get("rounds"), list):
            section["rounds"] = [e for e in section["rounds"]
                                 if not isinstance(e, Mapping) or int(e.get("round", 0)) <= upto_round]
        for key in ("rounds_plain", "rounds_aborted"):
            if isinstance(section.get(key), list):
                section[key] = [r for r in section[key] if int(r) <= upto_round]
    return out


def truncate_history(history: list[tuple[float, float, int]], steps: int) -> list[tuple[float, float, int]]:
    """The prefix of an Opacus history that covers exactly ``steps`` DP-SGD steps (entries compose by steps)."""
    out: list[tuple[float, float, int]] = []
    left = int(steps)
    for sigma, rate, n in history:
        if left <= 0:
            break
        take = min(int(n), left)
        out.append((sigma, rate, take))
        left -= take
    return out


__all__ = ["COMPLETED", "COMPLETED_WITH_FAILURES", "FAILED", "FINAL_STATUSES", "RUNNING", "STOPPED",
           "DERIVED_REGION_KEYS", "HTML_NAME", "JSON_NAME", "MD_NAME", "REQUIRED", "RESUME_REQUIRED", "SCHEMA_VERSION",
           "TOP_LEVEL_KEYS", "finite_only", "json_default", "load", "normalise", "peek", "report_path", "save", "truncate",
           "truncate_history"]
