"""
L{AgentConnection}: sending events, matching answers, timeouts, cancels,
flow control, health, ping, and connection loss -- every request ends
exactly once.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.logger import formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from sentinel_twisted import messages as m
from sentinel_twisted.errors import (
    ConnectionClosed,
    DuplicateCorrelationId,
    InvalidMessage,
    MessageTooLarge,
    RequestCancelled,
    RequestTimeout,
)
from sentinel_twisted.proxy.connection import AgentConnection
from sentinel_twisted.wire import MAX_MESSAGE_SIZE, MessageType, frame_header

from ._proxy_support import (
    answer_payload,
    capabilities,
    captured_log,
    log_text,
    request_headers,
    response_headers,
)
from .test_pending import Outcomes


class Sink:
    """Stands in for the protocol: records frames and close requests."""

    def __init__(self) -> None:
        self.frames: list[tuple[int, bytes]] = []
        self.close_requests: list[str] = []
        self.aborts: list[bool] = []

    def send_frame(self, message_type: int, payload: bytes) -> None:
        frame_header(message_type, len(payload))  # refuses oversize frames
        self.frames.append((message_type, payload))

    def close_connection(self, detail: str, abort: bool = False) -> None:
        self.close_requests.append(detail)
        self.aborts.append(abort)

    def take(self) -> list[tuple[int, bytes]]:
        frames, self.frames = self.frames, []
        return frames

    def cancels(self) -> list[dict[str, Any]]:
        return [json.loads(p) for t, p in self.take() if t == MessageType.CANCEL]


class Listener:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self._answer_observer: Any = self._connection_answered

    def _connection_flow_changed(self, connection: AgentConnection, paused: bool) -> None:
        self.calls.append(("flow", paused))

    def _connection_health_changed(self, connection: AgentConnection, state: int | None) -> None:
        self.calls.append(("health", state))

    def _connection_metrics(self, connection: AgentConnection, report: dict[str, Any]) -> None:
        self.calls.append(("metrics", report))

    def _connection_config_update(self, connection: AgentConnection, request: dict[str, Any]) -> None:
        self.calls.append(("config", request))

    def _connection_answered(self, connection: AgentConnection, correlation_id: str, seconds: float) -> None:
        self.calls.append(("answered", correlation_id, seconds))

    def _answer_observer_failed(self, observer: Any) -> None:
        self.calls.append(("observer failed", observer))


def all_events(cid: str = "") -> list[m.Event]:
    return [
        request_headers(cid),
        m.RequestBodyChunkEvent(
            correlation_id=cid, data="aGk=", is_last=True, chunk_index=0, bytes_received=2
        ),
        response_headers(cid),
        m.ResponseBodyChunkEvent(
            correlation_id=cid, data="aGk=", is_last=False, chunk_index=1, bytes_sent=2
        ),
        m.RequestCompleteEvent(correlation_id=cid, status=200, duration_ms=12),
        m.WebSocketFrameEvent(
            correlation_id=cid,
            opcode="text",
            data="aGk=",
            client_to_server=True,
            frame_index=0,
            client_ip="203.0.113.7",
        ),
        m.GuardrailInspectEvent(
            correlation_id=cid, inspection_type="prompt_injection", content="ignore all"
        ),
        m.ConfigureEvent(correlation_id=cid, config={"mode": "block"}, config_version="3"),
    ]


SENDERS = [
    "send_request_headers",
    "send_request_body_chunk",
    "send_response_headers",
    "send_response_body_chunk",
    "send_request_complete",
    "send_websocket_frame",
    "send_guardrail_inspect",
    "send_configure",
]


class ConnectionTestCase(TestCase):
    request_timeout = 30.0

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.sink = Sink()
        self.connection = AgentConnection(
            self.sink,
            agent_id="waf-1",
            connection_id="waf-1-abc-1",
            capabilities=capabilities(),
            metadata={"zone": "a"},
            clock=self.clock,
            request_timeout=self.request_timeout,
            connected_since=123.0,
            peer="127.0.0.1:40000",
        )
        self.listener = Listener()
        self.connection.listener = self.listener
        self.outcomes = Outcomes()

    def send(self, cid: str = "req-1", timeout: float | None = None) -> None:
        self.outcomes.watch(
            cid, self.connection.send_request_headers(request_headers(cid), timeout=timeout)
        )

    def receive(self, message_type: int, payload: bytes | dict[str, Any]) -> None:
        if isinstance(payload, dict):
            payload = json.dumps(payload).encode()
        self.connection.frame_received(message_type, payload)

    def answer(self, cid: str | None, **fields: Any) -> None:
        self.receive(MessageType.AGENT_RESPONSE, answer_payload(cid, **fields))


class SendingTests(ConnectionTestCase):
    def test_request_headers_frame_carries_the_id_twice(self) -> None:
        self.send("req-7")
        [(kind, payload)] = self.sink.take()
        self.assertEqual(kind, MessageType.REQUEST_HEADERS)
        doc = json.loads(payload)
        self.assertEqual(doc["correlation_id"], "req-7")
        self.assertEqual(doc["metadata"]["correlation_id"], "req-7")

    def test_every_event_type_is_sent_with_its_type_byte_and_id(self) -> None:
        for i, (sender, event) in enumerate(zip(SENDERS, all_events(), strict=True)):
            cid = f"c{i}"
            self.outcomes.watch(cid, getattr(self.connection, sender)(event, cid))
            [(kind, payload)] = self.sink.take()
            self.assertEqual(kind, event.message_type, sender)
            self.assertEqual(json.loads(payload)["correlation_id"], cid, sender)
        self.assertEqual(self.connection.in_flight, 8)

    def test_event_own_id_is_used_when_none_is_given(self) -> None:
        self.connection.send_response_headers(response_headers("own-id"))
        [(_, payload)] = self.sink.take()
        self.assertEqual(json.loads(payload)["correlation_id"], "own-id")
        self.assertEqual(self.connection.pending_ids(), ["own-id"])

    def test_a_fresh_id_is_made_when_the_event_has_none(self) -> None:
        for _ in range(50):
            self.connection.send_response_headers(response_headers(""))
        ids = [json.loads(p)["correlation_id"] for _, p in self.sink.take()]
        self.assertEqual(len(set(ids)), 50)
        self.assertTrue(all(ids))
        self.assertEqual(sorted(self.connection.pending_ids()), sorted(ids))

    def test_argument_id_wins_over_the_event_one(self) -> None:
        self.connection.send_response_headers(response_headers("struct-cid"), "arg-cid")
        [(_, payload)] = self.sink.take()
        self.assertEqual(json.loads(payload)["correlation_id"], "arg-cid")
        self.assertEqual(self.connection.pending_ids(), ["arg-cid"])

    def test_in_flight_counts_waiting_requests(self) -> None:
        self.send("a")
        self.send("b")
        self.assertEqual(self.connection.in_flight, 2)

    def test_duplicate_correlation_id_is_refused(self) -> None:
        self.send("dup")
        self.sink.take()
        deferred = self.connection.send_request_headers(request_headers("dup"))
        failure = self.failureResultOf(deferred, DuplicateCorrelationId)
        self.assertIn("'dup' is already in flight", str(failure.value))
        self.assertEqual(self.sink.take(), [])
        self.assertEqual(self.connection.in_flight, 1)
        self.assertEqual(self.outcomes.waiting(), ["dup"])

    def test_oversize_event_fails_without_leaving_a_pending_entry(self) -> None:
        event = m.ConfigureEvent(config="x" * MAX_MESSAGE_SIZE)
        failure = self.failureResultOf(self.connection.send_configure(event, "big"), MessageTooLarge)
        self.assertIn("Message too large", str(failure.value))
        self.assertEqual(self.connection.in_flight, 0)
        self.assertEqual(self.sink.take(), [])


class AnswerTests(ConnectionTestCase):
    def test_answer_fires_the_deferred_with_a_typed_response(self) -> None:
        self.send("a")
        self.answer("a", decision=m.Block(403, "no"))
        response = self.outcomes.value("a")
        self.assertIsInstance(response, m.AgentResponse)
        self.assertEqual(response.decision, m.Block(403, "no"))
        self.assertEqual(response.correlation_id, "a")
        self.assertEqual(self.connection.in_flight, 0)

    def test_answers_in_any_order_reach_their_requests(self) -> None:
        for cid in ("a", "b", "c"):
            self.send(cid)
        self.answer("c", decision=m.Redirect("/c"))
        self.answer("a", decision=m.Redirect("/a"))
        self.answer("b", decision=m.Redirect("/b"))
        for cid in ("a", "b", "c"):
            self.assertEqual(self.outcomes.value(cid).decision, m.Redirect(f"/{cid}"))

    def test_answer_for_unknown_id_is_dropped(self) -> None:
        self.send("a")
        with captured_log() as events:
            self.answer("nobody")
        self.assertEqual(self.outcomes.waiting(), ["a"])
        self.assertEqual(self.connection.in_flight, 1)
        self.assertEqual([e["log_level"].name for e in events], ["debug"])

    def test_a_flood_of_answers_for_unknown_ids_logs_a_few_lines_and_a_count(self) -> None:
        # 20,000 of them wrote 3 MB of log, one line each.
        payload = answer_payload("nobody")
        with captured_log() as events:
            for _ in range(20_000):
                self.receive(MessageType.AGENT_RESPONSE, payload)
            self.clock.advance(10)
        lines = [formatEvent(e) or "" for e in events]
        self.assertLessEqual(len(lines), 10)
        self.assertIn("more like it in the last 10 s", lines[-1])
        self.assertIn("19,99", lines[-1])

    def test_repeated_invalid_control_messages_are_rate_limited(self) -> None:
        with captured_log() as events:
            for _ in range(1000):
                self.receive(MessageType.HEALTH_STATUS, b'{"state": "ok"}')
        self.assertLessEqual(len(events), 10)

    def test_answer_without_correlation_id_is_dropped(self) -> None:
        self.send("a")
        self.answer(None)
        self.assertEqual(self.outcomes.waiting(), ["a"])

    def test_second_answer_for_the_same_id_is_dropped(self) -> None:
        self.send("a")
        self.answer("a", decision=m.ALLOW)
        self.answer("a", decision=m.Block(403))
        self.assertTrue(self.outcomes.value("a").is_allow)

    def test_invalid_answer_naming_a_pending_id_fails_it_at_once(self) -> None:
        self.send("a")
        self.send("b")
        self.receive(
            MessageType.AGENT_RESPONSE,
            {"decision": "allow", "audit": {"custom": {"correlation_id": "a"}}},
        )
        error = self.outcomes.error("a")
        self.assertIsInstance(error, InvalidMessage)
        self.assertIn("missing required field `version`", str(error))
        self.assertEqual(self.outcomes.waiting(), ["b"])
        self.assertEqual(self.connection.in_flight, 1)

    def test_an_answer_of_too_many_values_fails_its_request_at_once(self) -> None:
        # Refused before it is decoded, its id still found (without decoding
        # the rest), and the connection stays.
        self.send("a")
        self.send("b")
        junk = [[] for _ in range(m.MAX_ANSWER_VALUES)]
        self.receive(
            MessageType.AGENT_RESPONSE,
            {"version": 2, "decision": "allow", "audit": {"custom": {"junk": junk, "correlation_id": "a"}}},
        )
        error = self.outcomes.error("a")
        self.assertIsInstance(error, InvalidMessage)
        self.assertIn("holds more than 100,000 values", str(error))
        self.assertEqual(self.outcomes.waiting(), ["b"])
        self.assertEqual(self.connection.in_flight, 1)

    def test_invalid_answer_naming_nobody_is_logged_and_ignored(self) -> None:
        self.send("a")
        with captured_log() as events:
            self.receive(MessageType.AGENT_RESPONSE, b"not json")
        self.assertEqual(self.outcomes.waiting(), ["a"])
        [event] = events
        self.assertEqual(event["log_level"].name, "warn")
        self.assertIn("invalid AgentResponse", event["log_format"])

    def test_listener_hears_the_round_trip_time(self) -> None:
        self.send("a")
        self.clock.advance(0.25)
        self.answer("a")
        self.assertIn(("answered", "a", 0.25), self.listener.calls)

    def test_a_listener_that_observes_no_answers_is_not_told_of_them(self) -> None:
        self.listener._answer_observer = None
        self.send("a")
        self.answer("a")
        self.assertTrue(self.outcomes.value("a").is_allow)
        self.assertEqual(self.listener.calls, [])


class TimeoutTests(ConnectionTestCase):
    request_timeout = 7.0

    def test_default_timeout_is_the_connection_one(self) -> None:
        self.send("a")
        self.clock.advance(6.9)
        self.assertEqual(self.outcomes.waiting(), ["a"])
        self.clock.advance(0.1)
        error = self.outcomes.error("a")
        self.assertIsInstance(error, RequestTimeout)
        self.assertEqual(str(error), "Timeout after 7s")

    def test_per_call_timeout(self) -> None:
        self.send("a", timeout=0.5)
        self.clock.advance(0.5)
        self.assertEqual(str(self.outcomes.error("a")), "Timeout after 500ms")

    def test_timeout_sends_cancel_with_reason_timeout(self) -> None:
        self.send("a", timeout=1)
        self.sink.take()
        self.clock.advance(1)
        [cancel] = self.sink.cancels()
        self.assertEqual(cancel["correlation_id"], "a")
        self.assertEqual(cancel["reason"], m.CancelReason.TIMEOUT)
        self.assertEqual(cancel["timestamp_ms"], int(self.clock.seconds() * 1000))

    def test_an_unanswered_request_complete_is_not_cancelled(self) -> None:
        # RequestComplete tells the agent the request is over: a Cancel
        # after it would name a request the agent was told had ended.  Its
        # caller still learns that no answer came.
        failures: list[Failure] = []
        self.connection.send_event_with(
            m.RequestCompleteEvent(correlation_id="a", status=200, duration_ms=1),
            lambda answer, arg: None,
            lambda failure, arg: failures.append(failure),
            correlation_id="a",
            timeout=1,
        )
        self.sink.take()
        self.clock.advance(1)
        self.assertEqual(self.sink.cancels(), [])
        (failure,) = failures
        self.assertIsInstance(failure.value, RequestTimeout)
        self.assertEqual(self.connection.pending_ids(), [])
        self.assertEqual(self.connection.timeouts, 0)

    def test_timeout_cancel_precedes_what_the_caller_sends_next_under_the_id(self) -> None:
        # A caller that ends its request on the timeout and says so under the
        # same id (the gateway's RequestComplete): the agent must get the
        # Cancel first, or it would cancel the RequestComplete instead.
        def complete(failure: Any, arg: Any) -> None:
            self.connection.send_event_with(
                m.RequestCompleteEvent(correlation_id="a", status=503, duration_ms=1000),
                lambda answer, arg: None,
                lambda failure, arg: None,
                correlation_id="a",
            )

        self.connection.send_event_with(request_headers("a"), lambda answer, arg: None, complete, timeout=1)
        self.sink.take()
        self.clock.advance(1)
        kinds = [kind for kind, _ in self.sink.take()]
        self.assertEqual(kinds, [MessageType.CANCEL, MessageType.REQUEST_COMPLETE])
        self.assertEqual(self.connection.pending_ids(), ["a"])

    def test_timeout_returns_in_flight_to_zero(self) -> None:
        self.send("a", timeout=1)
        self.send("b", timeout=2)
        self.clock.advance(2)
        self.assertEqual(self.connection.in_flight, 0)
        self.assertEqual(self.connection.pending_ids(), [])

    def test_late_answer_after_timeout_is_dropped(self) -> None:
        self.send("a", timeout=1)
        self.clock.advance(1)
        self.answer("a")
        self.assertIsInstance(self.outcomes.error("a"), RequestTimeout)

    def test_mixed_timeouts_expire_in_deadline_order(self) -> None:
        self.send("slow", timeout=10)
        self.send("default")
        self.send("fast", timeout=2)
        self.sink.take()
        self.clock.advance(2)
        self.assertEqual(sorted(self.outcomes.waiting()), ["default", "slow"])
        self.clock.advance(5)
        self.assertEqual(self.outcomes.waiting(), ["slow"])
        self.clock.advance(3)
        self.assertEqual(self.outcomes.waiting(), [])
        self.assertEqual([c["correlation_id"] for c in self.sink.cancels()], ["fast", "default", "slow"])


class CancelTests(ConnectionTestCase):
    def test_cancel_request_sends_cancel_and_fails_the_caller(self) -> None:
        self.send("a")
        self.sink.take()
        self.assertTrue(self.connection.cancel_request("a", m.CancelReason.CLIENT_DISCONNECT))
        [cancel] = self.sink.cancels()
        self.assertEqual((cancel["correlation_id"], cancel["reason"]), ("a", 0))
        error = self.outcomes.error("a")
        self.assertIsInstance(error, RequestCancelled)
        self.assertIsInstance(error, CancelledError)
        self.assertEqual(str(error), "Request cancelled: 'a' (client_disconnect)")
        self.assertEqual(self.connection.in_flight, 0)

    def test_cancel_request_default_reason_is_manual(self) -> None:
        self.send("a")
        self.sink.take()
        self.connection.cancel_request("a")
        self.assertEqual(self.sink.cancels()[0]["reason"], m.CancelReason.MANUAL)

    def test_cancel_of_unknown_request_is_false_and_sends_nothing(self) -> None:
        self.assertFalse(self.connection.cancel_request("nobody"))
        self.assertEqual(self.sink.take(), [])

    def test_answer_after_cancel_is_dropped(self) -> None:
        self.send("a")
        self.connection.cancel_request("a")
        self.answer("a")
        self.assertIsInstance(self.outcomes.error("a"), RequestCancelled)

    def test_cancel_all_cancels_every_request_and_counts_them(self) -> None:
        for cid in ("a", "b", "c"):
            self.send(cid)
        self.sink.take()
        count = self.connection.cancel_all(m.CancelReason.PROXY_SHUTDOWN)
        self.assertEqual(count, 3)
        cancels = self.sink.cancels()
        self.assertEqual([c["correlation_id"] for c in cancels], ["a", "b", "c"])
        self.assertEqual({c["reason"] for c in cancels}, {4})
        for cid in ("a", "b", "c"):
            self.assertIsInstance(self.outcomes.error(cid), RequestCancelled)
            self.assertEqual(self.outcomes.error(cid).reason, 4)  # type: ignore[attr-defined]
        self.assertEqual(self.connection.in_flight, 0)

    def test_cancel_all_of_nothing_is_zero(self) -> None:
        self.assertEqual(self.connection.cancel_all(), 0)
        self.assertEqual(self.sink.take(), [])

    def test_cancelling_the_deferred_cancels_the_request(self) -> None:
        deferred = self.connection.send_request_headers(request_headers("a"))
        self.sink.take()
        deferred.cancel()
        self.failureResultOf(deferred, CancelledError)
        [cancel] = self.sink.cancels()
        self.assertEqual(cancel["correlation_id"], "a")
        self.assertEqual(cancel["reason"], m.CancelReason.MANUAL)
        self.assertEqual(self.connection.in_flight, 0)

    def test_cancelled_request_does_not_time_out_later(self) -> None:
        self.send("a", timeout=1)
        self.connection.cancel_request("a")
        self.sink.take()
        self.clock.advance(5)
        self.assertEqual(self.sink.take(), [])


class LossTests(ConnectionTestCase):
    def test_connection_loss_fails_every_request_at_once(self) -> None:
        for cid in ("a", "b"):
            self.send(cid)
        self.send("c", timeout=1)
        failed = self.connection.connection_lost("connection closed by agent")
        self.assertEqual(failed, 3)
        for cid in ("a", "b", "c"):
            error = self.outcomes.error(cid)
            self.assertIsInstance(error, ConnectionClosed)
            self.assertEqual(str(error), "Connection closed")
            self.assertEqual(error.detail, "connection closed by agent")  # type: ignore[attr-defined]
        self.assertEqual(self.connection.in_flight, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_cancel_frames_are_sent_after_loss(self) -> None:
        self.send("a")
        self.sink.take()
        self.connection.connection_lost("gone")
        self.assertFalse(self.connection.cancel_request("a"))
        self.assertEqual(self.sink.take(), [])

    def test_sending_after_loss_fails_at_once(self) -> None:
        self.connection.connection_lost("gone")
        failure = self.failureResultOf(
            self.connection.send_request_headers(request_headers("x")), ConnectionClosed
        )
        self.assertEqual(failure.value.detail, "gone")
        self.assertEqual(self.sink.take(), [])
        self.assertTrue(self.connection.is_closed)
        self.assertFalse(self.connection.can_accept_requests)

    def test_sending_while_closing_fails_at_once(self) -> None:
        self.connection.mark_closing("closing")
        self.failureResultOf(self.connection.send_request_headers(request_headers("x")), ConnectionClosed)
        self.assertEqual(self.sink.take(), [])

    def test_close_asks_the_protocol_and_fires_when_the_connection_is_gone(self) -> None:
        self.send("a")
        deferred = self.connection.close("maintenance")
        self.assertEqual(self.sink.close_requests, ["maintenance"])
        self.assertNoResult(deferred)
        self.connection.connection_lost("maintenance")
        self.assertIsNone(self.successResultOf(deferred))
        self.assertIsInstance(self.outcomes.error("a"), ConnectionClosed)

    def test_close_after_loss_fires_at_once(self) -> None:
        self.connection.connection_lost("gone")
        self.assertIsNone(self.successResultOf(self.connection.close()))
        self.assertEqual(self.sink.close_requests, [])

    def test_ping_waiter_fails_on_loss(self) -> None:
        deferred = self.connection.ping()
        self.connection.connection_lost("gone")
        self.failureResultOf(deferred, ConnectionClosed)


class WithoutDeferredTests(ConnectionTestCase):
    """
    send_event_with: the same outcomes as send_event, handed to two plain
    callables (the gateway's path), each request ending exactly once.
    """

    def send_with(self, cid: str, timeout: float | None = None) -> list[tuple[str, Any, Any]]:
        calls: list[tuple[str, Any, Any]] = []
        self.connection.send_event_with(
            request_headers(cid),
            lambda answer, arg: calls.append(("answered", answer, arg)),
            lambda failure, arg: calls.append(("failed", failure.value, arg)),
            cid + "-arg",
            timeout=timeout,
        )
        return calls

    def test_the_answer_reaches_the_callable_with_its_argument(self) -> None:
        calls = self.send_with("a")
        [(kind, payload)] = self.sink.take()
        self.assertEqual(kind, MessageType.REQUEST_HEADERS)
        self.assertEqual(json.loads(payload)["correlation_id"], "a")
        self.assertEqual(calls, [])
        self.answer("a", decision=m.Block(403, "no"))
        [(what, answer, arg)] = calls
        self.assertEqual((what, arg), ("answered", "a-arg"))
        self.assertEqual(answer.decision, m.Block(403, "no"))
        self.assertEqual(self.listener.calls, [("answered", "a", 0.0)])
        self.answer("a")
        self.assertEqual(len(calls), 1)
        self.assertEqual(self.connection.in_flight, 0)

    def test_every_failure_reaches_the_other_callable(self) -> None:
        timed = self.send_with("t", timeout=1)
        cancelled = self.send_with("c")
        lost = self.send_with("l")
        self.clock.advance(1)
        self.assertTrue(self.connection.cancel_request("c"))
        self.connection.connection_lost("gone")
        for calls, error, cid in ((timed, RequestTimeout, "t"), (cancelled, RequestCancelled, "c"), (lost, ConnectionClosed, "l")):
            [(what, value, arg)] = calls
            self.assertEqual((what, arg), ("failed", cid + "-arg"))
            self.assertIsInstance(value, error)
        self.assertEqual(self.connection.in_flight, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_failures_at_once_are_handed_over_at_once(self) -> None:
        self.send_with("dup")
        [(_, duplicate, _)] = self.send_with("dup")
        self.assertIsInstance(duplicate, DuplicateCorrelationId)
        calls: list[Any] = []
        self.connection.send_event_with(
            m.ConfigureEvent(config="x" * MAX_MESSAGE_SIZE), calls.append, lambda f, arg: calls.append(f.value)
        )
        [too_large] = calls
        self.assertIsInstance(too_large, MessageTooLarge)
        self.assertEqual(self.connection.in_flight, 1)
        self.connection.connection_lost("gone")
        [(_, closed, _)] = self.send_with("late")
        self.assertIsInstance(closed, ConnectionClosed)

    def test_a_failing_handler_is_logged_and_the_connection_goes_on(self) -> None:
        def broken(answer: Any, arg: Any) -> None:
            raise ZeroDivisionError("handler bug")

        self.connection.send_event_with(request_headers("x"), broken, lambda f, arg: None)
        with captured_log() as events:
            self.answer("x")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertTrue(any("answer handler" in formatEvent(e) for e in events))
        calls = self.send_with("y")
        self.answer("y")
        self.assertEqual(calls[0][0], "answered")

    def test_a_failing_handler_of_a_failure_at_once_is_logged_and_goes_no_further(self) -> None:
        # A failure at once (a duplicate id, a closed connection) is handed
        # over like a later one: the handler's exception never reaches the
        # sender, who may be reading frames or answering a client.
        def broken(failure: Any, arg: Any) -> None:
            raise ZeroDivisionError("handler bug")

        self.send_with("x")
        with captured_log() as events:
            self.connection.send_event_with(request_headers("x"), lambda answer, arg: None, broken)
            self.connection.connection_lost("gone")
            self.connection.send_event_with(request_headers("y"), lambda answer, arg: None, broken)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 2)
        self.assertEqual(sum("failure handler" in formatEvent(e) for e in events), 2)

    def test_a_frame_the_sink_refuses_leaves_nothing_pending(self) -> None:
        # Whatever the sink raises, the request it could not send is not
        # left waiting: it would end a second time when it timed out.
        def refuse(message_type: int, payload: bytes) -> None:
            raise ValueError("refused")

        self.sink.send_frame = refuse  # type: ignore[method-assign]
        calls = self.send_with("r", timeout=1)
        self.assertEqual(self.connection.in_flight, 0)
        self.clock.advance(1)
        [(what, value, _)] = calls
        self.assertEqual(what, "failed")
        self.assertIsInstance(value, ValueError)

    def test_an_event_the_sink_refuses_fails_its_deferred_and_leaves_nothing_pending(self) -> None:
        def refuse(message_type: int, payload: bytes) -> None:
            raise MessageTooLarge(MAX_MESSAGE_SIZE + 1, MAX_MESSAGE_SIZE)

        self.sink.send_frame = refuse  # type: ignore[method-assign]
        d = self.connection.send_event(request_headers("r"), timeout=1)
        self.assertEqual(self.connection.in_flight, 0)
        self.clock.advance(1)
        self.failureResultOf(d, MessageTooLarge)
        self.assertEqual(self.connection.events_sent, 0)


class ControlTests(ConnectionTestCase):
    def test_flow_control_pause_and_resume_integer_form(self) -> None:
        self.receive(MessageType.FLOW_CONTROL, {"action": 1})
        self.assertTrue(self.connection.is_paused)
        self.assertFalse(self.connection.can_accept_requests)
        self.receive(MessageType.FLOW_CONTROL, {"action": 2})
        self.assertFalse(self.connection.is_paused)
        self.assertTrue(self.connection.can_accept_requests)
        self.assertEqual(self.listener.calls, [("flow", True), ("flow", False)])

    def test_flow_control_pause_and_resume_struct_form(self) -> None:
        self.receive(MessageType.FLOW_CONTROL, {"action": {"type": "pause"}, "correlation_id": None})
        self.assertTrue(self.connection.is_paused)
        self.receive(MessageType.FLOW_CONTROL, {"action": {"type": "resume"}})
        self.assertFalse(self.connection.is_paused)

    def test_repeated_pause_notifies_once(self) -> None:
        self.receive(MessageType.FLOW_CONTROL, {"action": 1})
        self.receive(MessageType.FLOW_CONTROL, {"action": 1})
        self.assertEqual(self.listener.calls, [("flow", True)])

    def test_invalid_flow_control_changes_nothing(self) -> None:
        self.receive(MessageType.FLOW_CONTROL, {"action": 1})
        self.receive(MessageType.FLOW_CONTROL, b'{"action": "resume"}')
        self.assertTrue(self.connection.is_paused)

    def test_flow_control_with_an_undefined_action_changes_nothing(self) -> None:
        # Only 1 (pause) and 2 (resume) are defined; 0, 7 or no action
        # resumed a paused connection.
        self.receive(MessageType.FLOW_CONTROL, {"action": 1})
        for body in ({"action": 0}, {"action": 7}, {}, {"action": {"type": "slow"}}):
            self.receive(MessageType.FLOW_CONTROL, body)
            self.assertTrue(self.connection.is_paused, body)
        self.receive(MessageType.FLOW_CONTROL, {"action": 2})
        self.assertFalse(self.connection.is_paused)
        for body in ({"action": 0}, {"action": 7}):
            self.receive(MessageType.FLOW_CONTROL, body)
            self.assertFalse(self.connection.is_paused, body)
        self.assertEqual(self.listener.calls, [("flow", True), ("flow", False)])

    def test_paused_connection_still_sends_when_asked_directly(self) -> None:
        # Pausing is advice to the router (the pool); requests already
        # routed here, and follow-ups of a request, still go out.
        self.receive(MessageType.FLOW_CONTROL, {"action": 1})
        self.send("a")
        self.assertEqual(len(self.sink.take()), 1)

    def test_last_health_state_is_kept(self) -> None:
        self.assertIsNone(self.connection.health_state)
        self.receive(MessageType.HEALTH_STATUS, {"state": 2})
        self.receive(MessageType.HEALTH_STATUS, {"state": 4, "message": "disk"})
        self.assertEqual(self.connection.health_state, m.HealthState.UNHEALTHY)
        assert self.connection.last_health is not None
        self.assertEqual(self.connection.last_health.message, "disk")
        self.assertEqual(self.listener.calls, [("health", 2), ("health", 4)])

    def test_health_struct_form_is_understood(self) -> None:
        self.receive(MessageType.HEALTH_STATUS, {"state": {"status": "draining"}})
        self.assertEqual(self.connection.health_state, m.HealthState.DRAINING)

    def test_invalid_health_keeps_the_last_state(self) -> None:
        self.receive(MessageType.HEALTH_STATUS, {"state": 1})
        self.receive(MessageType.HEALTH_STATUS, b'{"state": "ok"}')
        self.assertEqual(self.connection.health_state, 1)

    def test_ping_is_answered_with_a_pong_of_the_same_sequence_and_timestamp(self) -> None:
        body = b'{"sequence":7,  "timestamp_ms":1767225600000}'
        self.receive(MessageType.PING, body)
        [(kind, payload)] = self.sink.take()
        self.assertEqual(kind, MessageType.PONG)
        self.assertEqual(json.loads(payload), {"sequence": 7, "timestamp_ms": 1767225600000})

    def test_pong_is_the_same_body_whatever_it_holds(self) -> None:
        # SPEC section 4: the same body back, as the reference does (more
        # fields, a sequence of -1, no timestamp).  The control frame limit
        # bounds it, and no Pong is queued for an agent that does not read.
        for body in (
            json.dumps({"sequence": 7, "timestamp_ms": 5, "padding": "x" * 50_000}).encode(),
            b'{"sequence": -1, "timestamp_ms": 1}',
            b'{"sequence": 18446744073709551615}',
        ):
            self.receive(MessageType.PING, body)
            self.assertEqual(self.sink.take(), [(MessageType.PONG, body)])

    def test_no_pong_is_queued_while_the_agent_does_not_read(self) -> None:
        self.connection.set_write_blocked(True)
        for sequence in range(3):
            self.receive(MessageType.PING, {"sequence": sequence, "timestamp_ms": 0})
        self.assertEqual(self.sink.take(), [])
        self.connection.set_write_blocked(False)
        self.receive(MessageType.PING, {"sequence": 3, "timestamp_ms": 0})
        self.assertEqual([json.loads(p)["sequence"] for _, p in self.sink.take()], [3])

    def test_invalid_ping_is_not_answered(self) -> None:
        self.receive(MessageType.PING, b'["sequence", 1]')
        self.assertEqual(self.sink.take(), [])

    def test_ping_sends_sequence_numbers_and_pong_gives_round_trip(self) -> None:
        first = self.connection.ping()
        second = self.connection.ping()
        frames = self.sink.take()
        self.assertEqual([t for t, _ in frames], [MessageType.PING] * 2)
        self.assertEqual([json.loads(p)["sequence"] for _, p in frames], [0, 1])
        self.clock.advance(0.5)
        self.receive(MessageType.PONG, frames[1][1])
        self.assertEqual(self.successResultOf(second), 0.5)
        self.assertNoResult(first)

    def test_a_cancelled_ping_is_forgotten_and_its_late_pong_ignored(self) -> None:
        waiter = self.connection.ping()
        [(_, body)] = self.sink.take()
        waiter.cancel()
        self.failureResultOf(waiter, CancelledError)
        self.assertEqual(self.connection._pings, {})
        self.receive(MessageType.PONG, body)
        self.assertEqual(self.sink.take(), [])

    def test_unexpected_pong_is_ignored(self) -> None:
        self.receive(MessageType.PONG, {"sequence": 99, "timestamp_ms": 0})
        self.assertEqual(self.sink.take(), [])

    def test_metrics_report_reaches_the_listener(self) -> None:
        report = {"agent_id": "waf-1", "counters": [{"name": "n", "value": 1}]}
        self.receive(MessageType.METRICS_REPORT, report)
        self.assertEqual(self.listener.calls, [("metrics", report)])

    def test_config_update_request_reaches_the_listener(self) -> None:
        request = {"request_id": "u1", "update_type": {"type": "request_reload"}}
        self.receive(MessageType.CONFIG_UPDATE_REQUEST, request)
        self.assertEqual(self.listener.calls, [("config", request)])

    def test_invalid_metrics_report_is_not_forwarded(self) -> None:
        self.receive(MessageType.METRICS_REPORT, b"[1, 2]")
        self.receive(MessageType.CONFIG_UPDATE_REQUEST, b"{")
        self.assertEqual(self.listener.calls, [])

    def test_a_report_of_too_many_values_is_refused_before_it_is_decoded(self) -> None:
        # A report or request of 16 MiB of empty lists decoded to hundreds
        # of MiB, handed to the observers (which may keep the last one).
        junk = [[] for _ in range(m.MAX_ANSWER_VALUES)]
        with captured_log() as events:
            self.receive(MessageType.METRICS_REPORT, {"agent_id": "waf-1", "junk": junk})
            self.receive(MessageType.CONFIG_UPDATE_REQUEST, {"request_id": "u1", "junk": junk})
        self.assertEqual(self.listener.calls, [])
        text = log_text(events)
        self.assertIn("invalid MetricsReport on connection", text)
        self.assertIn("Invalid message format: MetricsReport holds more than 100,000 values", text)
        self.assertIn("Invalid message format: ConfigUpdateRequest holds more than 100,000 values", text)
        # Within the bound, as before.
        report = {"agent_id": "waf-1", "values": list(range(m.MAX_ANSWER_VALUES - 10))}
        self.receive(MessageType.METRICS_REPORT, report)
        self.assertEqual(self.listener.calls, [("metrics", report)])

    def test_proxy_only_frames_from_the_agent_are_ignored(self) -> None:
        self.send("a")
        self.sink.take()
        with captured_log() as events:
            for kind in (MessageType.REQUEST_HEADERS, MessageType.CANCEL, MessageType.HANDSHAKE_REQUEST):
                self.receive(kind, b"{}")
        self.assertEqual(self.sink.take(), [])
        self.assertEqual(self.outcomes.waiting(), ["a"])
        self.assertEqual(len(events), 3)

    def test_without_listener_control_messages_still_work(self) -> None:
        self.connection.listener = None
        self.receive(MessageType.FLOW_CONTROL, {"action": 1})
        self.receive(MessageType.HEALTH_STATUS, {"state": 1})
        self.receive(MessageType.METRICS_REPORT, {})
        self.send("a")
        self.answer("a")
        self.assertTrue(self.connection.is_paused)
        self.assertTrue(self.outcomes.value("a").is_allow)

    def test_info_snapshot(self) -> None:
        self.send("a")
        self.receive(MessageType.FLOW_CONTROL, {"action": 1})
        self.receive(MessageType.HEALTH_STATUS, {"state": 3})
        info = self.connection.info()
        self.assertEqual(info.connection_id, "waf-1-abc-1")
        self.assertEqual(info.agent_id, "waf-1")
        self.assertEqual(info.in_flight, 1)
        self.assertTrue(info.paused)
        self.assertEqual(info.health, 3)
        self.assertEqual(info.capabilities, capabilities())
        self.assertEqual(info.metadata, {"zone": "a"})
        self.assertEqual(info.connected_since, 123.0)
        self.assertEqual(info.peer, "127.0.0.1:40000")


class TimeoutArgumentTests(TestCase):
    def test_a_non_positive_timeout_fails_the_deferred_instead_of_raising(self) -> None:
        from ._proxy_support import Proxy, request_headers

        proxy = Proxy()
        connection = proxy.register("waf-1")[2]
        for bad in (0, -1.0, float("nan")):
            failure = self.failureResultOf(connection.send_request_headers(request_headers("r"), timeout=bad))
            failure.trap(ValueError)
            self.assertIn("timeout must be a positive number", str(failure.value))
        self.assertEqual(connection.in_flight, 0)
