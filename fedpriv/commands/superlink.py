"""``fedpriv superlink``: run the coordinator's SuperLink in the foreground until Ctrl-C."""

from __future__ import annotations

import argparse
import time

from fedpriv.commands.options import add_certs, add_log
from fedpriv.commands.registry import command
from fedpriv.core.errors import FedprivError


@command("superlink", "Run the coordinator: Flower SuperLink with TLS and SuperNode authentication (Control API on loopback only).")
class SuperLinkCommand:
    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        from fedpriv.deploy.ports import CONTROL_PORT, FLEET_PORT

        add_certs(p, "ca.crt, server.crt, server.key")
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
        add_log(p, "SuperLink")
        p.add_argument("--ready-timeout", type=float, default=60.0, metavar="S", help=argparse.SUPPRESS)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from fedpriv.deploy.ports import format_address
        from fedpriv.deploy.processes import exit_message, run_in_foreground
        from fedpriv.deploy.superlink import SuperLinkProcess

        sl = SuperLinkProcess(
            args.certs, host=args.host, port=args.port, state_file=args.state, log_file=args.log,
            control_port=args.control_port, echo=True,
        )

        def watch() -> None:
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
                f"Next: {register_hint(sl)}\n"
                "Press Ctrl-C to stop.\n",
                flush=True,
            )
            while True:
                dead = sl.exited()
                if dead is not None:
                    raise FedprivError(exit_message(dead))
                time.sleep(0.5)

        return run_in_foreground("superlink", sl, watch)


def register_hint(sl) -> str:  # noqa: ANN001 - SuperLinkProcess
    """The ``fedpriv register`` command that works as printed: the demo's keys beside the certs, else the regions' .pub files."""
    from fedpriv.deploy.ports import DEFAULT_CONTROL

    superlink = "" if sl.control_address == DEFAULT_CONTROL else f" --superlink {sl.control_address}"
    demo = sl.certs.regions_with(".pub")
    if demo:
        return f"fedpriv register{superlink} --certs {sl.certs.root}   (registers {', '.join(demo)} from {sl.certs.regions_dir})"
    return (f"fedpriv register{superlink} --certs {sl.certs.root} --public-key NAME=NAME.pub ...   (one per region: "
            "the regions/NAME.pub each region made with `fedpriv keygen --region`; or --keys DIR of NAME.pub files)")
