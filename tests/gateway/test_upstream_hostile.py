"""
A hostile or broken upstream, over real loopback connections: response
heads past any sane size, interim responses without end, framing that
cannot be trusted (Content-Length with Transfer-Encoding, a coding other
than chunked, a 101 nobody asked for), bytes past the end of a response,
header lines a client would read differently.  What must hold: the client
gets a clear C{502}, the gateway holds a bounded amount, and an upstream
connection in doubt is never used again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.trial.unittest import TestCase

from .._proxy_support import captured_log
from .support import (
    REQUEST_BODY_CHUNK,
    REQUEST_COMPLETE,
    RESPONSE_HEADERS,
    Harness,
    ScriptedAgent,
    answer,
    block,
    listen_for,
    wait_until,
    warnings,
)

#: What a scripted upstream writes for the n-th request head on one connection.
Script = Callable[["_ScriptedUpstream", int], None]


class _ScriptedUpstream(Protocol):
    """An upstream that answers each request head (no body) with its script's bytes."""

    def __init__(self, script: Script, connections: list[_ScriptedUpstream]) -> None:
        self.script = script
        self.received = b""
        self.heads = b""
        self.requests = 0
        self.closed = False
        connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        while b"\r\n\r\n" in self.received:
            head, _, self.received = self.received.partition(b"\r\n\r\n")
            self.heads += head + b"\r\n\r\n"
            self.requests += 1
            self.script(self, self.requests)

    def connectionLost(self, reason: Any = None) -> None:
        self.closed = True


class _Gateway:
    """A gateway in front of a scripted upstream, with one agent that allows everything."""

    def __init__(self, test: TestCase, script: Script) -> None:
        self.test = test
        self.script = script
        self.connections: list[_ScriptedUpstream] = []

    async def start(self, *argv: str, events: tuple[int, ...] = (1, 3)) -> tuple[Harness, ScriptedAgent]:
        factory = Factory.forProtocol(lambda: _ScriptedUpstream(self.script, self.connections))
        port = await listen_for(self.test, factory)
        h = await Harness(self.test).start("--upstream", f"http://127.0.0.1:{port.getHost().port}", *argv)
        agent = await h.agent("waf", events=events)
        return h, agent


def _canned(response: bytes) -> Script:
    def script(upstream: _ScriptedUpstream, n: int) -> None:
        upstream.transport.write(response)

    return script


_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
_GET = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"


