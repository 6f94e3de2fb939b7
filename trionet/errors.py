"""Error types shared by every layer (shaped like h11's ``_util.py``).

Inside a sans-IO core a mistake by the peer is raised where it is found; the
Trio layer catches ``ProtocolError`` once, at the boundary, logs it, and acts
(NACK, close the connection, mark a ring broken).
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base class: something in a conversation went wrong.

    Not raised directly; see ``LocalProtocolError`` and ``RemoteProtocolError``.
    """

    def __init__(self, msg: str) -> None:
        if type(self) is ProtocolError:
            raise TypeError(f"tried to directly instantiate {type(self).__name__}")
        super().__init__(msg)


class LocalProtocolError(ProtocolError):
    """We (trionet) were asked to do something the protocol forbids."""


class RemoteProtocolError(ProtocolError):
    """The peer (VMM or guest driver) sent something malformed or out of order.

    ``reply`` is what to send back, when the protocol wants an answer (a vhost-user
    NACK, a ``VIRTIO_NET_ERR`` ack); ``fatal`` says whether the connection or
    ring can go on after it.
    """

    def __init__(self, msg: str, *, reply: bytes | None = None, fatal: bool = True) -> None:
        super().__init__(msg)
        self.reply = reply
        self.fatal = fatal


class GuestMemoryError(RemoteProtocolError):
    """A guest or VMM address fell outside the memory the VMM gave us."""


class RingError(RemoteProtocolError):
    """A virtqueue broke a rule (loop, overlong chain, bad index, bad address).

    The ring that raised it is marked broken; everything else goes on.
    """
