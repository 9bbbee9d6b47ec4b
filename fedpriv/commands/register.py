"""``fedpriv register``: register each region's SuperNode public key with the SuperLink (idempotent)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedpriv.cli import command


@command("register", "Register each region's SuperNode public key with the SuperLink (safe to repeat).")
class RegisterCommand:
    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        from fedpriv.deploy.processes import CONTROL_PORT

        p.add_argument(
            "--superlink", default=f"127.0.0.1:{CONTROL_PORT}", metavar="HOST:PORT",
            help=f"the SuperLink's Control API: its --control-port on loopback (default 127.0.0.1:{CONTROL_PORT})",
        )
        p.add_argument("--certs", required=True, metavar="DIR", help="directory from `fedpriv certs` (needs ca.crt and regions/*.pub)")
        p.add_argument("--regions", default=None, metavar="A,B", help="regions to register (default: every regions/*.pub in DIR)")
        p.add_argument(
            "--flwr-home", default=None, metavar="DIR",
            help="fedpriv-owned FLWR_HOME for the flwr CLI (default: DIR/flwr-home); its config.toml is rewritten",
        )

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from fedpriv.deploy.certs import CertPaths, parse_regions
        from fedpriv.deploy.ports import is_loopback, parse_address
        from fedpriv.deploy.processes import _require_file, register_region, write_flwr_home
        from fedpriv.errors import FedprivError

        certs = CertPaths(Path(args.certs).expanduser().absolute())
        host, _ = parse_address(args.superlink)
        _require_file(certs.ca_cert, "CA certificate")
        known = certs.regions_with(".pub")
        if args.regions is None:
            regions = tuple(known)
            if not regions:
                raise FedprivError(f"no public keys in {certs.regions_dir}: run `fedpriv certs {certs.root}` first")
        else:
            regions = parse_regions(args.regions)
            unknown = [r for r in regions if r not in known]
            if unknown:
                raise FedprivError(
                    f"unknown region {unknown[0]!r}: {certs.regions_dir} has public keys for {', '.join(known) or 'no region'}"
                )
        if not is_loopback(host):
            print(f"fedpriv register: note: {host} is not a loopback address; the Control API of a fedpriv SuperLink only listens on 127.0.0.1")
        home = Path(args.flwr_home).expanduser().absolute() if args.flwr_home else certs.root / "flwr-home"
        write_flwr_home(home, args.superlink, certs.ca_cert)
        for region in regions:
            status, node_id = register_region(region, certs.root, home, args.superlink)
            print(f"{region}: {status}" + (f" as SuperNode {node_id}" if node_id else ""), flush=True)
        print(f"check with: FLWR_HOME={home} flwr supernode list")
        return 0
