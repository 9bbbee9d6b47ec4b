"""The region's gate in front of Flower's ClientApp: verify the bundle, then run the region's *own* ClientApp.

``fedpriv supernode`` starts ``flower-supernode --isolation process`` and, next to
it, this module as the SuperNode's SuperExec::

    python -m fedpriv.deploy.trusted_exec superexec --trust FILE <flower-superexec args>

It is Flower's own ``flower-superexec`` with one change: a ClientApp task is
started as ``python -m fedpriv.deploy.trusted_exec clientapp --trust FILE
<flwr-clientapp args>`` (any other task type is refused, and a region never installs
a bundle's dependencies). That process is Flower's ``flwr-clientapp``
(``flwr/supernode/runtime/run_clientapp.py``) with three changes:

1. The bundle it pulled is checked *before* anything of it is used: signed by a key in
   the region's trust file, for the fedpriv version the region runs, no older than the
   policy's ``max-bundle-age-days`` (:func:`fedpriv.deploy.app_signing.verify_bundle`),
   naming ``fedpriv.apps:clientapp`` as its ClientApp. A refused bundle becomes the
   task's error reply and one ``fedpriv: REFUSED`` line in the SuperNode's log.
2. The bundle is never unpacked (Flower's ``install_from_fab`` would write it under
   ``FLWR_HOME/apps``).
3. The ClientApp is the region's *installed* ``fedpriv.apps:clientapp``. Flower's
   loader would put the unpacked bundle first on ``sys.path`` and import the component
   the bundle names, so a bundle shipping its own ``fedpriv/`` (every FAB built from
   the repository does) would run *its* policy check, ledger, accountant, DP-SGD and
   secure-aggregation client. Here nothing is imported from the bundle: it contributes
   only its run config (the SuperNode fuses the bundle's ``[tool.flwr.app.config]``
   with the run's overrides), and the region's own code checks that against the
   region's own policy.

The trust file and the policy are re-read for every task, so a region can revoke a
publisher or change its bundle age limit without a restart.
"""

from __future__ import annotations

import sys

REFUSED = "fedpriv: REFUSED app bundle:"


def _split_trust(argv: list[str]) -> tuple[str, list[str]]:
    if len(argv) < 2 or argv[0] != "--trust":
        raise SystemExit("usage: python -m fedpriv.deploy.trusted_exec {superexec|clientapp} --trust FILE ...")
    return argv[1], argv[2:]


def clientapp_command(spec, trust: str) -> list[str]:  # noqa: ANN001 - flwr's ExecutionSpec
    """The argv Flower's ``SubprocessExecutor.launch`` builds, with our verifying ClientApp in front."""
    from flwr.supercore.constant import TASK_TYPE_TO_APPIO_API_ADDRESS_ARG

    args = [sys.executable, "-P", "-m", "fedpriv.deploy.trusted_exec", "clientapp", "--trust", trust,
            TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[spec.task_type], spec.runtime_api_address, "--token", spec.token]
    if spec.insecure:
        args.append("--insecure")
    elif spec.root_certificates_path is not None:
        args += ["--root-certificates", spec.root_certificates_path]
    if spec.parent_pid is not None:
        args += ["--parent-pid", str(spec.parent_pid)]
    # Never --allow-runtime-dependency-installation: a region installs nothing a bundle asks for.
    return args


def _superexec(trust: str, rest: list[str]) -> None:
    """Flower's SuperExec whose subprocess executor starts only the verifying ClientApp."""
    import subprocess

    from flwr.supercore.cli.flower_superexec import flower_superexec
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
    from flwr.supercore.superexec.executor.types import LaunchResult

    def launch(self, spec):  # noqa: ANN001, ANN202 - mirrors SubprocessExecutor.launch (flwr 1.41)
        if spec.task_type != TaskType.CLIENT_APP:
            return LaunchResult.failed(f"a fedpriv region runs ClientApp tasks only, not {spec.task_type}")
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL} if spec.suppress_output else {}
        subprocess.Popen(clientapp_command(spec, trust), **quiet)  # noqa: S603
        return LaunchResult.accepted()

    SubprocessExecutor.launch = launch  # type: ignore[method-assign]
    sys.argv = ["flower-superexec", *rest]
    flower_superexec()


