"""Helper for tests/adversary/test_job_ceiling_race.py: one round of one region, in a process of its own.

Usage: python tests/region_round_worker.py SPEC.json ROUND ATTEMPT

Runs the real :class:`fedpriv.client.region.RegionRuntime` on the tiny model. After local training it waits until
every worker named in the spec has trained too (marker files in the spec's barrier folder), so all of them pass
the checks made before training before any release is recorded -- the race a coordinator can provoke by sending
two rounds of one job at once. Prints one JSON line: ``{"ok": true, "epsilon": ...}`` or ``{"ok": false, ...}``.
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedpriv.client import region as region_mod  # noqa: E402
from fedpriv.core.config import FedprivConfig  # noqa: E402
from fedpriv.core.errors import FedprivError  # noqa: E402
from fedpriv.task.model import get_trainable  # noqa: E402


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    server_round, attempt = int(sys.argv[2]), sys.argv[3]
    barrier = Path(spec["barrier"])
    real = region_mod.LocalTrainer.train

    def train_then_wait(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        (barrier / f"trained-{server_round}").touch()
        deadline = time.monotonic() + 300
        while len(list(barrier.glob("trained-*"))) < spec["parties"] and time.monotonic() < deadline:
            time.sleep(0.05)
        return result

    region_mod.LocalTrainer.train = train_then_wait
    cfg = FedprivConfig.from_run_config(spec["run_config"])
    runtime = region_mod.RegionRuntime(cfg, region_mod.identify_region(spec["node_config"], cfg))
    try:
        outcome = runtime.train(get_trainable(runtime.split.model), server_round, job_id=spec["job"],
                                attempt_id=attempt)
        print(json.dumps({"ok": True, "epsilon": outcome.epsilon}), flush=True)
    except FedprivError as exc:
        print(json.dumps({"ok": False, "error": str(exc)}), flush=True)


if __name__ == "__main__":
    main()
