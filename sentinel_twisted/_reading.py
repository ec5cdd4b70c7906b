"""
Reading a UNIX socket with C{recv()}.

Twisted reads its UNIX stream transports with C{recvmsg()}, for protocols
that take file descriptors (C{IFileDescriptorReceiver}).  Ours carry bytes
only, and that path costs twice:

  - Each descriptor a peer passes is installed in this process before
    Twisted closes it, and each read that carries any logs a line: a log
    stream that a peer drives at will.
  - C{recvmsg()} through C{twisted.python.sendmsg} costs about 11,000 more
    instructions per read than C{recv()} (callgrind, one agent answer per
    read): 8 % of a round trip at concurrency 1.

L{read_plainly} gives such a transport the read of Twisted's TCP
transports.  With no room for ancillary data, the kernel closes whatever
descriptors a peer passes before they reach this process (unix(7)), and
nothing is logged.

It changes the class of a transport of exactly Twisted's C{unix.Server} or
C{unix.Client} to a subclass that differs in C{doRead} alone; any other
transport is left as it is.  The tests of both sides fail if a Twisted
release changes what that relies on.
"""

from __future__ import annotations

from twisted.internet import tcp

__all__ = ["read_plainly"]

_PLAIN: dict[type, type] = {}

try:
    from twisted.internet import unix
except ImportError:  # pragma: no cover - a platform without AF_UNIX
    pass
else:

    class _PlainServer(unix.Server):
        """An accepted UNIX connection that reads with C{recv()}."""

        doRead = tcp.Connection.doRead  # type: ignore[assignment]  # (Twisted types doRead loosely)

    class _PlainClient(unix.Client):
        """A dialled UNIX connection that reads with C{recv()}."""

        doRead = tcp.Connection.doRead  # type: ignore[assignment]  # (Twisted types doRead loosely)

    _PLAIN[unix.Server] = _PlainServer
    _PLAIN[unix.Client] = _PlainClient


def read_plainly(transport: object) -> None:
    """
    Make C{transport} read with C{recv()} if it is one of Twisted's own
    UNIX stream transports; do nothing otherwise.
    """
    plain = _PLAIN.get(type(transport))
    if plain is not None:
        transport.__class__ = plain
