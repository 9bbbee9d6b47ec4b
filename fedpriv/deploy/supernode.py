"""One region: ``flower-supernode`` (TLS to the SuperLink, authenticated with the region's key) and its
verifying SuperExec (:mod:`fedpriv.deploy.trusted_exec`).

Everything it is given is the region's own and checked before anything starts: its key, the CA
certificate, its data, its privacy policy and the publisher keys it trusts. ``fedpriv supernode``
runs a :class:`SuperNodeProcess` in the foreground.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from fedpriv.core.errors import FedprivError
from fedpriv.deploy.certs import CertPaths, check_region_name
from fedpriv.deploy.paths import check_node_config_path, require_file, require_private_key, resolve_region_data_dir
from fedpriv.deploy.ports import CLIENTAPPIO_PORT, check_port_free, parse_address
from fedpriv.deploy.processes import LogSink, ManagedProcess, ProcessGroup, child_env, exit_message, flower_executable, last_line_hint
from fedpriv.privacy.policy import load_policy


def check_policy_file(path: Path) -> None:
    """Fail fast on the region's privacy policy: readable, and parsed as the ClientApp will parse it."""
    require_file(path, "policy file", "the region's privacy policy (see examples/region-policy.toml)")
    load_policy(path)  # raises fedpriv.core.errors.ConfigError (a FedprivError) with one line


