"""Secure aggregation (SecAgg / SecAgg+) as a pure library: no Flower, no I/O.

The coordinator learns only the (weighted) sum of the surviving clients' updates.
See :mod:`fedpriv.privacy.secagg.protocol` for the round, :mod:`~fedpriv.privacy.secagg.quantize`
for the fixed-point encoding and its error bound, :mod:`~fedpriv.privacy.secagg.crypto`
for the primitives, :mod:`~fedpriv.privacy.secagg.shamir` and :mod:`~fedpriv.privacy.secagg.graph`
for secret sharing and the neighbour graph, and :mod:`~fedpriv.privacy.secagg.simulate`
for an in-process round driver.

Threat model: a coordinator that may collude with up to ``threshold - 1`` clients
learns nothing about the other clients' individual updates beyond their sum. It does
learn the sum, the total weight, which clients took part and which dropped at which
stage, and anything sent outside this protocol (e.g. plaintext metrics). The protocol
classes alone trust the coordinator's key list; against a coordinator that *acts*
(invented or substituted peers, replayed advertisements, different views for different
clients) the region authenticates every peer with :mod:`~fedpriv.privacy.secagg.identity`
(signed advertisements checked against its roster, and a signed-view consistency round),
as Bonawitz et al. 2017's actively secure variant does.
"""

from .errors import SecAggAbort, SecAggError, SecAggProtocolError, ShareDecryptionError
from .protocol import (
    SecAggClient,
    SecAggConfig,
    SecAggResult,
    SecAggServer,
    pack_ids,
    unpack_ids,
)
from .quantize import (
    average_error_bound,
    dequantize,
    dequantize_sum,
    quantization_step,
    quantize,
    required_mod_bits,
    sum_error_bound,
)
from .simulate import DROP_STAGES, RoundStats, simulate_round

__all__ = [
    "DROP_STAGES",
    "RoundStats",
    "SecAggAbort",
    "SecAggClient",
    "SecAggConfig",
    "SecAggError",
    "SecAggProtocolError",
    "SecAggResult",
    "SecAggServer",
    "ShareDecryptionError",
    "average_error_bound",
    "dequantize",
    "dequantize_sum",
    "pack_ids",
    "quantization_step",
    "quantize",
    "required_mod_bits",
    "simulate_round",
    "sum_error_bound",
    "unpack_ids",
]
