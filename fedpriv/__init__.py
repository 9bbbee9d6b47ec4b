"""fedpriv: privacy-preserving federated fine-tuning across regional datacenters.

The top-level folders name the architecture: ``server/`` (coordinator),
``client/`` (one process per region), ``strategies/`` (how updates combine),
``privacy/`` (accounting, reports, secure-aggregation math), ``simulations/``
(many regions on one machine) and ``task/`` (model and data shared by server and
client). This package holds the command line, the run configuration and the
deployment tooling.

Importing any fedpriv module has no side effect: ClientApps, ServerApps and Ray
workers import ``fedpriv.errors`` and ``fedpriv.config``, so nothing here may
change the process (the PATH the Flower children need is set in their own
environment, :func:`fedpriv.deploy.processes.child_env`).
"""

__version__ = "0.1.0"
