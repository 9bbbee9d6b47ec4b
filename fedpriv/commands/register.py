"""``fedpriv register``: register the regions' SuperNode public keys with the SuperLink (idempotent).

The keys are the ``.pub`` files each region made with ``fedpriv keygen --region``
and sent to the operator: ``--public-key NAME=FILE`` (repeatable), or
``--keys DIR`` for a directory of ``NAME.pub`` files. Without either, the
``regions/*.pub`` of the certs directory are used (where the demo path
``fedpriv certs --demo-region-keys`` puts them).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedpriv.commands.options import add_certs, add_control_superlink
from fedpriv.commands.registry import command


@command("register", "Register the regions' SuperNode public keys (.pub files the regions sent) with the SuperLink (safe to repeat).")
class RegisterCommand:
    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        add_control_superlink(p)
        add_certs(p, "ca.crt")
        p.add_argument("--public-key", action="append", default=[], metavar="NAME=FILE",
                       help="region NAME's public key, the .pub file it made with `fedpriv keygen --region NAME`; repeatable")
        p.add_argument("--keys", default=None, metavar="KEYDIR", help="a directory of NAME.pub files, one per region")
        p.add_argument("--regions", default=None, metavar="A,B", help="register only these regions (default: every key given)")
        p.add_argument(
            "--flwr-home", default=None, metavar="DIR",
            help="fedpriv-owned FLWR_HOME for the flwr CLI (default: DIR/flwr-home); its config.toml is rewritten",
        )

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from fedpriv.deploy.certs import CertPaths, parse_regions
        from fedpriv.deploy.ports import is_loopback, parse_address
        from fedpriv.deploy.flwr_cli import register_region, write_flwr_home
        from fedpriv.deploy.paths import require_file
        from fedpriv.core.errors import FedprivError

        certs = CertPaths(Path(args.certs).expanduser().absolute())
        host, _ = parse_address(args.superlink)
        require_file(certs.ca_cert, "CA certificate")
        keys = collect_public_keys(args.public_key, args.keys, certs)
        if args.regions is not None:
            wanted = parse_regions(args.regions)
            unknown = [r for r in wanted if r not in keys]
            if unknown:
                raise FedprivError(f"unknown region {unknown[0]!r}: public keys were given for {', '.join(sorted(keys)) or 'no region'}")
            keys = {r: keys[r] for r in wanted}
        if not is_loopback(host):
            print(f"fedpriv register: note: {host} is not a loopback address; the Control API of a fedpriv SuperLink only listens on 127.0.0.1")
        home = Path(args.flwr_home).expanduser().absolute() if args.flwr_home else certs.root / "flwr-home"
        write_flwr_home(home, args.superlink, certs.ca_cert)
        for region, pub in keys.items():
            status, node_id = register_region(region, pub, home, args.superlink, certs.ca_cert)
            print(f"{region}: {status}" + (f" as SuperNode {node_id}" if node_id else ""), flush=True)
        print(f"check with: FLWR_HOME={home} flwr supernode list")
        return 0


def collect_public_keys(pairs: list[str], keys_dir: str | None, certs) -> dict[str, Path]:  # noqa: ANN001 - CertPaths
    """Region name -> checked ``.pub`` path, from ``NAME=FILE`` pairs, a directory, or the certs dir (demo)."""
    from fedpriv.deploy.certs import check_region_name, load_region_public_key
    from fedpriv.core.errors import FedprivError

    keys: dict[str, Path] = {}
    for pair in pairs:
        name, sep, file = pair.partition("=")
        if not sep or not name.strip() or not file.strip():
            raise FedprivError(f"--public-key {pair!r}: expected NAME=FILE, e.g. us-east=us-east.pub")
        name = check_region_name(name.strip())
        if name in keys:
            raise FedprivError(f"--public-key: region {name!r} given twice")
        keys[name] = Path(file.strip()).expanduser().absolute()
    if keys_dir is not None:
        d = Path(keys_dir).expanduser().absolute()
        if not d.is_dir():
            raise FedprivError(f"--keys {d}: no such directory")
        found = sorted(d.glob("*.pub"))
        if not found:
            raise FedprivError(f"--keys {d}: no NAME.pub files in it")
        for pub in found:
            name = check_region_name(pub.stem)
            if name in keys:
                raise FedprivError(f"region {name!r} has a key in --keys {d} and in --public-key")
            keys[name] = pub
    if not pairs and keys_dir is None:
        keys = {r: certs.region_pub(r) for r in certs.regions_with(".pub")}
        if not keys:
            raise FedprivError("no public keys given: pass --public-key NAME=FILE (the .pub each region made with "
                               "`fedpriv keygen --region NAME DIR`) or --keys DIR")
    for name, pub in keys.items():
        load_region_public_key(pub, name)
    return keys
