"""``fedpriv certs``: the CA, the SuperLink's TLS certificate and one SuperNode key pair per region."""

from __future__ import annotations

import argparse

from fedpriv.cli import command


@command("certs", "Create a CA, the SuperLink's TLS certificate and one SuperNode key pair per region.")
class CertsCommand:
    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("dir", metavar="DIR", help="directory to create (ca.crt, ca.key, server.crt, server.key, regions/<region>.key|.pub, README.txt)")
        p.add_argument(
            "--host", action="append", default=[], metavar="NAME",
            help="DNS name or IP SuperNodes use to reach the coordinator; repeatable. "
            "localhost, 127.0.0.1 and ::1 are always included.",
        )
        p.add_argument("--regions", default=None, metavar="A,B,C", help="comma-separated region names (default: us-east,eu-west,ap-south)")
        p.add_argument("--force", action="store_true", help="replace existing keys and certificates (every region must then be re-provisioned and re-registered)")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from fedpriv.deploy.certs import create_certs, parse_regions

        result = create_certs(args.dir, hosts=args.host, regions=parse_regions(args.regions), force=args.force)
        rows = [
            ("ca.crt, ca.key", "deployment CA (keep ca.key offline)"),
            ("server.crt, server.key", f"SuperLink TLS, valid for: {', '.join(result.hosts)}"),
            *((f"regions/{r}.key, .pub", f"SuperNode authentication key pair of {r}") for r in result.regions),
            ("README.txt", "which file goes to which machine"),
        ]
        width = max(len(a) for a, _ in rows) + 2
        print(f"wrote {result.paths.root}/")
        for a, b in rows:
            print(f"  {a.ljust(width)}{b}")
        return 0
