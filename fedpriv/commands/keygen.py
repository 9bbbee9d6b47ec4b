"""``fedpriv keygen``: a key pair made where it is used; only its public half travels.

* ``--region NAME DIR``, run **in the region**: the SuperNode authentication key
  (``DIR/regions/NAME.key``, EC P-384 OpenSSH, mode 0600) and its public half
  ``DIR/regions/NAME.pub``, which the region sends to the operator for
  ``fedpriv register``; and its secure-aggregation identity key (``DIR/regions/NAME.id.key``,
  Ed25519, mode 0600) whose public half ``NAME.id.pub`` goes to the *other regions* for their
  rosters (``fedpriv supernode --roster``). Where the SuperNode key exists already, only the
  identity key is added.
* ``--publisher NAME DIR``, run by whoever submits runs: the Ed25519 key that signs
  app bundles (``DIR/publisher.key``) and ``DIR/publisher.pub``, which each region
  may add to its trust file (``fedpriv supernode --trust``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedpriv.commands.registry import command


@command("keygen", "Make a region's SuperNode key (run in the region) or the app publisher's signing key.")
class KeygenCommand:
    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        who = p.add_mutually_exclusive_group(required=True)
        who.add_argument("--region", metavar="NAME",
                         help="run in region NAME: write its SuperNode key pair DIR/regions/NAME.key (stays) and .pub (send to the "
                              "operator), and its identity key pair NAME.id.key (stays) and NAME.id.pub (send to the "
                              "other regions for their rosters)")
        who.add_argument("--publisher", metavar="NAME",
                         help="write the app-signing key pair DIR/publisher.key (stays with whoever runs `fedpriv run`) "
                              "and DIR/publisher.pub (regions put it in their trust file)")
        p.add_argument("dir", metavar="DIR", help="directory to write into (created if missing)")
        p.add_argument("--force", action="store_true", help="replace an existing key pair (it must then be registered / trusted again)")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        if args.region is not None:
            return _region_keys(args.region, args.dir, args.force)
        from fedpriv.deploy.app_signing import create_publisher_key, trust_line

        key, pub = create_publisher_key(args.dir, args.publisher, force=args.force)
        print(f"wrote {key}  (private: signs app bundles; keep it away from the operator; `fedpriv sign-bundle --sign-key` it, mode 0600)")
        print(f"wrote {pub}  (public: send it to every region)")
        print("a region trusts this publisher by adding this line to its trust file (fedpriv supernode --trust FILE):")
        print(trust_line(args.publisher, pub.read_text()), end="")
        return 0


def _region_keys(region: str, directory: str, force: bool) -> int:
    from fedpriv.core.errors import FedprivError
    from fedpriv.deploy.certs import CertPaths, create_region_key
    from fedpriv.privacy.secagg.identity import IdentityError, identity_paths, roster_line, write_identity

    node_key = CertPaths(Path(directory).expanduser().absolute()).region_key(region)
    if force or not node_key.exists() or identity_paths(directory, region)[0].exists():
        key, pub = create_region_key(directory, region, force=force)
        print(f"wrote {key}  (private: stays in region {region}, mode 0600)")
        print(f"wrote {pub}  (public: send this file to the operator)")
        print(f"the operator registers it with: fedpriv register --certs CERTS_DIR --public-key {region}={pub.name}")
        print(pub.read_text().strip())
    try:
        id_key, id_pub = write_identity(directory, region, force=force)
    except IdentityError as exc:
        raise FedprivError(str(exc)) from None
    print(f"wrote {id_key}  (private: the region's secure-aggregation identity, stays in region {region}, mode 0600)")
    print(f"wrote {id_pub}  (public: send it to every other region, out of band)")
    print("every other region adds this line to its roster (fedpriv supernode --roster FILE):")
    print(roster_line(region, id_pub.read_text()), end="")
    return 0
