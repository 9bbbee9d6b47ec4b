"""``fedpriv sign-bundle``: the publisher builds and signs the app bundle; the operator only submits it.

The publisher (whoever the regions trust to release fedpriv jobs, ideally not the
coordinator's operator) runs this where its ``publisher.key`` lives and hands the
resulting ``app.fab`` to the operator, who submits it with ``fedpriv run --bundle``.
The signature names the fedpriv version and the signing time; a region refuses a
bundle for another version or older than its policy's ``max-bundle-age-days``
(:mod:`fedpriv.deploy.app_signing`).
"""

from __future__ import annotations

import argparse

from fedpriv.commands.registry import command


@command("sign-bundle", "Publisher: build the app bundle and sign it (the operator submits it with `fedpriv run --bundle`).")
class SignBundleCommand:
    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--sign-key", required=True, metavar="FILE", help="the publisher's private key (publisher.key from "
                       "`fedpriv keygen --publisher`)")
        p.add_argument("--out", required=True, metavar="FILE", help="where to write the signed bundle (e.g. app.fab); "
                       "it holds no secret: send it to the operator")
        p.add_argument("--force", action="store_true", help="replace an existing --out file")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        import hashlib
        import time
        from pathlib import Path

        import fedpriv
        from fedpriv.core.config import APP_DIR
        from fedpriv.core.errors import FedprivError
        from fedpriv.core.files import atomic_write_bytes
        from fedpriv.deploy.app_signing import build_signed_bundle, key_id, load_publisher_key

        out = Path(args.out).expanduser().absolute()
        if out.exists() and not args.force:
            raise FedprivError(f"{out} already exists: pass --force to replace it")
        if not out.parent.is_dir():
            raise FedprivError(f"directory of --out {out} does not exist: create {out.parent} first")
        key = load_publisher_key(args.sign_key)
        fab = build_signed_bundle(APP_DIR, key)
        atomic_write_bytes(out, fab)
        print(f"wrote {out}  (sha256 {hashlib.sha256(fab).hexdigest()[:12]}, fedpriv {fedpriv.__version__}, signed "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by {key_id(key.public_key())})")
        print(f"send it to the operator, who submits it with: fedpriv run --bundle {out.name} --certs CERTS_DIR ...")
        print("regions accept it until it is older than their policy's max-bundle-age-days (default 30): sign again before")
        return 0
