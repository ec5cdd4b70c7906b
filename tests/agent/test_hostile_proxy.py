"""
What a hostile or broken proxy can make an agent hold, spend or log: in
forward mode, whoever can reach the agent's endpoint is a proxy.

Each test drives one connection (or a listener's many) over a
StringTransport with a Clock, as a proxy would, frame by frame.
"""

from __future__ import annotations

import json
import struct
import tracemalloc
from typing import Any

import msgspec
from twisted.internet.address import UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from sentinel_twisted.agent import Agent, AgentSettings, allow
from sentinel_twisted.agent.forward import ForwardAgentFactory
from sentinel_twisted.wire import MAX_MESSAGE_SIZE

from .._proxy_support import captured_log
from ..vectors import by_name, frame_bytes
from ._support import (
    AGENT_RESPONSE,
    CANCEL,
    CONFIGURE,
    HANDSHAKE_REQUEST,
    HANDSHAKE_RESPONSE,
    PING,
    PONG,
    REQUEST_COMPLETE,
    REQUEST_HEADERS,
    Harness,
    RecordingAgent,
    frame,
    headers_event,
)
from .test_forward import Connection, handshake


def cid_of(answer: dict[str, Any]) -> str:
    return answer["audit"]["custom"]["correlation_id"]  # type: ignore[no-any-return]


