"""A coordinator that holds a publisher key ships its own enforcer: the region must still run its own.

The coordinator builds the real app bundle from a copy of the repository whose
``privacy/policy.py`` no longer refuses anything and whose ``fedpriv/apps.py`` leaves a
mark, signs it with a key the region trusts, and asks a region with a strict policy
(``require-dp``) to train with ``dp = false``. The region's ClientApp process is the
real one - :mod:`fedpriv.deploy.trusted_exec` in front of flwr 1.41's ``run_clientapp``
(install, load, execute) - started as a separate process, with only the SuperNode
transport replaced by the pulled task and a captured reply. The region must refuse
(``require-dp``) and no file of the bundle may run.

Also here: a bundle signed for another fedpriv version, and a signature older than the
policy's ``max-bundle-age-days``, are refused by that same process before any code runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from adversary_support import build_shards, write_policy

from fedpriv.core.config import APP_DIR
from fedpriv.deploy.app_signing import create_publisher_key, load_publisher_key, sign_bundle, trust_line

SOURCE = ("fedpriv", "task", "privacy", "client", "strategies", "server", "simulations")

DRIVER = textwrap.dedent('''
    """One ClientApp task as a SuperNode would hand it to the region's verifying ClientApp process."""
    import json, sys, uuid
    from pathlib import Path

    args = json.loads(sys.argv[1])

    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.common.serde import message_from_proto, message_to_proto
    from flwr.supercore.fab import Fab
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supernode.runtime import run_clientapp as rc

    from fedpriv.core import contract
    from fedpriv.core.config import resolve_config
    from fedpriv.privacy.secagg import messages
    from fedpriv.task.model import build_model, get_trainable, to_array_record

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 4242
    flat, _ = resolve_config(args["run_config"])
    model = build_model("tiny", "all", 42, "mean", 0)
    content = RecordDict({contract.ARRAYS: to_array_record(get_trainable(model)),
                          contract.CONFIG: ConfigRecord({"server-round": 1, messages.TRAIN_FLAG: 1})})
    msg = Message(content, 4242, "train")
    msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
    msg = message_from_proto(message_to_proto(msg))
    context = Context(run_id=7, node_id=4242, node_config=args["node_config"], state=RecordDict(), run_config=flat)
    fab_bytes = Path(args["fab"]).read_bytes()
    import hashlib
    fab_hash = hashlib.sha256(fab_bytes).hexdigest()
    run = Run.create_empty(7)
    run.fab_id, run.fab_version, run.fab_hash = "fedpriv/fedpriv", "0.1.0", fab_hash

    def pull_task_input(client):
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 4242
        return msg, context, run, Fab(fab_hash, fab_bytes, {})

    def push_message(client, reply, ctx):
        out = {"error": reply.error.reason if reply.has_error() else None, "keys": sorted(reply.content.keys())
               if not reply.has_error() else []}
        Path(args["out"]).write_text(json.dumps(out))

    class NoClient:
        @classmethod
        def from_server_address(cls, **kwargs):
            return cls()
        def close(self):
            pass

    class NoHeartbeat:
        is_running = False
        def __init__(self, *a, **k):
            pass
        def start(self):
            pass
        def stop(self):
            pass

    rc.pull_task_input, rc.push_message = pull_task_input, push_message
    rc.push_task_output = lambda **kwargs: None
    rc.RuntimeHttpClient, rc.HeartbeatSender = NoClient, NoHeartbeat
    rc.make_task_heartbeat_fn_http = lambda client: None

    from fedpriv.deploy import trusted_exec
    trusted_exec.main(["clientapp", "--trust", args["trust"], "--runtime-api-address", "127.0.0.1:1",
                       "--token", "t", "--insecure"])
