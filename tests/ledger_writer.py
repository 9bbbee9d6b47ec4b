"""Helper for tests/test_ledger.py: append releases to a ledger forever, printing each after commit.

Usage: python tests/ledger_writer.py LEDGER RUN_ID

Resumes after the last round recorded for RUN_ID, and re-records that round first
(a retry, which must not add a row), then prints ``ready`` and appends. Parameters are a pure function of
(run_id, round), so a retry after a crash is an exact repeat. The test SIGKILLs this
process at random moments.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedpriv.privacy.ledger import PrivacyLedger, Release  # noqa: E402


def release(run_id: str, rnd: int) -> Release:
    k = sum(map(ord, run_id)) % 3
    return Release(run_id=run_id, round=rnd, steps=5 + rnd % 4, sample_rate=0.01 * (1 + k),
                   noise_multiplier=1.0 + 0.25 * k, max_grad_norm=1.0, delta=1e-5, accountant="rdp")


def main() -> None:
    path, run_id = sys.argv[1], sys.argv[2]
    ledger = PrivacyLedger(path)
    done = [r.round for r in ledger.releases() if r.run_id == run_id]
    rnd = max(done) if done else 0
    if done:
        ledger.record(release(run_id, rnd))  # retry of the last recorded round: a no-op
        print(f"{run_id} {rnd}", flush=True)
        rnd += 1
    print("ready", flush=True)
    while True:
        ledger.record(release(run_id, rnd))
        print(f"{run_id} {rnd}", flush=True)
        rnd += 1


if __name__ == "__main__":
    main()
