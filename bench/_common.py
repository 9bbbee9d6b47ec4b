"""Shared helpers for the fedpriv benchmarks: threads, timing, memory, Markdown tables.

Memory on torch workloads: ``tracemalloc`` sees only Python allocations, not
torch's (or BLAS') buffers, so the benchmarks measure resident memory instead:

* :class:`PeakRSS` -- one process. Linux lets a process reset its own
  high-water mark (``echo 5 > /proc/self/clear_refs``), after which ``VmHWM`` is
  the exact peak resident set from that moment on. If the kernel refuses, it
  falls back to sampling RSS with psutil every few milliseconds.
* :class:`TreeMemorySampler` -- a whole process tree (a simulation's SuperLink,
  ServerApp, Ray raylet/GCS and workers ...), polled with psutil; reports the
  peak of the summed RSS (an upper bound: shared pages count once per process)
  and the peak summed PSS (shared pages split between their users: the honest
  total), plus the fewest bytes the machine had available.

Run every configuration whose peak memory matters in a *fresh* subprocess
(:func:`run_worker`): a process never gives all freed memory back, so the second
configuration measured in one process would inherit the first one's peak.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MIB = 1024.0 * 1024.0


# ----------------------------------------------------------------- environment


def set_threads(n: int = 2) -> None:
    """Same intra-op threads everywhere (the machines are 2-core and shared). Call before importing torch.

    ``OMP_WAIT_POLICY=PASSIVE``: by default OpenMP threads spin at every barrier, and
    on a 2-core machine that other processes also load, a spinning thread keeps the
    one it waits for off the CPU. Measured here: small-op training steps (the split
    head) ran 20-30x slower with 2 spinning threads than with 2 passive ones, and
    7-15x slower than with 1 thread. Passive waiting keeps 2 threads honest.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, str(n))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(n)


def committed_preset(name: str) -> dict:
    """A preset of simulations/presets.toml as committed (read directly: the runner that owns presets imports
    flwr, which a GPU machine lacks)."""
    import tomllib

    with (ROOT / "simulations" / "presets.toml").open("rb") as fh:
        return dict(tomllib.load(fh).get(name, {}))


