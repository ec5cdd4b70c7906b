"""
L{read_plainly}: Twisted's own UNIX transports read with C{recv()}, every
other transport is left alone.  What that means over a real socket (passed
descriptors dropped, nothing logged) is in the loopback tests of each side.
"""

from __future__ import annotations

from twisted.internet import tcp, unix
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from sentinel_twisted._reading import read_plainly


class ReadPlainlyTests(SynchronousTestCase):
    def test_twisteds_unix_transports_read_with_recv(self) -> None:
        for cls in (unix.Server, unix.Client):
            transport = object.__new__(cls)
            read_plainly(transport)
            self.assertIsInstance(transport, cls)
            self.assertIs(type(transport).doRead, tcp.Connection.doRead)

    def test_other_transports_are_left_as_they_are(self) -> None:
        class OwnServer(unix.Server):
            pass

        for transport in (StringTransport(), object.__new__(OwnServer), object.__new__(tcp.Server)):
            before = type(transport)
            read_plainly(transport)
            self.assertIs(type(transport), before)
