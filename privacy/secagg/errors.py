"""Errors raised by the secure-aggregation library.

Callers normally need only two: :class:`SecAggAbort` (the round cannot be
completed safely -- too few clients or shares survived; keep the global model
unchanged and try again next round) and :class:`SecAggProtocolError` (a message
broke the protocol; on a client this means *refuse to answer*).
"""


class SecAggError(Exception):
    """Base class of every secure-aggregation error."""


class SecAggAbort(SecAggError):
    """The round must be abandoned: fewer than ``threshold`` clients or shares survived.

    Raised instead of returning a partial or unmasked result. Nothing about any
    individual update has been revealed when this is raised.
    """


class SecAggProtocolError(SecAggError):
    """A message violates the protocol (wrong stage, unknown peer, inconsistent request)."""


class ShareDecryptionError(SecAggProtocolError):
    """An encrypted share bundle failed authentication (tampered, misrouted or replayed)."""

    def __init__(self, sender: int, receiver: int, round_id: int) -> None:
        self.sender = sender
        self.receiver = receiver
        self.round_id = round_id
        super().__init__(
            f"share bundle from client {sender} to client {receiver} (round {round_id}) "
            "failed AES-GCM authentication: ciphertext tampered with, misrouted or from another round"
        )