class Holding(Agent):
    """Answers Configure and RequestComplete events only when told to."""

    def __init__(self) -> None:
        self.waiting: dict[str, Deferred[Any]] = {}

    def on_configure(self, event: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.waiting[event.correlation_id] = d
        return d

    on_request_complete = on_configure


def lists(count: int) -> list[Any]:
    """A configuration of C{count} empty lists: what decodes to the most for its bytes."""
    return [[] for _ in range(count)]


def configure(cid: str, config: Any) -> dict[str, Any]:
    return {"correlation_id": cid, "config": config, "config_version": None}


class EventValuesTests(SynchronousTestCase):
    """
    An event that would decode to more values than C{max_event_values} is
    answered with the error decision without being decoded, and every
    held event counts what decoding made of it.
    """

    def serving(self, agent: Any = None, **settings: Any) -> Harness:
        h = Harness(agent if agent is not None else Holding(), health_interval=0, **settings)
        h.register()
        h.sent()
        return h

    def test_an_event_with_too_many_values_is_refused_undecoded(self) -> None:
        agent = Holding()
        h = self.serving(agent, max_event_values=1000)
        payload = json.dumps(configure("big", lists(2000))).encode()
        with captured_log() as events:
            h.feed(CONFIGURE, payload)
        [answer] = h.answers()
        self.assertEqual(cid_of(answer), "big")
        self.assertEqual(answer["decision"], {"block": {"status": 500, "body": "agent error", "headers": None}})
        self.assertEqual(agent.waiting, {})
        self.assertEqual(h.protocol.stats["oversized_events"], 1)
        [warning] = [formatEvent(e) for e in events if e["log_level"] is LogLevel.warn]
        self.assertIn(f"Proxy sent a Configure event 'big' of {len(payload):,} bytes", warning)
        self.assertIn("that holds more than 1,000 values (the agent's max_event_values)", warning)
        self.assertIn("answering with the error decision without decoding it", warning)
        # The connection serves on, and an event within the bound is decoded.
        h.feed(CONFIGURE, configure("small", lists(400)))
        self.assertEqual(list(agent.waiting), ["small"])
        self.assertFalse(h.transport.disconnecting)

    def test_refusing_it_decodes_nothing(self) -> None:
        """
        Memory in proportion to the frame, not to what its values would
        make (more than 20 times as much), with the default bound.
        """
        h = self.serving()
        payload = msgspec.json.encode(configure("big", lists(1_100_000)))
        data = frame(CONFIGURE, payload)
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        h.protocol.dataReceived(data)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        # The payload cut out of the frame, and the copies a count makes.
        self.assertLess(peak, 5 * len(payload))
        self.assertEqual([cid_of(a) for a in h.answers()], ["big"])

    def test_the_id_of_a_request_headers_is_found_in_its_metadata(self) -> None:
        h = self.serving(max_event_values=1000)
        event = headers_event("in-metadata", headers={f"h{i}": [] for i in range(2000)}, top_level_cid="")
        h.feed(REQUEST_HEADERS, event)
        self.assertEqual([cid_of(a) for a in h.answers()], ["in-metadata"])

    def test_without_an_id_it_is_dropped(self) -> None:
        h = self.serving(max_event_values=1000)
        with captured_log() as events:
            h.feed(CONFIGURE, {"correlation_id": lists(2000)})
        self.assertEqual(h.answers(), [])
        [warning] = [formatEvent(e) for e in events if e["log_level"] is LogLevel.warn]
        self.assertIn("Configure event without a usable correlation id", warning)
        self.assertIn("; dropped", warning)

    def test_commas_inside_strings_are_not_values(self) -> None:
        """A text full of commas is counted again without them before it is refused."""
        agent = Holding()
        h = self.serving(agent, max_event_values=1000)
        h.feed(CONFIGURE, configure("csv", "a," * 5000))
        self.assertEqual(list(agent.waiting), ["csv"])
        self.assertEqual(h.answers(), [])

    def test_the_warnings_are_rate_limited(self) -> None:
        h = self.serving(max_event_values=100)
        with captured_log() as events:
            for n in range(50):
                h.feed(CONFIGURE, configure(f"c{n}", lists(200)))
        self.assertEqual(len(h.answers()), 50)
        warnings = [e for e in events if e["log_level"] is LogLevel.warn]
        self.assertEqual(len(warnings), h.protocol.log_limiter.burst)

    def test_held_events_count_their_decoded_values(self) -> None:
        """
        Ten thousand values in 30 KB of JSON decode to more than 600 KB:
        two such events go past a limit of 1 MB, which their payloads alone
        would not.
        """
        agent = Holding()
        h = self.serving(agent, max_held_event_bytes=1_000_000)
        for cid in ("a", "b"):
            h.feed(CONFIGURE, configure(cid, lists(5000)))
        self.assertEqual(list(agent.waiting), ["a"])
        [answer] = h.answers()
        self.assertEqual(cid_of(answer), "b")
        self.assertEqual(answer["decision"]["block"], {"status": 503, "body": "agent overloaded", "headers": None})
        agent.waiting.pop("a").callback(allow())
        self.assertEqual(h.protocol._held_bytes, 0)
        # An event of 4 KiB or less is counted by its bytes alone.
        small = configure("small", lists(1000))
        h.feed(CONFIGURE, small)
        self.assertEqual(h.protocol._held_bytes, len(json.dumps(small).encode()))

    def test_the_bound_must_be_positive(self) -> None:
        self.assertRaises(ValueError, AgentSettings, agent=Agent(), agent_id="a", max_event_values=0)


class MessagePackEventValuesTests(SynchronousTestCase):
    """The same bound in MessagePack, where an empty list is one byte."""

    def serving(self, agent: Any = None, **settings: Any) -> Connection:
        c = Connection(agent if agent is not None else Holding(), settings=settings)
        c.shake(frame_bytes(by_name("fwd_handshake_request_msgpack")))
        c.sent()
        return c

    def test_an_event_with_too_many_values_is_refused_undecoded(self) -> None:
        agent = Holding()
        c = self.serving(agent, max_event_values=1000)
        c.feed(frame(CONFIGURE, msgspec.msgpack.encode(configure("big", lists(5000)))))
        [(kind, body)] = c.sent()
        self.assertEqual(kind, AGENT_RESPONSE)
        answer = msgspec.msgpack.decode(body)
        self.assertEqual(answer[1], {"block": [500, "agent error", None]})
        self.assertEqual(answer[5][4], {"correlation_id": "big"})
        self.assertEqual(agent.waiting, {})
        c.feed(frame(CONFIGURE, msgspec.msgpack.encode(configure("small", lists(900)))))
        self.assertEqual(list(agent.waiting), ["small"])

    def test_the_id_in_positional_metadata_is_found(self) -> None:
        c = self.serving(max_event_values=1000)
        event = msgspec.msgpack.decode(frame_bytes(by_name("fwd_evt_request_headers_msgpack"))[5:])
        event["correlation_id"] = ""
        event["headers"] = {f"h{i}": [] for i in range(2000)}
        c.feed(frame(REQUEST_HEADERS, msgspec.msgpack.encode(event)))
        [(kind, body)] = c.sent()
        self.assertEqual(msgspec.msgpack.decode(body)[5][4], {"correlation_id": "req-7f3a"})

    def test_refusing_it_decodes_nothing(self) -> None:
        c = self.serving(max_event_values=10_000)
        payload = msgspec.msgpack.encode(configure("big", lists(500_000)))
        data = frame(CONFIGURE, payload)
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        c.feed(data)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        # The payload cut out of the frame; half a million lists would be
        # some 60 times as much.
        self.assertLess(peak, 2 * len(payload))
        self.assertEqual(len(c.sent()), 1)

    def test_held_events_count_their_decoded_values(self) -> None:
        agent = Holding()
        c = self.serving(agent, max_held_event_bytes=1_000_000)
        for cid in ("a", "b"):
            c.feed(frame(CONFIGURE, msgspec.msgpack.encode(configure(cid, lists(10_000)))))
        self.assertEqual(list(agent.waiting), ["a"])
        [(kind, body)] = c.sent()
        self.assertEqual(msgspec.msgpack.decode(body)[1], {"block": [503, "agent overloaded", None]})


class HandlerFailureLogTests(SynchronousTestCase):
    """
    The proxy chooses the events a handler fails on: their log lines (and
    tracebacks) are a few per period, and the exception's text, which may
    quote the event, is cut short and escaped.
    """

    class Quoting(Agent):
        def on_request_headers(self, event: Any) -> Any:
            raise ValueError(f"no route for {event.uri}")

    def test_failures_are_rate_limited_and_every_event_answered(self) -> None:
        h = Harness(self.Quoting(), health_interval=0)
        h.register()
        h.sent()
        with captured_log() as events:
            for n in range(50):
                h.feed(REQUEST_HEADERS, headers_event(f"r{n}"))
        self.assertEqual(len(h.answers()), 50)
        failures = [e for e in events if e["log_level"] is LogLevel.critical]
        self.assertEqual(len(failures), h.protocol.log_limiter.burst)
        self.assertEqual(h.protocol.stats["handler_errors"], 50)
        self.flushLoggedErrors(ValueError)

    def test_the_exception_text_is_cut_and_escaped_in_the_line_and_traceback(self) -> None:
        kept: list[Any] = []

        class Keeping(Agent):
            """Fails with a Deferred, and keeps its failure."""

            def on_request_headers(self, event: Any) -> Any:
                d: Deferred[Any] = Deferred()
                d.addErrback(lambda f: kept.append(f) or f)
                d.errback(ValueError(f"no route for {event.uri}"))
                return d

        h = Harness(Keeping(), health_interval=0)
        h.register()
        h.sent()
        uri = "/\x1b[2J\u2028" + "A" * 100_000
        with captured_log() as events:
            h.feed(REQUEST_HEADERS, headers_event("r", uri=uri))
        [event] = [e for e in events if e["log_level"] is LogLevel.critical]
        line = formatEvent(event)
        traceback = event["log_failure"].getTraceback()
        for text in (line, traceback):
            self.assertNotIn("\x1b", text)
            self.assertNotIn("\u2028", text)
            self.assertIn("\\x1b[2J\\u2028AAAA", text)
            self.assertIn("characters, cut...]", text)
            self.assertLess(len(text), 5000)
        self.assertIn("builtins.ValueError: no route for /\\x1b", traceback)
        self.assertIn("Agent handler on_request_headers failed for 'r': ValueError: no route for", line)
        # The handler's own failure is left as it was.
        [failure] = kept
        self.assertEqual(failure.getErrorMessage(), f"no route for {uri}")
        self.assertEqual(len(h.answers()), 1)
        self.flushLoggedErrors(ValueError)


class FlowAndCancelLogTests(SynchronousTestCase):
    def test_pausing_and_resuming_lines_are_rate_limited(self) -> None:
        """At a limit of one, every event pauses and resumes the proxy."""
        agent = RecordingAgent()
        h = Harness(agent, max_concurrency=1, health_interval=0)
        h.register()
        h.sent()
        with captured_log() as events:
            for n in range(50):
                h.feed(REQUEST_HEADERS, headers_event(f"r{n}"))
                agent.answer(f"r{n}")
        self.assertEqual(h.protocol.stats["pauses"], 50)
        self.assertEqual(h.protocol.stats["resumes"], 50)
        texts = [formatEvent(e) for e in events]
        burst = h.protocol.log_limiter.burst
        self.assertEqual(sum("pausing" in t for t in texts), burst)
        self.assertEqual(sum("resuming" in t for t in texts), burst)

    def test_cancel_lines_are_rate_limited(self) -> None:
        agent = RecordingAgent()
        h = Harness(agent, health_interval=0)
        h.register()
        h.sent()
        with captured_log() as events:
            for n in range(50):
                h.feed(CANCEL, {"correlation_id": f"gone-{n}", "reason": 0, "timestamp_ms": 1})
                h.feed(REQUEST_HEADERS, headers_event(f"r{n}"))
                h.feed(CANCEL, {"correlation_id": f"r{n}", "reason": 0, "timestamp_ms": 1})
        self.assertEqual(len(agent.cancelled), 50)
        debug = [e for e in events if e["log_level"] is LogLevel.debug]
        self.assertEqual(len(debug), 2 * h.protocol.log_limiter.burst)


class DeepEventTests(SynchronousTestCase):
    """
    An event nested too deeply to be decoded (even skipped) is the proxy's
    invalid event: answered with the error decision under the id it names
    where the proxy writes it, not dropped for want of one, whether it is
    counted (over C{max_event_values}) or not.
    """

    def serving(self, **settings: Any) -> Harness:
        h = Harness(Holding(), health_interval=0, **settings)
        h.register()
        h.sent()
        return h

    def deep(self, depth: int = 5000) -> bytes:
        return b"[" * depth + b"]" * depth

    def test_the_top_level_id_of_a_deep_event_is_answered(self) -> None:
        for settings in ({}, {"max_event_values": 1000}):
            with self.subTest(**settings):
                h = self.serving(**settings)
                # The reference sorts an event's keys: config comes first.
                payload = b'{"config": ' + self.deep() + b', "config_version": null, "correlation_id": "cfg-1"}'
                h.feed(CONFIGURE, payload)
                [answer] = h.answers()
                self.assertEqual(cid_of(answer), "cfg-1")
                self.assertEqual(answer["decision"]["block"]["status"], 500)
                self.assertFalse(h.transport.disconnecting)

    def test_a_request_headers_is_answered_by_its_metadata_id(self) -> None:
        h = self.serving()
        event = json.dumps(headers_event("in-metadata", top_level_cid="top")).encode()
        h.feed(REQUEST_HEADERS, event[:-1] + b', "zz": ' + self.deep() + b"}")
        self.assertEqual([cid_of(a) for a in h.answers()], ["in-metadata"])

    def test_an_id_nested_or_quoted_is_not_taken_for_it(self) -> None:
        h = self.serving()
        for payload in (
            b'{"x": {"correlation_id": "inner"}, "zz": ' + self.deep() + b"}",
            b'{"x": "\\"correlation_id\\": \\"quoted\\"", "zz": ' + self.deep() + b"}",
            b'{"x": "correlation_id", "zz": ' + self.deep() + b"}",
        ):
            with self.subTest(payload=payload[:60]):
                h.feed(CONFIGURE, payload)
                self.assertEqual(h.answers(), [])
        # An escaped id is read as JSON reads it.
        h.feed(CONFIGURE, b'{"correlation_id": "a\\"b\\u00e9", "zz": ' + self.deep() + b"}")
        self.assertEqual([cid_of(a) for a in h.answers()], ['a"b\u00e9'])


class UnanswerableIdTests(SynchronousTestCase):
    def test_an_id_too_long_for_any_answer_is_logged_not_raised(self) -> None:
        """
        The event fits in a frame; no answer naming its id does.  The proxy
        is left to time it out, and the connection serves on.
        """
        h = Harness(health_interval=0)
        h.register()
        h.sent()
        event = {"correlation_id": "", "status": 200, "duration_ms": 1}
        room = MAX_MESSAGE_SIZE - 1 - len(json.dumps(event).encode())
        event["correlation_id"] = "c" * room
        with captured_log() as events:
            h.feed(REQUEST_COMPLETE, event)
        self.assertEqual(h.answers(), [])
        self.assertEqual(h.protocol.stats["unanswerable"], 1)
        [line] = [formatEvent(e) for e in events if e["log_level"] is LogLevel.error]
        self.assertIn("cannot answer 'cccc", line)
        self.assertIn("at all: Message too large", line)
        self.assertIn(f"its correlation id is {room:,} characters long", line)
        self.assertLess(len(line), 1000)
        h.feed(REQUEST_COMPLETE, {"correlation_id": "next", "status": 200, "duration_ms": 1})
        self.assertEqual([cid_of(a) for a in h.answers()], ["next"])
        self.assertFalse(h.transport.disconnecting)


class ForwardConnectionLogTests(SynchronousTestCase):
    """Whoever reaches a listening agent may connect and go in a loop."""

    def connections(self, agent: Any, count: int, then: Any) -> tuple[ForwardAgentFactory, list[Any]]:
        factory = ForwardAgentFactory(AgentSettings(agent=agent, agent_id="a", health_interval=0), Clock())
        with captured_log() as events:
            for _ in range(count):
                protocol = factory.buildProtocol(UNIXAddress(None))
                transport = StringTransport(peerAddress=UNIXAddress(None))
                protocol.makeConnection(transport)
                then(protocol, transport)
        return factory, events

    def test_serving_and_ended_lines_are_rate_limited(self) -> None:
        def handshake_and_leave(protocol: Any, transport: Any) -> None:
            protocol.dataReceived(frame(HANDSHAKE_REQUEST, handshake()))
            transport.disconnecting = True
            protocol.connectionLost(Failure(ConnectionDone()))

        factory, events = self.connections(Agent(), 100, handshake_and_leave)
        texts = [formatEvent(e) or "" for e in events]
        burst = factory.log_limiter.burst
        self.assertEqual(sum("serving proxy" in t for t in texts), burst)
        self.assertEqual(sum(" ended: " in t for t in texts), burst)
        self.assertEqual(factory.connections, set())

    def test_handlers_cut_by_a_protocol_error_are_rate_limited(self) -> None:
        def break_with_a_handler_running(protocol: Any, transport: Any) -> None:
            protocol.dataReceived(frame(HANDSHAKE_REQUEST, handshake()))
            protocol.dataReceived(frame(REQUEST_HEADERS, headers_event("r")))
            protocol.dataReceived(b"\x00\x00\x00\x00")

        factory, events = self.connections(RecordingAgent(), 100, break_with_a_handler_running)
        texts = [formatEvent(e) or "" for e in events]
        self.assertEqual(sum("unfinished handler(s) cancelled" in t for t in texts), factory.log_limiter.burst)

    def test_capabilities_failures_are_rate_limited(self) -> None:
        class Broken(Agent):
            def capabilities(self, agent_id: str) -> Any:
                raise RuntimeError("nope")

        factory, events = self.connections(Broken(), 100, lambda protocol, transport: None)
        failures = [e for e in events if e["log_level"] is LogLevel.critical]
        self.assertEqual(len(failures), factory.log_limiter.burst)
        self.flushLoggedErrors(RuntimeError)


class QueueTests(SynchronousTestCase):
    def test_a_cancelled_queued_event_leaves_without_a_search(self) -> None:
        """
        At a limit of thousands, a proxy that sends and cancels events
        while every slot is busy costs a step each, not a look at every
        event queued before it.
        """
        from sentinel_twisted.agent._serving import _Entry

        compared: list[object] = []

        def equal(entry: object, other: object) -> bool:
            compared.append(other)
            return entry is other

        self.patch(_Entry, "__eq__", equal)
        agent = RecordingAgent()
        h = Harness(agent, max_concurrency=1000, max_queued=1000, health_interval=0)
        h.register()
        h.sent()
        for n in range(1999):
            h.feed(REQUEST_HEADERS, headers_event(f"r{n}"))
        for n in range(50):
            h.feed(REQUEST_HEADERS, headers_event(f"x{n}"))
            h.feed(CANCEL, {"correlation_id": f"x{n}", "reason": 0, "timestamp_ms": 1})
        self.assertEqual(agent.cancelled, [])
        self.assertEqual(h.protocol.queued, 999)
        self.assertEqual(len(compared), 0)
        # The queue is still first come, first served.
        agent.answer("r0")
        self.assertIn("r1000", agent.waiting)
        self.assertEqual(h.protocol.queued, 998)


class PingTests(SynchronousTestCase):
    def test_a_ping_is_answered_without_decoding_what_it_holds(self) -> None:
        """A Ping of 64 KiB of empty lists is checked to be an object, not decoded into 20,000 lists."""
        h = Harness(health_interval=0)
        h.register()
        h.sent()
        payload = b'{"sequence":1,"timestamp_ms":2,"pad":[' + b"[]," * 21_000 + b"[]]}"
        data = frame(PING, payload)
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        h.protocol.dataReceived(data)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        self.assertLess(peak, 4 * len(payload))
        self.assertEqual(h.sent(), [(PONG, json.loads(payload))])


class RegistrationAnswerTests(SynchronousTestCase):
    def test_an_answer_over_64_kib_ends_the_connection_unbuffered(self) -> None:
        """
        A RegistrationResponse is about 150 bytes: one that declares 16 MiB
        is refused as it starts, not held for the registration timeout
        (and its text kept for the connection's life); the limit is lifted
        once registered.
        """
        h = Harness(health_interval=0)
        h.sent()
        h.protocol.dataReceived(struct.pack("!IB", 16 * 1024 * 1024, HANDSHAKE_RESPONSE) + b"{" * 1000)
        self.assertEqual(h.protocol.buffered_bytes, 0)
        self.assertTrue(h.transport.disconnecting)
        [(_, error)] = [e for e in h.events if e[0] == "refused"]
        self.assertIn("Message too large: 16777216 bytes (max: 65536)", str(error))
        served = Harness(health_interval=0)
        served.register()
        served.sent()
        served.feed(REQUEST_COMPLETE, {"correlation_id": "c" * 100_000, "status": 200, "duration_ms": 1})
        self.assertEqual(len(served.answers()), 1)