def check_bundle(fab_content: bytes, trust: str, node_config: dict | None = None) -> str:
    """Verify ``fab_content`` for this region; return the publisher's label or raise one line.

    Signed by a key in ``trust``, for the installed fedpriv's version, no older than the
    policy's ``max-bundle-age-days`` (the policy file named by node config ``policy-path``;
    without one, the policy default), and naming the region's own ClientApp.
    """
    from fedpriv.deploy.app_signing import check_clientapp_component, load_trust_file, verify_bundle
    from fedpriv.privacy.policy import POLICY_PATH_KEY, RegionPolicy, load_policy

    policy_path = (node_config or {}).get(POLICY_PATH_KEY)
    max_age = load_policy(str(policy_path)).max_bundle_age_days if policy_path else RegionPolicy.max_bundle_age_days
    verified = verify_bundle(fab_content, load_trust_file(trust), max_age_days=max_age)
    check_clientapp_component(fab_content)
    return verified.label


def installed_clientapp(roots: list[str]):  # noqa: ANN201 - flwr's ClientApp
    """The region's own ``fedpriv.apps:clientapp``; refused if any ``fedpriv`` module lies outside ``roots``.

    ``roots`` (:func:`installed_roots`, taken when the gate started, before Flower pulled
    anything) are the installed fedpriv's folders: a bundle can never supply a module.
    """
    import importlib
    import os

    from flwr.clientapp import ClientApp

    app = importlib.import_module("fedpriv.apps").clientapp
    foreign = [name for name, module in list(sys.modules.items())
               if (name == "fedpriv" or name.startswith("fedpriv.")) and getattr(module, "__file__", None)
               and not any(os.path.realpath(module.__file__).startswith(r + os.sep) for r in roots)]
    if foreign or not isinstance(app, ClientApp):
        raise RuntimeError(f"fedpriv module {(foreign or ['apps'])[0]} is not the region's installed fedpriv")
    return app


def installed_roots() -> list[str]:
    """The folders the installed fedpriv's packages live in (with ``package-dir``, one per sub-package)."""
    import importlib
    import os

    import fedpriv

    names = ["fedpriv", *[f"fedpriv.{s}" for s in fedpriv.SUBPACKAGE_FOLDERS]]
    return [os.path.realpath(p) for n in names for p in importlib.import_module(n).__path__]


def _no_traceback_for_refusals(record) -> bool:  # noqa: ANN001 - a logging.LogRecord
    """Flower logs whatever a ClientApp task raised with its traceback; a refused bundle is one line instead."""
    from fedpriv.core.errors import FedprivError

    exc = record.exc_info[1] if record.exc_info else None
    return not isinstance(exc, FedprivError)


def _clientapp(trust: str, rest: list[str]) -> None:
    """Flower's ``flwr-clientapp`` that verifies the bundle, never unpacks it, and runs the installed ClientApp."""
    from flwr.common.logger import FLOWER_LOGGER
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp as rc

    from fedpriv.core.errors import FedprivError

    roots = installed_roots()  # before Flower has pulled anything: the region's own fedpriv
    pulled: dict = {}
    pull = rc.pull_task_input

    def pull_and_remember(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        message, context, run, fab = pull(*args, **kwargs)
        pulled["node_config"] = dict(context.node_config)
        return message, context, run, fab

    def verify_instead_of_install(fab_file, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        content = fab_file if isinstance(fab_file, bytes) else fab_file.read_bytes()
        try:
            publisher = check_bundle(content, trust, pulled.get("node_config"))
        except FedprivError as exc:
            print(f"{REFUSED} {exc}", file=sys.stderr, flush=True)
            raise
        print(f"fedpriv: app bundle verified: signed by {publisher!r} ({trust}); running the installed "
              f"fedpriv's ClientApp, the bundle contributes its run config only", file=sys.stderr, flush=True)
        # Not unpacked: nothing of the bundle is written or imported.

    def load_installed(*_args, **_kwargs):  # noqa: ANN002, ANN003, ANN202 - replaces get_load_client_app_fn
        return lambda _fab_id, _fab_version, _fab_hash: installed_clientapp(roots)

    rc.pull_task_input = pull_and_remember
    rc.install_from_fab = verify_instead_of_install
    rc.get_load_client_app_fn = load_installed
    FLOWER_LOGGER.addFilter(_no_traceback_for_refusals)  # the REFUSED line above is the refusal's one line
    sys.argv = ["flwr-clientapp", *[a for a in rest if a != "--allow-runtime-dependency-installation"]]
    flwr_clientapp()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("superexec", "clientapp"):
        raise SystemExit("usage: python -m fedpriv.deploy.trusted_exec {superexec|clientapp} --trust FILE ...")
    trust, rest = _split_trust(argv[1:])
    (_superexec if argv[0] == "superexec" else _clientapp)(trust, rest)


if __name__ == "__main__":
    main()
