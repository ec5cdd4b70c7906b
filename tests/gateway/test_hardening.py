"""
The HTTP side against hostile agents and clients: framing headers stay the
gateway's, unusable decision statuses are answered 500, slow or oversized
request heads get an answer and a deadline, client connections are capped,
the status site answers only to its own names, the access log is private.
"""

from __future__ import annotations

import os
import stat
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.ssl import Certificate, CertificateOptions, optionsForClientTLS
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import http

from sentinel_twisted._deadlines import TIMEOUT_RESPONSE
from sentinel_twisted.gateway.config import GatewayConfig
from sentinel_twisted.gateway.exchange import Gateway
from sentinel_twisted.gateway.resource import GatewaySite

from .._proxy_support import captured_log
from .support import (
    Harness,
    OneAgentPool,
    RawClient,
    ScriptedAgent,
    _OneShot,
    answer,
    block,
    wait_until,
    warnings,
)
from .test_metadata import self_signed
from .test_target import _RecordingConnection, _RecordingUpstream


def _set(name: str, value: str) -> dict[str, Any]:
    return {"set": {"name": name, "value": value}}


class AgentHeaderOperationTests(TestCase):
    timeout = 20

    def test_framing_headers_of_the_response_stay_the_gateways(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            ops = [_set("Content-Length", "5"), _set("Transfer-Encoding", "chunked"), _set("Connection", "close")]
            await h.agent("waf", decide=lambda a, t, b: answer(response_headers=ops))
            with captured_log() as events:
                client = await h.raw(b"GET /page HTTP/1.1\r\nHost: x\r\n\r\n")
                body = b"upstream saw /page"
                await wait_until(lambda: client.received.endswith(body), what="the response")
            head = client.received.split(b"\r\n\r\n", 1)[0].lower()
            self.assertIn(b"content-length: %d" % len(body), head)
            self.assertNotIn(b"transfer-encoding", head)
            self.assertNotIn(b"connection: close", head)
            self.assertFalse(client.is_lost)
            # A warning per operation (a flood of them is rate-limited, as
            # every line an agent can trigger: test_logs).
            self.assertEqual(
                warnings(events),
                [
                    f"Agent waf tried to change the {name!r} header; ignored (the gateway frames messages itself)"
                    for name in ("Content-Length", "Transfer-Encoding", "Connection")
                ],
            )

        return ensureDeferred(go())

    def test_framing_headers_and_host_of_the_request_stay_the_gateways(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start("--upstream-timeout", "3")
            ops = [_set("Content-Length", "999"), _set("Transfer-Encoding", "chunked"), _set("Host", "evil.example")]
            await h.agent("waf", decide=lambda a, t, b: answer(request_headers=ops))
            response = await h.get("/get")
            self.assertEqual(response.code, 200)
            (seen,) = h.upstream.requests
            self.assertNotIn("content-length", seen["headers"])
            self.assertNotIn("transfer-encoding", seen["headers"])
            self.assertEqual(seen["headers"]["host"], [f"127.0.0.1:{h.upstream_port.getHost().port}"])

        return ensureDeferred(go())

    def test_framing_headers_of_a_block_stay_the_gateways(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            await h.agent("waf", decide=lambda a, t, b: block(403, "no", {"Content-Length": "1", "Transfer-Encoding": "chunked"}))
            response = await h.get("/x")
            self.assertEqual((response.code, response.body), (403, b"no"))
            self.assertIsNone(response.header("Transfer-Encoding"))

        return ensureDeferred(go())


    def test_header_names_in_warnings_are_cut_and_rate_limited(self) -> Any:
        # An agent chooses its header names: a long one must not become a
        # long log line, once per request.  (The two operations stay within
        # the 16 KiB that an answer's response header operations may take.)
        long_name = "bad name " + "x" * 8_000
        protected = "Content-Length" + " " * 8_000
        ops = [_set(long_name, "v"), _set(protected, "5")]

        async def go() -> None:
            h = await Harness(self).start()
            limiter = h.gateway_service.gateway.log_limiter
            await h.agent(
                "waf", decide=lambda a, t, b: block(403, "no", {long_name: "v"}) | {"response_headers": ops}
            )
            with captured_log() as events:
                for _ in range(limiter.burst + 3):
                    self.assertEqual((await h.get("/x")).code, 403)
            warned = warnings(events)
            self.assertTrue(warned)
            self.assertLessEqual(max(len(line) for line in warned), 1000)
            # Each kind of warning a few times per period, not per request.
            self.assertLessEqual(len(warned), 3 * limiter.burst)

        return ensureDeferred(go())


class DecisionStatusTests(TestCase):
    timeout = 20

    def test_block_status_outside_4xx_5xx_is_answered_500(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            await h.agent("waf", decide=lambda a, t, b: block(0, "zero"))
            with captured_log() as events:
                response = await h.get("/x")
            self.assertEqual(response.code, 500)
            self.assertEqual(h.upstream.requests, [])
            self.assertEqual(warnings(events), ["Agent waf answered block with status 0, outside 400-599; answering 500"])
            self.assertEqual(h.sample("sentinel_gateway_requests_total", decision="error"), 1)

        return ensureDeferred(go())

    def test_redirect_status_outside_3xx_is_answered_500(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            await h.agent("waf", decide=lambda a, t, b: answer({"redirect": {"url": "/elsewhere", "status": 200}}))
            with captured_log() as events:
                response = await h.get("/x")
            self.assertEqual(response.code, 500)
            self.assertIsNone(response.header("Location"))
            self.assertEqual(warnings(events), ["Agent waf answered redirect with status 200, outside 300-399; answering 500"])

        return ensureDeferred(go())

    def test_usable_statuses_go_out(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()

            def decide(agent: ScriptedAgent, message_type: int, body: dict[str, Any]) -> Any:
                if body["uri"] == "/teapot":
                    return block(599, "edge")
                return answer({"redirect": {"url": "/b", "status": 308}})

            await h.agent("waf", decide=decide)
            self.assertEqual((await h.get("/teapot")).code, 599)
            self.assertEqual((await h.get("/a")).code, 308)

        return ensureDeferred(go())


# -- client connections, in memory -------------------------------------------------


class ClientConnectionTests(SynchronousTestCase):
    def site(self, **config: Any) -> tuple[GatewaySite, MemoryReactorClock, _RecordingUpstream]:
        reactor = MemoryReactorClock()
        upstream = _RecordingUpstream()
        gateway = Gateway(OneAgentPool(_RecordingConnection(), "recorder"), GatewayConfig(**config), upstream, clock=reactor)  # type: ignore[arg-type]
        return GatewaySite(gateway, reactor=reactor), reactor, upstream

    def connect(self, site: GatewaySite) -> tuple[Any, StringTransport]:
        channel = site.buildProtocol(None)
        assert channel is not None
        transport = StringTransport()
        channel.makeConnection(transport)
        return channel, transport

    def test_a_head_not_complete_in_time_gets_408(self) -> None:
        site, reactor, upstream = self.site(header_timeout=30.0)
        channel, transport = self.connect(site)
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n")
        reactor.advance(29)
        channel.dataReceived(b"X-Slow: 1\r\n")
        self.assertFalse(transport.disconnecting)
        reactor.advance(1)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 Request Timeout\r\n"), transport.value())
        self.assertTrue(transport.disconnecting)
        self.assertEqual(upstream.targets, [])

    def test_an_idle_connection_is_closed_at_the_deadline(self) -> None:
        site, reactor, _ = self.site(header_timeout=5.0)
        channel, transport = self.connect(site)
        reactor.advance(5)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")

    def test_the_deadline_covers_each_head_of_a_kept_alive_connection(self) -> None:
        site, reactor, upstream = self.site(header_timeout=5.0)
        channel, transport = self.connect(site)
        channel.dataReceived(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"HTTP/1.1 200 OK", transport.value())
        # The request took the deadline away; its end starts a new one.
        reactor.advance(4)
        channel.dataReceived(b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n")
        reactor.advance(4)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(upstream.targets, [b"/one", b"/two"])
        reactor.advance(1)
        self.assertTrue(transport.disconnecting)
        channel.connectionLost(None)
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_one_timer_per_connection_not_per_request(self) -> None:
        # The deadline moves with each request; the connection keeps a
        # single timer that re-arms itself rather than one per head.
        site, reactor, upstream = self.site(header_timeout=5.0)
        channel, transport = self.connect(site)
        scheduled = []

        def call_later(delay: float, f: Any, *args: Any) -> Any:
            scheduled.append(delay)
            return reactor.callLater(delay, f, *args)

        channel.callLater = call_later
        for i in range(50):
            channel.dataReceived(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
        self.assertEqual(len(upstream.targets), 50)
        # (twisted.web's own idle timeout schedules its own timers.)
        self.assertNotIn(5.0, scheduled)
        reactor.advance(4.9)
        self.assertFalse(transport.disconnecting)
        reactor.advance(0.1)
        self.assertTrue(transport.disconnecting)

    def test_a_400_is_the_last_word_on_a_connection(self) -> None:
        # The connection is being closed: its head's deadline no longer
        # runs, and no 408 follows the 400 while the client reads nothing.
        site, reactor, _ = self.site(header_timeout=5.0, send_timeout=60.0)
        channel, transport = self.connect(site)
        channel.dataReceived(b"NONSENSE\r\n")
        self.assertEqual(transport.value(), b"HTTP/1.1 400 Bad Request\r\n\r\n")
        reactor.advance(5)
        self.assertEqual(transport.value(), b"HTTP/1.1 400 Bad Request\r\n\r\n")

    def test_a_line_over_the_limit_gets_431(self) -> None:
        site, _, upstream = self.site()
        channel, transport = self.connect(site)
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), transport.value()[:100])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(upstream.targets, [])

    def test_a_request_line_over_the_limit_gets_414(self) -> None:
        site, _, upstream = self.site()
        channel, transport = self.connect(site)
        channel.dataReceived(b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 414 URI Too Long\r\n"), transport.value()[:100])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(upstream.targets, [])

    def test_a_long_request_line_on_a_kept_alive_connection_gets_414(self) -> None:
        site, _, upstream = self.site()
        channel, transport = self.connect(site)
        channel.dataReceived(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"HTTP/1.1 200 OK", transport.value())
        channel.dataReceived(b"GET /" + b"a" * 20000)
        self.assertIn(b"HTTP/1.1 414 URI Too Long\r\n", transport.value())
        self.assertTrue(transport.disconnecting)
        self.assertEqual(upstream.targets, [b"/first"])

    def test_a_head_over_the_total_limit_gets_431(self) -> None:
        site, _, upstream = self.site()
        channel, transport = self.connect(site)
        lines = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 1000) for i in range(20))
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n" + lines + b"\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 431 "), transport.value()[:100])
        self.assertEqual(upstream.targets, [])

    def test_too_many_headers_get_431(self) -> None:
        site, _, upstream = self.site()
        channel, transport = self.connect(site)
        lines = b"".join(b"X: %d\r\n" % i for i in range(600))
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n" + lines + b"\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 431 "), transport.value()[:100])
        self.assertEqual(upstream.targets, [])

    def serve(self, data: bytes) -> tuple[bytes, bool, list[bytes], list[Any]]:
        """
        C{data} from one client: the response bytes, whether the connection
        is being closed, the targets forwarded upstream and the events the
        agent was shown.
        """
        site, _, upstream = self.site()
        channel, transport = self.connect(site)
        channel.dataReceived(data)
        closing = transport.disconnecting
        channel.connectionLost(None)
        return transport.value(), closing, upstream.targets, site.gateway.pool.connection.seen

    def test_close_among_other_connection_options_ends_the_connection(self) -> None:
        # Found by test_differential: twisted.web looked for "close" among
        # the space-separated words of the first Connection field only.
        # After "Connection: close, X-A" the request pipelined behind it
        # was judged and forwarded, though RFC 9112 section 9.6 has the
        # server process nothing after it.
        for connection in (
            b"Connection: close, X-A",
            b"Connection: X-A,close",
            b"Connection: X-A\r\nConnection: close",
            b"Connection: TE\r\nConnection: close, X-A",
            b"Connection: Close",
        ):
            response, closing, targets, _ = self.serve(
                b"GET /one HTTP/1.1\r\nHost: example.com\r\n" + connection + b"\r\n\r\n"
                b"GET /two HTTP/1.1\r\nHost: example.com\r\n\r\n"
            )
            self.assertEqual(targets, [b"/one"], connection)
            self.assertEqual(response.count(b"HTTP/1.1 200 OK\r\n"), 1, connection)
            self.assertIn(b"\r\nConnection: close\r\n", response, connection)
            self.assertTrue(closing, connection)

    def test_other_connection_options_keep_the_connection(self) -> None:
        response, closing, targets, _ = self.serve(
            b"GET /one HTTP/1.1\r\nHost: example.com\r\nConnection: keep-alive, X-Closed\r\n\r\n"
            b"GET /two HTTP/1.1\r\nHost: example.com\r\n\r\n"
        )
        self.assertEqual(targets, [b"/one", b"/two"])
        self.assertNotIn(b"Connection: close", response)
        self.assertFalse(closing)

    def test_a_transfer_coding_that_is_not_chunked_is_refused(self) -> None:
        # Found by test_differential: twisted.web ignored "Transfer-Encoding:
        # identity", and "PUT /a.b? HTTP/1.1 ... Transfer-Encoding:
        # identity\r\nContent-Length: 11" went to the agents and the
        # upstream framed by its Content-Length.  RFC 9112 section 6.3: with
        # a Transfer-Encoding whose last coding is not chunked the length of
        # a request cannot be known; the server answers 400 and closes.
        for framing in (
            b"Transfer-Encoding: identity\r\nContent-Length: 5\r\n\r\nhello",
            b"Transfer-Encoding: identity\r\n\r\n",
            b"Transfer-Encoding: IDENTITY\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ):
            response, closing, targets, seen = self.serve(
                b"PUT /a.b? HTTP/1.1\r\nHost: example.com\r\n" + framing + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
            )
            self.assertTrue(response.startswith(b"HTTP/1.1 400 Bad Request\r\n"), (framing, response))
            self.assertEqual(response.count(b"HTTP/1.1 "), 1, framing)
            self.assertEqual((targets, seen), ([], []), framing)
            self.assertTrue(closing, framing)

    def test_a_bare_line_end_in_a_header_line_gets_400_and_closes(self) -> None:
        # Twisted before 26.10 ends header lines at CRLF only: "Host:
        # example.com\nContent-Length: +0" was one Host value to the gateway
        # (400 for the Host, the connection kept) where a parser that ends
        # lines at LF reads two headers.  Refused at the line, as Twisted
        # 26.10 does: 400, and the connection closed.
        for head in (
            b"GET / HTTP/1.1\r\nHost: example.com\nContent-Length: +0\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: example.com\r\nX-A: a\nb\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: example.com\r\nX-A: a\rb\r\n\r\n",
        ):
            response, closing, targets, seen = self.serve(head + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertTrue(response.startswith(b"HTTP/1.1 400 Bad Request\r\n"), (head, response))
            self.assertEqual(response.count(b"HTTP/1.1 "), 1, head)
            self.assertEqual((targets, seen), ([], []), head)
            self.assertTrue(closing, head)

    def test_chunked_is_still_taken_in_any_case(self) -> None:
        response, closing, targets, seen = self.serve(
            b"PUT /a HTTP/1.1\r\nHost: example.com\r\ntransfer-encoding: Chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\nX-T: 1\r\n\r\n"
        )
        self.assertTrue(response.startswith(b"HTTP/1.1 200 OK\r\n"), response)
        self.assertEqual(targets, [b"/a"])
        self.assertFalse(closing)

    def test_client_connections_are_capped(self) -> None:
        site, _, _ = self.site(max_client_connections=2)
        first, _ = self.connect(site)
        self.connect(site)
        with captured_log() as events:
            refused = site.buildProtocol(None)
            transport = StringTransport()
            refused.makeConnection(transport)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(site.clients, 2)
        self.assertIn("2 client connections (--max-client-connections); closing new ones", warnings(events))
        first.connectionLost(None)
        self.connect(site)

    def test_client_connections_over_tls_are_capped(self) -> None:
        # An ssl: endpoint wraps whatever the site builds in TLS: a refusal
        # must be a protocol that closes, not None (which TLS wraps, then
        # fails on with a traceback per connection after the handshake).
        site, _, _ = self.site(max_client_connections=1)
        self.connect(site)
        tls = TLSMemoryBIOFactory(CertificateOptions(), False, site)
        wrapped = tls.buildProtocol(None)
        transport = StringTransport()
        wrapped.makeConnection(transport)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(site.clients, 1)


class UnixClientTests(TestCase):
    """Peers on UNIX sockets cannot pass file descriptors in, nor have them logged."""

    timeout = 20

    async def request_passing_descriptors(self, h: Harness, path: str, target: bytes) -> bytes:
        """
        Send a GET for C{target} to C{path} with three file descriptors
        passed along; return the response head, after checking that
        nothing was logged about the descriptors.
        """
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        client = RawClient()
        h.raw_clients.append(client)
        await UNIXClientEndpoint(reactor, path).connect(_OneShot(client))
        with captured_log() as events:
            for fd in (r, w, r):
                client.transport.sendFileDescriptor(fd)
            client.transport.write(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            await wait_until(lambda: b"\r\n\r\n" in client.received, what="the response head")
        self.assertEqual([e for e in events if "descriptor" in (formatEvent(e) or "")], [])
        return client.received

    def test_file_descriptors_a_client_passes_are_dropped_unlogged(self) -> Any:
        """
        A client on a UNIX socket gets its answer; the descriptors it
        passes are closed by the kernel, unseen and unlogged (the gateway
        reads with recv(), not Twisted's recvmsg()).
        """

        async def go() -> None:
            h = Harness(self)
            path = os.path.join(h.dir, "http.sock")
            await h.start(http=f"unix:{path}")
            received = await self.request_passing_descriptors(h, path, b"/page")
            self.assertTrue(received.startswith(b"HTTP/1.1 503 "), received[:40])

        return ensureDeferred(go())

    def test_file_descriptors_passed_to_the_status_site_are_dropped_unlogged(self) -> Any:
        async def go() -> None:
            h = Harness(self)
            path = os.path.join(h.dir, "status.sock")
            await h.start("--status", f"unix:{path}")
            received = await self.request_passing_descriptors(h, path, b"/healthz")
            self.assertTrue(received.startswith(b"HTTP/1.1 "), received[:40])

        return ensureDeferred(go())


# -- the status site and the access log ------------------------------------------------


class Http2OfferTests(TestCase):
    """
    Over TLS both sites offer HTTP/1.1 alone: their channels speak no
    HTTP/2, which Twisted's Site offers (ALPN) whenever C{h2} is installed.
    A client that took the offer got C{400} to its HTTP/2 preface.
    """

    timeout = 20

    def setUp(self) -> None:
        # As with h2 installed: Twisted's Site would offer it.
        self.patch(http, "H2_ENABLED", True)

    async def _negotiated(self, h: Harness, port: int, cert_pem: bytes, request: bytes) -> Any:
        client = RawClient()
        h.raw_clients.append(client)
        options = optionsForClientTLS(
            "sni.example", trustRoot=Certificate.loadPEM(cert_pem), acceptableProtocols=[b"h2", b"http/1.1"]
        )
        endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", port))
        await endpoint.connect(_OneShot(client))
        client.transport.write(request)
        await wait_until(lambda: b"\r\n\r\n" in client.received, what="the response head")
        self.assertTrue(client.received.startswith(b"HTTP/1.1 200 "), client.received[:40])
        return client.transport.negotiatedProtocol

    def test_the_gateway_offers_http_1_1_alone(self) -> Any:
        async def go() -> None:
            harness = Harness(self)
            pem, cert_pem = self_signed(harness.dir, "sni.example")
            h = await harness.start(http=f"ssl:0:interface=127.0.0.1:privateKey={pem}:certKey={pem}")
            await h.agent("waf")
            request = b"GET / HTTP/1.1\r\nHost: sni.example\r\n\r\n"
            self.assertEqual(await self._negotiated(h, h.http_port, cert_pem, request), b"http/1.1")

        return ensureDeferred(go())

    def test_the_status_site_offers_http_1_1_alone(self) -> Any:
        async def go() -> None:
            harness = Harness(self)
            pem, cert_pem = self_signed(harness.dir, "sni.example")
            h = await harness.start("--status", f"ssl:0:interface=127.0.0.1:privateKey={pem}:certKey={pem}")
            request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            self.assertEqual(await self._negotiated(h, h.status_port, cert_pem, request), b"http/1.1")

        return ensureDeferred(go())


class StatusConnectionTests(SynchronousTestCase):
    """The status site holds a bounded number of connections, none idle for long."""

    def site(self, **kwargs: Any) -> tuple[Any, MemoryReactorClock]:
        from sentinel_twisted.status.metrics import GatewayMetrics
        from sentinel_twisted.status.resource import StatusResource, StatusSite

        from .._proxy_support import Proxy

        proxy = Proxy()
        reactor = MemoryReactorClock()
        resource = StatusResource(proxy.pool, GatewayMetrics(proxy.pool, proxy.factory))
        return StatusSite(resource, reactor=reactor, **kwargs), reactor

    def connect(self, site: Any) -> tuple[Any, StringTransport]:
        channel = site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        return channel, transport

    def test_past_its_connections_a_new_one_is_closed_until_one_leaves(self) -> None:
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        site, _ = self.site(max_connections=2)
        first, _ = self.connect(site)
        self.connect(site)
        with captured_log() as events:
            for _ in range(20):
                _, refused = self.connect(site)
                self.assertTrue(refused.disconnecting)
        # A warning, rate-limited, however many are refused.
        self.assertEqual(warnings(events)[0], "2 status site connections; closing new ones")
        self.assertLess(len(warnings(events)), 20)
        first.connectionLost(Failure(ConnectionDone()))
        _, taken = self.connect(site)
        self.assertFalse(taken.disconnecting)
        self.assertEqual(site.connections, 2)

    #: A request for the site at StringTransport's address.
    HEAD = b"GET /agents HTTP/1.1\r\nHost: 10.0.0.1\r\n\r\n"

    def test_trickling_a_head_does_not_move_its_deadline(self) -> None:
        # twisted.web's idle timeout starts over with every byte: a client
        # sending one every 50 s held its place for ever, and 64 of them
        # locked operators out of /metrics and /healthz.
        site, reactor = self.site()
        connections = [self.connect(site) for _ in range(20)]
        with captured_log() as events:
            for wait, byte in [(50, b"G"), (9, b"E")]:
                for channel, _ in connections:
                    channel.dataReceived(byte)
                reactor.advance(wait)
            self.assertFalse(any(transport.disconnecting for _, transport in connections))
            reactor.advance(1)
        for _, transport in connections:
            self.assertEqual(transport.value(), TIMEOUT_RESPONSE)
            self.assertTrue(transport.disconnecting)
        # A warning, rate-limited, however many clients are cut off.
        lines = warnings(events)
        self.assertEqual(lines[0], "A status site client sent no complete request head in 60.0s; answering 408")
        self.assertLess(len(lines), 20)

    def test_each_head_has_its_deadline_from_the_previous_response(self) -> None:
        site, reactor = self.site()
        channel, transport = self.connect(site)
        # A head trickled in pieces, whole within the minute: served.
        channel.dataReceived(self.HEAD[:10])
        reactor.advance(29)
        channel.dataReceived(self.HEAD[10:20])
        reactor.advance(29)
        channel.dataReceived(self.HEAD[20:])
        self.assertEqual(transport.value().count(b"HTTP/1.1 200 OK\r\n"), 1)
        # A minute from connecting has passed: the next head has a minute
        # from the end of that response (at 58 s).
        reactor.advance(42)
        channel.dataReceived(self.HEAD)
        self.assertEqual(transport.value().count(b"HTTP/1.1 200 OK\r\n"), 2)
        # And the third a minute from the end of the second (at 100 s),
        # however it trickles in.
        reactor.advance(50)
        channel.dataReceived(self.HEAD[:10])
        reactor.advance(9)
        self.assertFalse(transport.disconnecting)
        reactor.advance(1)
        self.assertTrue(transport.value().endswith(b"}\n" + TIMEOUT_RESPONSE), transport.value())
        self.assertTrue(transport.disconnecting)

    def test_an_idle_connection_is_closed_at_its_head_deadline(self) -> None:
        # Without twisted.web's idle timeout: the head's deadline alone
        # closes a connection that sends nothing, without a word.
        site, reactor = self.site(timeout=None)
        fresh, fresh_transport = self.connect(site)
        kept, kept_transport = self.connect(site)
        reactor.advance(30)
        kept.dataReceived(self.HEAD)
        answered = kept_transport.value()
        self.assertIn(b"HTTP/1.1 200 OK\r\n", answered)
        with captured_log() as events:
            reactor.advance(29.5)
            self.assertFalse(fresh_transport.disconnecting)
            reactor.advance(0.5)
            self.assertTrue(fresh_transport.disconnecting)
            self.assertEqual(fresh_transport.value(), b"")
            reactor.advance(29.5)
            self.assertFalse(kept_transport.disconnecting)
            reactor.advance(0.5)
            self.assertTrue(kept_transport.disconnecting)
            self.assertEqual(kept_transport.value(), answered)
        self.assertEqual(warnings(events), [])
        for channel in (fresh, kept):
            channel.connectionLost(None)
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_a_quiet_connection_is_closed_after_a_minute(self) -> None:
        # Twisted's default, which the cap relies on to free places.
        site, reactor = self.site()
        _, transport = self.connect(site)
        reactor.advance(59)
        self.assertFalse(transport.disconnecting)
        reactor.advance(1)
        self.assertTrue(transport.disconnecting)


    def test_a_request_body_is_refused_before_it_is_read(self) -> None:
        # Twisted takes a body whole, spooling a large one to a temporary
        # file: whoever reaches the site could fill the disk.  The site
        # answers GETs only, and refuses at the head.
        for head in [
            b"POST /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000000000\r\n\r\n",
            b"GET /agents HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        ]:
            # (Without twisted.web's idle timeout, which would close it again.)
            site, reactor = self.site(timeout=None)
            channel, transport = self.connect(site)
            channel.dataReceived(head + b"x" * 200_000)
            self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "), transport.value())
            self.assertTrue(transport.disconnecting)
            # No request was given a place (memory or a file) to take a body.
            self.assertEqual([r.content for r in channel.requests], [None])
            channel.dataReceived(b"x" * 200_000)
            self.assertTrue(transport.value().endswith(b"\r\n\r\n"))
            # The 413 is the last word: no 408 follows it.
            reactor.advance(60)
            self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "), transport.value())
            self.assertEqual(transport.value().count(b"HTTP/1.1 "), 1)

    def test_a_get_without_a_body_is_still_answered(self) -> None:
        site, _ = self.site()
        channel, transport = self.connect(site)
        channel.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 "), transport.value())
        self.assertNotIn(b" 413 ", transport.value().split(b"\r\n")[0])
        self.assertFalse(transport.disconnecting)

class StatusHostTests(TestCase):
    timeout = 20

    def test_status_site_answers_only_to_its_own_names(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start("--status-host", "Status.Internal")
            url = h.status_url("/agents")
            for host, code in [
                (None, 200),
                (f"127.0.0.1:{h.status_port}", 200),
                (f"localhost:{h.status_port}", 200),
                ("status.internal", 200),
                (f"rebound.example:{h.status_port}", 421),
                ("127.0.0.2", 421),
            ]:
                headers = {} if host is None else {"Host": host}
                response = await h.client.request("GET", url, headers=headers)
                self.assertEqual(response.code, code, host)
                if code == 421:
                    self.assertNotIn(b"agents", response.body)

        return ensureDeferred(go())

    def test_an_http11_request_needs_exactly_one_host(self) -> Any:
        # RFC 9112 section 3.2: 400 for an HTTP/1.1 request without Host,
        # and for any request with more than one or one that is no
        # host[:port].
        async def go() -> None:
            h = await Harness(self).start()
            host = b"Host: 127.0.0.1\r\n"
            for head, status in [
                (b"GET /agents HTTP/1.1\r\n", b"HTTP/1.1 400 Bad Request"),
                (b"GET /agents HTTP/1.1\r\n" + host + host, b"HTTP/1.1 400 Bad Request"),
                (b"GET /agents HTTP/1.0\r\n" + host + host, b"HTTP/1.0 400 Bad Request"),
                (b"GET /agents HTTP/1.0\r\n", b"HTTP/1.0 200 OK"),
                (b"GET /agents HTTP/1.1\r\nHost: a b\r\n", b"HTTP/1.1 400 Bad Request"),
                (b"GET /agents HTTP/1.0\r\nHost: 127.0.0.1, evil.example\r\n", b"HTTP/1.0 400 Bad Request"),
                (b"GET /agents HTTP/1.1\r\nHost: 127.0.0.1@evil.example\r\n", b"HTTP/1.1 400 Bad Request"),
                (b"GET /agents HTTP/1.1\r\nHost: \r\n", b"HTTP/1.1 400 Bad Request"),
                (b"GET /agents HTTP/1.1\r\n" + host, b"HTTP/1.1 200 OK"),
            ]:
                client = await h.raw(head + b"Connection: close\r\n\r\n", h.status_port)
                await client.lost
                self.assertEqual(client.received.split(b"\r\n", 1)[0], status, head)
                if status.endswith(b"400 Bad Request"):
                    self.assertNotIn(b"agents", client.received)

        return ensureDeferred(go())

    def test_refusal_names_its_status(self) -> Any:
        """421 goes out as C{Misdirected Request}, not C{Unknown Status}."""

        async def go() -> None:
            h = await Harness(self).start()
            client = await h.raw(b"GET /agents HTTP/1.1\r\nHost: rebound.example\r\n\r\n", h.status_port)
            await wait_until(lambda: b"\r\n\r\n" in client.received, what="the response head")
            status_line = client.received.split(b"\r\n", 1)[0]
            self.assertEqual(status_line, b"HTTP/1.1 421 Misdirected Request")

        return ensureDeferred(go())


class StatusConnectionCloseTests(TestCase):
    """
    The status site ends a connection after a request with C{close} among
    the comma-separated options of any of its C{Connection} fields, as the
    gateway does (RFC 9112 section 9.6).
    """

    timeout = 20

    def test_close_among_the_options_of_any_connection_field_closes(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            for fields in [
                b"Connection: close\r\n",
                b"Connection: keep-alive, close\r\n",
                b"Connection: close, TE\r\nTE: trailers\r\n",
                b"Connection: keep-alive,close\r\n",
                b"Connection: Keep-Alive\r\nConnection: Close\r\n",
            ]:
                head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                # A second request pipelined behind: never answered.
                client = await h.raw(head + fields + b"\r\n" + head + b"\r\n", h.status_port)
                await wait_until(
                    lambda: client.is_lost or client.received.count(b"HTTP/1.1 ") > 1,  # noqa: B023
                    what="the connection to close",
                )
                self.assertEqual(client.received.count(b"HTTP/1.1 "), 1, fields)
                self.assertTrue(client.is_lost, fields)
                self.assertIn(b"\r\nConnection: close\r\n", client.received, fields)

        return ensureDeferred(go())

    def test_other_options_keep_the_connection(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: keep-alive, closed\r\n\r\n"
            client = await h.raw(head + head, h.status_port)
            await wait_until(lambda: client.received.count(b"HTTP/1.1 ") == 2, what="both responses")
            self.assertFalse(client.is_lost)

        return ensureDeferred(go())


class ConnectEndsTheConnectionTests(TestCase):
    """
    Neither the gateway nor the status site is a tunnel: a C{CONNECT} is
    refused, and what its client sends after it (a tunnel's bytes, a TLS
    ClientHello say) is not read as the next request: the connection ends
    after the refusal.
    """

    timeout = 20

    def assert_connect_ends_the_connection(self, h: Harness, port: int, status: bytes) -> Any:
        async def go() -> None:
            pipelined = b"GET /admin HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            client = await h.raw(b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\n\r\n" + pipelined, port)
            await wait_until(
                lambda: client.is_lost or client.received.count(b"HTTP/1.1 ") > 1, what="the connection to close"
            )
            self.assertEqual(client.received.count(b"HTTP/1.1 "), 1, client.received)
            self.assertTrue(client.received.startswith(b"HTTP/1.1 " + status), client.received)
            self.assertIn(b"\r\nConnection: close\r\n", client.received)
            self.assertTrue(client.is_lost)

        return go()

    def test_the_gateway(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            agent = await h.agent("recorder")
            await self.assert_connect_ends_the_connection(h, h.http_port, b"501")
            # Neither the CONNECT nor what followed it was judged or forwarded.
            self.assertEqual(agent.events, [])
            self.assertEqual(h.upstream.requests, [])

        return ensureDeferred(go())

    def test_the_status_site(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            await self.assert_connect_ends_the_connection(h, h.status_port, b"4")

        return ensureDeferred(go())

    def test_a_refusal_of_the_gateway_says_it_closes(self) -> Any:
        # The gateway's own answers (a 400 here, an agent's 403) replace the
        # response headers: the Connection: close is kept among them.
        async def go() -> None:
            h = await Harness(self).start()
            await h.agent("recorder")
            client = await h.raw(b"GET /x/../a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            await client.lost
            self.assertTrue(client.received.startswith(b"HTTP/1.1 400 "), client.received)
            self.assertIn(b"\r\nConnection: close\r\n", client.received)

        return ensureDeferred(go())


class AccessLogTests(TestCase):
    timeout = 20

    def test_access_log_is_created_owner_only(self) -> Any:
        async def go() -> None:
            path = os.path.join(self.mktemp() + "-dir", "access.log")
            os.makedirs(os.path.dirname(path))
            old = os.umask(0o022)
            try:
                h = await Harness(self).start("--access-log", path)
            finally:
                os.umask(old)
            await h.agent("waf")
            await h.get("/logged")
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

        return ensureDeferred(go())
