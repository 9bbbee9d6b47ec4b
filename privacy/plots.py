"""Plots for privacy reports (``privacy_report.json``, schema_version 1), as PNG.

Uses matplotlib's Agg canvas directly (no pyplot, no global backend switch), so it is
safe on headless machines and inside processes that use matplotlib otherwise.
Every function takes the report dict(s) (or :class:`~fedpriv.privacy.report_view.ReportView`)
and a destination — a path or a binary file object — and tolerates missing keys: a plot with
nothing to show still produces a valid PNG that says so. What the numbers mean (DP off = ε ∞,
a region's budget, the run's largest ε) is the view's; only ``fedpriv report`` imports this
module, so matplotlib stays out of the coordinator.
"""

from __future__ import annotations

import math
import os
from typing import IO, Any, Iterable, Mapping, Union

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fedpriv.privacy.report_view import (ReportView, epsilon_value, final_accuracy, max_region_epsilon, number,
                                         region_budget, region_epsilon_series, skipped_rounds)

__all__ = [
    "epsilon_value",
    "final_accuracy",
    "max_region_epsilon",
    "plot_accuracy",
    "plot_accuracy_vs_epsilon",
    "plot_epsilon",
    "region_budget",
    "region_epsilon_series",
]

Dest = Union[str, os.PathLike, IO[bytes]]
Report = Union[Mapping[str, Any], ReportView]

_SIZE = (6.4, 3.6)
_DPI = 110


# -- plotting -----------------------------------------------------------------------------


def _figure() -> tuple[Figure, Any]:
    fig = Figure(figsize=_SIZE, dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.grid(True, alpha=0.3)
    return fig, ax


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#666")
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig: Figure, dest: Dest) -> None:
    if isinstance(dest, (str, os.PathLike)):
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    fig.savefig(dest, format="png")


def _round_ticks(ax, xs: Iterable[float]) -> None:
    xs = sorted(set(xs))
    if xs and len(xs) <= 20:
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{x:g}" for x in xs])


_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "h"]


def plot_epsilon(report: Report, out_png: Dest) -> None:
    """Cumulative ε per region vs round, with the regions' budgets as dashed lines.

    Regions with identical curves stay visible (each has its own marker and size). A budget
    shared by every region is drawn once. Rounds a region skipped (refused, declined, failed: nothing
    released, no ε spent) are hollow circles on its curve at the ε it stood at, never on the budget
    line; a region's ε across all runs (``lifetime_epsilon``, from
    its ledger) is marked ★ at its last round when it exceeds this run's ε. Regions that
    trained without DP (ε = ∞) are named in a note instead of plotted.
    """
    fig, ax = _figure()
    view = ReportView.of(report)
    regions = sorted(view.display_regions.items())
    budgets = {region_budget(r) for _, r in regions}
    shared_budget = next(iter(budgets)) if len(budgets) == 1 and len(regions) > 1 else None
    all_x: list[float] = []
    top = 0.0
    plotted, no_dp = 0, []
    n = len(regions)
    for i, (name, region) in enumerate(regions):
        color, marker = _COLORS[i % len(_COLORS)], _MARKERS[i % len(_MARKERS)]
        xs, ys = region_epsilon_series(region)
        finite = [(x, y) for x, y in zip(xs, ys) if math.isfinite(y)]
        if ys and not finite:
            no_dp.append(name)
        if finite:
            size = 9 - 4 * i / max(1, n - 1) if n > 1 else 6  # earlier regions drawn larger: overlaps stay visible
            ax.plot([p[0] for p in finite], [p[1] for p in finite], marker=marker, markersize=size,
                    linewidth=2.2 - 1.2 * i / max(1, n - 1) if n > 1 else 1.6, color=color, label=name, zorder=2 + i)
            all_x += [p[0] for p in finite]
            top = max(top, max(p[1] for p in finite))
            plotted += 1
        lifetime = epsilon_value(region.get("lifetime_epsilon"))
        if lifetime is not None and math.isfinite(lifetime) and finite and lifetime > finite[-1][1] + 1e-9:
            ax.scatter([finite[-1][0]], [lifetime], marker="*", s=120, color=color, zorder=10,
                       label=f"{name} all runs (ledger)")
            top = max(top, lifetime)
        budget, label = region_budget(region)
        if budget is not None and shared_budget is None:
            ax.axhline(budget, color=color, linestyle="--", linewidth=1, alpha=0.8, label=f"{name} {label} = {budget:g}")
            top = max(top, budget)
        skipped = sorted(skipped_rounds(region))
        if skipped and (finite or not ys):  # a skipped round spent nothing: drawn at the ε the region stood at
            level = [max([p[1] for p in finite if p[0] < rnd], default=0.0) for rnd in skipped]
            ax.scatter(skipped, level, marker="o", s=70, facecolors="none", edgecolors=color, linewidths=1.4,
                       zorder=11, label=f"{name} skipped (no ε spent)")
            all_x += skipped
            plotted += 0 if finite else 1
    if shared_budget is not None and shared_budget[0] is not None:
        ax.axhline(shared_budget[0], color="#555", linestyle="--", linewidth=1.2,
                   label=f"{shared_budget[1]} = {shared_budget[0]:g} (every region)")
        top = max(top, shared_budget[0])
    if plotted == 0:
        _empty(ax, "DP was off: no finite ε (ε = ∞), no privacy guarantee" if no_dp
               else "no per-round ε in this report")
    else:
        ax.set_xlabel("round" + (f"\nno DP (ε = ∞), not plotted: {', '.join(no_dp)}" if no_dp else ""))
        ax.set_ylabel(f"cumulative ε (δ = {view.data.get('delta', '?')})")
        ax.set_ylim(0, top * 1.12 if top > 0 else 1.0)  # headroom: a budget line must not sit on the frame
        _round_ticks(ax, all_x)
        ax.legend(fontsize=7, loc="best")
    ax.set_title(f"Privacy spent per region — {view.run_name}", fontsize=10)
    _save(fig, out_png)


