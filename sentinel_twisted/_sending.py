"""
Writing to a plain socket at once.

A Twisted transport buffers every write until the reactor's next turn and
watches the socket for writability meanwhile: an extra turn and two
C{epoll_ctl} calls per message at low load.  On a plain (not TLS) socket
whose transport holds nothing, L{send_now} sends at once instead and
leaves the transport whatever the socket does not take.  Both the proxy's
agent connections and the gateway's client connections write this way.

It reads a few attributes of Twisted's socket transports that are not
public (C{_tempDataBuffer}, C{dataBuffer}, C{offset}); L{writes_through}
says whether a transport has them, and the tests of both users fail if a
Twisted release changes them.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.abstract import FileDescriptor

__all__ = ["send_now", "writes_through"]


def writes_through(transport: object) -> bool:
    """Whether data can go to C{transport}'s socket directly: a plain (not TLS) socket transport."""
    return (
        isinstance(transport, FileDescriptor)
        and hasattr(transport, "socket")
        and not getattr(transport, "TLS", False)
        and hasattr(transport, "_tempDataBuffer")
    )


def send_now(transport: Any, data: bytes) -> None:
    """
    Send C{data} on C{transport}'s socket now if the transport holds
    nothing to send before it; the rest (or all of it) goes through the
    transport as usual.  C{transport} must be one L{writes_through} accepts.
    """
    if (
        transport._tempDataBuffer
        or len(transport.dataBuffer) > transport.offset
        or transport.disconnecting
        or not transport.connected
    ):
        transport.write(data)
        return
    try:
        sent = transport.socket.send(data)
    except (BlockingIOError, InterruptedError):
        sent = 0
    except OSError:
        # The transport meets the same error on its own write and ends the
        # connection as it always does.
        transport.write(data)
        return
    if sent < len(data):
        transport.write(data[sent:])
