"""Running fedpriv for real: certificates, the coordinator and one process per region.

* :mod:`fedpriv.deploy.certs` - CA, SuperLink TLS certificate, SuperNode key pairs.
* :mod:`fedpriv.deploy.processes` - start/stop ``flower-superlink`` (loopback only)
  with its Fleet gateway, and ``flower-supernode`` per region; ``flwr`` CLI helpers.
* :mod:`fedpriv.deploy.ports` - free-port checks and the Fleet-only TLS gateway.

The commands ``fedpriv certs | superlink | register | supernode`` wrap these.
"""
