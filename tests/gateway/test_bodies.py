"""
Bodies: inspection chunk by chunk with mutations, size limits, response
bodies, and streaming in both directions.
"""

from __future__ import annotations

import base64
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from .._proxy_support import captured_log
from .support import (
    REQUEST_BODY_CHUNK,
    REQUEST_HEADERS,
    RESPONSE_BODY_CHUNK,
    RESPONSE_HEADERS,
    Harness,
    ScriptedAgent,
    answer,
    b64,
    block,
    listen_for,
    small_chunks,
    wait_until,
    warnings,
)


def chunk_data(body: dict[str, Any]) -> bytes:
    return base64.b64decode(body["data"])


class RequestBodyTests(TestCase):
    timeout = 20

    def setUp(self) -> None:
        # Short bodies in several chunks.
        small_chunks(self)

    def test_chunks_and_mutations_in_order(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            mutations = {
                0: {"data": b64(b"AAAA"), "chunk_index": 0},  # replace
                1: {"data": "", "chunk_index": 1},  # drop
                2: {"data": None, "chunk_index": 2},  # pass
            }

            def decide(agent: ScriptedAgent, message_type: int, body: dict[str, Any]) -> Any:
                if message_type == REQUEST_BODY_CHUNK:
                    index = body["chunk_index"]
                    return answer(needs_more=True, request_body_mutation=mutations[index])
                return answer()

            agent = await h.agent("waf", events=(1, 2), chunk_size=4, decide=decide)
            response = await h.post("/echo-body", b"aaaabbbbcccc")
            self.assertEqual((response.code, response.body), (200, b"AAAAcccc"))
            chunks = agent.of_type(REQUEST_BODY_CHUNK)
            self.assertEqual([chunk_data(c) for c in chunks], [b"aaaa", b"bbbb", b"cccc"])
            self.assertEqual([c["chunk_index"] for c in chunks], [0, 1, 2])
            self.assertEqual([c["is_last"] for c in chunks], [False, False, True])
            self.assertEqual([c["bytes_received"] for c in chunks], [4, 8, 12])
            self.assertEqual({c["total_size"] for c in chunks}, {12})
            (headers,) = agent.of_type(REQUEST_HEADERS)
            cid = headers["metadata"]["correlation_id"]
            self.assertEqual({c["correlation_id"] for c in chunks}, {cid})
            # The body changed size: it went upstream chunked.
            (seen,) = h.upstream.requests
            self.assertNotIn("content-length", seen["headers"])
            self.assertEqual(seen["body"], b"AAAAcccc")

        return ensureDeferred(go())

    def test_needs_more_false_ends_inspection(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            agent = await h.agent("waf", events=(1, 2), chunk_size=4)
            response = await h.post("/echo-body", b"aaaabbbbcccc")
            self.assertEqual(response.body, b"aaaabbbbcccc")
            self.assertEqual(len(agent.of_type(REQUEST_BODY_CHUNK)), 1)

        return ensureDeferred(go())

    def test_block_on_a_later_chunk(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()

            def decide(agent: ScriptedAgent, message_type: int, body: dict[str, Any]) -> Any:
                if message_type == REQUEST_BODY_CHUNK and b"EVIL" in chunk_data(body):
                    return block(403, "bad body")
                return answer(needs_more=True)

            agent = await h.agent("waf", events=(1, 2), chunk_size=4, decide=decide)
            response = await h.post("/echo-body", b"goodgoodEVILgood")
            self.assertEqual((response.code, response.body), (403, b"bad body"))
            self.assertEqual(len(agent.of_type(REQUEST_BODY_CHUNK)), 3)
            # The upstream never got a whole request.
            self.assertEqual(h.upstream.requests, [])

        return ensureDeferred(go())

    def test_chained_agents_see_each_others_output(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start("--agent", "upper", "--agent", "audit")

            def upper(agent: ScriptedAgent, message_type: int, body: dict[str, Any]) -> Any:
                if message_type == REQUEST_BODY_CHUNK:
                    data = chunk_data(body).upper()
                    return answer(
                        needs_more=True,
                        request_body_mutation={"data": b64(data), "chunk_index": body["chunk_index"]},
                    )
                return answer()

            await h.agent("upper", events=(1, 2), chunk_size=3, decide=upper)
            audit = await h.agent(
                "audit", events=(1, 2), chunk_size=5, decide=lambda a, t, b: answer(needs_more=True)
            )
            response = await h.post("/echo-body", b"abcdefghij")
            self.assertEqual(response.body, b"ABCDEFGHIJ")
            self.assertEqual(
                [chunk_data(c) for c in audit.of_type(REQUEST_BODY_CHUNK)], [b"ABCDE", b"FGHIJ"]
            )

        return ensureDeferred(go())

    def test_declared_body_over_the_limit_is_413(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            agent = await h.agent("waf", events=(1, 2), max_body=10)
            response = await h.post("/echo-body", b"x" * 11)
            self.assertEqual(response.code, 413)
            self.assertEqual(agent.events, [])
            self.assertEqual(h.upstream.requests, [])
            self.assertEqual(h.sample("sentinel_gateway_requests_total", decision="too_large"), 1)
            # Exactly the limit passes.
            self.assertEqual((await h.post("/echo-body", b"x" * 10)).code, 200)

        return ensureDeferred(go())

    def test_chunked_body_over_the_limit_is_413(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            await h.agent("waf", events=(1, 2), max_body=10, decide=lambda a, t, b: answer(needs_more=True))
            response = await h.client.request("POST", h.url("/echo-body"), chunks=[b"x" * 6, b"x" * 6])
            self.assertEqual(response.code, 413)
            self.assertEqual(h.upstream.requests, [])

        return ensureDeferred(go())

    def test_agents_without_body_events_see_no_chunks(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            agent = await h.agent("waf", events=(1,))
            response = await h.post("/echo-body", b"x" * 100000)
            self.assertEqual(len(response.body), 100000)
            self.assertEqual([t for t, _ in agent.events], [REQUEST_HEADERS])
            # Not inspected: forwarded with its own length.
            self.assertEqual(h.upstream.requests[0]["headers"]["content-length"], ["100000"])

        return ensureDeferred(go())


class ChunkSizeFloorTests(TestCase):
    timeout = 20

    def test_an_agent_preferring_one_byte_chunks_gets_4_kib_ones(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            agent = await h.agent(
                "waf", events=(1, 2), chunk_size=1, decide=lambda a, t, b: answer(needs_more=True)
            )
            response = await h.post("/echo-body", b"z" * 10000)
            self.assertEqual(response.code, 200)
            chunks = agent.of_type(REQUEST_BODY_CHUNK)
            self.assertEqual([len(chunk_data(c)) for c in chunks], [4096, 4096, 1808])
            self.assertEqual(h.upstream.requests[0]["body"], b"z" * 10000)

        return ensureDeferred(go())


class ResponseBodyTests(TestCase):
    timeout = 20

    def test_response_headers_and_body_chunks_with_mutation(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()

            def decide(agent: ScriptedAgent, message_type: int, body: dict[str, Any]) -> Any:
                if message_type == RESPONSE_HEADERS:
                    return answer(response_headers=[{"set": {"name": "X-Scanned", "value": "yes"}}])
                if message_type == RESPONSE_BODY_CHUNK and body["chunk_index"] == 1:
                    return answer(needs_more=True, response_body_mutation={"data": b64(b"Y" * 10), "chunk_index": 1})
                return answer(needs_more=True)

            agent = await h.agent("dlp", events=(1, 3, 4), chunk_size=4096, decide=decide)
            response = await h.get("/bytes?n=10000")
            self.assertEqual(response.code, 200)
            self.assertEqual(response.body, b"x" * 4096 + b"Y" * 10 + b"x" * 1808)
            self.assertEqual(response.header("X-Scanned"), "yes")
            (headers,) = agent.of_type(RESPONSE_HEADERS)
            self.assertEqual(headers["status"], 200)
            self.assertEqual(headers["headers"]["content-length"], ["10000"])
            chunks = agent.of_type(RESPONSE_BODY_CHUNK)
            self.assertEqual([len(chunk_data(c)) for c in chunks], [4096, 4096, 1808])
            self.assertEqual([c["is_last"] for c in chunks], [False, False, True])
            self.assertEqual([c["bytes_sent"] for c in chunks], [4096, 8192, 10000])

        return ensureDeferred(go())

    def test_block_at_response_headers(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()

            def decide(agent: ScriptedAgent, message_type: int, body: dict[str, Any]) -> Any:
                if message_type == RESPONSE_HEADERS:
                    return block(502, "upstream answer refused")
                return answer()

            await h.agent("dlp", events=(1, 3), decide=decide)
            response = await h.get("/anything")
            self.assertEqual((response.code, response.body), (502, b"upstream answer refused"))
            self.assertEqual(len(h.upstream.requests), 1)

        return ensureDeferred(go())

    def test_block_on_first_response_chunk_replaces_the_response(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()

            def decide(agent: ScriptedAgent, message_type: int, body: dict[str, Any]) -> Any:
                if message_type == RESPONSE_BODY_CHUNK:
                    return block(451, "leak")
                return answer()

            await h.agent("dlp", events=(1, 4), decide=decide)
            response = await h.get("/secret")
            self.assertEqual((response.code, response.body), (451, b"leak"))

        return ensureDeferred(go())


class RawUpstream(Protocol):
    """An upstream that shows what arrives as it arrives, and answers on demand."""

    def __init__(self, owner: list[RawUpstream]) -> None:
        self.received = b""
        owner.append(self)
        self.gone = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.gone = True


class StreamingTests(TestCase):
    timeout = 20

    async def raw_upstream(self, h: Harness) -> list[RawUpstream]:
        connections: list[RawUpstream] = []
        port = await listen_for(self, Factory.forProtocol(lambda: RawUpstream(connections)))
        self.raw_port = port.getHost().port
        return connections

    def test_request_body_streams_to_the_upstream(self) -> Any:
        async def go() -> None:
            h = Harness(self)
            upstreams = await self.raw_upstream(h)
            await h.start("--upstream", f"http://127.0.0.1:{self.raw_port}")
            await h.agent("waf", events=(1, 2), chunk_size=1000, decide=lambda a, t, b: answer(needs_more=True))
            client = await h.raw(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 20000\r\n\r\n" + b"a" * 5000)
            # Inspected chunks reach the upstream before the client has sent everything.
            await wait_until(
                lambda: bool(upstreams) and upstreams[0].received.count(b"a") >= 4000,
                what="the first chunks upstream",
            )
            self.assertNotIn(b"b", upstreams[0].received)
            client.transport.write(b"b" * 15000)
            await wait_until(
                lambda: upstreams[0].received.endswith(b"0\r\n\r\n"), what="the rest"
            )
            self.assertEqual(upstreams[0].received.count(b"b"), 15000)
            self.assertIn(b"Transfer-Encoding: chunked", upstreams[0].received)
            (upstream,) = upstreams
            upstream.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await wait_until(lambda: client.received.endswith(b"\r\n\r\nok"), what="the response")
            self.assertTrue(client.received.startswith(b"HTTP/1.1 200 OK\r\n"))

        return ensureDeferred(go())

    def test_uninspected_request_body_streams_with_its_length(self) -> Any:
        async def go() -> None:
            h = Harness(self)
            upstreams = await self.raw_upstream(h)
            await h.start("--upstream", f"http://127.0.0.1:{self.raw_port}")
            await h.agent("waf", events=(1,))
            client = await h.raw(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 20000\r\n\r\n" + b"a" * 5000)
            await wait_until(
                lambda: bool(upstreams) and upstreams[0].received.endswith(b"a" * 5000),
                what="the first part upstream",
            )
            self.assertIn(b"Content-Length: 20000\r\n", upstreams[0].received)
            client.transport.write(b"b" * 15000)
            await wait_until(lambda: upstreams[0].received.endswith(b"b" * 15000), what="the rest")
            upstreams[0].transport.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            await wait_until(lambda: client.received.endswith(b"\r\n\r\n"), what="the response")
            self.assertTrue(client.received.startswith(b"HTTP/1.1 204 No Content\r\n"))

        return ensureDeferred(go())

    def test_response_body_streams_to_the_client(self) -> Any:
        async def go() -> None:
            h = Harness(self)
            upstreams = await self.raw_upstream(h)
            await h.start("--upstream", f"http://127.0.0.1:{self.raw_port}")
            await h.agent("waf")
            client = await h.raw(b"GET /down HTTP/1.1\r\nHost: x\r\n\r\n")
            await wait_until(lambda: upstreams and upstreams[0].received.endswith(b"\r\n\r\n"), what="the request")
            upstream = upstreams[0]
            upstream.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfirst")
            # The client has the first half while the upstream still owes the rest.
            await wait_until(lambda: client.received.endswith(b"first"), what="the first half")
            self.assertIn(b"Content-Length: 10\r\n", client.received)
            upstream.transport.write(b"-last")
            await wait_until(lambda: client.received.endswith(b"first-last"), what="the second half")

        return ensureDeferred(go())

    def test_upstream_breaking_mid_response_closes_the_client(self) -> Any:
        async def go() -> None:
            h = Harness(self)
            upstreams = await self.raw_upstream(h)
            await h.start("--upstream", f"http://127.0.0.1:{self.raw_port}")
            await h.agent("waf")
            client = await h.raw(b"GET /down HTTP/1.1\r\nHost: x\r\n\r\n")
            await wait_until(lambda: upstreams and upstreams[0].received.endswith(b"\r\n\r\n"), what="the request")
            upstreams[0].transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfirst")
            await wait_until(lambda: client.received.endswith(b"first"), what="the first half")
            upstreams[0].transport.abortConnection()
            await client.lost
            self.assertTrue(client.received.endswith(b"first"))

        return ensureDeferred(go())


class MutationChunkIndexTests(TestCase):
    """
    A body mutation names the chunk it is for: a replacement or a drop
    meant for another chunk than the one answered is an agent error, never
    applied to bytes the agent did not judge.
    """

    timeout = 20

    def setUp(self) -> None:
        small_chunks(self)

    def test_a_replacement_for_another_request_chunk_fails_the_agent(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()

            def decide(agent: ScriptedAgent, message_type: int, body: dict[str, Any]) -> Any:
                if message_type == REQUEST_BODY_CHUNK:
                    wrong = body["chunk_index"] + 1
                    return answer(needs_more=True, request_body_mutation={"data": b64(b"ZZZZ"), "chunk_index": wrong})
                return answer()

            await h.agent("waf", events=(1, 2), chunk_size=4, decide=decide)
            with captured_log() as events:
                response = await h.post("/echo-body", b"aaaabbbb")
            self.assertEqual(response.code, 503)
            self.assertEqual(h.upstream.requests, [])
            self.assertTrue(
                any("its body mutation is for chunk 1, but it was answering chunk 0" in line for line in warnings(events)),
                warnings(events),
            )

        return ensureDeferred(go())

    def test_a_drop_for_another_response_chunk_fails_the_agent(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()

            def decide(agent: ScriptedAgent, message_type: int, body: dict[str, Any]) -> Any:
                if message_type == RESPONSE_BODY_CHUNK:
                    return answer(needs_more=True, response_body_mutation={"data": "", "chunk_index": 7})
                return answer()

            await h.agent("dlp", events=(1, 4), chunk_size=4096, decide=decide)
            response = await h.get("/bytes?n=10000")
            self.assertEqual(response.code, 503)
            self.assertNotIn(b"x", response.body)

        return ensureDeferred(go())

    def test_a_pass_through_naming_another_chunk_passes(self) -> Any:
        """C{data: null} changes nothing, whatever chunk it names."""

        async def go() -> None:
            h = await Harness(self).start()

            def decide(agent: ScriptedAgent, message_type: int, body: dict[str, Any]) -> Any:
                if message_type == REQUEST_BODY_CHUNK:
                    return answer(needs_more=True, request_body_mutation={"data": None, "chunk_index": 0})
                return answer()

            await h.agent("waf", events=(1, 2), chunk_size=4, decide=decide)
            response = await h.post("/echo-body", b"aaaabbbbcc")
            self.assertEqual((response.code, response.body), (200, b"aaaabbbbcc"))

        return ensureDeferred(go())
