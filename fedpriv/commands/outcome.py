"""How a run ended, for ``fedpriv simulate`` and ``fedpriv run``: the report's status, one line, one exit code.

The coordinator writes the run's end into its privacy report (``status``, ``status_reason``:
:data:`fedpriv.core.report_schema.FINAL_STATUSES`); Flower's own run status only says whether the
ServerApp returned. Both commands judge a run the same way here, so a run that trained nothing is never
a success for a script or CI:

* ``completed`` -> 0
* ``failed`` -> 1 (no round updated the model, the run ended early or below min-train-regions, a crash)
* ``stopped`` -> 1 (130 / 143 when this command itself was interrupted)
* ``completed with failures`` -> 3 (a model was trained, but a region refused or failed in every round,
  or some rounds left the model unchanged)

(2 stays the exit code of input errors, before anything ran.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedpriv.core import report_schema
from fedpriv.core.report_schema import COMPLETED, COMPLETED_WITH_FAILURES, FAILED, RUNNING, STOPPED

EXIT_CODES = {COMPLETED: 0, FAILED: 1, STOPPED: 1, COMPLETED_WITH_FAILURES: 3}


@dataclass(frozen=True)
class Verdict:
    status: str
    reason: str
    exit_code: int

    @property
    def line(self) -> str:
        """``status`` or ``status: reason`` (one line)."""
        return f"{self.status}: {self.reason}" if self.reason else self.status


def judge(run_dir: Path, outcome) -> Verdict:  # noqa: ANN001 - fedpriv.deploy.flwr_cli.RunOutcome
    """The run's end from its report, after Flower's ``outcome``; a report left ``running`` is settled first."""
    from fedpriv.privacy.report import settle_unfinished

    if not outcome.succeeded:  # the ServerApp did not return: its report may still say "running"
        flower = f"Flower status {outcome.status}" + (f" ({outcome.details})" if outcome.details not in ("", "N/A") else "")
        settled = STOPPED if outcome.status in ("finished:stopped", "finished:timeout") else FAILED
        settle_unfinished(run_dir, settled, f"the coordinator did not finish: {flower}")
    report = report_schema.peek(run_dir)
    if report is None:
        return Verdict(FAILED, f"no privacy report in {run_dir}: the coordinator did not start "
                               f"(Flower status {outcome.status}; see the SuperLink's log)", 1)
    status = str(report.get("status", ""))
    reason = str(report.get("status_reason") or "")
    if status == RUNNING:  # Flower says the ServerApp returned, the report was never finished
        settle_unfinished(run_dir, FAILED, f"the coordinator returned without finishing its report "
                                           f"(Flower status {outcome.status})")
        return judge(run_dir, outcome)
    if status not in EXIT_CODES:  # an older report's free text ("stopped: ...", "interrupted: ...")
        return Verdict(status, reason, 1)
    if status == COMPLETED and not outcome.succeeded:
        return Verdict(FAILED, f"the report says completed but Flower says {outcome.status}", 1)
    return Verdict(status, reason, EXIT_CODES[status])


def settle_interrupted(run_dir: Path, why: str) -> None:
    """This command was interrupted (Ctrl-C, SIGTERM) and its run's processes are gone: the report says stopped."""
    from fedpriv.privacy.report import settle_unfinished

    settle_unfinished(run_dir, STOPPED, why)


__all__ = ["EXIT_CODES", "Verdict", "judge", "settle_interrupted"]
