"""
What one agent answer may make the gateway do: at most
L{MAX_HEADER_OPS <sentinel_twisted.messages.MAX_HEADER_OPS>} header
operations, and heads no larger than a client's may be; past it the answer
is an agent failure (C{503}, or the agent left out failing open).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers

from sentinel_twisted import messages as m
from sentinel_twisted.gateway.config import GatewayConfig
from sentinel_twisted.gateway.decisions import MAX_HEAD_SIZE, head_size
from sentinel_twisted.gateway.exchange import AgentSlot, Gateway
from sentinel_twisted.gateway.resource import GatewaySite
from sentinel_twisted.gateway.upstream import ForwardRequest, UpstreamResponse

from .._proxy_support import captured_log
from .support import Harness, OneAgentPool, answer


class _Connection:
    """An agent connection that answers every event with C{answer}."""

    is_closed = False

    def __init__(self, answer: m.AgentResponse, *events: m.EventType) -> None:
        self.answer = answer
        self.events = frozenset(events or (m.EventType.REQUEST_HEADERS,))

    def send_event_with(self, event: Any, answered: Any, failed: Any, arg: Any, correlation_id: str) -> None:
        if isinstance(event, m.RequestHeadersEvent):
            answered(self.answer, arg)
        else:
            answered(m.AgentResponse(), arg)

    def cancel_request(self, correlation_id: str, reason: int) -> bool:
        return False


class _Response(UpstreamResponse):
    code = 200
    phrase = b"OK"
    length = 0

    def __init__(self) -> None:
        self.headers = Headers()

    def deliver(self, sink: Any) -> None:
        sink.response_end(None)


class _Upstream:
    """Records the heads of the requests it is sent; answers 200."""

    def __init__(self) -> None:
        self.heads: list[Headers] = []

    def forward(self, request: ForwardRequest) -> Deferred[UpstreamResponse]:
        self.heads.append(request.headers)
        return succeed(_Response())

    def close(self) -> Deferred[None]:
        return succeed(None)

    def describe(self) -> str:
        return "recorder"


class _SecretUpstream(_Upstream):
    """Answers with an C{X-Secret} header."""

    def forward(self, request: ForwardRequest) -> Deferred[UpstreamResponse]:
        self.heads.append(request.headers)
        response = _Response()
        response.headers.setRawHeaders(b"X-Secret", [b"s3cret"])
        return succeed(response)


def exchange(
    agent_answer: m.AgentResponse, head: bytes = b"", upstream: _Upstream | None = None, **config: Any
) -> tuple[bytes, _Upstream]:
    """The client's response to a GET with C{head} when the agent answers C{agent_answer}."""
    reactor = MemoryReactorClock()
    upstream = upstream or _Upstream()
    gateway = Gateway(OneAgentPool(_Connection(agent_answer), "waf"), GatewayConfig(**config), upstream, clock=reactor)  # type: ignore[arg-type]
    channel = GatewaySite(gateway, reactor=reactor).buildProtocol(None)
    assert channel is not None
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n")
    return transport.value(), upstream


def adds(count: int, value: str = "v", name: str = "x-agent") -> list[m.HeaderOp]:
    return [m.AddHeader(name, value) for _ in range(count)]


class RequestHeadTests(SynchronousTestCase):
    def test_operations_within_the_limit_go_upstream(self) -> None:
        response, upstream = exchange(m.AgentResponse(request_headers=adds(100, "v" * 100)))
        self.assertTrue(response.startswith(b"HTTP/1.1 200 "), response[:40])
        [head] = upstream.heads
        self.assertEqual(len(head.getRawHeaders("x-agent") or []), 100)

    def test_a_head_over_16_kib_is_an_agent_failure(self) -> None:
        big = m.AgentResponse(request_headers=[m.SetHeader(f"x-{i}", "v" * 1000) for i in range(17)])
        with captured_log() as events:
            response, upstream = exchange(big)
        self.assertTrue(response.startswith(b"HTTP/1.1 503 "), response[:40])
        self.assertEqual(upstream.heads, [])
        text = " ".join(formatEvent(e) or "" for e in events)
        self.assertIn("invalid_answer", text)
        self.assertIn(f"(max: {MAX_HEAD_SIZE} bytes, 500 lines)", text)

    def test_a_head_over_500_lines_is_an_agent_failure(self) -> None:
        client = b"".join(b"X-Client-%d: c\r\n" % i for i in range(450))
        response, upstream = exchange(m.AgentResponse(request_headers=adds(60)), client)
        self.assertTrue(response.startswith(b"HTTP/1.1 503 "), response[:40])
        self.assertEqual(upstream.heads, [])

    def test_failing_open_the_request_goes_on_without_the_operations(self) -> None:
        ops = [m.SetHeader("x-kept", "no"), *[m.SetHeader(f"x-{i}", "v" * 1000) for i in range(17)]]
        response, upstream = exchange(m.AgentResponse(request_headers=ops), fail_open=True)
        self.assertTrue(response.startswith(b"HTTP/1.1 200 "), response[:40])
        [head] = upstream.heads
        self.assertFalse(head.hasHeader("x-kept"))
        self.assertLess(head_size(head)[0], 200)


