"""
A chunked upstream response whose framing is broken, over real loopback
connections: a chunk-size line ending in a bare LF, a chunk size with junk
after it, a chunk-size line without end, chunk data not followed by CRLF.
The upstream keeps its connection open, as a broken server would: the
gateway must see the fault in the bytes it has, answer the client C{502}
at once (the response's head has not reached the client yet) and close
the upstream connection, not wait for more bytes until
C{--upstream-timeout}.  What RFC 9112 section 7.1 allows (chunk
extensions, with whitespace before their C{;} and quoted values, and
trailer fields) still goes through, its connection kept for the next
request.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.logger import formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http import _MalformedChunkedDataError

from sentinel_twisted.gateway.upstream import _StrictChunkedDecoder

from .._proxy_support import captured_log
from .support import REQUEST_COMPLETE, wait_until
from .test_upstream_hostile import _GET, _canned, _Gateway


def log_lines(events: list[Any]) -> list[str]:
    return [formatEvent(event) or "" for event in events]


_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"

#: Far longer than any test here may wait: a gateway that waits for the
#: upstream's timeout fails the test (C{wait_until} gives up first).
_NEVER = "3600"


class MalformedChunksTests(TestCase):
    """
    Broken chunked framing is the upstream's failure as soon as it is
    read: C{502}, the upstream connection closed.
    """

    timeout = 20

    async def assert_refused_at_once(self, body: bytes, why: str, started: bytes = b"") -> None:
        """
        The client gets C{502} when the upstream answers with C{body}; or,
        with C{started}, the body's bytes before the fault, sent on before
        it was read, and its connection closed short of the body's end (as
        docs/operators.md has it for an upstream that breaks once the
        response has started).
        """
        gateway = _Gateway(self, _canned(_HEAD + body))
        h, agent = await gateway.start("--upstream-timeout", _NEVER, events=(1, 5))
        with captured_log() as events:
            client = await h.raw(_GET)
            if started:
                await wait_until(lambda: client.is_lost, timeout=5, what=f"the client's connection to close, for {body!r}")
                self.assertTrue(client.received.startswith(b"HTTP/1.1 200 OK\r\n"), (body, client.received))
                self.assertTrue(client.received.endswith(b"\r\n\r\n" + started), (body, client.received))
            else:
                await wait_until(
                    lambda: client.received.endswith(b"\n") or client.is_lost, timeout=5, what=f"the answer to {body!r}"
                )
                self.assertTrue(client.received.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), (body, client.received))
            await wait_until(
                lambda: all(c.closed for c in gateway.connections), timeout=5, what="the upstream connection to close"
            )
        await agent.wait(lambda: len(agent.of_type(REQUEST_COMPLETE)) == 1)
        error = str(agent.of_type(REQUEST_COMPLETE)[0]["error"])
        if started:
            # Cut mid-response: the agents and the log are told why.
            (line,) = [text for text in log_lines(events) if "Closing the client connection mid-response" in text]
            self.assertEqual(line.partition(": ")[2], error)
        self.assertTrue(error.startswith("upstream response broke: a malformed chunked body: "), error)
        self.assertIn(why, error)

    def test_a_chunk_size_line_ending_in_a_bare_lf_is_502(self) -> Any:
        async def go() -> None:
            for body in (b"5\nhello\n0\n\n", b"0\n\n", b"5;a=b\nhello"):
                await self.assert_refused_at_once(body, "bare LF")

        return ensureDeferred(go())

    def test_a_trailer_line_ending_in_a_bare_lf_is_502(self) -> Any:
        async def go() -> None:
            for body in (b"0\r\n\n", b"0\r\nX-T: a\nb"):
                await self.assert_refused_at_once(body, "trailer section line ending in a bare LF")
            await self.assert_refused_at_once(
                b"5\r\nhello\r\n0\r\n\n", "trailer section line ending in a bare LF", started=b"5\r\nhello\r\n"
            )

        return ensureDeferred(go())

    def test_a_chunk_size_with_junk_is_502(self) -> Any:
        async def go() -> None:
            for body in (b"5 junk", b"5x", b"0x5", b"+5", b";a=b", b" 5", b"5\rx", b"5 \r\n", b"5\x00"):
                await self.assert_refused_at_once(body, "chunk-size line")

        return ensureDeferred(go())

    def test_an_overlong_chunk_size_line_is_502(self) -> Any:
        async def go() -> None:
            await self.assert_refused_at_once(b"5;" + b"e" * 1100, "longer than 1024 bytes")
            await self.assert_refused_at_once(b"0" * 1100, "longer than 1024 bytes")

        return ensureDeferred(go())

    def test_chunk_data_not_followed_by_crlf_is_502(self) -> Any:
        async def go() -> None:
            # The chunk is sent on as it comes: the client has it when the fault is read.
            for body in (b"5\r\nhelloX", b"5\r\nhello\n", b"5\r\nhello\rX"):
                await self.assert_refused_at_once(body, "not followed by CRLF", started=b"5\r\nhello\r\n")

        return ensureDeferred(go())


class WellFormedChunksTests(TestCase):
    """What RFC 9112 allows in a chunked body reaches the client, and the connection is used again."""

    timeout = 20

    async def assert_passed_on(self, body: bytes) -> None:
        gateway = _Gateway(self, _canned(_HEAD + body))
        h, _ = await gateway.start("--upstream-timeout", _NEVER)
        for _ in range(2):
            response = await h.get("/a")
            self.assertEqual((response.code, response.body), (200, b"hello, world"), body)
        self.assertEqual(len(gateway.connections), 1, body)
        self.assertFalse(gateway.connections[0].closed, body)

    def test_chunk_extensions_and_trailers_are_taken(self) -> Any:
        async def go() -> None:
            for body in (
                b"5;name=value\r\nhello\r\n7;flag\r\n, world\r\n0\r\n\r\n",
                b'5 ; name = "a \\"quoted\\" value"\r\nhello\r\n7\t;x\r\n, world\r\n0;last\r\n\r\n',
                b"5\r\nhello\r\n7\r\n, world\r\n0\r\nX-Checksum: abc\r\nX-Other: d\r\n\r\n",
                b"0005\r\nhello\r\n7\r\n, world\r\n000\r\n\r\n",
            ):
                await self.assert_passed_on(body)

        return ensureDeferred(go())


class DecoderTests(SynchronousTestCase):
    """The gateway's chunked decoder, fed a byte at a time, as a slow upstream may send."""

    def feed(self, data: bytes) -> tuple[bytes, bytes | None, int | None]:
        """The body decoded, what came after its end (C{None}: no end), and the byte a fault was seen at."""
        body: list[bytes] = []
        rest: list[bytes] = []
        decoder = _StrictChunkedDecoder(body.append, rest.append)
        for at in range(len(data)):
            try:
                decoder.dataReceived(data[at : at + 1])
            except _MalformedChunkedDataError:
                return b"".join(body), None, at
            if rest:
                break
        return b"".join(body), rest[0] if rest else None, None

    def test_a_body_in_single_bytes_is_decoded(self) -> None:
        data = b'5 ;a="x\\"y"\r\nhello\r\n7;b\r\n, world\r\n0\r\nX-T: t\r\n\r\n'
        self.assertEqual(self.feed(data), (b"hello, world", b"", None))

    def test_a_fault_is_seen_at_its_byte(self) -> None:
        for data, at in (
            (b"5\nhello", 1),
            (b"5 x", 2),
            (b"5;a\x00", 3),
            (b"5\rx", 2),
            (b"5 \r\n", 3),
            (b"\r\n", 1),
            (b"5\r\nhelloX", 8),
            (b"5\r\nhello\rX", 9),
            (b"5;" + b"e" * 2000, 1024),
            (b"0\r\n\n", 3),
            (b"0\r\nX: a\n", 7),
        ):
            self.assertEqual(self.feed(data)[2], at, data)
