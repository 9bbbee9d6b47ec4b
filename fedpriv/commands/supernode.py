"""``fedpriv supernode``: run one region's SuperNode in the foreground until Ctrl-C.

Everything it needs is the region's own: its key (``fedpriv keygen --region``), the
CA certificate it was given, its data, its privacy policy (``--policy``) and the
publisher keys it trusts (``--trust``): app bundles not signed by one of those are
refused before any of their code is installed (:mod:`fedpriv.deploy.trusted_exec`).
"""

from __future__ import annotations

import argparse
import time

from fedpriv.commands.registry import command
from fedpriv.deploy.processes import StopRequested, ignore_stop_signals, install_stop_handlers, restore_handlers


@command("supernode", "Run one region's Flower SuperNode (TLS to the SuperLink, authenticated with the region's key).")
class SuperNodeCommand:
    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        from fedpriv.deploy.processes import CLIENTAPPIO_PORT

        p.add_argument("--region", required=True, metavar="NAME",
                       help="region name; its key is CERTS/regions/NAME.key (from `fedpriv keygen --region NAME CERTS`)")
        p.add_argument(
            "--data", required=True, metavar="DIR",
            help="prepared data: DIR/regions/NAME/ is used, or DIR itself if it directly contains train.jsonl",
        )
        p.add_argument("--certs", required=True, metavar="DIR", help="directory with ca.crt (from the operator) and regions/NAME.key")
        p.add_argument("--trust", required=True, metavar="FILE",
                       help="the publisher keys this region trusts (YAML `label: 'ssh-ed25519 AAAA...'`, Flower's "
                            "--trusted-entities format); only app bundles signed by one of them run here")
        p.add_argument("--policy", required=True, metavar="FILE",
                       help="this region's privacy policy (TOML, e.g. examples/region-policy.toml); passed to the ClientApp "
                            "as node config policy-path, checked at start")
        p.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's Fleet API address (a name in its certificate)")
        p.add_argument(
            "--port", type=int, default=CLIENTAPPIO_PORT,
            help=f"local ClientApp IO port on 127.0.0.1 (default {CLIENTAPPIO_PORT}); each SuperNode on one machine needs its own",
        )
        p.add_argument("--log", default=None, metavar="FILE", help="also append all SuperNode output to FILE")
        p.add_argument("--ledger", default=None, metavar="FILE",
                       help="the region's privacy ledger (default: privacy_ledger.sqlite next to its data)")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from fedpriv.deploy.processes import SuperNodeProcess
        from fedpriv.core.errors import FedprivError

        sn = SuperNodeProcess(args.region, args.data, args.certs, args.superlink, clientappio_port=args.port, log_file=args.log, echo=True,
                              ledger_path=args.ledger, trust_file=args.trust, policy_file=args.policy)
        old = install_stop_handlers()
        try:
            sn.start()
            for w in sn.warnings:
                print(f"fedpriv supernode: warning: {w}", flush=True)
            print(f"fedpriv supernode: region {args.region}, data {sn.data_dir}, policy {sn.policy_file}, "
                  f"runs only bundles signed by: {', '.join(sn.trusted)} ({sn.trust_file}); connecting to {args.superlink} ...",
                  flush=True)
            proc = sn.procs[0]
            started, announced, hinted = time.monotonic(), False, False
            while True:
                if not announced and "ready" in proc.seen:
                    node_id = proc.seen["ready"].split(sn.READY, 1)[1].strip()
                    print(f"\nfedpriv supernode: connected: region {args.region} is SuperNode {node_id}. Press Ctrl-C to stop.\n", flush=True)
                    announced = True
                if not sn.running():
                    if proc.running():  # the verifying SuperExec died: never leave a SuperNode without it
                        raise FedprivError(sn.failure_message())
                    proc.proc.wait()  # type: ignore[union-attr]
                    if proc._thread is not None:
                        proc._thread.join(timeout=5)
                    raise FedprivError(sn.failure_message())
                if not announced and not hinted and time.monotonic() - started > 30:
                    print(f"fedpriv supernode: still trying to reach {args.superlink} (is the SuperLink running? is the address right?)", flush=True)
                    hinted = True
                proc.wait_marker(("ready",) if not announced else (), 0.5)
        except (KeyboardInterrupt, StopRequested) as exc:
            print(f"fedpriv supernode: {exc if isinstance(exc, StopRequested) else 'SIGINT'}: stopping", flush=True)
            return 0
        finally:
            ignore_stop_signals()  # a second Ctrl-C must not interrupt the cleanup
            try:
                sn.stop()
            finally:
                restore_handlers(old)
