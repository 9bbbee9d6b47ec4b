"""fedpriv: privacy-preserving federated fine-tuning across regional datacenters.

The top-level folders name the architecture: ``server/`` (coordinator),
``client/`` (one process per region), ``strategies/`` (how updates combine),
``privacy/`` (accounting, reports, secure-aggregation math), ``simulations/``
(many regions on one machine) and ``task/`` (model and data shared by server and
client). This package holds the command line and the run configuration.
"""

__version__ = "0.1.0"