def machine_line(extra: Iterable[str] = ()) -> str:
    """One line describing where and with what a result was measured."""
    parts = [f"{platform.machine()}, {os.cpu_count()} CPU(s)", f"Python {platform.python_version()}"]
    if os.environ.get("OMP_WAIT_POLICY"):
        parts.append(f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
    for mod in ("torch", "opacus", "peft", "transformers", "flwr", "ray"):
        try:
            parts.append(f"{mod} {__import__(mod).__version__}")
        except Exception:  # noqa: BLE001 - optional
            pass
    try:
        load = os.getloadavg()
        parts.append(f"load average at start {load[0]:.1f}")
    except OSError:
        pass
    try:
        import psutil

        parts.append(f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM")
    except Exception:  # noqa: BLE001
        pass
    return ", ".join(list(parts) + list(extra))


# ----------------------------------------------------------------- formatting


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def fmt_mib(x: float | None) -> str:
    if x is None or x != x:
        return "-"
    return f"{x / 1024:.2f} GiB" if x >= 10 * 1024 else f"{x:,.0f} MiB"


def fmt_rate(x: float | None) -> str:
    if x is None or x != x:
        return "-"
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def fmt_s(x: float | None) -> str:
    if x is None or x != x:
        return "-"
    if x < 1e-3:
        return f"{x * 1e6:.0f} µs"
    if x < 1:
        return f"{x * 1e3:.1f} ms"
    if x < 120:
        return f"{x:.1f} s"
    return f"{x / 60:.1f} min"


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None or x != x else f"{x:.2f}x"


def fmt_pct(x: float | None) -> str:
    return "-" if x is None or x != x else f"{100 * x:.2f}"


def median(values: Sequence[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def write_result(name: str, title: str, body: str, out: Path | None) -> None:
    """Print the report and (unless ``out`` is None) write it as Markdown."""
    text = f"# {title}\n\n{body.strip()}\n"
    print(text, flush=True)
    if out is not None:
        from fedpriv.core.files import atomic_write_text

        atomic_write_text(out, text)
        print(f"(written to {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out})", flush=True)


# ----------------------------------------------------------------- memory: one process


def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_mib() -> float:
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib / 1024.0
    import psutil

    return psutil.Process().memory_info().rss / MIB


class PeakRSS:
    """Peak resident memory of this process from :meth:`start` on (MiB), and the RSS at start.

    ``delta`` is what the measured code added on top of what was already resident
    (model, data, optimizer) -- the number to compare between configurations.
    """

    def __init__(self, sample_interval: float = 0.005):
        self.interval = sample_interval
        self.method = ""
        self.base = float("nan")
        self._peak = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "PeakRSS":
        import gc

        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.method = "VmHWM after clear_refs"
        except OSError:
            self.method = f"psutil RSS sampled every {self.interval * 1e3:.0f} ms"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self.base = current_rss_mib()
        self._peak = self.base
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, current_rss_mib())
            time.sleep(self.interval)

    def stop(self) -> tuple[float, float]:
        """(peak MiB, delta MiB over the RSS at start)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, current_rss_mib())
        else:
            peak = (_status_kib("VmHWM") or 0) / 1024.0
        return peak, peak - self.base


# ----------------------------------------------------------------- memory: a process tree


@dataclass
class TreeMemory:
    peak_rss_mib: float = 0.0
    peak_pss_mib: float = 0.0
    peak_processes: int = 0
    min_available_mib: float = float("inf")
    samples: int = 0
    names_at_peak: dict[str, int] = field(default_factory=dict)  # process name -> count, at the peak-RSS sample
    timeline: list[tuple[float, float, int]] = field(default_factory=list)  # (t, rss MiB, processes)


class TreeMemorySampler:
    """Polls ``root`` and all its descendants every ``interval`` s in a background thread.

    Summed RSS every poll; summed PSS (``/proc/<pid>/smaps_rollup``) every
    ``pss_every`` polls, since reading it costs a few ms per process.
    """

    def __init__(self, root_pid: int | None = None, interval: float = 0.5, pss_every: int = 2):
        import psutil

        self.root = psutil.Process(root_pid or os.getpid())
        self.interval = interval
        self.pss_every = pss_every
        self.result = TreeMemory()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = 0.0

    def __enter__(self) -> "TreeMemorySampler":
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _procs(self):
        try:
            return [self.root] + self.root.children(recursive=True)
        except Exception:  # noqa: BLE001 - the root may be gone at the very end
            return []

    def _run(self) -> None:
        import psutil

        n = 0
        while not self._stop.is_set():
            procs = self._procs()
            rss = pss = 0.0
            with_pss = n % self.pss_every == 0
            names: dict[str, int] = {}
            for p in procs:
                try:
                    rss += p.memory_info().rss
                    name = p.name()
                    names[name] = names.get(name, 0) + 1
                    if with_pss:
                        pss += _pss_bytes(p.pid)
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
                    continue
            r = self.result
            if rss / MIB > r.peak_rss_mib:
                r.names_at_peak = names
            r.peak_rss_mib = max(r.peak_rss_mib, rss / MIB)
            if with_pss:
                r.peak_pss_mib = max(r.peak_pss_mib, pss / MIB)
            r.peak_processes = max(r.peak_processes, len(procs))
            r.min_available_mib = min(r.min_available_mib, psutil.virtual_memory().available / MIB)
            r.samples += 1
            r.timeline.append((round(time.monotonic() - self._t0, 1), round(rss / MIB, 1), len(procs)))
            n += 1
            self._stop.wait(self.interval)


def _pss_bytes(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    return 0.0


# ----------------------------------------------------------------- isolated workers


def run_worker(script: Path, spec: dict, timeout: float | None = None) -> dict:
    """Run ``python script --worker JSON`` in a fresh process; its last stdout line is a JSON result.

    A failing configuration is returned as ``{"error": "..."}`` so one broken
    mode (e.g. a library incompatibility) is reported, not fatal.
    """
    cmd = [sys.executable, str(script), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: " + " / ".join(tail)[-400:]}
    return json.loads(lines[-1])


def worker_main(argv: Sequence[str], fn: Callable[[dict], dict]) -> bool:
    """If invoked as a worker, run ``fn(spec)``, print its JSON result and return True."""
    if len(argv) >= 2 and argv[0] == "--worker":
        result = fn(json.loads(argv[1]))
        print(json.dumps(result), flush=True)
        return True
    return False