''')


def _malicious_app(root: Path, marker: Path) -> Path:
    """A copy of this repository whose policy check accepts everything and whose code leaves a mark when run."""
    app = root / "app"
    app.mkdir()
    shutil.copy(Path(APP_DIR) / "pyproject.toml", app / "pyproject.toml")
    for folder in SOURCE:
        shutil.copytree(Path(APP_DIR) / folder, app / folder, ignore=shutil.ignore_patterns("__pycache__", ".*"))
    mark = f"open({str(marker)!r}, 'a').write(__name__ + '\\n')\n"
    policy = app / "privacy" / "policy.py"
    text = policy.read_text()
    head = "def check_train_request(policy: RegionPolicy, cfg: Any, secure_round: bool) -> None:\n"
    assert head in text
    policy.write_text(text.replace(head, head + "    return  # the coordinator's enforcer: nothing is refused\n") + mark)
    (app / "fedpriv" / "apps.py").write_text((app / "fedpriv" / "apps.py").read_text() + mark)
    (app / "fedpriv" / "__init__.py").write_text((app / "fedpriv" / "__init__.py").read_text() + mark)
    return app


def _run_region(tmp_path: Path, fab: bytes, trust: Path, policy: Path, shard_root: Path, **run_config) -> dict:
    from flwr.cli.build import build_fab_from_disk  # noqa: F401 - flwr is importable here

    fab_path, out = tmp_path / "signed.fab", tmp_path / "reply.json"
    fab_path.write_bytes(fab)
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    config = {"noise-multiplier": 1.0, "model": "tiny", "trainable": "all", "regions": "us-east,eu-west,ap-south,sa-east",
              "num-server-rounds": 3, "batch-size": 32, "physical-batch-size": 32, "local-epochs": 1.0,
              "target-epsilon": 3.0, "delta": 1e-5, "accountant": "rdp", "num-threads": 1,
              "data-dir": str(shard_root), "run-dir": str(tmp_path / "run"), "job-id": "job-1", **run_config}
    node_config = {"region": "us-east", "data-path": str(shard_root), "ledger-path": str(home / "us-east.sqlite"),
                   "policy-path": str(policy)}
    args = {"run_config": config, "node_config": node_config, "fab": str(fab_path), "trust": str(trust), "out": str(out)}
    env = {**os.environ, "FLWR_HOME": str(home / "flwr"), "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(args)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    reply = json.loads(out.read_text()) if out.exists() else None
    return {"reply": reply, "stderr": proc.stderr, "returncode": proc.returncode,
            "ledger": (home / "us-east.sqlite").exists(), "installed": (home / "flwr" / "apps").exists()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from flwr.cli.build import build_fab_from_disk

    root = tmp_path_factory.mktemp("bundle")
    shard_root = build_shards(root / "shards")
    key_path, pub_path = create_publisher_key(root / "publisher", "acme")
    trust = root / "trust.yaml"
    trust.write_text(trust_line("acme", pub_path.read_text()))
    marker = root / "bundle-code-ran.txt"
    fab = build_fab_from_disk(_malicious_app(root, marker))
    strict = write_policy(root / "strict-policy.toml", **{"require-dp": True, "require-secure-aggregation": True})
    return {"root": root, "shards": shard_root, "key": load_publisher_key(key_path), "trust": trust, "marker": marker,
            "fab": fab, "policy": strict}


def test_a_signed_bundle_with_a_disabled_policy_check_is_still_refused_by_the_regions_policy(setup, tmp_path):
    signed = sign_bundle(setup["fab"], setup["key"])
    seen = _run_region(tmp_path, signed, setup["trust"], setup["policy"], setup["shards"], dp=False)
    assert "app bundle verified: signed by 'acme'" in seen["stderr"], seen["stderr"][-2000:]
    assert seen["reply"] is not None, seen["stderr"][-3000:]
    assert seen["reply"]["error"] is not None and "require-dp" in seen["reply"]["error"], seen["reply"]
    assert not setup["marker"].exists(), f"the bundle's code ran in the region: {setup['marker'].read_text()}"
    assert not seen["installed"], "the bundle was unpacked under FLWR_HOME/apps"


def test_a_bundle_naming_another_fedpriv_version_is_refused(setup, tmp_path):
    signed = sign_bundle(setup["fab"], setup["key"], fedpriv_version="0.0.9")
    seen = _run_region(tmp_path, signed, setup["trust"], setup["policy"], setup["shards"])
    assert "fedpriv: REFUSED app bundle:" in seen["stderr"] and "signed for fedpriv '0.0.9'" in seen["stderr"]
    assert seen["reply"] is not None and "signed for fedpriv '0.0.9'" in seen["reply"]["error"]
    assert not seen["ledger"] and not setup["marker"].exists()


def test_a_replayed_old_signature_is_refused_beyond_the_policys_bundle_age(setup, tmp_path):
    policy = write_policy(tmp_path / "policy.toml", **{"max-bundle-age-days": 7.0})
    old = sign_bundle(setup["fab"], setup["key"], signed_at=int(time.time()) - 8 * 86400)
    seen = _run_region(tmp_path, old, setup["trust"], policy, setup["shards"])
    assert "fedpriv: REFUSED app bundle:" in seen["stderr"] and "max-bundle-age-days = 7" in seen["stderr"]
    assert seen["reply"] is not None and "max-bundle-age-days" in seen["reply"]["error"]
    assert not seen["ledger"] and not setup["marker"].exists()
