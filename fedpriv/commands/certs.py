"""``fedpriv certs``: the coordinator's CA and SuperLink TLS certificate (regions make their own keys)."""

from __future__ import annotations

import argparse

from fedpriv.commands.registry import command


@command("certs", "Create the deployment CA and the SuperLink's TLS certificate (coordinator side; regions run `fedpriv keygen`).")
class CertsCommand:
    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("dir", metavar="DIR", help="directory to create (ca.crt, ca.key, server.crt, server.key, README.txt)")
        p.add_argument(
            "--host", action="append", default=[], metavar="NAME",
            help="DNS name or IP SuperNodes use to reach the coordinator; repeatable. "
            "localhost, 127.0.0.1 and ::1 are always included.",
        )
        p.add_argument(
            "--demo-region-keys", action="store_true",
            help="DEMO ONLY: also make the regions' SuperNode keys here, in DIR/regions/. The operator then holds "
            "every region's private key and can impersonate any region; in a deployment each region runs "
            "`fedpriv keygen --region NAME DIR` itself and sends only its .pub.",
        )
        p.add_argument("--regions", default=None, metavar="A,B,C",
                       help="with --demo-region-keys: the regions (default: us-east,eu-west,ap-south)")
        p.add_argument("--force", action="store_true", help="replace existing keys and certificates (every region must then get the new ca.crt)")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from fedpriv.deploy.certs import create_certs, parse_regions
        from fedpriv.core.errors import FedprivError

        if args.regions is not None and not args.demo_region_keys:
            raise FedprivError("--regions: each region makes its own key (`fedpriv keygen --region NAME DIR`); "
                               "only the demo path `--demo-region-keys --regions A,B` makes them here")
        demo = parse_regions(args.regions) if args.demo_region_keys else ()
        result = create_certs(args.dir, hosts=args.host, demo_regions=demo, force=args.force)
        rows = [
            ("ca.crt, ca.key", "deployment CA (ca.crt to every region; keep ca.key offline)"),
            ("server.crt, server.key", f"SuperLink TLS, valid for: {', '.join(result.hosts)}"),
            *((f"regions/{r}.key, .pub", f"DEMO ONLY: SuperNode key pair of {r}, made by the operator") for r in result.regions),
            ("README.txt", "which file goes to which machine"),
        ]
        width = max(len(a) for a, _ in rows) + 2
        print(f"wrote {result.paths.root}/")
        for a, b in rows:
            print(f"  {a.ljust(width)}{b}")
        if result.regions:
            print("demo only: this machine now holds every region's private key; "
                  "in a deployment each region runs `fedpriv keygen --region NAME DIR` and sends only its .pub")
        else:
            print("next: each region runs `fedpriv keygen --region NAME DIR` and sends you DIR/regions/NAME.pub; "
                  "register them with `fedpriv register --certs DIR --public-key NAME=FILE ...`")
        return 0