def plot_accuracy(report: Report, out_png: Dest) -> None:
    """Global (server-side) accuracy vs round."""
    fig, ax = _figure()
    view = ReportView.of(report)
    pts = [(number(r.get("round")), number(r.get("accuracy"))) for r in view.rounds]
    pts = [(x, y) for x, y in pts if x is not None and y is not None]
    if not pts:
        _empty(ax, "no per-round accuracy in this report")
    else:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color="#1f77b4", label="accuracy")
        ax.set_xlabel("round")
        ax.set_ylabel("global test accuracy")
        lo = min(p[1] for p in pts)
        ax.set_ylim(min(0.5, lo - 0.05) if lo >= 0 else lo, 1.0)
        _round_ticks(ax, [p[0] for p in pts])
    ax.set_title(f"Global accuracy — {view.run_name}", fontsize=10)
    _save(fig, out_png)


def plot_accuracy_vs_epsilon(reports: Iterable[Report], out_png: Dest) -> None:
    """One point per run: final global accuracy vs the largest final ε over its regions.

    Runs trained without DP (ε = ∞) are drawn in a separate "∞ (no DP)" column at the right,
    as the non-private baseline; runs without an accuracy or an ε are listed in a note.
    """
    fig, ax = _figure()
    points, no_dp, skipped = [], [], []
    for report in reports:
        view = ReportView.of(report)
        eps, acc = view.max_epsilon, view.final_accuracy
        name = view.run_name  # the run dir's name, not Flower's 19-digit run id
        if eps is None or acc is None:
            skipped.append(name)
        elif math.isfinite(eps):
            points.append((eps, acc, name))
        else:
            no_dp.append((acc, name))
    if not points and not no_dp:
        _empty(ax, "no run with both an ε and an accuracy")
    else:
        right = max((p[0] for p in points), default=0.0) or 1.0
        x_inf = right * 1.3
        xmax = (x_inf if no_dp else right) * 1.15
        for eps, acc, name in points:
            ax.scatter([eps], [acc], s=40, color="#1f77b4", zorder=3)
            _label(ax, name, eps, acc, xmax)
        for acc, name in no_dp:
            ax.scatter([x_inf], [acc], s=50, marker="D", color="#c23030", zorder=3)
            _label(ax, name, x_inf, acc, xmax)
        ax.set_xlim(0, xmax)
        if no_dp:
            ticks = [t for t in ax.get_xticks() if 0 <= t <= right * 1.05]
            ax.set_xticks(ticks + [x_inf])
            ax.set_xticklabels([f"{t:g}" for t in ticks] + ["∞ (no DP)"])
            ax.axvline((right + x_inf) / 2, color="#999", linestyle=":", linewidth=1)
        ax.margins(y=0.15)
        ax.set_ylabel("final global accuracy")
    xlabel = "max region ε (final)" if points or no_dp else ""
    if skipped:
        xlabel += ("\n" if xlabel else "") + f"not shown (no ε or no accuracy): {', '.join(skipped)}"
    ax.set_xlabel(xlabel)
    ax.set_title("Accuracy vs privacy (one point per run)", fontsize=10)
    _save(fig, out_png)


def _label(ax, text: str, x: float, y: float, xmax: float) -> None:
    """Annotate a point, towards the inside of the axes so long run ids are not cut off."""
    left = x > 0.55 * xmax
    ax.annotate(text, (x, y), textcoords="offset points", xytext=(-6 if left else 6, 4), fontsize=7,
                ha="right" if left else "left")