class SuperNodeProcess(ProcessGroup):
    """``flower-supernode`` for one region (TLS + SuperNode authentication) and its verifying SuperExec.

    ``data_dir`` is resolved with :func:`resolve_region_data_dir` and passed as node
    config ``data-path`` (with ``region``). ``clientappio_port`` is the SuperNode's
    local ClientApp IO (Runtime) API on 127.0.0.1; every SuperNode on a machine needs
    its own. ``flwr_home`` sets ``FLWR_HOME`` (where apps are unpacked).

    ``trust_file`` (required) lists the publisher keys whose signed bundles this
    region runs: the SuperNode runs with ``--isolation process`` and its only
    SuperExec is :mod:`fedpriv.deploy.trusted_exec`, which verifies every bundle
    against that file before installing it. ``policy_file`` (the region's privacy
    policy) is passed as node config ``policy-path`` (absolute) and validated here.
    """

    READY = "SuperNode ID:"
    FAILURES = ("refused", "tls", "badkey", "superexec")

    def __init__(
        self,
        region: str,
        data_dir: str | os.PathLike,
        certs_dir: str | os.PathLike,
        superlink_address: str,
        clientappio_port: int = CLIENTAPPIO_PORT,
        log_file: str | os.PathLike | None = None,
        echo: bool = False,
        max_retries: int | None = None,
        flwr_home: str | os.PathLike | None = None,
        ledger_path: str | os.PathLike | None = None,
        trust_file: str | os.PathLike | None = None,
        policy_file: str | os.PathLike | None = None,
        roster_file: str | os.PathLike | None = None,
    ) -> None:
        self.region = region
        self.ledger_path = Path(ledger_path).expanduser().absolute() if ledger_path else None
        self.trust_file = Path(trust_file).expanduser().absolute() if trust_file else None
        self.policy_file = Path(policy_file).expanduser().absolute() if policy_file else None
        self.roster_file = Path(roster_file).expanduser().absolute() if roster_file else None
        self.flwr_home = Path(flwr_home).expanduser().absolute() if flwr_home else None
        self.data_dir_arg = data_dir
        self.data_dir: Path | None = None
        self.certs = CertPaths(Path(certs_dir).expanduser().absolute())
        self.superlink_address = superlink_address
        self.clientappio_port = int(clientappio_port)
        self.max_retries = max_retries
        self.log = LogSink(log_file, echo)
        self.procs: list[ManagedProcess] = []
        self.warnings: list[str] = []
        self.node_id: str | None = None
        self.trusted: list[str] = []  # labels of the trusted publishers (after preflight)
        self.peers: list[str] = []  # regions in the roster (after preflight)

    @property
    def key_file(self) -> Path:
        return self.certs.region_key(self.region)

    @property
    def identity_key_file(self) -> Path:
        """The region's secure-aggregation identity key (``fedpriv keygen --region``), beside its SuperNode key."""
        from fedpriv.privacy.secagg.identity import identity_paths

        return identity_paths(self.certs.root, self.region)[0]

    def node_config(self) -> str:
        """Region identity and the region's *own* settings: the coordinator cannot change these."""
        assert self.data_dir is not None
        config = f"region='{self.region}' data-path='{self.data_dir}'"
        if self.ledger_path is not None:
            config += f" ledger-path='{self.ledger_path}'"
        if self.policy_file is not None:
            config += f" policy-path='{self.policy_file}'"
        if self.roster_file is not None:
            config += f" roster-path='{self.roster_file}' identity-key-path='{self.identity_key_file}'"
        return config

    def command(self) -> list[str]:
        if self.data_dir is None:
            self.data_dir = resolve_region_data_dir(self.data_dir_arg, self.region)
        argv = [
            flower_executable("flower-supernode"),
            "--superlink", self.superlink_address,
            "--root-certificates", str(self.certs.ca_cert),
            "--auth-supernode-private-key", str(self.key_file),
            "--node-config", self.node_config(),
            "--isolation", "process",  # the ClientApp is started only by our verifying SuperExec
            "--host", "127.0.0.1",
            "--port", str(self.clientappio_port),
        ]
        if self.max_retries is not None:
            argv += ["--max-retries", str(self.max_retries)]
        return argv

    def superexec_command(self, supernode_pid: int | None = None) -> list[str]:
        """The region's SuperExec: verifies each bundle with ``trust_file`` before it is installed."""
        assert self.trust_file is not None
        argv = [
            sys.executable, "-P", "-m", "fedpriv.deploy.trusted_exec", "superexec", "--trust", str(self.trust_file),
            "--runtime-api-address", f"127.0.0.1:{self.clientappio_port}", "--insecure",
        ]
        if supernode_pid is not None:
            argv += ["--parent-pid", str(supernode_pid)]
        return argv

    def preflight(self) -> None:
        from fedpriv.deploy.app_signing import load_trust_file

        check_region_name(self.region)
        parse_address(self.superlink_address, "--superlink")
        require_file(self.certs.ca_cert, "CA certificate", "copy ca.crt from the operator's `fedpriv certs` directory into it")
        if not self.key_file.is_file():
            known = self.certs.regions_with(".key")
            if known:
                raise FedprivError(
                    f"unknown region {self.region!r}: {self.certs.regions_dir} has keys for {', '.join(known)} "
                    f"(check --region, or run `fedpriv keygen --region {self.region} {self.certs.root}`)"
                )
            raise FedprivError(
                f"missing key {self.key_file} for region {self.region!r}: run `fedpriv keygen --region {self.region} "
                f"{self.certs.root}` here and send regions/{self.region}.pub to the operator"
            )
        require_file(self.key_file, "SuperNode key")
        require_private_key(self.key_file, "SuperNode key")
        if self.trust_file is None:
            raise FedprivError("missing --trust FILE: the publisher keys whose signed app bundles this region runs "
                               "(a region never runs unsigned code)")
        self.trusted = [t.label for t in load_trust_file(self.trust_file)]
        if self.policy_file is not None:
            check_policy_file(self.policy_file)
        self.check_roster()
        self.data_dir = resolve_region_data_dir(self.data_dir_arg, self.region)
        check_node_config_path("data directory", self.data_dir)
        check_node_config_path("policy file", self.policy_file)
        check_node_config_path("roster", self.roster_file)
        if self.roster_file is not None:
            check_node_config_path("identity key", self.identity_key_file)
        check_port_free("127.0.0.1", self.clientappio_port, "--port")
        flower_executable("flower-supernode")

    def check_roster(self) -> None:
        """The roster (peer identity keys) and the region's own identity key load as the ClientApp will load them."""
        from fedpriv.privacy.secagg.identity import IdentityError, load_identity

        if self.roster_file is None:
            self.warnings.append("no --roster: this region cannot authenticate any peer, so it refuses every "
                                 "secure-aggregation round")
            return
        require_file(self.roster_file, "roster", "one line 'NAME ssh-ed25519 AAAA...' per peer region (their NAME.id.pub)")
        if not self.identity_key_file.is_file():
            raise FedprivError(f"missing identity key {self.identity_key_file} for region {self.region!r}: run "
                               f"`fedpriv keygen --region {self.region} {self.certs.root}` (it adds the identity key "
                               "beside an existing SuperNode key) and send regions/"
                               f"{self.region}.id.pub to the other regions")
        require_private_key(self.identity_key_file, "identity key")
        try:
            identity = load_identity(self.region, self.identity_key_file, self.roster_file)
        except IdentityError as exc:
            raise FedprivError(str(exc)) from None
        self.peers = sorted(set(identity.roster.keys) - {self.region})

    def start(self) -> None:
        if self.procs:
            raise RuntimeError("SuperNodeProcess already started")
        self.preflight()
        self.log.open()
        markers = {
            "ready": self.READY,
            "refused": "Failed to activate SuperNode",
            "tls": "CERTIFICATE_VERIFY_FAILED",
            "badkey": "Unable to parse the private key file",
        }
        env = child_env({"FLWR_HOME": str(self.flwr_home)} if self.flwr_home else None)
        node = ManagedProcess(f"supernode-{self.region}", self.command(), self.log, markers=markers, env=env)
        self.procs = [node]
        try:
            node.start()
            exec_markers = {"refused_app": "fedpriv: REFUSED app bundle:", "verified_app": "fedpriv: app bundle verified:"}
            self.procs.append(ManagedProcess(f"superexec-{self.region}", self.superexec_command(node.pid), self.log,
                                             markers=exec_markers, env=env))
            self.procs[1].start()
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, timeout: float = 60.0) -> str:
        """Return the node id once the SuperLink accepted this SuperNode; raise a one-line error otherwise."""
        p = self.procs[0]
        seen = p.wait_marker(("ready", *self.FAILURES), timeout)
        if seen == "ready":
            return self.connected_node_id()  # type: ignore[return-value]
        if seen is not None:  # a fatal error was printed; the SuperNode is exiting
            raise FedprivError(self.failure_message())
        if not p.running():
            p.wait_exit(timeout=10)
            raise FedprivError(self.failure_message())
        raise FedprivError(
            f"SuperNode {self.region} did not connect to {self.superlink_address} within {timeout:.0f}s" + last_line_hint(self.procs)
        )

    def connected_node_id(self) -> str | None:
        """The node id the SuperLink gave this SuperNode, once it printed it (None before)."""
        line = self.procs[0].seen.get("ready") if self.procs else None
        if line is not None:
            self.node_id = line.split(self.READY, 1)[1].strip()
        return self.node_id if line is not None else None

    def failure_message(self) -> str:
        """A one-line explanation of why the SuperNode exited."""
        p = self.procs[0]
        if "refused" in p.seen:
            return (
                f"the SuperLink at {self.superlink_address} refused region {self.region!r}: its public key is not registered "
                f"(on the coordinator run `fedpriv register --regions {self.region} ...`)"
            )
        if "tls" in p.seen:
            return (
                f"TLS verification of the SuperLink at {self.superlink_address} failed: its certificate is not signed by "
                f"{self.certs.ca_cert} (or not issued for that host) - use the ca.crt of the same `fedpriv certs` run"
            )
        if "badkey" in p.seen:
            return f"{self.key_file} is not a SuperNode private key (OpenSSH EC key from `fedpriv keygen --region`)"
        if len(self.procs) > 1 and self.procs[1].proc is not None and not self.procs[1].running() and p.running():
            return f"the region's verifying SuperExec stopped: {exit_message(self.procs[1], '--port')}"
        return exit_message(p, "--port")
