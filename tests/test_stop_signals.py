"""`fedpriv simulate` stopped by a signal leaves no process behind.

`timeout`, systemd, CI runners and container runtimes stop a program with SIGTERM, not
Ctrl-C. Before, SIGTERM killed `fedpriv simulate` on the spot and its SuperLink,
SuperExec and the run's apps kept running as orphans. Now SIGINT and SIGTERM both stop
the run and the whole process tree, and the command exits non-zero with one line.
"""

from __future__ import annotations

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

pytestmark = pytest.mark.slow

FLOWER_NAMES = ("flower-superlink", "flower-superexec", "flwr-serverapp", "flwr-clientapp", "flwr", "ray", "raylet")
SERVER_LINE = "global model on"  # coordinator.py logs it once per round (ServerApp)


def _tree(pid: int) -> dict[int, str]:
    try:
        return {p.pid: " ".join(p.cmdline()[:3]) for p in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return {}


def _alive(pids: dict[int, str]) -> dict[int, str]:
    out = {}
    for pid, cmd in pids.items():
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE and " ".join(p.cmdline()[:3]) == cmd:
                out[pid] = cmd
        except psutil.Error:
            pass
    return out


def _is_flower(cmd: str) -> bool:
    return any(name in cmd for name in FLOWER_NAMES)


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
    first_round = threading.Event()

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            out.append(line)
            if SERVER_LINE in line:
                first_round.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    seen: dict[int, str] = {}
    try:
        # Wait until the run is under way (its SuperLink, SuperExec and apps exist), then stop it.
        assert first_round.wait(240), "".join(out)[-3000:]
        time.sleep(2)  # a second printing of the same line, if any, arrives meanwhile
        seen = _tree(proc.pid)
        assert any("flower-superlink" in c for c in seen.values()), seen
        assert any("flower-superexec" in c for c in seen.values()), seen
        os.kill(proc.pid, sig)
        started = time.monotonic()
        rc = proc.wait(timeout=90)
        stop_s = time.monotonic() - started
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        seen |= _tree(proc.pid)
    reader.join(timeout=10)
    deadline = time.monotonic() + 15
    while _alive(seen) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = _alive(seen)
    for pid in left:  # never leave orphans behind, even when the assertion below fails
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass
    text = "".join(out)
    assert not left, f"still running after {sig.name}: {left}"
    assert rc != 0 and stop_s < 60, (rc, stop_s)
    last = [ln for ln in text.strip().splitlines() if ln.strip()][-1]
    assert last.startswith("fedpriv simulate: ") and sig.name in last, text[-2000:]
    assert "Traceback" not in text, text[-3000:]
    # Each ServerApp log line reaches the console once (not once coloured and once timestamped).
    first = [ln for ln in text.splitlines() if SERVER_LINE in ln and "round 1:" in ln]
    assert len(first) == 1, first