class ResponseOperationTests(SynchronousTestCase):
    def slot(self) -> AgentSlot:
        return AgentSlot("waf", _Connection(m.AgentResponse()))  # type: ignore[arg-type]

    def test_a_set_or_remove_repeated_in_every_answer_is_kept_once(self) -> None:
        slot = self.slot()
        for _ in range(1000):
            self.assertIsNone(slot.add_response_ops([m.SetHeader("X-Scanned", "yes"), m.RemoveHeader("server")]))
        self.assertEqual(
            slot.response_ops, {"x-scanned": [m.SetHeader("X-Scanned", "yes")], "server": [m.RemoveHeader("server")]}
        )

    def test_a_set_or_remove_makes_what_came_before_for_its_name_moot(self) -> None:
        slot = self.slot()
        slot.add_response_ops([m.AddHeader("x-a", "1"), m.AddHeader("X-A", "2"), m.SetHeader("x-b", "1")])
        slot.add_response_ops([m.SetHeader("X-A", "3"), m.AddHeader("x-a", "4"), m.RemoveHeader("x-b")])
        self.assertEqual(
            slot.response_ops, {"x-a": [m.SetHeader("X-A", "3"), m.AddHeader("x-a", "4")], "x-b": [m.RemoveHeader("x-b")]}
        )

    def test_an_unusable_operation_does_not_undo_the_ones_before_it(self) -> None:
        """
        An operation skipped for its value (a control character) leaves
        the header as the operations before it made it: a header removed
        stays removed, one set stays set.
        """
        ops = [
            m.RemoveHeader("X-Secret"), m.SetHeader("x-secret", "a\x00b"),
            m.SetHeader("X-Set", "kept"), m.SetHeader("X-Set", "\x01"),
            # No header name (skipped), though "x-kept" in lower case: the Kelvin sign.
            m.SetHeader("X-Kept", "kept"), m.SetHeader("X-\u212aept", "v"), m.RemoveHeader("X-\u212aept"),
        ]  # fmt: skip
        with captured_log():
            response, _ = exchange(m.AgentResponse(response_headers=ops), upstream=_SecretUpstream())
        self.assertTrue(response.startswith(b"HTTP/1.1 200 "), response[:40])
        self.assertNotIn(b"s3cret", response)
        self.assertIn(b"\r\nX-Set: kept\r\n", response)
        self.assertIn(b"\r\nX-Kept: kept\r\n", response)

    def test_more_than_100_operations_over_several_answers_fail_the_agent(self) -> None:
        slot = self.slot()
        self.assertIsNone(slot.add_response_ops(adds(60)))
        problem = slot.add_response_ops(adds(41))
        self.assertEqual(problem, "its response header operations come to 101 operations of 1010 bytes (max: 100 operations, 16384 bytes)")

    def test_more_than_16_kib_of_header_lines_fail_the_agent(self) -> None:
        slot = self.slot()
        self.assertIsNone(slot.add_response_ops([m.SetHeader("x-a", "v" * 16000)]))
        self.assertIsNotNone(slot.add_response_ops([m.SetHeader("x-b", "v" * 400)]))

    def test_an_answer_with_too_much_for_the_response_is_an_agent_failure(self) -> None:
        ops = [m.SetHeader(f"x-{i}", "v" * 1000) for i in range(17)]
        response, upstream = exchange(m.AgentResponse(response_headers=ops))
        self.assertTrue(response.startswith(b"HTTP/1.1 503 "), response[:40])
        self.assertEqual(upstream.heads, [])

    def test_failing_open_the_response_goes_out_without_the_operations(self) -> None:
        ops = [m.SetHeader("x-kept", "no"), *[m.SetHeader(f"x-{i}", "v" * 1000) for i in range(17)]]
        response, upstream = exchange(m.AgentResponse(response_headers=ops), fail_open=True)
        self.assertTrue(response.startswith(b"HTTP/1.1 200 "), response[:40])
        self.assertNotIn(b"x-kept", response.lower())


class AnswerOverTheWireTests(TestCase):
    timeout = 20

    def test_an_answer_with_101_header_operations_is_answered_503(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            ops = [{"add": {"name": "x-h", "value": "v"}}] * 101
            await h.agent("waf", decide=lambda a, t, b: answer(request_headers=ops))
            response = await h.get("/x")
            self.assertEqual(response.code, 503)
            self.assertEqual(h.upstream.requests, [])

        return ensureDeferred(go())
