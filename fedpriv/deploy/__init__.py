"""Running fedpriv for real: certificates, the coordinator and one process per region, one idea per module.

* :mod:`fedpriv.deploy.certs` - CA, SuperLink TLS certificate, SuperNode key pairs.
* :mod:`fedpriv.deploy.paths` - the files and directories a command is given: present, readable, private.
* :mod:`fedpriv.deploy.ports` - default ports, free-port checks, ``HOST:PORT``, ``/health`` probes.
* :mod:`fedpriv.deploy.processes` - start, watch and stop a child process tree; stop signals.
* :mod:`fedpriv.deploy.superlink` - ``flower-superlink`` on loopback + :mod:`fedpriv.deploy.gateway`
  (the Fleet-only TLS gateway SuperNodes connect to).
* :mod:`fedpriv.deploy.supernode` - ``flower-supernode`` for one region + its verifying SuperExec
  (:mod:`fedpriv.deploy.trusted_exec`).
* :mod:`fedpriv.deploy.flwr_cli` - the ``flwr`` CLI: private ``FLWR_HOME``, SuperNode registry,
  submitting a run (signed: :mod:`fedpriv.deploy.app_signing`, :mod:`fedpriv.deploy.signed_run`)
  and waiting for its real outcome.

The commands ``fedpriv certs | keygen | superlink | register | supernode | run`` wrap these;
``fedpriv simulate`` (:mod:`fedpriv.simulations`) reuses the process and ``flwr`` CLI helpers.
"""
