"""The region's gate in front of Flower's ClientApp: verify the bundle, then run it.

``fedpriv supernode`` starts ``flower-supernode --isolation process`` and, next to
it, this module as the SuperNode's SuperExec::

    python -m fedpriv.deploy.trusted_exec superexec --trust FILE <flower-superexec args>

It is Flower's own ``flower-superexec`` with one change: a ClientApp task is
started as ``python -m fedpriv.deploy.trusted_exec clientapp --trust FILE
<flwr-clientapp args>`` (any other task type is refused). That process is Flower's
``flwr-clientapp`` with one change: the bundle it pulled from the SuperNode is
checked by :func:`fedpriv.deploy.app_signing.verify_bundle` against the region's
trust file *before* ``install_from_fab`` unpacks it, so no file of an unsigned or
modified bundle is ever written or imported. A refused bundle becomes the task's
error reply (the coordinator sees "app bundle ... is not signed ...") and one
``fedpriv: REFUSED`` line in the SuperNode's log.

Both entry points run the region's installed fedpriv, never code from a bundle.
The trust file is re-read for every task, so a region can revoke a publisher
without a restart.
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

    args = [sys.executable, "-m", "fedpriv.deploy.trusted_exec", "clientapp", "--trust", trust,
            TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[spec.task_type], spec.runtime_api_address, "--token", spec.token]
    if spec.insecure:
        args.append("--insecure")
    elif spec.root_certificates_path is not None:
        args += ["--root-certificates", spec.root_certificates_path]
    if spec.parent_pid is not None:
        args += ["--parent-pid", str(spec.parent_pid)]
    if spec.runtime_dependency_install:
        args.append("--allow-runtime-dependency-installation")
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


def check_bundle(fab_content: bytes, trust: str) -> str:
    """Verify ``fab_content`` with the region's trust file; return the publisher's label or raise one line."""
    from fedpriv.deploy.app_signing import load_trust_file, verify_bundle

    return verify_bundle(fab_content, load_trust_file(trust)).label


def _no_traceback_for_refusals(record) -> bool:  # noqa: ANN001 - a logging.LogRecord
    """Flower logs whatever a ClientApp task raised with its traceback; a refused bundle is one line instead."""
    from fedpriv.core.errors import FedprivError

    exc = record.exc_info[1] if record.exc_info else None
    return not isinstance(exc, FedprivError)


def _clientapp(trust: str, rest: list[str]) -> None:
    """Flower's ``flwr-clientapp`` that verifies the bundle before installing it."""
    from flwr.common.logger import FLOWER_LOGGER
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp as rc

    from fedpriv.core.errors import FedprivError

    install = rc.install_from_fab

    def verified_install(fab_file, *args, **kwargs):  # noqa: ANN001, ANN202
        content = fab_file if isinstance(fab_file, bytes) else fab_file.read_bytes()
        try:
            publisher = check_bundle(content, trust)
        except FedprivError as exc:
            print(f"{REFUSED} {exc}", file=sys.stderr, flush=True)
            raise
        print(f"fedpriv: app bundle verified: signed by {publisher!r} ({trust})", file=sys.stderr, flush=True)
        # This gate imported the region's own fedpriv; forget it so the bundle's code imports its own
        # (signed) copy from the installed bundle, exactly what was verified.
        for name in [m for m in sys.modules if m == "fedpriv" or m.startswith("fedpriv.")]:
            del sys.modules[name]
        return install(content, *args, **kwargs)

    rc.install_from_fab = verified_install
    FLOWER_LOGGER.addFilter(_no_traceback_for_refusals)  # the REFUSED line above is the refusal's one line
    sys.argv = ["flwr-clientapp", *rest]
    flwr_clientapp()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("superexec", "clientapp"):
        raise SystemExit("usage: python -m fedpriv.deploy.trusted_exec {superexec|clientapp} --trust FILE ...")
    trust, rest = _split_trust(argv[1:])
    (_superexec if argv[0] == "superexec" else _clientapp)(trust, rest)


if __name__ == "__main__":
    main()
