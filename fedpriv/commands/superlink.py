"""``fedpriv superlink``: run the coordinator's SuperLink in the foreground until Ctrl-C."""

from __future__ import annotations

import argparse
import time

from fedpriv.commands.registry import command
from fedpriv.deploy.processes import StopRequested, ignore_stop_signals, install_stop_handlers, restore_handlers
from fedpriv.core.errors import FedprivError


@command("superlink", "Run the coordinator: Flower SuperLink with TLS and SuperNode authentication (Control API on loopback only).")
class SuperLinkCommand:
    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        from fedpriv.deploy.processes import CONTROL_PORT, FLEET_PORT

        p.add_argument("--certs", required=True, metavar="DIR", help="directory from `fedpriv certs` (needs ca.crt, server.crt, server.key)")
        p.add_argument(
            "--host", default="127.0.0.1", metavar="ADDR",
            help="address the Fleet API (SuperNodes) listens on: 127.0.0.1 (default, all regions on this machine) "
            "or 0.0.0.0 / a local IP for remote datacenters",
        )
        p.add_argument("--port", type=int, default=FLEET_PORT, help=f"Fleet API port SuperNodes connect to (default {FLEET_PORT})")
        p.add_argument(
            "--control-port", type=int, default=CONTROL_PORT, metavar="PORT",
            help=f"port of the Control API on 127.0.0.1 for flwr / fedpriv register / fedpriv run (default {CONTROL_PORT}); never exposed",
        )
        p.add_argument("--state", default=None, metavar="FILE", help="SQLite file keeping registrations and runs across restarts (default: in memory)")
        p.add_argument("--log", default=None, metavar="FILE", help="also append all SuperLink output to FILE")
        p.add_argument("--ready-timeout", type=float, default=60.0, metavar="S", help=argparse.SUPPRESS)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from fedpriv.deploy.ports import format_address
        from fedpriv.deploy.processes import SuperLinkProcess, _exit_message

        sl = SuperLinkProcess(
            args.certs, host=args.host, port=args.port, state_file=args.state, log_file=args.log,
            control_port=args.control_port, echo=True,
        )
        old = install_stop_handlers()
        try:
            sl.start()
            for w in sl.warnings:
                print(f"fedpriv superlink: warning: {w}", flush=True)
            sl.wait_ready(args.ready_timeout)
            wildcard = sl.host in ("0.0.0.0", "::")
            fleet = f"<this machine's name>:{sl.port}" if wildcard else sl.fleet_address
            state = str(sl.state_file) if sl.state_file else "in memory (registrations are lost when it stops; pass --state FILE to keep them)"
            print(
                "\nSuperLink ready.\n"
                f"  Fleet API    https://{format_address(sl.host, sl.port)}  (SuperNodes: --superlink {fleet}; TLS, SuperNode authentication, Fleet API only)\n"
                f"  Control API  https://{sl.control_address}  (flwr CLI, fedpriv register, fedpriv run; loopback only)\n"
                f"  state        {state}\n"
                f"Next: fedpriv register --superlink {sl.control_address} --certs {sl.certs.root}\n"
                "Press Ctrl-C to stop.\n",
                flush=True,
            )
            while True:
                dead = sl.exited()
                if dead is not None:
                    raise FedprivError(_exit_message(dead))
                time.sleep(0.5)
        except (KeyboardInterrupt, StopRequested) as exc:
            print(f"fedpriv superlink: {exc if isinstance(exc, StopRequested) else 'SIGINT'}: stopping", flush=True)
            return 0
        finally:
            ignore_stop_signals()  # a second Ctrl-C must not interrupt the cleanup
            try:
                sl.stop()
            finally:
                restore_handlers(old)
