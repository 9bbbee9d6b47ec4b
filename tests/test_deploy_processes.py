"""Real Flower processes on 127.0.0.1: TLS, SuperNode authentication, the Fleet-only gateway, cleanup.

Everything binds to loopback on free ports; every process is stopped (and checked
to be gone) even when a test fails.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from e2e_support import tree_pids
from fedpriv.cli import main
from fedpriv.deploy.certs import create_certs
from fedpriv.deploy.flwr_cli import list_supernodes, register_region, write_flwr_home
from fedpriv.deploy.paths import resolve_region_data_dir
from fedpriv.deploy.ports import check_port_free, free_port
from fedpriv.deploy.superlink import SuperLinkProcess
from fedpriv.deploy.supernode import SuperNodeProcess
from fedpriv.core.errors import FedprivError

READY_TIMEOUT = 90.0  # generous: CI machines are shared
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def write_trust(root: Path, name: str = "tests") -> tuple[Path, Path]:
    """A publisher key and a region trust file that lists it: (publisher.key, trust.yaml)."""
    from fedpriv.deploy.app_signing import create_publisher_key, trust_line

    key, pub = create_publisher_key(root / f"publisher-{name}", name)
    trust = root / f"trust-{name}.yaml"
    trust.write_text(trust_line(name, pub.read_text()))
    return key, trust


def write_policy(root: Path) -> Path:
    """The region policy of the examples (or a minimal one while that file does not exist yet)."""
    example = REPO / "examples" / "region-policy.toml"
    if example.is_file():
        return example
    path = root / "region-policy.toml"
    path.write_text("[policy]\ndelta = 1e-5\nmax-lifetime-epsilon = 10.0\n")
    return path


def _group_pids(group) -> set[int]:
    pids: set[int] = set()
    for mp in group.procs:
        pids |= tree_pids(mp.pid)
    return pids


def _alive(pids: set[int]) -> list[str]:
    out = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{pid} {' '.join(p.cmdline())[:120]}")
        except psutil.Error:
            pass
    return out


def _assert_gone(pids: set[int], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pids), f"leftover processes: {_alive(pids)}"


class _Tracked:
    """Start a process group, remember every pid it ever had, stop it and check they are gone."""

    def __init__(self, group) -> None:
        self.group = group
        self.pids: set[int] = set()

    def __enter__(self):
        try:
            self.group.start()
        except BaseException:
            self.group.stop()
            raise
        self.pids |= _group_pids(self.group)
        return self.group

    def snapshot(self) -> None:
        self.pids |= _group_pids(self.group)

    def __exit__(self, *exc) -> None:
        self.snapshot()
        self.group.stop()
        _assert_gone(self.pids)


def _https_status(host: str, port: int, cafile: Path, method: str = "GET", path: str = "/health", body: bytes | None = None, headers=None):
    ctx = ssl.create_default_context(cafile=str(cafile))
    conn = http.client.HTTPSConnection(host, port, timeout=15, context=ctx)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# ---------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """One SuperLink (TLS + SuperNode auth + gateway) with region us-east registered, eu-west not."""
    root = tmp_path_factory.mktemp("deploy")
    certs = create_certs(root / "certs", demo_regions=("us-east", "eu-west")).paths
    other = create_certs(root / "other-ca", demo_regions=("us-east",)).paths
    data = root / "data"
    for r in ("us-east", "eu-west"):
        (data / "regions" / r).mkdir(parents=True)
        (data / "regions" / r / "train.jsonl").write_text("{}\n")
    publisher_key, trust = write_trust(root)
    apps_home = root / "apps-home"  # FLWR_HOME of the Flower processes: submitted apps are unpacked here
    sl = SuperLinkProcess(
        certs.root, host="127.0.0.1", port=free_port(), control_port=free_port(),
        state_file=root / "state.db", log_file=root / "superlink.log", flwr_home=apps_home / "superlink",
    )
    tracked = _Tracked(sl)
    with tracked:
        sl.wait_ready(READY_TIMEOUT)
        tracked.snapshot()  # includes flower-superexec, which runs in its own session
        home = root / "flwr-home"
        write_flwr_home(home, sl.control_address, certs.ca_cert)
        status, node_id = register_region("us-east", certs.root, home, sl.control_address)
        assert status == "registered" and node_id
        yield SimpleNamespace(
            root=root, certs=certs, other=other, data=data, sl=sl, home=home, us_east_id=node_id, tracked=tracked, apps_home=apps_home,
            publisher_key=publisher_key, trust=trust, policy=write_policy(root),
        )
    # _Tracked.__exit__ asserted that no process of the SuperLink is left.


def _log(sl: SuperLinkProcess) -> str:
    return sl.log.path.read_text(encoding="utf-8", errors="replace") if sl.log.path else ""


# ---------------------------------------------------------------------------
# SuperLink: TLS, health, Control API only on loopback
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_superlink_command_line_enables_tls_auth_and_no_runtime_installs(deployment):
    argv = deployment.sl.superlink_command()
    for flag in ("--enable-supernode-auth", "--disable-runtime-dependency-installation", "--ssl-certfile", "--ssl-keyfile", "--ssl-ca-certfile", "--database"):
        assert flag in argv
    assert "--insecure" not in argv
    assert argv[argv.index("--isolation") + 1] == "subprocess"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"  # Control/Runtime/Fleet HTTP APIs: loopback only
    # The SuperLink itself listens on loopback only; only the gateway has the Fleet port.
    conns = psutil.Process(deployment.sl.procs[0].pid).net_connections(kind="tcp")
    listening = {(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}
    assert listening == {("127.0.0.1", deployment.sl.control_port)}
    # The SuperExec it launched for ServerApps does not install dependencies either.
    children = [" ".join(c.cmdline()) for c in psutil.Process(deployment.sl.procs[0].pid).children(recursive=True)]
    assert any("flower-superexec" in c for c in children), children
    assert not any("--allow-runtime-dependency-installation" in c for c in children), children


@pytest.mark.slow
def test_superlink_answers_health_over_tls_only(deployment):
    sl, certs = deployment.sl, deployment.certs
    assert _https_status("127.0.0.1", sl.port, certs.ca_cert)[0] == 200  # through the gateway
    assert _https_status("127.0.0.1", sl.control_port, certs.ca_cert)[0] == 200  # the SuperLink itself
    assert _https_status("localhost", sl.port, certs.ca_cert)[0] == 200  # SAN "localhost"
    # Plain HTTP is not served.
    for port in (sl.port, sl.control_port):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", "/health")
            status = conn.getresponse().status
        except (OSError, http.client.HTTPException):
            status = None
        finally:
            conn.close()
        assert status != 200


@pytest.mark.slow
def test_client_trusting_another_ca_is_refused(deployment):
    sl, other = deployment.sl, deployment.other
    for port in (sl.port, sl.control_port):
        with pytest.raises(ssl.SSLCertVerificationError):
            _https_status("127.0.0.1", port, other.ca_cert)
    # The flwr CLI (Control API) with the wrong CA.
    home = deployment.root / "flwr-home-other-ca"
    write_flwr_home(home, sl.control_address, other.ca_cert)
    with pytest.raises(FedprivError, match="TLS verification failed"):
        list_supernodes(home, sl.control_address, other.ca_cert)
    # ... and so does `fedpriv register` with a certs directory of another deployment.
    with pytest.raises(FedprivError, match="TLS verification failed"):
        register_region("us-east", other.root, home, sl.control_address)


@pytest.mark.slow
def test_gateway_serves_only_the_fleet_api(deployment):
    sl, certs = deployment.sl, deployment.certs
    # Control API through the public port: refused by the gateway.
    status, body = _https_status("127.0.0.1", sl.port, certs.ca_cert, "POST", "/v1/control/list-nodes", b"", {"content-type": "application/protobuf"})
    assert status == 403 and b"Fleet API" in body
    for path in ("/v1/runtime/acquire-task", "/docs", "/openapi.json", "/v1/fleet/../control/list-nodes", "/v1/fleet/pull-messages?x=1"):
        assert _https_status("127.0.0.1", sl.port, certs.ca_cert, "POST" if "v1" in path else "GET", path, b"")[0] == 403, path
    # ... while the same request on the loopback Control port reaches the Control API.
    assert _https_status("127.0.0.1", sl.control_port, certs.ca_cert, "POST", "/v1/control/list-nodes", b"", {"content-type": "application/protobuf"})[0] != 403
    # `flwr` pointed at the Fleet port gets a clear error.
    home = deployment.root / "flwr-home-fleet-port"
    write_flwr_home(home, sl.fleet_address, certs.ca_cert)
    with pytest.raises(FedprivError, match="Fleet port"):
        list_supernodes(home, sl.fleet_address, certs.ca_cert)
    assert "rejected 'POST /v1/control/list-nodes'" in _log(sl)


@pytest.mark.slow
def test_gateway_forwards_chunked_bodies_and_closes_on_a_forbidden_follow_up(deployment):
    sl, certs = deployment.sl, deployment.certs
    ctx = ssl.create_default_context(cafile=str(certs.ca_cert))
    with socket.create_connection(("127.0.0.1", sl.port), timeout=15) as raw, ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        s.sendall(
            b"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/protobuf\r\n"
            b"X-Forwarded-For: 6.6.6.6\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        )
        first = s.recv(65536)
        assert first.startswith(b"HTTP/1.1 ") and not first.startswith(b"HTTP/1.1 403")  # the SuperLink answered
        s.sendall(b"POST /v1/control/list-nodes HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        rest = b""
        while True:  # drain the rest of the first response; the gateway then closes the connection
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
        assert b"403" not in rest and b"list-nodes" not in rest
    assert "6.6.6.6" not in _log(sl)  # client-supplied forwarding headers are dropped


# ---------------------------------------------------------------------------
# SuperNodes: registered key connects, unregistered key and foreign CA are refused
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_registered_supernode_connects(deployment):
    sn = SuperNodeProcess(
        "us-east", deployment.data, deployment.certs.root, deployment.sl.fleet_address, free_port(),
        log_file=deployment.root / "sn-us-east.log", flwr_home=deployment.apps_home / "us-east",
        trust_file=deployment.trust, policy_file=deployment.policy,
    )
    argv = sn.command()
    assert "--auth-supernode-private-key" in argv and "--root-certificates" in argv
    assert argv[argv.index("--isolation") + 1] == "process"  # Flower starts no ClientApp on its own
    assert sn.node_config() == (f"region='us-east' data-path='{deployment.data / 'regions' / 'us-east'}' "
                                f"policy-path='{deployment.policy}'")
    with _Tracked(sn) as node:
        assert node.wait_ready(READY_TIMEOUT) == deployment.us_east_id
        children = [" ".join(c.cmdline()) for c in psutil.Process(node.procs[0].pid).children(recursive=True)]
        assert not any("flower-superexec" in c for c in children), children  # no unverified SuperExec
        superexec = " ".join(psutil.Process(node.procs[1].pid).cmdline())
        assert "fedpriv.deploy.trusted_exec superexec --trust" in superexec
        assert "--allow-runtime-dependency-installation" not in superexec
        nodes = {n["node-id"]: n["status"] for n in list_supernodes(deployment.home, deployment.sl.control_address, deployment.certs.ca_cert)}
        assert nodes[deployment.us_east_id] == "online"
    assert f"Activated node_id={deployment.us_east_id}" in _log(deployment.sl)


ECHO_PYPROJECT = """
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "deploysmoke"
version = "1.0.0"
description = "fedpriv deployment smoke test"
license = "Apache-2.0"
dependencies = ["flwr"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedpriv"

[tool.flwr.app.components]
serverapp = "deploysmoke.server:app"
clientapp = "deploysmoke.client:app"

[tool.flwr.app.config]
num-nodes = 1
"""

ECHO_SERVER = """
import time
import numpy as np
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    want = int(context.run_config["num-nodes"])
    deadline = time.time() + 60
    nodes = list(grid.get_node_ids())
    while len(nodes) < want and time.time() < deadline:
        time.sleep(0.5)
        nodes = list(grid.get_node_ids())
    sent = np.arange(250_000, dtype=np.float32)  # ~1 MB each way
    payload = ArrayRecord([sent])
    msgs = [Message(content=RecordDict({"w": payload}), message_type="train", dst_node_id=n) for n in nodes]
    for r in grid.send_and_receive(msgs, timeout=90):
        if r.has_error():
            print("ECHO-ERROR", r.error)
            continue
        info = r.content["info"]
        match = bool(np.array_equal(r.content["w"].to_numpy_ndarrays()[0], 2 * sent))
        print(f"ECHO-REPLY region={info['region']} data={info['data']} match={match}")
"""

ECHO_CLIENT = """
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    arr = msg.content["w"].to_numpy_ndarrays()[0] * 2
    info = ConfigRecord({"region": str(context.node_config["region"]), "data": str(context.node_config["data-path"])})
    return Message(content=RecordDict({"w": ArrayRecord([arr]), "info": info}), reply_to=msg)
"""


@pytest.mark.slow
def test_a_run_round_trips_messages_through_tls_auth_and_the_gateway(deployment):
    """`flwr run` on the Control port; ~1 MB down via the gateway to the region's *installed* fedpriv ClientApp,
    which sees its node config (it names its region) and answers: this SuperNode has no policy, so it refuses."""
    app = _echo_app(deployment.root, clientapp="fedpriv.apps:clientapp")
    apps = deployment.apps_home / "us-east-run"
    sn = SuperNodeProcess(
        "us-east", deployment.data, deployment.certs.root, deployment.sl.fleet_address, free_port(),
        log_file=deployment.root / "sn-run.log", flwr_home=apps, trust_file=deployment.trust,
    )
    with _Tracked(sn) as node:
        node.wait_ready(READY_TIMEOUT)
        out = _submit(deployment, _signed_echo_app(deployment, app), app=app)
        deployment.tracked.snapshot()
    assert "ECHO-ERROR" in out and "region us-east has no privacy policy" in out, out[-3000:]
    assert "fedpriv: app bundle verified: signed by 'tests'" in sn.log.path.read_text()
    assert not (apps / "apps").exists()  # the bundle is never unpacked in a region


def _echo_app(root: Path, clientapp: str = "deploysmoke.client:app") -> Path:
    """The echo app; with ``clientapp = "fedpriv.apps:clientapp"`` its run config is fedpriv's defaults."""
    import tomli_w

    from fedpriv.core.config import resolve_config

    app = root / ("deploysmoke" if clientapp == "deploysmoke.client:app" else "deployfedpriv")
    if not app.exists():
        (app / "deploysmoke").mkdir(parents=True)
        pyproject = ECHO_PYPROJECT.replace('clientapp = "deploysmoke.client:app"', f'clientapp = "{clientapp}"')
        if clientapp != "deploysmoke.client:app":
            flat, _ = resolve_config({})
            pyproject = pyproject.replace("[tool.flwr.app.config]\nnum-nodes = 1\n", tomli_w.dumps(
                {"tool": {"flwr": {"app": {"config": {**flat, "num-nodes": 1}}}}}))
        (app / "pyproject.toml").write_text(pyproject)
        (app / "deploysmoke" / "__init__.py").write_text("")
        (app / "deploysmoke" / "server.py").write_text(ECHO_SERVER)
        (app / "deploysmoke" / "client.py").write_text(ECHO_CLIENT)
    return app


def _signed_echo_app(deployment, app: Path, key: Path | None = None) -> Path:
    from flwr.cli.build import build_fab_from_disk

    from fedpriv.deploy.app_signing import load_publisher_key, sign_bundle

    fab = deployment.root / f"signed-{app.name}-{(key or deployment.publisher_key).parent.name}.fab"
    fab.write_bytes(sign_bundle(build_fab_from_disk(app), load_publisher_key(key or deployment.publisher_key)))
    return fab


def _submit(deployment, fab: Path | None, app: Path | None = None) -> str:
    """`flwr run APP --stream` with Flower's own bundle (fab=None) or with the given signed bundle."""
    env = dict(os.environ, FLWR_HOME=str(deployment.home), FLWR_DISABLE_UPDATE_CHECK="1", FLWR_TELEMETRY_ENABLED="0")
    app = app or _echo_app(deployment.root)
    if fab is None:
        argv = [str(Path(sys.executable).parent / "flwr"), "run", str(app), "fedpriv", "--stream"]
    else:
        argv = [sys.executable, "-m", "fedpriv.deploy.signed_run", str(fab), "run", str(app), "fedpriv", "--stream"]
    run = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = run.communicate(timeout=180)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    return out


@pytest.mark.slow
def test_unsigned_modified_or_foreign_bundles_are_refused_by_a_real_supernode(deployment):
    """Finding 6: before, a SuperNode ran whatever bundle the coordinator submitted. Now the region's
    SuperExec refuses it before installing it: no file of it is unpacked, its ClientApp never runs, and
    the coordinator gets an error reply naming the reason."""
    import hashlib
    import io
    import zipfile

    app = _echo_app(deployment.root)
    apps = deployment.apps_home / "us-east-refuse"
    log = deployment.root / "sn-refuse.log"
    sn = SuperNodeProcess("us-east", deployment.data, deployment.certs.root, deployment.sl.fleet_address, free_port(),
                          log_file=log, flwr_home=apps, trust_file=deployment.trust)

    # The coordinator edits the ClientApp after signing and fixes Flower's .info/CONTENT hashes to match.
    signed = zipfile.ZipFile(_signed_echo_app(deployment, app))
    entries = {i.filename: signed.read(i) for i in signed.infolist()}
    evil = entries["deploysmoke/client.py"].replace(b"* 2", b"* 3")
    entries["deploysmoke/client.py"] = evil
    entries[".info/CONTENT"] = b"\n".join(
        (f"deploysmoke/client.py,{hashlib.sha256(evil).hexdigest()},{len(evil)}".encode()
         if line.startswith(b"deploysmoke/client.py,") else line)
        for line in entries[".info/CONTENT"].split(b"\n"))
    tampered = deployment.root / "tampered.fab"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    tampered.write_bytes(buf.getvalue())
    mallory_key, _ = write_trust(deployment.root, "mallory")
    foreign = _signed_echo_app(deployment, app, key=mallory_key)
    elsewhere = _signed_echo_app(deployment, app)  # signed by the trusted key, but its ClientApp is not the region's

    with _Tracked(sn) as node:
        node.wait_ready(READY_TIMEOUT)
        outs = {name: _submit(deployment, fab) for name, fab in (("unsigned", None), ("tampered", tampered), ("foreign", foreign),
                                                                 ("elsewhere", elsewhere))}
        deployment.tracked.snapshot()
    text = log.read_text()
    for name, reason in (("unsigned", "is not signed"), ("tampered", "modified after signing"),
                         ("foreign", "not in this region's trust file"), ("elsewhere", "names ClientApp 'deploysmoke.client:app'")):
        assert "ECHO-REPLY" not in outs[name] and "ECHO-ERROR" in outs[name], outs[name][-2000:]
        assert reason in outs[name], outs[name][-2000:]  # the coordinator learns why, in the error reply
        assert reason in text
    assert text.count("fedpriv: REFUSED app bundle:") == 4 and "app bundle verified" not in text
    assert not (apps / "apps").exists() or not any((apps / "apps").iterdir())  # nothing was unpacked


@pytest.mark.slow
def test_unregistered_supernode_is_refused_with_a_visible_message(deployment, capsys):
    """Through the `fedpriv supernode` command: exits with one line naming the fix; the SuperLink logs the refusal."""
    port = free_port()
    rc = main([
        "supernode", "--region", "eu-west", "--data", str(deployment.data), "--certs", str(deployment.certs.root),
        "--superlink", deployment.sl.fleet_address, "--port", str(port), "--trust", str(deployment.trust),
        "--policy", str(deployment.policy),
    ])
    err = capsys.readouterr().err
    assert rc == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("fedpriv supernode: error: ") and "not registered" in last and "fedpriv register" in last
    assert "No SuperNode found with the given public key" in _log(deployment.sl)
    check_port_free("127.0.0.1", port)  # the SuperNode is gone and released its port


@pytest.mark.slow
def test_supernode_trusting_another_ca_is_refused(deployment):
    mixed = deployment.root / "mixed-certs"
    (mixed / "regions").mkdir(parents=True)
    shutil.copy(deployment.other.ca_cert, mixed / "ca.crt")
    key = mixed / "regions" / "us-east.key"
    key.write_bytes(deployment.certs.region_key("us-east").read_bytes())
    key.chmod(0o600)
    sn = SuperNodeProcess("us-east", deployment.data, mixed, deployment.sl.fleet_address, free_port(), trust_file=deployment.trust)
    with _Tracked(sn) as node, pytest.raises(FedprivError, match="TLS verification of the SuperLink"):
        node.wait_ready(READY_TIMEOUT)


@pytest.mark.slow
def test_register_command_is_idempotent(deployment, capsys):
    args = ["register", "--superlink", deployment.sl.control_address, "--certs", str(deployment.certs.root), "--flwr-home", str(deployment.home)]
    assert main([*args, "--regions", "us-east"]) == 0
    assert "us-east: already registered" in capsys.readouterr().out
    assert main([*args, "--regions", "nope"]) == 2
    assert "unknown region 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_two_supernodes_on_one_host_each_with_its_own_port(deployment, capsys):
    """README step 5: SuperNodes sharing a host each pass --port. Both connect; the same port twice is one line
    naming --port (the only port option of `fedpriv supernode`), before anything starts."""
    from fedpriv.deploy.certs import create_region_key

    second = deployment.root / "certs-ap-south"  # ap-south's own directory: its key and the CA certificate
    create_region_key(second, "ap-south")
    shutil.copy(deployment.certs.ca_cert, second / "ca.crt")
    (deployment.data / "regions" / "ap-south").mkdir(parents=True, exist_ok=True)
    (deployment.data / "regions" / "ap-south" / "train.jsonl").write_text("{}\n")
    status, ap_south_id = register_region("ap-south", second / "regions" / "ap-south.pub", deployment.home,
                                          deployment.sl.control_address, deployment.certs.ca_cert)
    assert status == "registered"
    port_a, port_b = free_port(), free_port()
    a = SuperNodeProcess("us-east", deployment.data, deployment.certs.root, deployment.sl.fleet_address, port_a,
                         log_file=deployment.root / "sn-two-a.log", trust_file=deployment.trust, policy_file=deployment.policy)
    with _Tracked(a) as node_a:
        assert node_a.wait_ready(READY_TIMEOUT) == deployment.us_east_id
        clash = ["supernode", "--region", "ap-south", "--data", str(deployment.data), "--certs", str(second),
                 "--superlink", deployment.sl.fleet_address, "--trust", str(deployment.trust), "--policy", str(deployment.policy)]
        assert main([*clash, "--port", str(port_a)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"fedpriv supernode: error: port {port_a} on 127.0.0.1 is already in use: pass --port with a free port"]
        b = SuperNodeProcess("ap-south", deployment.data, second, deployment.sl.fleet_address, port_b,
                             log_file=deployment.root / "sn-two-b.log", trust_file=deployment.trust, policy_file=deployment.policy)
        with _Tracked(b) as node_b:
            assert node_b.wait_ready(READY_TIMEOUT) == ap_south_id
            assert node_a.running() and node_b.running()
            nodes = {n["node-id"]: n["status"] for n in list_supernodes(deployment.home, deployment.sl.control_address,
                                                                         deployment.certs.ca_cert)}
            assert nodes[deployment.us_east_id] == nodes[ap_south_id] == "online"


def _options_of(command: str) -> set[str]:
    import argparse

    from fedpriv.commands.registry import COMMANDS
    import fedpriv.commands  # noqa: F401 - registers every subcommand

    parser = argparse.ArgumentParser()
    COMMANDS[command][0](parser)
    return {o for action in parser._actions for o in action.option_strings}


def test_superlink_next_hint_is_a_register_command_that_works_as_printed(tmp_path):
    """The printed `fedpriv register ...` uses only register's options, and without demo keys names --public-key."""
    import re
    import shlex

    from fedpriv.commands.superlink import register_hint
    from fedpriv.deploy.certs import CertPaths

    options = _options_of("register")
    for demo, control in (((), "127.0.0.1:9093"), (("us-east", "eu-west"), "127.0.0.1:9193")):
        certs = create_certs(tmp_path / f"certs-{len(demo)}", demo_regions=demo).paths
        hint = register_hint(SimpleNamespace(certs=CertPaths(certs.root), control_address=control))
        command = hint.split("   (")[0]
        flags = set(re.findall(r"(?<!\S)--[a-z-]+", command))
        assert flags <= options, (flags - options, hint)
        assert ("--superlink" in flags) == (control != "127.0.0.1:9093")  # the default needs no flag
        if demo:
            assert "--public-key" not in flags and "eu-west, us-east" in hint
            argv = shlex.split(command)[2:]  # runs as printed: register's parser accepts it
            import argparse

            from fedpriv.commands.registry import COMMANDS

            parser = argparse.ArgumentParser()
            COMMANDS["register"][0](parser)
            assert parser.parse_args(argv).certs == str(certs.root)
        else:
            assert "--public-key NAME=NAME.pub" in command  # the datacenter path: the regions' own .pub files


def test_a_supernode_port_clash_hint_names_only_supernode_options(tmp_path):
    """flower-supernode's last words on a port clash become one line naming --port, never --control-port."""
    from fedpriv.deploy.processes import exit_message

    assert "--port" in _options_of("supernode") and "--control-port" not in _options_of("supernode")
    dead = SimpleNamespace(_thread=None, name="supernode-us-east", returncode=lambda: 1, seen={}, proc=None,
                           last_lines=lambda n=8: ["OSError: [Errno 98] Address already in use"], running=lambda: False)
    sn = SuperNodeProcess("us-east", tmp_path, tmp_path, "127.0.0.1:9092")
    sn.procs = [dead]
    message = sn.failure_message()
    assert "pass --port with free ports" in message and "--control-port" not in message
    assert "pass --port/--control-port with free ports" in exit_message(dead)  # the SuperLink has both


# ---------------------------------------------------------------------------
# Foreground command, port conflicts, pre-flight checks
# ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_superlink_command_runs_until_sigint_and_stops_its_children(tmp_path, sig):
    """Ctrl-C, and SIGTERM (how timeout, systemd and container runtimes stop a service), stop it cleanly."""
    certs = create_certs(tmp_path / "certs", demo_regions=("a",)).paths
    fleet, control = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from fedpriv.cli import main; sys.exit(main())", "superlink",
         "--certs", str(certs.root), "--port", str(fleet), "--control-port", str(control)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    pids: set[int] = {proc.pid}
    ready = threading.Event()
    out: list[str] = []

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            out.append(line)
            if "SuperLink ready" in line:
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(READY_TIMEOUT), "".join(out)
        time.sleep(0.5)
        pids |= tree_pids(proc.pid)
        assert len(pids) >= 3  # fedpriv, flower-superlink, gateway (+ flower-superexec)
        os.kill(proc.pid, sig)
        assert proc.wait(timeout=60) == 0, "".join(out[-40:])  # its one-line error, if a child died
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in pids - {proc.pid}:  # belt and braces: never leave children behind
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
    reader.join(timeout=5)
    _assert_gone(pids)
    assert any(f"{sig.name}: stopping" in line for line in out)


def test_port_in_use_is_a_one_line_error(tmp_path, capsys):
    certs = create_certs(tmp_path / "certs", demo_regions=("a",)).paths
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(FedprivError) as exc:
            check_port_free("127.0.0.1", port)
        assert str(exc.value) == f"port {port} on 127.0.0.1 is already in use: pass --port with a free port"

        sl = SuperLinkProcess(certs.root, port=port, control_port=free_port())
        with pytest.raises(FedprivError, match=f"port {port} on 127.0.0.1 is already in use"):
            sl.start()
        assert sl.procs == []  # nothing was started

        assert main(["superlink", "--certs", str(certs.root), "--port", str(free_port()), "--control-port", str(port)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"fedpriv superlink: error: port {port} on 127.0.0.1 is already in use: pass --control-port with a free port"


def test_preflight_errors_name_the_problem(tmp_path):
    certs = create_certs(tmp_path / "certs", demo_regions=("us-east",)).paths
    data = tmp_path / "data"
    (data / "regions" / "us-east").mkdir(parents=True)
    (data / "regions" / "us-east" / "train.jsonl").write_text("{}\n")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FedprivError, match=r"missing CA certificate .*empty/ca.crt: run `fedpriv certs"):
        SuperLinkProcess(empty, port=free_port(), control_port=free_port()).start()
    with pytest.raises(FedprivError, match="not a loopback address"):
        SuperLinkProcess(certs.root, port=free_port(), control_port=free_port(), control_host="0.0.0.0").start()

    _, trust = write_trust(tmp_path)

    def node(region="us-east", data_dir=data, certs_dir=certs.root, trust_file=trust, policy_file=None):
        return SuperNodeProcess(region, data_dir, certs_dir, "127.0.0.1:1", free_port(), trust_file=trust_file,
                                policy_file=policy_file)

    # The region's own trust list and policy: one line each, nothing started.
    with pytest.raises(FedprivError, match="missing --trust FILE"):
        node(trust_file=None).start()
    with pytest.raises(FedprivError, match="missing trust file"):
        node(trust_file=tmp_path / "nope.yaml").start()
    (tmp_path / "bad-trust.yaml").write_text("acme: 'ssh-rsa AAAA'\n")
    with pytest.raises(FedprivError, match="bad-trust.yaml: entry 'acme'"):
        node(trust_file=tmp_path / "bad-trust.yaml").start()
    with pytest.raises(FedprivError, match="missing policy file"):
        node(policy_file=tmp_path / "nope.toml").start()
    (tmp_path / "bad.toml").write_text("[policy\n")
    with pytest.raises(FedprivError, match="bad.toml"):
        node(policy_file=tmp_path / "bad.toml").start()
    certs.region_key("us-east").chmod(0o640)
    with pytest.raises(FedprivError, match=r"readable by other users \(mode 640\): chmod 600"):
        node().start()
    certs.region_key("us-east").chmod(0o600)

    with pytest.raises(FedprivError, match=r"unknown region 'eu-central': .* has keys for us-east"):
        node("eu-central").start()
    with pytest.raises(FedprivError, match="data directory .*missing does not exist"):
        node(data_dir=tmp_path / "missing").start()
    with pytest.raises(FedprivError, match="no data for region 'us-east'"):
        node(data_dir=empty).start()
    with pytest.raises(FedprivError, match=r"missing CA certificate .*empty/ca.crt"):
        node(certs_dir=empty).start()
    with pytest.raises(FedprivError, match="expected HOST:PORT"):
        SuperNodeProcess("us-east", data, certs.root, "no-port", free_port(), trust_file=trust).start()
    unreadable = tmp_path / "unreadable"
    unreadable.write_text("x")
    with pytest.raises(FedprivError, match="is not a directory"):
        node(data_dir=unreadable).start()

    no_train = tmp_path / "no-train"
    (no_train / "regions" / "us-east").mkdir(parents=True)
    with pytest.raises(FedprivError, match=r"no train.jsonl in .*no-train/regions/us-east"):
        node(data_dir=no_train).start()

    # Data dir rule: DIR/regions/<region>/, or DIR itself when it holds train.jsonl.
    assert resolve_region_data_dir(data, "us-east") == data / "regions" / "us-east"
    (empty / "train.jsonl").write_text("{}\n")
    assert resolve_region_data_dir(empty, "us-east") == empty


def test_supernode_command_region_side_errors_are_one_line(tmp_path, capsys):
    """What a region can get wrong about its own trust list, policy and key: one line each, nothing started."""
    from fedpriv.deploy.certs import create_region_key

    creds = create_region_key(tmp_path / "creds", "us-east")[0].parents[1]
    (creds / "ca.crt").write_bytes(create_certs(tmp_path / "op").paths.ca_cert.read_bytes())
    data = tmp_path / "data"
    (data / "regions" / "us-east").mkdir(parents=True)
    (data / "regions" / "us-east" / "train.jsonl").write_text("{}\n")
    _, trust = write_trust(tmp_path)
    policy = write_policy(tmp_path)
    base = ["supernode", "--region", "us-east", "--data", str(data), "--certs", str(creds), "--superlink", "127.0.0.1:1",
            "--port", str(free_port())]
    (tmp_path / "empty.yaml").write_text("")
    cases = [
        (["--trust", str(tmp_path / "none.yaml"), "--policy", str(policy)], "missing trust file"),
        (["--trust", str(tmp_path / "empty.yaml"), "--policy", str(policy)], "at least one publisher key"),
        (["--trust", str(trust), "--policy", str(tmp_path / "none.toml")], "missing policy file"),
        (["--trust", str(trust), "--policy", str(policy), "--region", "eu-west"], "unknown region 'eu-west'"),
    ]
    for extra, needle in cases:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("fedpriv supernode: error: ") and needle in err, err


# ---------------------------------------------------------------------------
# The flwr CLI helpers (no processes)
# ---------------------------------------------------------------------------


def test_one_flwr_home_writer_for_tls_and_the_insecure_simulation_superlink(tmp_path):
    """`fedpriv register`/`run` (TLS, our CA) and `fedpriv simulate` (loopback, insecure) write FLWR_HOME alike."""
    import tomllib

    from fedpriv.deploy.flwr_cli import CONNECTION, FlowerRunClient

    ca = tmp_path / "certs" / "ca.crt"
    tls = tomllib.loads(write_flwr_home(tmp_path / "tls", "127.0.0.1:9093", ca).read_text())
    assert tls["superlink"]["default"] == CONNECTION
    assert tls["superlink"][CONNECTION] == {"address": "127.0.0.1:9093", "root-certificates": str(ca.absolute())}
    FlowerRunClient(tmp_path / "sim", "127.0.0.1:40123")
    sim = tomllib.loads((tmp_path / "sim" / "config.toml").read_text())
    assert sim["superlink"][CONNECTION] == {"address": "127.0.0.1:40123", "insecure": True}
    with pytest.raises(FedprivError, match="expected HOST:PORT"):
        write_flwr_home(tmp_path / "bad", "no-port", ca)
    assert not (tmp_path / "bad" / "config.toml").exists()


def test_flwr_json_output_is_read_after_warning_lines():
    from fedpriv.deploy.flwr_cli import last_line, parse_json_output

    assert parse_json_output('WARNING: a newer flwr exists\n{"success": true, "run-id": 7}\n') == {"success": True, "run-id": 7}
    assert parse_json_output("Usage: flwr run [OPTIONS]\nError: no such option") is None
    assert parse_json_output('{"success": tru') is None
    assert last_line("Using SuperLink 'fedpriv'\nrun 7 not found\n\n") == "run 7 not found"
    assert last_line("") == "no message"


def test_flower_executables_are_found_where_the_flower_children_find_them(monkeypatch, tmp_path):
    """One resolver: this interpreter's scripts first (also with the virtualenv not activated), then PATH."""
    from fedpriv.deploy.processes import child_env, flower_executable

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    found = flower_executable("flwr")
    assert Path(found).parent == Path(sys.executable).parent
    assert shutil.which("flwr", path=child_env()["PATH"]) == found
    with pytest.raises(FedprivError, match="fedpriv-no-such-tool not found"):
        flower_executable("fedpriv-no-such-tool")
