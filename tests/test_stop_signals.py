"""`fedpriv simulate` stopped by a signal leaves no process behind.

`timeout`, systemd, CI runners and container runtimes stop a program with SIGTERM, not
Ctrl-C. Before, SIGTERM killed `fedpriv simulate` on the spot and its SuperLink,
SuperExec and the run's apps kept running as orphans. Now SIGINT and SIGTERM both stop
the run and the whole process tree, and the command exits non-zero with one line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from conftest import write_corpus

SERVER_LINE = "round 0: global model on"  # the ServerApp (coordinator.py) logs it once, before round 1
TRAINING = "[ROUND 1/"  # Flower's ServerApp line: round 1 (and the ClientApps) started


def _tree(pid: int) -> dict[int, psutil.Process]:
    try:
        return {p.pid: p for p in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return {}


def _alive(procs: dict[int, psutil.Process]) -> dict[int, str]:
    """The processes still running (``is_running`` also checks the start time: a reused pid is not ours)."""
    out = {}
    for pid, p in procs.items():
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out[pid] = " ".join(p.cmdline()[:3])[:160]
        except psutil.Error:
            pass
    return out


def _names(procs: dict[int, psutil.Process]) -> str:
    return " | ".join(cmd for cmd in _alive(procs).values())


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_simulate_stopped_by_a_signal_stops_its_whole_process_tree(tmp_path: Path, sig: signal.Signals):
    data = write_corpus(tmp_path / "data", 600)
    env = {**os.environ, "FEDPRIV_DATA_DIR": str(data), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedpriv", "simulate", "--preset", "tiny", "--run-dir", str(tmp_path / "run"),
         "--run-config", "num-server-rounds=50 num-threads=1 secure-aggregation=false"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
    )
    out: list[str] = []
    training = threading.Event()
    seen: dict[int, psutil.Process] = {}  # every descendant ever seen, sampled until the command exits

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            out.append(line)
            if TRAINING in line:
                training.set()

    def sample() -> None:
        while proc.poll() is None:
            for pid, p in _tree(proc.pid).items():
                seen.setdefault(pid, p)
            time.sleep(0.3)

    threads = [threading.Thread(target=read, daemon=True), threading.Thread(target=sample, daemon=True)]
    for t in threads:
        t.start()
    try:
        # Wait until the run is under way (SuperLink, SuperExec, the simulation, Ray), then stop it.
        assert training.wait(240), "".join(out)[-3000:]
        time.sleep(5)  # the regions' ClientApp actors start meanwhile
        names = _names(seen)
        assert "flower-superlink" in names and "flower-superexec" in names, names
        os.kill(proc.pid, sig)
        started = time.monotonic()
        rc = proc.wait(timeout=90)
        stop_s = time.monotonic() - started
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    for t in threads:
        t.join(timeout=10)
    deadline = time.monotonic() + 15
    while _alive(seen) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = _alive(seen)
    for pid in left:  # never leave orphans behind, even when the assertion below fails
        try:
            seen[pid].kill()
        except psutil.Error:
            pass
    text = "".join(out)
    assert not left, f"still running after {sig.name}: {left}"
    assert rc != 0 and stop_s < 60, (rc, stop_s)
    last = [ln for ln in text.strip().splitlines() if ln.strip()][-1]
    assert last.startswith("fedpriv simulate: ") and sig.name in last, text[-2000:]
    assert "Traceback" not in text, text[-3000:]
    # Each ServerApp log line reaches the console once (not once coloured and once timestamped).
    assert len([ln for ln in text.splitlines() if SERVER_LINE in ln]) == 1, text[-3000:]
    # The report says how the run ended: it was left "running" by the killed coordinator (issue 23).
    report = json.loads((tmp_path / "run" / "privacy_report.json").read_text())
    assert report["status"] == "stopped" and report["status_reason"], (report["status"], report.get("status_reason"))


def test_sigterm_becomes_stop_requested_once_and_not_during_a_tree_stop():
    """SIGTERM raises StopRequested (a KeyboardInterrupt: every Ctrl-C cleanup runs for it too); a signal
    arriving while a process tree is being stopped does not cut that stop short."""
    from fedpriv.deploy import processes

    old = processes.install_stop_handlers()
    try:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
        # The parent takes a second to stop on SIGTERM (the signal to fedpriv lands meanwhile) and has a
        # child in a session of its own, as Flower's SuperLink starts its SuperExec.
        grandchild_code = ("import signal, subprocess, sys, time; "
                           "signal.signal(signal.SIGTERM, lambda *a: (time.sleep(1.0), sys.exit(0))); "
                           "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True); "
                           "time.sleep(60)")
        parent = subprocess.Popen([sys.executable, "-c", grandchild_code], start_new_session=True)
        deadline = time.monotonic() + 30
        while not psutil.Process(parent.pid).children() and time.monotonic() < deadline:
            time.sleep(0.1)
        (escaped,) = psutil.Process(parent.pid).children()  # in its own session: not in the group
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
        started = time.monotonic()
        processes.stop_process_tree(parent, grace=5)  # the SIGTERM lands meanwhile: ignored
        assert time.monotonic() - started > 0.5  # (so it did land during the stop)
        assert parent.poll() == 0
        assert not escaped.is_running() or escaped.status() == psutil.STATUS_ZOMBIE
        with pytest.raises(KeyboardInterrupt) as caught:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        assert isinstance(caught.value, processes.StopRequested)
        assert caught.value.signal_name == "SIGTERM" and caught.value.exit_status == 143
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal while the first one's cleanup runs: ignored
        time.sleep(0.2)
        processes.stop_process_tree(child, grace=5)
        assert child.poll() is not None
    finally:
        processes.restore_handlers(old)


def test_a_child_that_will_not_be_reaped_ends_the_stop_with_one_line_not_a_traceback(capsys):
    """Seen once on a loaded machine: a flower-superlink outlived SIGTERM's grace and was not reaped 10 s after
    SIGKILL; `fedpriv superlink` then exited 1 with a TimeoutExpired traceback instead of stopping cleanly."""
    from fedpriv.deploy import processes

    child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                              "time.sleep(60)"], start_new_session=True)
    real_wait = child.wait

    def never_reaped(timeout=None):
        raise subprocess.TimeoutExpired(child.args, timeout)

    try:
        time.sleep(0.5)  # its SIGTERM handler is in place
        child.wait = never_reaped  # as if the kernel had not let it go yet
        processes.stop_process_tree(child, grace=0.5)
        err = capsys.readouterr().err
        assert f"(pid {child.pid}) did not exit 10 s after SIGKILL" in err and "Traceback" not in err
    finally:
        child.wait = real_wait
        child.kill()
        child.wait(timeout=10)
