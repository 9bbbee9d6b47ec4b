"""``fedpriv supernode``: run one region's SuperNode in the foreground until Ctrl-C.

Everything it needs is the region's own: its keys (``fedpriv keygen --region``), the
CA certificate it was given, its data, its privacy policy (``--policy``), the
publisher keys it trusts (``--trust``): app bundles not signed by one of those are
refused before any of their code is installed (:mod:`fedpriv.deploy.trusted_exec`) --
and its roster (``--roster``): the peer regions' identity keys, the only share holders
it accepts in secure aggregation (:mod:`fedpriv.privacy.secagg.identity`).
"""

from __future__ import annotations

import argparse
import time

from fedpriv.commands.options import add_log
from fedpriv.commands.registry import command


@command("supernode", "Run one region's Flower SuperNode (TLS to the SuperLink, authenticated with the region's key).")
class SuperNodeCommand:
    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        from fedpriv.deploy.ports import CLIENTAPPIO_PORT

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
        p.add_argument("--roster", default=None, metavar="FILE",
                       help="the peer regions' identity public keys, one line 'NAME ssh-ed25519 AAAA...' each (their "
                            "NAME.id.pub, exchanged out of band); passed to the ClientApp as node config roster-path. "
                            "Without it the region refuses every secure-aggregation round")
        p.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's Fleet API address (a name in its certificate)")
        p.add_argument(
            "--port", type=int, default=CLIENTAPPIO_PORT,
            help=f"local ClientApp IO port on 127.0.0.1 (default {CLIENTAPPIO_PORT}); each SuperNode on one machine needs its own",
        )
        add_log(p, "SuperNode")
        p.add_argument("--ledger", default=None, metavar="FILE",
                       help="the region's privacy ledger (default: privacy_ledger.sqlite next to its data)")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from fedpriv.core.errors import FedprivError
        from fedpriv.deploy.processes import run_in_foreground
        from fedpriv.deploy.supernode import SuperNodeProcess

        sn = SuperNodeProcess(args.region, args.data, args.certs, args.superlink, clientappio_port=args.port, log_file=args.log, echo=True,
                              ledger_path=args.ledger, trust_file=args.trust, policy_file=args.policy,
                              roster_file=args.roster)

        def watch() -> None:
            for w in sn.warnings:
                print(f"fedpriv supernode: warning: {w}", flush=True)
            print(f"fedpriv supernode: region {args.region}, data {sn.data_dir}, policy {sn.policy_file}, "
                  f"runs only bundles signed by: {', '.join(sn.trusted)} ({sn.trust_file}); secure-aggregation peers: "
                  f"{', '.join(sn.peers) or 'none'}; connecting to {args.superlink} ...",
                  flush=True)
            proc = sn.procs[0]
            started, announced, hinted = time.monotonic(), False, False
            while True:
                node_id = sn.connected_node_id()
                if not announced and node_id is not None:
                    print(f"\nfedpriv supernode: connected: region {args.region} is SuperNode {node_id}. Press Ctrl-C to stop.\n", flush=True)
                    announced = True
                if not sn.running():
                    if not proc.running():  # the SuperNode exited: let its last lines reach the message
                        proc.wait_exit()
                    # else the verifying SuperExec died: never leave a SuperNode without it
                    raise FedprivError(sn.failure_message())
                if not announced and not hinted and time.monotonic() - started > 30:
                    print(f"fedpriv supernode: still trying to reach {args.superlink} (is the SuperLink running? is the address right?)", flush=True)
                    hinted = True
                proc.wait_marker(("ready",) if not announced else (), 0.5)

        return run_in_foreground("supernode", sn, watch)
