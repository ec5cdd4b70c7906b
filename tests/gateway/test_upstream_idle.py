"""
An idle upstream connection, back in the pool, that receives bytes while
no request is out on it (a C{408} some servers send before they close an
idle connection, or garbage): it can carry no request now, so the next
request never goes out on it but on a new connection.  twisted.web closes
it (gracefully) but kept it in the pool until the close completed, and a
request picked in that moment was written to a connection about to close:
sent to the upstream perhaps, answered never (a POST's client got 502, a
GET was sent again).

Driven in memory (L{MemoryReactorClock}, L{StringTransport}) with the
real L{HTTPUpstream}, through the gateway as in C{test_upstream_quiet}.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from .._proxy_support import captured_log
from .test_upstream_quiet import _GET, _Scene, _text, _Transport

_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class IdleUpstreamBytesTests(SynchronousTestCase):
    def _answered_once(self) -> _Scene:
        scene = _Scene()
        scene.upstream_sends(_RESPONSE)
        self.assertTrue(scene.received.startswith(b"HTTP/1.1 200 OK\r\n"), scene.received)
        self.assertTrue(scene.received.endswith(b"ok"), scene.received)
        return scene

    def test_control_reuses_an_idle_connection(self) -> None:
        """
        Without stray bytes, the second request goes out on the same
        upstream connection (so the test below would see reuse).
        """
        scene = self._answered_once()
        scene.server_transport.clear()
        scene.client.dataReceived(_GET)
        self.assertEqual(len(scene.reactor.tcpClients), 1)
        self.assertTrue(scene.server_transport.value().startswith(b"GET /file HTTP/1.1\r\n"))

    def test_bytes_on_an_idle_connection_take_it_out_of_use(self) -> None:
        for stray in (b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n\r\n", b"x", b"\r\n"):
            scene = self._answered_once()
            scene.server_transport.clear()
            with captured_log() as events:
                scene.upstream_sends(stray)
                self.assertTrue(scene.server_transport.disconnecting, stray)
                # The close has not completed yet: the next request comes now.
                scene.client.dataReceived(_GET)
                self.assertEqual(scene.server_transport.value(), b"", stray)
                self.assertEqual(len(scene.reactor.tcpClients), 2, stray)
                host, port, factory, _, _ = scene.reactor.tcpClients[1]
                server = factory.buildProtocol(IPv4Address("TCP", host, port))
                transport = _Transport()
                server.makeConnection(transport)
                self.assertTrue(transport.value().startswith(b"GET /file HTTP/1.1\r\n"), stray)
                server.dataReceived(_RESPONSE)
                self.assertEqual(scene.received.count(b"HTTP/1.1 200 OK\r\n"), 2, stray)
                # The old connection's close completes, quietly.
                scene.server.connectionLost(Failure(ConnectionDone()))
            self.assertEqual(_text(events), "", stray)