class UpstreamHeadTests(TestCase):
    """An upstream's response head is bounded: in bytes, in lines, interim responses included."""

    timeout = 20

    async def answered_by(self, response: bytes) -> tuple[bytes, str | None]:
        """
        What a client gets from a gateway whose upstream answers
        C{response}, and the error RequestComplete tells the agent of.
        The upstream connection is closed, not kept for another request.
        """
        gateway = _Gateway(self, _canned(response))
        h, agent = await gateway.start(events=(1, 5))
        client = await h.raw(_GET)
        await wait_until(
            lambda: b"\r\n\r\n" in client.received and client.received.endswith((b"\n", b"ok")) or client.is_lost,
            what="the response",
        )
        await agent.wait(lambda: len(agent.of_type(REQUEST_COMPLETE)) == 1)
        await wait_until(lambda: all(c.closed for c in gateway.connections), what="the upstream connection to close")
        return client.received, agent.of_type(REQUEST_COMPLETE)[0]["error"]

    def test_a_head_of_endless_header_lines_is_502(self) -> Any:
        async def go() -> None:
            head = b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"p" * 1000 + b"\r\n" * 1
            response = head + (b"X-Pad: " + b"p" * 1000 + b"\r\n") * 2000 + b"Content-Length: 2\r\n\r\nok"
            received, error = await self.answered_by(response)
            self.assertTrue(received.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), received[:200])
            self.assertIn("a response head over 65536 bytes or 500 lines", str(error))

        return ensureDeferred(go())

    def test_a_header_continued_without_end_is_502(self) -> Any:
        async def go() -> None:
            response = (
                b"HTTP/1.1 200 OK\r\nX-Long: a\r\n" + b" " + b"c" * 1000 + b"\r\n" * 1
            ) + (b" " + b"c" * 1000 + b"\r\n") * 2000 + b"Content-Length: 2\r\n\r\nok"
            received, _ = await self.answered_by(response)
            self.assertTrue(received.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), received[:200])

        return ensureDeferred(go())

    def test_too_many_header_lines_are_502(self) -> Any:
        async def go() -> None:
            response = b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 600 + b"Content-Length: 2\r\n\r\nok"
            received, _ = await self.answered_by(response)
            self.assertTrue(received.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), received[:200])

        return ensureDeferred(go())

    def test_interim_responses_without_end_are_502(self) -> Any:
        async def go() -> None:
            response = b"HTTP/1.1 100 Continue\r\n\r\n" * 5000 + _OK
            received, _ = await self.answered_by(response)
            self.assertTrue(received.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), received[:200])

        return ensureDeferred(go())

    def test_a_few_interim_responses_are_skipped(self) -> Any:
        async def go() -> None:
            gateway = _Gateway(self, _canned(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n" * 3 + _OK))
            h, _ = await gateway.start()
            response = await h.get("/a")
            self.assertEqual((response.code, response.body), (200, b"ok"))

        return ensureDeferred(go())

    def test_a_head_within_the_limit_goes_through(self) -> Any:
        async def go() -> None:
            head = b"HTTP/1.1 200 OK\r\n" + (b"X-Pad: " + b"p" * 100 + b"\r\n") * 400
            gateway = _Gateway(self, _canned(head + b"Content-Length: 2\r\n\r\nok"))
            h, _ = await gateway.start()
            response = await h.get("/a")
            self.assertEqual((response.code, response.body), (200, b"ok"))
            self.assertEqual(len(response.headers.getRawHeaders("X-Pad")), 400)

        return ensureDeferred(go())


class UpstreamFramingTests(TestCase):
    """
    A response whose framing or fields could be read in two ways is the
    upstream's failure (C{502}), and its connection is closed.
    """

    timeout = 20

    async def answered_by(self, response: bytes, closed: bool = True) -> bytes:
        gateway = _Gateway(self, _canned(response))
        h, _ = await gateway.start()
        client = await h.raw(_GET)
        await wait_until(
            lambda: b"\r\n\r\n" in client.received and client.received.endswith((b"\n", b"ok")),
            what="the response",
        )
        if closed:
            await wait_until(lambda: gateway.connections[0].closed, what="the upstream connection to close")
        return client.received

    async def assert_502(self, response: bytes) -> None:
        received = await self.answered_by(response)
        self.assertTrue(received.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), (response, received))

    def test_transfer_encoding_with_content_length_is_502(self) -> Any:
        return ensureDeferred(
            self.assert_502(
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
            )
        )

    def test_a_coding_other_than_chunked_alone_is_502(self) -> Any:
        async def go() -> None:
            for codings in (b"gzip, chunked", b"chunked, gzip", b"chunked\r\nTransfer-Encoding: gzip", b"identity"):
                await self.assert_502(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + codings + b"\r\n\r\n2\r\nok\r\n0\r\n\r\n"
                )

        return ensureDeferred(go())

    def test_a_transfer_encoding_in_an_http_1_0_response_is_502(self) -> Any:
        return ensureDeferred(
            self.assert_502(b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
        )

    def test_chunked_in_any_case_is_taken(self) -> Any:
        async def go() -> None:
            received = await self.answered_by(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked \r\n\r\n2\r\nok\r\n0\r\n\r\n", closed=False
            )
            self.assertTrue(received.startswith(b"HTTP/1.1 200 OK\r\n"), received)

        return ensureDeferred(go())

    def test_switching_protocols_nobody_asked_for_is_502(self) -> Any:
        return ensureDeferred(self.assert_502(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n" + _OK))

    def test_a_header_value_with_a_control_character_is_502(self) -> Any:
        async def go() -> None:
            for value in (b"a\x00b", b"\x1b[2J", b"a\x7f", b"a\x0cb"):
                await self.assert_502(b"HTTP/1.1 200 OK\r\nX-Odd: " + value + b"\r\nContent-Length: 2\r\n\r\nok")

        return ensureDeferred(go())

    def test_a_bare_cr_in_a_header_value_goes_on_as_a_space(self) -> Any:
        async def go() -> None:
            received = await self.answered_by(
                b"HTTP/1.1 200 OK\r\nX-Odd: a\rSet-Cookie: planted=1\r\nContent-Length: 2\r\n\r\nok", closed=False
            )
            self.assertIn(b"\r\nX-Odd: a Set-Cookie: planted=1\r\n", received)
            self.assertNotIn(b"\rSet-Cookie", received)

        return ensureDeferred(go())

    def test_headers_the_connection_header_names_stay_with_the_upstream(self) -> Any:
        """
        RFC 9110 section 7.6.1: a header the upstream names in its
        C{Connection} header is for the gateway's connection alone, as
        hop-by-hop as C{Keep-Alive}: neither the agents nor the client get it.
        """

        async def go() -> None:
            gateway = _Gateway(self, _canned(
                b"HTTP/1.1 200 OK\r\nConnection: X-Hop, x-other\r\nX-Hop: 1\r\nX-Other: 2\r\n"
                b"X-Kept: 3\r\nContent-Length: 2\r\n\r\nok"
            ))
            h, agent = await gateway.start()
            client = await h.raw(_GET)
            await wait_until(lambda: client.received.endswith(b"ok"), what="the response")
            head = client.received.split(b"\r\n\r\n", 1)[0].lower()
            self.assertIn(b"\r\nx-kept: 3", head)
            self.assertNotIn(b"x-hop", head)
            self.assertNotIn(b"x-other", head)
            (shown,) = agent.of_type(RESPONSE_HEADERS)
            self.assertEqual(sorted(shown["headers"]), ["content-length", "x-kept"])

        return ensureDeferred(go())

    def test_a_header_name_that_is_no_token_is_502(self) -> Any:
        async def go() -> None:
            for name in (b"X Odd", b"X\x00Odd", b"X(Odd)"):
                await self.assert_502(b"HTTP/1.1 200 OK\r\n" + name + b": v\r\nContent-Length: 2\r\n\r\nok")

        return ensureDeferred(go())

    def test_conflicting_content_lengths_are_502(self) -> Any:
        async def go() -> None:
            for lengths in (b"2\r\nContent-Length: 3", b"2, 3", b"+2", b"0x2", b"2_0", b"-1"):
                await self.assert_502(b"HTTP/1.1 200 OK\r\nContent-Length: " + lengths + b"\r\n\r\nok")

        return ensureDeferred(go())

    def test_a_status_line_that_is_not_http_is_502(self) -> Any:
        async def go() -> None:
            for line in (b"SSH-2.0-OpenSSH_9.6", b"HTTP/1.1200 OK", b"ICY 200 OK", b"HTTP/2 200"):
                await self.assert_502(line + b"\r\nContent-Length: 2\r\n\r\nok")

        return ensureDeferred(go())

    def test_a_status_line_off_the_http_1_grammar_is_502(self) -> Any:
        """
        Not C{HTTP/1.x}, then a status code of three digits: twisted.web.client
        takes any protocol name, version numbers and integer.
        """

        async def go() -> None:
            for line in (
                b"XTTP/1.1 200 OK",
                b"HTTP/2.0 200 OK",
                b"HTTP/01.1 200 OK",
                b"HTTP/1.1 +200 OK",
                b"HTTP/1.1 2_00 OK",
                b"HTTP/1.1 0200 OK",
            ):
                await self.assert_502(line + b"\r\nContent-Length: 2\r\n\r\nok")

        return ensureDeferred(go())

    def test_a_status_code_outside_200_to_599_closes_the_connection_even_with_its_body_read(self) -> Any:
        """The whole response is in when its head is (no body): its connection is not kept."""

        async def go() -> None:
            for line in (b"HTTP/1.1 000 Zero", b"HTTP/1.1 099 Low", b"HTTP/1.1 600 High", b"HTTP/1.1 999 High"):
                await self.assert_502(line + b"\r\nContent-Length: 0\r\n\r\n")

        return ensureDeferred(go())

    def test_a_status_line_of_another_http_1_minor_version_or_without_reason_is_taken(self) -> Any:
        async def go() -> None:
            for line in (b"HTTP/1.2 200 OK", b"HTTP/1.1 200", b"HTTP/1.1 200 "):
                received = await self.answered_by(line + b"\r\nContent-Length: 2\r\n\r\nok", closed=False)
                self.assertTrue(received.startswith(b"HTTP/1.1 200 OK\r\n"), (line, received))

        return ensureDeferred(go())


class UpstreamConnectionReuseTests(TestCase):
    """An upstream connection is reused only after a response that ended where its framing said."""

    timeout = 20

    def test_bytes_past_the_content_length_close_the_connection(self) -> Any:
        async def go() -> None:
            def script(upstream: _ScriptedUpstream, n: int) -> None:
                if len(gateway.connections) == 1 and n == 1:
                    upstream.transport.write(_OK + b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nplanted")
                else:
                    upstream.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nmine")

            gateway = _Gateway(self, script)
            h, _ = await gateway.start()
            first = await h.get("/a")
            self.assertEqual(first.body, b"ok")
            await wait_until(lambda: gateway.connections[0].closed, what="the first upstream connection to close")
            second = await h.get("/b")
            self.assertEqual(second.body, b"mine")
            self.assertEqual(len(gateway.connections), 2)

        return ensureDeferred(go())

    def test_a_head_answered_with_a_body_closes_the_connection(self) -> Any:
        async def go() -> None:
            def script(upstream: _ScriptedUpstream, n: int) -> None:
                upstream.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nmine")

            gateway = _Gateway(self, script)
            h, _ = await gateway.start()
            client = await h.raw(b"HEAD /a HTTP/1.1\r\nHost: x\r\n\r\n")
            await wait_until(lambda: b"\r\n\r\n" in client.received, what="the HEAD response")
            await wait_until(lambda: gateway.connections[0].closed, what="the upstream connection to close")
            client.transport.write(_GET)
            await wait_until(lambda: client.received.endswith(b"mine"), what="the GET response")
            head, _, rest = client.received.partition(b"\r\n\r\n")
            self.assertIn(b"Content-Length: 4", head)
            self.assertTrue(rest.startswith(b"HTTP/1.1 200 OK\r\n"), rest)
            self.assertEqual(len(gateway.connections), 2)

        return ensureDeferred(go())

    def test_a_response_that_ends_where_it_says_keeps_the_connection(self) -> Any:
        async def go() -> None:
            gateway = _Gateway(self, _canned(_OK))
            h, _ = await gateway.start()
            for _ in range(3):
                self.assertEqual((await h.get("/a")).body, b"ok")
            self.assertEqual(len(gateway.connections), 1)

        return ensureDeferred(go())


    async def connections_for_two_requests(self, response: bytes) -> int:
        gateway = _Gateway(self, _canned(response))
        h, _ = await gateway.start()
        for _ in range(2):
            self.assertEqual((await h.get("/a")).body, b"ok")
        if len(gateway.connections) == 2:
            await wait_until(lambda: gateway.connections[0].closed, what="the first upstream connection to close")
        return len(gateway.connections)

    def test_an_http_1_0_response_without_keep_alive_is_not_followed_on_its_connection(self) -> Any:
        # The upstream closes after it (RFC 9112 section 9.3), if only
        # once the next request is on its way: that one would fail.
        async def go() -> None:
            self.assertEqual(await self.connections_for_two_requests(_OK.replace(b"HTTP/1.1", b"HTTP/1.0")), 2)

        return ensureDeferred(go())

    def test_a_close_option_in_any_case_or_list_is_not_followed_on_its_connection(self) -> Any:
        # twisted.web.client looks for a Connection field that is exactly "close".
        async def go() -> None:
            for value in (b"Close", b"keep-alive, close", b"x\r\nConnection: CLOSE"):
                response = b"HTTP/1.1 200 OK\r\nConnection: " + value + b"\r\nContent-Length: 2\r\n\r\nok"
                self.assertEqual(await self.connections_for_two_requests(response), 2, value)

        return ensureDeferred(go())

    def test_an_http_1_0_response_with_keep_alive_keeps_its_connection(self) -> Any:
        async def go() -> None:
            response = b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 2\r\n\r\nok"
            self.assertEqual(await self.connections_for_two_requests(response), 1)

        return ensureDeferred(go())


class UpstreamTimeTests(TestCase):
    """An upstream that trickles or never ends holds the gateway no longer than its timeouts."""

    timeout = 20

    def test_a_head_trickled_a_byte_at_a_time_is_504(self) -> Any:
        """The wait for response headers is not renewed by each byte of them."""

        async def go() -> None:
            calls: list[LoopingCall] = []

            def script(upstream: _ScriptedUpstream, n: int) -> None:
                head = iter(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 10000)

                def trickle() -> None:
                    if not upstream.closed:
                        upstream.transport.write(bytes([next(head)]))

                call = LoopingCall(trickle)
                calls.append(call)
                call.start(0.01)

            gateway = _Gateway(self, script)
            h, _ = await gateway.start("--upstream-timeout", "0.5")
            self.addCleanup(lambda: [c.stop() for c in calls if c.running])
            response = await h.get("/a")
            self.assertEqual(response.code, 504)
            await wait_until(lambda: gateway.connections[0].closed, what="the upstream connection to close")

        return ensureDeferred(go())

    def test_an_endless_body_stops_when_the_client_goes(self) -> Any:
        async def go() -> None:
            calls: list[LoopingCall] = []

            def script(upstream: _ScriptedUpstream, n: int) -> None:
                upstream.transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")

                def more() -> None:
                    if not upstream.closed:
                        upstream.transport.write(b"1000\r\n" + b"x" * 4096 + b"\r\n")

                call = LoopingCall(more)
                calls.append(call)
                call.start(0.005)

            gateway = _Gateway(self, script)
            h, _ = await gateway.start()
            self.addCleanup(lambda: [c.stop() for c in calls if c.running])
            client = await h.raw(_GET)
            await wait_until(lambda: len(client.received) > 20000, what="some of the body")
            client.transport.loseConnection()
            await wait_until(lambda: gateway.connections[0].closed, what="the upstream connection to close")

        return ensureDeferred(go())

    def test_a_chunk_size_of_2_to_the_64_cuts_the_client_off_when_it_ends(self) -> Any:
        async def go() -> None:
            gateway = _Gateway(
                self,
                _canned(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000000\r\nabc"),
            )
            h, _ = await gateway.start()
            client = await h.raw(_GET)
            await wait_until(lambda: client.received.endswith(b"abc\r\n"), what="the body so far")
            gateway.connections[0].transport.loseConnection()
            await client.lost
            self.assertTrue(client.received.endswith(b"\r\n3\r\nabc\r\n"), client.received)

        return ensureDeferred(go())

    def test_a_chunk_size_line_without_end_is_cut_off(self) -> Any:
        async def go() -> None:
            gateway = _Gateway(
                self, _canned(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"0" * 100000)
            )
            h, _ = await gateway.start()
            client = await h.raw(_GET)
            await wait_until(lambda: bool(gateway.connections) and gateway.connections[0].closed, what="the close")
            await wait_until(lambda: client.is_lost or client.received.endswith(b"\n"), what="the client's end")
            self.assertTrue(client.is_lost or client.received.startswith(b"HTTP/1.1 502"), client.received)

        return ensureDeferred(go())


def _op(kind: str, name: str, value: str | None = None) -> dict[str, Any]:
    return {kind: {"name": name} if value is None else {"name": name, "value": value}}


class AgentAnswerTests(TestCase):
    """
    What an agent answers never puts a byte into a head that the gateway
    would refuse from a client: a header operation, a block's header or a
    redirect's URL with a control character other than a tab is unusable.
    """

    timeout = 20

    async def through(self, decide: Any, request: bytes = _GET) -> tuple[bytes, bytes, Harness]:
        """What the upstream received and the client got, an agent answering with C{decide}."""
        gateway = _Gateway(self, _canned(_OK))
        factory = Factory.forProtocol(lambda: _ScriptedUpstream(gateway.script, gateway.connections))
        port = await listen_for(self, factory)
        h = await Harness(self).start("--upstream", f"http://127.0.0.1:{port.getHost().port}")
        await h.agent("waf", events=(1, 3), decide=decide)
        client = await h.raw(request)
        await wait_until(lambda: client.received.endswith((b"\n", b"ok", b"no")), what="the response")
        upstream = gateway.connections[0].heads if gateway.connections else b""
        return upstream, client.received, h

    def test_request_header_operations_with_control_characters_are_skipped(self) -> Any:
        async def go() -> None:
            ops = [
                _op("set", "X-Nul", "a\x00b"),
                _op("add", "X-Esc", "\x1b[2J"),
                _op("set", "X-Del", "a\x7f"),
                _op("set", "X-Tab", "a\tb"),
                _op("set", "X-Fine", "caf\u00e9"),
            ]
            with captured_log() as events:
                upstream, received, _ = await self.through(lambda a, t, b: answer(request_headers=ops))
            self.assertTrue(received.startswith(b"HTTP/1.1 200 OK\r\n"), received)
            self.assertNotIn(b"X-Nul", upstream)
            self.assertNotIn(b"X-Esc", upstream)
            self.assertNotIn(b"X-Del", upstream)
            self.assertIn(b"\r\nX-Tab: a\tb\r\n", upstream)
            self.assertIn(
                "Agent waf sent an unusable header operation SetHeader(name='X-Nul', value='a\\x00b'): "
                "its value holds the control character '\\x00'",
                warnings(events),
            )
            self.assertIn(b"\r\nX-Fine: caf\xc3\xa9\r\n", upstream)

        return ensureDeferred(go())

    def test_request_header_operations_cannot_inject_lines(self) -> Any:
        async def go() -> None:
            ops = [_op("set", "X-A", "a\r\nContent-Length: 5\r\n\r\nGET /smuggled HTTP/1.1"), _op("set", "X-B\r\nX-C", "v")]
            upstream, received, _ = await self.through(lambda a, t, b: answer(request_headers=ops))
            self.assertTrue(received.startswith(b"HTTP/1.1 200 OK\r\n"), received)
            self.assertEqual(upstream.count(b"\r\n\r\n"), 1, upstream)
            self.assertNotIn(b"\r\nContent-Length", upstream)
            self.assertNotIn(b"X-C", upstream)

        return ensureDeferred(go())

    def test_response_header_operations_with_control_characters_are_skipped(self) -> Any:
        async def go() -> None:
            def decide(agent: ScriptedAgent, message_type: int, body: dict[str, Any]) -> dict[str, Any]:
                if message_type == RESPONSE_HEADERS:
                    return answer(response_headers=[_op("set", "X-Nul", "a\x00b"), _op("set", "X-Ok", "fine")])
                return answer()

            _, received, _ = await self.through(decide)
            self.assertTrue(received.startswith(b"HTTP/1.1 200 OK\r\n"), received)
            self.assertNotIn(b"X-Nul", received)
            self.assertIn(b"\r\nX-Ok: fine\r\n", received)

        return ensureDeferred(go())

    def test_block_headers_with_control_characters_are_skipped(self) -> Any:
        async def go() -> None:
            _, received, _ = await self.through(
                lambda a, t, b: block(403, "no", {"X-Nul": "a\x00b", "X-Ok": "fine"})
            )
            self.assertTrue(received.startswith(b"HTTP/1.1 403 Forbidden\r\n"), received)
            self.assertNotIn(b"X-Nul", received)
            self.assertIn(b"\r\nX-Ok: fine\r\n", received)

        return ensureDeferred(go())

    def test_a_redirect_to_a_url_with_control_characters_is_500(self) -> Any:
        async def go() -> None:
            for url, shown in (
                ("https://x.example/\r\nSet-Cookie: planted=1", "'\\r'"),
                ("https://x.example/\x00", "'\\x00'"),
            ):
                with captured_log() as events:
                    _, received, _ = await self.through(
                        lambda a, t, b, url=url: answer({"redirect": {"url": url, "status": 302}})
                    )
                self.assertTrue(received.startswith(b"HTTP/1.1 500 Internal Server Error\r\n"), received)
                self.assertNotIn(b"planted", received)
                self.assertIn(
                    f"Agent waf answered redirect with a URL holding the control character {shown}; answering 500",
                    warnings(events),
                )

        return ensureDeferred(go())

    def test_a_body_mutation_that_is_not_base64_fails_the_agent(self) -> Any:
        """Nothing of the body reaches the upstream: the client gets 503, the upstream request is cut off."""

        async def go() -> None:
            def decide(agent: ScriptedAgent, message_type: int, body: dict[str, Any]) -> dict[str, Any]:
                if message_type == REQUEST_BODY_CHUNK:
                    return answer(request_body_mutation={"data": "no base64!", "chunk_index": body["chunk_index"]})
                return answer()

            gateway = _Gateway(self, _canned(_OK))
            port = await listen_for(
                self, Factory.forProtocol(lambda: _ScriptedUpstream(gateway.script, gateway.connections))
            )
            h = await Harness(self).start("--upstream", f"http://127.0.0.1:{port.getHost().port}")
            await h.agent("waf", events=(1, 2), decide=decide)
            client = await h.raw(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nsecret")
            await wait_until(lambda: client.received.endswith(b"\n"), what="the response")
            self.assertTrue(client.received.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), client.received)
            if gateway.connections:
                await wait_until(lambda: gateway.connections[0].closed, what="the upstream request to be cut off")
                self.assertNotIn(b"secret", gateway.connections[0].heads + gateway.connections[0].received)

        return ensureDeferred(go())
