"""
The agent's end of one connection (L{AgentProtocol}), driven frame by frame
over a StringTransport with a Clock.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import formatEvent
from twisted.trial.unittest import SynchronousTestCase

from sentinel_twisted.agent import (
    Agent,
    RegistrationFailed,
    RegistrationRejected,
    allow,
    block,
)
from sentinel_twisted.messages import AgentResponse

from .._proxy_support import captured_log
from ._support import (
    AGENT_RESPONSE,
    CANCEL,
    CONFIGURE,
    FLOW_CONTROL,
    GUARDRAIL_INSPECT,
    HANDSHAKE_REQUEST,
    HANDSHAKE_RESPONSE,
    HEALTH_STATUS,
    PING,
    PONG,
    REQUEST_BODY_CHUNK,
    REQUEST_COMPLETE,
    REQUEST_HEADERS,
    RESPONSE_BODY_CHUNK,
    RESPONSE_HEADERS,
    WEBSOCKET_FRAME,
    Harness,
    RecordingAgent,
    body_chunk_event,
    failure_response,
    frame,
    headers_event,
    success_response,
)


def cid_of(answer: dict[str, Any]) -> str:
    return answer["audit"]["custom"]["correlation_id"]  # type: ignore[no-any-return]


class RegistrationTests(SynchronousTestCase):
    def test_sends_registration_request_first(self) -> None:
        h = Harness(auth_token="s3cret", metadata={"zone": "a"})
        frames = h.sent()
        self.assertEqual([t for t, _ in frames], [HANDSHAKE_REQUEST])
        body = frames[0][1]
        self.assertEqual(body["protocol_version"], 2)
        self.assertEqual(body["agent_id"], "waf-1")
        self.assertEqual(body["auth_token"], "s3cret")
        self.assertEqual(body["metadata"], {"zone": "a"})
        self.assertEqual(body["capabilities"]["agent_id"], "waf-1")

    def test_unset_token_and_metadata_are_null(self) -> None:
        body = Harness().sent()[0][1]
        self.assertIn("auth_token", body)
        self.assertIsNone(body["auth_token"])
        self.assertIn("metadata", body)
        self.assertIsNone(body["metadata"])

    def test_success_registers(self) -> None:
        h = Harness()
        h.register(success_response("waf-1-x-7"))
        self.assertEqual(h.events, [("registered", "waf-1-x-7")])
        self.assertTrue(h.protocol.registered)
        self.assertEqual(h.protocol.proxy_id, "test-proxy")

    def test_no_answer_times_out(self) -> None:
        h = Harness(registration_timeout=5)
        h.clock.advance(4.9)
        self.assertEqual(h.events, [])
        h.clock.advance(0.2)
        [(kind, error)] = h.events
        self.assertEqual(kind, "refused")
        self.assertIsInstance(error, RegistrationFailed)
        self.assertTrue(error.retryable)
        self.assertIn("no RegistrationResponse within 5s", str(error))
        self.assertTrue(h.transport.disconnecting)

    def test_answer_cancels_the_timeout(self) -> None:
        h = Harness(registration_timeout=5)
        h.register()
        h.clock.advance(60)
        self.assertEqual([e[0] for e in h.events], ["registered"])
        self.assertFalse(h.transport.disconnecting)

    def test_rejections_are_classified(self) -> None:
        cases = {
            "Protocol version mismatch: expected 2, got 3": False,
            "Invalid message format: Agent ID cannot be empty": False,
            "Invalid message format: Agent 'waf-1' is not in the allowed list": False,
            "Invalid message format: Authentication required but no token provided": False,
            "Authentication failed: invalid token for agent 'waf-1'": False,
            "Connection limit reached: agent 'waf-1' already holds 4 registered "
            "connections (max: 4)": True,
            "Timeout after 10s": True,
            "something new": True,
        }
        for text, retryable in cases.items():
            h = Harness()
            h.register(failure_response(text))
            [(kind, error)] = h.events
            self.assertEqual(kind, "refused")
            self.assertIsInstance(error, RegistrationRejected)
            self.assertEqual(error.reason, text)
            self.assertEqual(error.retryable, retryable, text)
            self.assertIn(text, str(error))
            self.assertTrue(h.transport.disconnecting)

    def test_other_first_frame_is_refused(self) -> None:
        h = Harness()
        h.feed(PING, {"sequence": 0, "timestamp_ms": 1})
        [(kind, error)] = h.events
        self.assertIsInstance(error, RegistrationFailed)
        self.assertIn("got Ping", str(error))
        self.assertTrue(h.transport.disconnecting)

    def test_malformed_answer_is_refused(self) -> None:
        h = Harness()
        h.feed(HANDSHAKE_RESPONSE, {"success": "yes"})
        [(kind, error)] = h.events
        self.assertIsInstance(error, RegistrationFailed)
        self.assertIn("malformed RegistrationResponse", str(error))
        self.assertTrue(error.retryable)

    def test_lost_before_answer(self) -> None:
        h = Harness()
        h.lose()
        [(kind, error)] = h.events
        self.assertEqual(kind, "refused")
        self.assertIn("before the proxy answered", str(error))

    def test_lost_before_answer_is_one_sentence(self) -> None:
        from twisted.internet.error import ConnectionLost

        h = Harness()
        h.lose(ConnectionLost())
        [(kind, error)] = h.events
        # Twisted's text ends in a full stop; it is not left before ours.
        self.assertIn("lost in a non-clean fashion before the proxy answered", str(error))

    def test_garbage_frames_refuse(self) -> None:
        h = Harness()
        h.protocol.dataReceived(b"\x00\x00\x00\x00")
        [(kind, error)] = h.events
        self.assertEqual(kind, "refused")
        self.assertIn("Zero-length", str(error))


    def test_proxy_texts_in_log_lines_are_cut_and_escaped(self) -> None:
        # The proxy chooses its id, version, connection id and rejection
        # text: a log line quotes a bounded, escaped part of each.  (Three
        # of them fit in a RegistrationResponse's 64 KiB.)
        forged = "\u2028[sentinel_twisted#critical] forged \x1b[31m" + "x" * 20_000
        response = success_response("c" + forged)
        response["proxy_id"] = "p" + forged
        response["proxy_version"] = "v" + forged
        with captured_log() as events:
            h = Harness()
            h.register(response)
            h.feed(HEALTH_STATUS, {"state": 1})
            h.feed(REQUEST_HEADERS, {"correlation_id": forged, "metadata": {"correlation_id": forged}})
            h.feed(CANCEL, {"correlation_id": forged, "reason": 0, "timestamp_ms": 1})
            h.lose()
            rejected = Harness()
            rejected.register(failure_response("e" + forged) | {"proxy_id": "p" + forged})
        [(_, error)] = rejected.events
        lines = [formatEvent(e) for e in events] + [str(error)]
        self.assertGreater(len(lines), 2)
        for line in lines:
            self.assertLess(len(line), 1000, line[:100])
            self.assertNotIn("\u2028", line)
            self.assertNotIn("\x1b", line)
        # The reason itself stays whole, for the program that asks.
        self.assertEqual(error.reason, "e" + forged)

    def test_error_texts_quoting_the_proxy_are_cut_and_escaped(self) -> None:
        # A decoding error may quote a value of the event (msgspec's
        # "Invalid enum value '...'"), and a handler's error names the
        # event's correlation id: their log lines are bounded too.
        forged = "\u2028[sentinel_twisted#critical] forged \x1b[31m" + "x" * 100_000

        class Failing(Agent):
            def on_request_headers(self, event: Any) -> Any:
                return None

        guardrail = {
            "categories": [],
            "content": "text",
            "correlation_id": "g-1",
            "inspection_type": forged,
            "metadata": {},
            "model": None,
            "route_id": None,
        }
        with captured_log() as events:
            h = Harness(Failing())
            h.register()
            h.sent()
            h.feed(GUARDRAIL_INSPECT, guardrail)
            h.feed(REQUEST_HEADERS, headers_event("h" + forged))
            h.feed(CANCEL, {"correlation_id": "c", "reason": forged, "timestamp_ms": 1})
            h.feed(PING, forged)
        self.assertEqual(len(h.answers()), 2)
        lines = [formatEvent(e) for e in events]
        self.assertGreaterEqual(len(lines), 4)
        for line in lines:
            self.assertLess(len(line), 1000, line[:100])
            self.assertNotIn("\u2028", line)
            self.assertNotIn("\x1b", line)


class EventTests(SynchronousTestCase):
    def test_request_headers_routed_by_metadata_id(self) -> None:
        h = Harness()
        h.register()
        h.sent()
        h.feed(REQUEST_HEADERS, headers_event("meta-id", top_level_cid="top-id"))
        [answer] = h.answers()
        self.assertEqual(cid_of(answer), "meta-id")

    def test_every_event_type_is_answered_with_its_id(self) -> None:
        seen: list[str] = []

        class All(Agent):
            def on_request_headers(self, event: Any) -> Any:
                seen.append("request_headers")
                return allow()

            def on_request_body_chunk(self, event: Any) -> Any:
                seen.append("request_body_chunk:" + event.body.decode())
                return allow()

            def on_response_headers(self, event: Any) -> Any:
                seen.append("response_headers")
                return allow()

            def on_response_body_chunk(self, event: Any) -> Any:
                seen.append("response_body_chunk")
                return allow()

            def on_request_complete(self, event: Any) -> Any:
                seen.append("request_complete")
                return allow()

            def on_websocket_frame(self, event: Any) -> Any:
                seen.append("websocket_frame")
                return allow().websocket_drop()

            def on_guardrail_inspect(self, event: Any) -> Any:
                seen.append("guardrail_inspect")
                return block(400, "injection")

            def on_configure(self, event: Any) -> Any:
                seen.append("configure")
                return allow()

        h = Harness(All())
        h.register()
        h.sent()
        h.feed(REQUEST_HEADERS, headers_event("c0"))
        h.feed(REQUEST_BODY_CHUNK, body_chunk_event("c1", b"hi"))
        h.feed(RESPONSE_HEADERS, {"correlation_id": "c2", "status": 200, "headers": {}})
        h.feed(
            RESPONSE_BODY_CHUNK,
            {"correlation_id": "c3", "data": "", "is_last": True, "chunk_index": 0, "bytes_sent": 0},
        )
        h.feed(REQUEST_COMPLETE, {"correlation_id": "c4", "status": 200, "duration_ms": 5})
        h.feed(
            WEBSOCKET_FRAME,
            {
                "correlation_id": "c5",
                "opcode": "text",
                "data": "",
                "client_to_server": True,
                "frame_index": 0,
                "client_ip": "1.2.3.4",
            },
        )
        h.feed(
            GUARDRAIL_INSPECT,
            {"correlation_id": "c6", "inspection_type": "prompt_injection", "content": "x"},
        )
        h.feed(CONFIGURE, {"correlation_id": "c7", "config": {"a": 1}})
        answers = h.answers()
        self.assertEqual([cid_of(a) for a in answers], [f"c{i}" for i in range(8)])
        self.assertEqual(
            seen,
            [
                "request_headers",
                "request_body_chunk:hi",
                "response_headers",
                "response_body_chunk",
                "request_complete",
                "websocket_frame",
                "guardrail_inspect",
                "configure",
            ],
        )
        self.assertEqual(answers[5]["websocket_decision"], "drop")
        self.assertEqual(answers[6]["decision"], {"block": {"status": 400, "body": "injection", "headers": None}})

    def test_answers_go_out_in_completion_order(self) -> None:
        agent = RecordingAgent()
        h = Harness(agent)
        h.register()
        h.sent()
        for cid in ("a", "b", "c"):
            h.feed(REQUEST_HEADERS, headers_event(cid))
        self.assertEqual(h.answers(), [])
        self.assertEqual(h.protocol.in_flight, 3)
        agent.answer("c", block(451))
        agent.answer("a")
        agent.answer("b", allow().set_request_header("x-b", "1"))
        answers = h.answers()
        self.assertEqual([cid_of(a) for a in answers], ["c", "a", "b"])
        self.assertEqual(answers[0]["decision"]["block"]["status"], 451)
        self.assertEqual(answers[2]["request_headers"], [{"set": {"name": "x-b", "value": "1"}}])
        self.assertEqual(h.protocol.in_flight, 0)

    def test_coroutine_handlers(self) -> None:
        gate: Deferred[None] = Deferred()

        class Async(Agent):
            async def on_request_headers(self, event: Any) -> Any:
                await gate
                return block(429)

        h = Harness(Async())
        h.register()
        h.sent()
        h.feed(REQUEST_HEADERS, headers_event("x"))
        self.assertEqual(h.answers(), [])
        gate.callback(None)
        [answer] = h.answers()
        self.assertEqual(answer["decision"]["block"]["status"], 429)

    def test_plain_agent_response_is_accepted_and_not_mutated(self) -> None:
        shared = AgentResponse()

        class Shared(Agent):
            def on_request_headers(self, event: Any) -> Any:
                return shared

        h = Harness(Shared())
        h.register()
        h.sent()
        h.feed(REQUEST_HEADERS, headers_event("one"))
        h.feed(REQUEST_HEADERS, headers_event("two"))
        self.assertEqual([cid_of(a) for a in h.answers()], ["one", "two"])
        self.assertEqual(shared.audit.custom, {})

    def test_ping_gets_pong_with_its_sequence_and_timestamp(self) -> None:
        h = Harness()
        h.register()
        h.sent()
        raw = b'{"sequence":7,"timestamp_ms":1767225600000}'
        h.protocol.dataReceived(frame(PING, raw))
        data = h.transport.value()
        self.assertTrue(data.endswith(bytes([PONG]) + raw))

    def test_pong_is_the_same_body_whatever_it_holds(self) -> None:
        # SPEC section 4: the same body back, as the reference does (more
        # fields, a sequence of -1, no timestamp); the control limit bounds it.
        for body in (
            b'{"sequence":7,"timestamp_ms":1767225600000,"pad":"' + b"x" * 10_000 + b'"}',
            b'{"sequence":-1,"timestamp_ms":1}',
            b'{"sequence":18446744073709551615}',
        ):
            h = Harness()
            h.register()
            h.sent()
            h.protocol.dataReceived(frame(PING, body))
            self.assertTrue(h.transport.value().endswith(bytes([PONG]) + body), body[:40])

    def test_a_ping_that_is_not_an_object_gets_no_pong(self) -> None:
        h = Harness()
        h.register()
        h.sent()
        h.protocol.dataReceived(frame(PING, b"[1, 2]"))
        self.assertNotIn(bytes([PONG]), h.transport.value())

    def test_frames_only_agents_send_are_ignored(self) -> None:
        h = Harness()
        h.register()
        h.sent()
        h.feed(FLOW_CONTROL, {"action": 1})
        h.feed(AGENT_RESPONSE, {"version": 2, "decision": "allow"})
        h.feed(PONG, {"sequence": 1, "timestamp_ms": 1})
        self.assertEqual(h.sent(), [])
        self.assertFalse(h.transport.disconnecting)
        h.feed(REQUEST_HEADERS, headers_event("still-works"))
        self.assertEqual([cid_of(a) for a in h.answers()], ["still-works"])


class ErrorAnswerTests(SynchronousTestCase):
    def serve(self, agent: Any, **settings: Any) -> dict[str, Any]:
        h = Harness(agent, **settings)
        h.register()
        h.sent()
        h.feed(REQUEST_HEADERS, headers_event("e1"))
        [answer] = h.answers()
        self.assertEqual(cid_of(answer), "e1")
        self.assertEqual(h.protocol.in_flight, 0)
        return answer

    def test_invalid_base64_from_the_proxy_is_an_invalid_event(self) -> None:
        # A handler that reads a chunk's body the proxy sent as invalid
        # base64 failed through no fault of its own: that is the proxy's
        # invalid event (a rate-limited warning, no traceback, no critical
        # line per frame), answered with the error decision.
        class Reading(Agent):
            def on_request_body_chunk(self, event: Any) -> Any:
                return allow().tag(str(len(event.body)))

        h = Harness(Reading())
        h.register()
        h.sent()
        with captured_log() as events:
            for i in range(50):
                chunk = body_chunk_event("b1", b"", index=i) | {"data": "!!not base64"}
                h.feed(REQUEST_BODY_CHUNK, chunk)
        answers = h.answers()
        self.assertEqual(len(answers), 50)
        self.assertEqual({cid_of(a) for a in answers}, {"b1"})
        self.assertEqual({a["decision"]["block"]["status"] for a in answers}, {500})
        self.assertEqual(h.protocol.in_flight, 0)
        self.assertEqual([e for e in events if e.get("log_failure") is not None], [])
        self.assertEqual([e for e in events if e["log_level"].name in ("error", "critical")], [])
        warnings = [formatEvent(e) for e in events if e["log_level"].name == "warn"]
        self.assertLess(len(warnings), 10)
        self.assertIn("Proxy sent an invalid RequestBodyChunk event 'b1'", warnings[0])
        self.assertIn("base64", warnings[0])
        self.assertEqual(h.protocol.stats["invalid_events"], 50)
        self.assertEqual(h.protocol.stats["handler_errors"], 0)

    def test_invalid_base64_is_still_a_value_error(self) -> None:
        # Code that caught binascii.Error (a ValueError) keeps working.
        import binascii

        from sentinel_twisted import messages as m
        from sentinel_twisted.errors import InvalidMessage

        event = m.decode(json.dumps(body_chunk_event("b1", b"") | {"data": "!!"}).encode(), m.RequestBodyChunkEvent)
        with self.assertRaises(binascii.Error) as caught:
            len(event.body)
        self.assertIsInstance(caught.exception, InvalidMessage)
        self.assertIn("- at `$.data`", str(caught.exception))

    def test_raising_handler_blocks_500(self) -> None:
        class Broken(Agent):
            def on_request_headers(self, event: Any) -> Any:
                raise KeyError("boom")

        answer = self.serve(Broken())
        self.assertEqual(answer["decision"], {"block": {"status": 500, "body": "agent error", "headers": None}})
        self.assertIn("agent_error", answer["audit"]["tags"])
        self.assertEqual(answer["audit"]["reason_codes"], ["AGENT_ERROR"])
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    def test_failing_deferred_blocks_500(self) -> None:
        class Broken(Agent):
            def on_request_headers(self, event: Any) -> Any:
                d: Deferred[Any] = Deferred()
                d.errback(ValueError("nope"))
                return d

        answer = self.serve(Broken())
        self.assertEqual(answer["decision"]["block"]["status"], 500)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_none_is_not_an_answer(self) -> None:
        class Forgetful(Agent):
            def on_request_headers(self, event: Any) -> Any:
                return None

        answer = self.serve(Forgetful())
        self.assertEqual(answer["decision"]["block"]["status"], 500)

    def test_wrong_type_is_not_an_answer(self) -> None:
        class Confused(Agent):
            def on_request_headers(self, event: Any) -> Any:
                return succeed({"decision": "allow"})

        answer = self.serve(Confused())
        self.assertEqual(answer["decision"]["block"]["status"], 500)

    def test_unserialisable_answer_is_replaced(self) -> None:
        class Odd(Agent):
            def on_request_headers(self, event: Any) -> Any:
                return allow().custom(thing=object())

        answer = self.serve(Odd())
        self.assertEqual(answer["decision"]["block"]["status"], 500)

    def test_an_answer_broken_inside_is_replaced_and_frees_its_slot(self) -> None:
        # msgspec does not check a Struct's fields when it is made.
        class Careless(RecordingAgent):
            def on_request_headers(self, event: Any) -> Any:
                if event.metadata.correlation_id == "e1":
                    return AgentResponse(audit=None)  # type: ignore[arg-type]
                return super().on_request_headers(event)

        agent = Careless()
        h = Harness(agent, max_concurrency=1, max_queued=1)
        h.register()
        h.sent()
        h.feed(REQUEST_HEADERS, headers_event("e2"))
        h.feed(REQUEST_HEADERS, headers_event("e1"))
        before = h.clock.seconds()
        h.clock.advance(3)
        agent.answer("e2")
        # The queued e1 ran and was answered; nothing is left in flight.
        answers = h.answers()
        self.assertEqual([cid_of(a) for a in answers], ["e2", "e1"])
        self.assertEqual(answers[1]["decision"]["block"]["status"], 500)
        self.assertEqual((h.protocol.load, h.protocol.stats["handler_errors"]), (0, 1))
        self.assertEqual(h.protocol.idle_since, before + 3)
        self.assertEqual(len(self.flushLoggedErrors(AttributeError)), 1)

    def test_fail_open_allows(self) -> None:
        class Broken(Agent):
            def on_request_headers(self, event: Any) -> Any:
                raise RuntimeError("boom")

        answer = self.serve(Broken(), fail_open=True)
        self.assertEqual(answer["decision"], "allow")
        self.assertIn("agent_error", answer["audit"]["tags"])
        self.flushLoggedErrors(RuntimeError)

    def test_invalid_event_with_an_id_gets_the_error_answer(self) -> None:
        h = Harness()
        h.register()
        h.sent()
        event = headers_event("bad-1")
        event["metadata"]["client_port"] = "not a number"
        h.feed(REQUEST_HEADERS, event)
        [answer] = h.answers()
        self.assertEqual(cid_of(answer), "bad-1")
        self.assertEqual(answer["decision"]["block"]["status"], 500)

    def test_invalid_event_without_an_id_is_dropped(self) -> None:
        h = Harness()
        h.register()
        h.sent()
        h.feed(RESPONSE_HEADERS, {"status": "x"})
        h.feed(RESPONSE_HEADERS, b"{not json")
        self.assertEqual(h.answers(), [])
        self.assertFalse(h.transport.disconnecting)


class CancelTests(SynchronousTestCase):
    def test_cancel_reaches_the_handler_and_nothing_is_sent(self) -> None:
        agent = RecordingAgent()
        h = Harness(agent)
        h.register()
        h.sent()
        h.feed(REQUEST_HEADERS, headers_event("keep"))
        h.feed(REQUEST_HEADERS, headers_event("drop"))
        h.feed(CANCEL, {"correlation_id": "drop", "reason": 0, "timestamp_ms": 1})
        self.assertEqual(agent.cancelled, ["drop"])
        self.assertEqual(h.protocol.in_flight, 1)
        agent.answer("keep")
        self.assertEqual([cid_of(a) for a in h.answers()], ["keep"])
        self.assertEqual(h.protocol.stats["cancelled"], 1)

    def test_cancel_of_unknown_id_is_harmless(self) -> None:
        h = Harness(RecordingAgent())
        h.register()
        h.sent()
        h.feed(CANCEL, {"correlation_id": "nobody", "reason": 5, "timestamp_ms": 1})
        self.assertEqual(h.sent(), [])

    def test_cancel_of_a_queued_event(self) -> None:
        agent = RecordingAgent()
        h = Harness(agent, max_concurrency=1)
        h.register()
        h.sent()
        h.feed(REQUEST_HEADERS, headers_event("running"))
        h.feed(REQUEST_HEADERS, headers_event("queued"))
        self.assertEqual(h.protocol.queued, 1)
        h.feed(CANCEL, {"correlation_id": "queued", "reason": 0, "timestamp_ms": 1})
        self.assertEqual(h.protocol.queued, 0)
        agent.answer("running")
        self.assertNotIn("queued", agent.waiting)
        self.assertEqual([cid_of(a) for a in h.answers()], ["running"])

    def test_connection_loss_cancels_handlers(self) -> None:
        agent = RecordingAgent()
        h = Harness(agent)
        h.register()
        h.feed(REQUEST_HEADERS, headers_event("a"))
        h.feed(REQUEST_HEADERS, headers_event("b"))
        h.lose()
        self.assertEqual(sorted(agent.cancelled), ["a", "b"])
        self.assertEqual(h.events[-1][0], "ended")


class FlowControlTests(SynchronousTestCase):
    def flow(self, frames: list[tuple[int, Any]]) -> list[int]:
        return [body["action"] for t, body in frames if t == FLOW_CONTROL]

    def test_pause_at_the_limit_resume_at_half(self) -> None:
        agent = RecordingAgent()
        h = Harness(agent, max_concurrency=4)
        h.register()
        h.sent()
        for i in range(3):
            h.feed(REQUEST_HEADERS, headers_event(f"r{i}"))
        self.assertEqual(self.flow(h.sent()), [])
        h.feed(REQUEST_HEADERS, headers_event("r3"))
        frames = h.sent()
        self.assertEqual(frames, [(FLOW_CONTROL, {"action": 1})])
        self.assertTrue(h.protocol.paused)
        agent.answer("r0")
        self.assertEqual(self.flow(h.sent()), [])
        agent.answer("r1")
        frames = h.sent()
        self.assertEqual(self.flow(frames), [2])
        self.assertEqual(frames[-1], (FLOW_CONTROL, {"action": 2}))
        self.assertFalse(h.protocol.paused)

    def test_events_beyond_the_limit_wait_their_turn(self) -> None:
        agent = RecordingAgent()
        h = Harness(agent, max_concurrency=2, max_queued=2)
        h.register()
        h.sent()
        for cid in ("a", "b", "c", "d"):
            h.feed(REQUEST_HEADERS, headers_event(cid))
        self.assertEqual(sorted(agent.waiting), ["a", "b"])
        self.assertEqual(h.protocol.queued, 2)
        agent.answer("b")
        self.assertEqual(sorted(agent.waiting), ["a", "c"])
        agent.answer("a")
        agent.answer("c")
        agent.answer("d")
        self.assertEqual([cid_of(a) for a in h.answers()], ["b", "a", "c", "d"])
        self.assertEqual(h.protocol.load, 0)

    def test_overflow_beyond_the_queue_is_answered_503(self) -> None:
        agent = RecordingAgent()
        h = Harness(agent, max_concurrency=1, max_queued=1)
        h.register()
        h.sent()
        for cid in ("a", "b", "c"):
            h.feed(REQUEST_HEADERS, headers_event(cid))
        [answer] = h.answers()
        self.assertEqual(cid_of(answer), "c")
        self.assertEqual(answer["decision"]["block"], {"status": 503, "body": "agent overloaded", "headers": None})

    def test_events_sent_and_cancelled_while_every_slot_is_busy_do_not_pile_up(self) -> None:
        # A cancelled queued event leaves the queue at once: a proxy that
        # sends and cancels while the handlers are slow holds nothing more.
        agent = RecordingAgent()
        h = Harness(agent, max_concurrency=1, max_queued=2)
        h.register()
        h.sent()
        h.feed(REQUEST_HEADERS, headers_event("slow"))
        for i in range(500):
            h.feed(REQUEST_HEADERS, headers_event(f"q{i}"))
            h.feed(CANCEL, {"correlation_id": f"q{i}", "reason": 0, "timestamp_ms": 1})
        self.assertEqual(len(h.protocol._queue), 0)
        self.assertEqual(h.protocol.queued, 0)
        self.assertEqual(h.protocol._held_bytes, len(json.dumps(headers_event("slow")).encode()))
        self.assertEqual(h.answers(), [])
        agent.answer("slow")
        self.assertEqual([cid_of(a) for a in h.answers()], ["slow"])
        self.assertEqual(h.protocol._held_bytes, 0)

    def test_events_past_the_held_bytes_are_answered_503(self) -> None:
        agent = RecordingAgent()
        big = headers_event("a", headers={"x-pad": ["p" * 3000]})
        size = len(json.dumps(big).encode())
        h = Harness(agent, max_concurrency=10, max_queued=10, max_held_event_bytes=2 * size + 10)
        h.register()
        h.sent()
        for cid in ("a", "b", "c"):
            h.feed(REQUEST_HEADERS, headers_event(cid, headers={"x-pad": ["p" * 3000]}))
        self.assertEqual(sorted(agent.waiting), ["a", "b"])
        [answer] = h.answers()
        self.assertEqual(cid_of(answer), "c")
        self.assertEqual(answer["decision"]["block"], {"status": 503, "body": "agent overloaded", "headers": None})
        # Room again once one is answered; a small event always fits.
        agent.answer("a")
        h.feed(REQUEST_HEADERS, headers_event("d", headers={"x-pad": ["p" * 3000]}))
        self.assertEqual(sorted(agent.waiting), ["b", "d"])
        h.feed(CANCEL, {"correlation_id": "b", "reason": 0, "timestamp_ms": 1})
        h.feed(CANCEL, {"correlation_id": "d", "reason": 0, "timestamp_ms": 1})
        self.assertEqual(h.protocol._held_bytes, 0)

    def test_one_event_larger_than_the_held_bytes_is_still_served(self) -> None:
        agent = RecordingAgent()
        h = Harness(agent, max_held_event_bytes=10)
        h.register()
        h.sent()
        h.feed(REQUEST_HEADERS, headers_event("alone"))
        self.assertEqual(agent.waiting and sorted(agent.waiting), ["alone"])
        h.feed(REQUEST_HEADERS, headers_event("second"))
        [answer] = h.answers()
        self.assertEqual(cid_of(answer), "second")

    def test_synchronous_handlers_under_load_keep_a_flat_stack(self) -> None:
        gate: list[Deferred[Any]] = []

        class Mixed(Agent):
            def on_request_headers(self, event: Any) -> Any:
                if event.metadata.correlation_id == "slow":
                    d: Deferred[Any] = Deferred()
                    gate.append(d)
                    return d
                return allow()

        h = Harness(Mixed(), max_concurrency=1, max_queued=5000)
        h.register()
        h.sent()
        h.feed(REQUEST_HEADERS, headers_event("slow"))
        for i in range(3000):
            h.feed(REQUEST_HEADERS, headers_event(f"q{i}"))
        self.assertEqual(h.protocol.queued, 3000)
        gate[0].callback(allow())
        answers = h.answers()
        self.assertEqual(len(answers), 3001)
        self.assertEqual(h.protocol.load, 0)


class HealthTests(SynchronousTestCase):
    def test_health_after_registration_and_periodically(self) -> None:
        h = Harness(health_interval=10)
        h.register()
        self.assertEqual(h.sent(), [(HEALTH_STATUS, {"state": 1})])
        h.clock.advance(10)
        self.assertEqual(h.sent(), [(HEALTH_STATUS, {"state": 1})])
        h.clock.advance(5)
        self.assertEqual(h.sent(), [])

    def test_reports_the_agents_state(self) -> None:
        class Tired(Agent):
            def health(self) -> int:
                return 2

        h = Harness(Tired())
        h.register()
        self.assertEqual(h.sent(), [(HEALTH_STATUS, {"state": 2})])

    def test_broken_health_reports_unhealthy(self) -> None:
        class Broken(Agent):
            def health(self) -> int:
                raise RuntimeError("sensor")

        h = Harness(Broken())
        h.register()
        self.assertEqual(h.sent(), [(HEALTH_STATUS, {"state": 4})])
        self.flushLoggedErrors(RuntimeError)

    def test_no_health_if_not_announced(self) -> None:
        class Quiet(Agent):
            features = {"health_reporting": False}

        h = Harness(Quiet())
        h.register()
        h.clock.advance(100)
        self.assertEqual(h.sent(), [])

    def test_health_stops_when_the_connection_ends(self) -> None:
        h = Harness(health_interval=1)
        h.register()
        h.lose()
        h.sent()
        h.clock.advance(10)
        self.assertEqual(h.sent(), [])
        self.assertEqual(h.clock.getDelayedCalls(), [])


class DrainTests(SynchronousTestCase):
    def test_drain_pauses_reports_draining_and_waits(self) -> None:
        agent = RecordingAgent()
        h = Harness(agent)
        h.register()
        h.sent()
        h.feed(REQUEST_HEADERS, headers_event("inflight"))
        done = h.protocol.drain(30)
        self.assertEqual(h.sent(), [(FLOW_CONTROL, {"action": 1}), (HEALTH_STATUS, {"state": 3})])
        self.assertFalse(h.transport.disconnecting)
        agent.answer("inflight", block(418))
        self.assertEqual([cid_of(a) for a in h.answers()], ["inflight"])
        self.assertTrue(h.transport.disconnecting)
        self.assertNoResult(done)
        h.lose()
        self.successResultOf(done)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_grace_period_cancels_what_is_left(self) -> None:
        agent = RecordingAgent()
        h = Harness(agent)
        h.register()
        h.feed(REQUEST_HEADERS, headers_event("stuck"))
        h.sent()
        done = h.protocol.drain(5)
        h.clock.advance(4.9)
        self.assertFalse(h.transport.disconnecting)
        h.clock.advance(0.2)
        self.assertEqual(agent.cancelled, ["stuck"])
        self.assertTrue(h.transport.disconnecting)
        self.assertEqual(h.answers(), [])
        h.lose()
        self.successResultOf(done)

    def test_drain_with_nothing_in_flight_closes_at_once(self) -> None:
        h = Harness()
        h.register()
        done = h.protocol.drain(30)
        self.assertTrue(h.transport.disconnecting)
        h.lose()
        self.successResultOf(done)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_events_racing_the_pause_are_still_served(self) -> None:
        agent = RecordingAgent()
        h = Harness(agent)
        h.register()
        h.feed(REQUEST_HEADERS, headers_event("first"))
        h.protocol.drain(30)
        h.feed(REQUEST_HEADERS, headers_event("late"))
        agent.answer("first")
        self.assertFalse(h.transport.disconnecting)
        agent.answer("late")
        self.assertEqual(sorted(cid_of(a) for a in h.answers()), ["first", "late"])
        self.assertTrue(h.transport.disconnecting)

    def test_drain_before_registration_just_closes(self) -> None:
        h = Harness()
        done = h.protocol.drain(30)
        self.assertTrue(h.transport.disconnecting)
        h.lose()
        self.successResultOf(done)
        self.assertEqual(h.events, [])


class CloseDeadlineTests(SynchronousTestCase):
    """
    A connection the agent closes is gone within C{close_grace}: a proxy
    that reads nothing (or a TLS layer waiting on it) cannot keep it open,
    nor keep a drain, and with it the agent's stop, waiting.
    """

    def pending_calls(self, h: Harness) -> list[str]:
        return [getattr(call.func, "__name__", "") for call in h.clock.getDelayedCalls()]

    def test_a_timed_out_registration_not_gone_after_the_grace_is_aborted(self) -> None:
        h = Harness(registration_timeout=5, close_grace=2)
        h.clock.advance(5)
        self.assertTrue(h.transport.disconnecting)
        self.assertFalse(h.transport.disconnected)
        h.clock.advance(1.9)
        self.assertFalse(h.transport.disconnected)
        with captured_log() as events:
            h.clock.advance(0.1)
        self.assertTrue(h.transport.disconnected, "not aborted after the grace")
        self.assertIn(
            "Agent waf-1 connection (registering) was not gone 2s after it was closed; aborting it",
            [formatEvent(e) for e in events],
        )
        h.lose()
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_a_drain_ends_although_the_proxy_reads_nothing(self) -> None:
        h = Harness()
        h.register()
        done = h.protocol.drain(30)
        self.assertTrue(h.transport.disconnecting)
        h.clock.advance(h.settings.close_grace)
        self.assertTrue(h.transport.disconnected)
        self.assertNoResult(done)
        h.lose()
        self.successResultOf(done)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_a_connection_gone_in_time_leaves_no_timer(self) -> None:
        h = Harness()
        h.register()
        h.protocol.close()
        self.assertEqual(self.pending_calls(h), ["_close_overdue"])
        h.lose()
        self.assertEqual(h.clock.getDelayedCalls(), [])
        self.assertFalse(h.transport.disconnected)

    def test_a_late_deadline_after_the_transport_is_gone_does_nothing(self) -> None:
        h = Harness()
        h.protocol.close()
        h.lose()
        h.protocol._close_overdue()
        self.assertFalse(h.transport.disconnected)

    def test_the_grace_must_be_positive(self) -> None:
        for value in (0, -1):
            self.assertRaises(ValueError, Harness, close_grace=value)


class LogRateLimitTests(SynchronousTestCase):
    """
    A proxy that sends invalid frames in a loop makes a handful of warnings
    and a summary per period, not a line per frame.
    """

    def flood(self, h: Harness, count: int) -> None:
        for n in range(count):
            event = headers_event(f"bad-{n}")
            event["metadata"]["client_port"] = "not a number"
            h.feed(REQUEST_HEADERS, event)
            h.feed(RESPONSE_HEADERS, b"{not json")
            h.feed(CANCEL, b"[]")
            h.feed(PING, b"{")
            h.feed(HEALTH_STATUS, {})

    def test_per_frame_warnings_are_rate_limited_on_the_agents_clock(self) -> None:
        h = Harness()
        h.register()
        h.sent()
        with captured_log() as events:
            self.flood(h, 200)
        warnings = [formatEvent(e) for e in events if e["log_level"].name == "warn"]
        burst = h.protocol.log_limiter.burst
        # Five kinds of warning, each at most a burst now.
        self.assertEqual(len(warnings), 5 * burst)
        # Every invalid event with an id is still answered.
        self.assertEqual(len(h.answers()), 200)
        with captured_log() as events:
            h.clock.advance(h.protocol.log_limiter.period)
        summaries = [formatEvent(e) for e in events]
        self.assertEqual(len(summaries), 5)
        for text in summaries:
            self.assertIn(f"and {200 - burst - 1} more like it in the last 10 s", text)

    def test_connections_of_one_factory_share_the_limiter(self) -> None:
        from twisted.internet.address import UNIXAddress
        from twisted.internet.task import Clock

        from sentinel_twisted.agent import AgentClientFactory
        from sentinel_twisted.agent.protocol import AgentSettings

        factory = AgentClientFactory(AgentSettings(agent=Agent(), agent_id="waf-1"), Clock())
        one = factory.buildProtocol(UNIXAddress(None))
        two = factory.buildProtocol(UNIXAddress(None))
        self.assertIs(one.log_limiter, two.log_limiter)
        self.assertIs(one.log_limiter.clock, factory.clock)


class LargeControlFrameTests(SynchronousTestCase):
    """
    A Ping, Pong, HealthStatus or FlowControl over the control frame limit
    (64 KiB) from a registered proxy is skipped, unbuffered, with a warning;
    the connection and its events in flight carry on.
    """

    LARGE = frame(PING, b"x" * (64 * 1024 + 1000))

    def registered(self) -> tuple[Harness, RecordingAgent]:
        agent = RecordingAgent()
        h = Harness(agent)
        h.register()
        h.sent()
        return h, agent

    def test_a_large_ping_is_skipped_unbuffered_and_the_next_event_served(self) -> None:
        h, agent = self.registered()
        h.feed(REQUEST_HEADERS, headers_event("before"))
        with captured_log() as events:
            for i in range(0, len(self.LARGE), 100):
                h.protocol.dataReceived(self.LARGE[i : i + 100])
                self.assertLessEqual(h.protocol.buffered_bytes, 5)
        h.feed(REQUEST_HEADERS, headers_event("after"))
        agent.answer("after")
        agent.answer("before")
        self.assertEqual([cid_of(a) for a in h.answers()], ["after", "before"])
        self.assertFalse(h.transport.disconnecting)
        [warning] = [formatEvent(e) for e in events if e["log_level"].name == "warn"]
        self.assertEqual(
            warning,
            f"Proxy test-proxy sent a Ping frame of {len(self.LARGE) - 4} bytes on connection "
            "waf-1-abc-1, over the limit of 65536 for a Ping frame; skipped it",
        )

    def test_skip_warnings_are_rate_limited(self) -> None:
        h, _ = self.registered()
        with captured_log() as events:
            h.protocol.dataReceived(self.LARGE * 50)
        warnings = [e for e in events if e["log_level"].name == "warn"]
        self.assertEqual(len(warnings), h.protocol.log_limiter.burst)
        self.assertEqual(h.sent(), [])
        self.assertFalse(h.transport.disconnecting)

    def test_a_trickled_skipped_frame_meets_the_frame_deadline(self) -> None:
        # A skipped frame is held to the frame deadline like any started frame.
        agent = RecordingAgent()
        h = Harness(agent, frame_timeout=5.0)
        h.register()
        h.sent()
        h.feed(REQUEST_HEADERS, headers_event("waiting"))
        for i in range(0, 1000, 100):
            self.assertFalse(h.transport.disconnecting)
            h.protocol.dataReceived(self.LARGE[i : i + 100])
            h.clock.advance(0.5)
        self.assertTrue(h.transport.disconnecting)
        self.assertEqual(agent.cancelled, ["waiting"])
        self.assertEqual(h.protocol.buffered_bytes, 0)
        h.lose()
        [(_, detail)] = [e for e in h.events if e[0] == "ended"]
        self.assertEqual(
            detail,
            "protocol error from proxy: Incomplete frame: 1000 bytes of a skipped Ping frame "
            "received, and the rest not within 5s",
        )

    def test_before_registration_a_large_ping_is_refused(self) -> None:
        h = Harness()
        h.sent()
        h.protocol.dataReceived(self.LARGE[:100])
        self.assertTrue(h.transport.disconnecting)
        [(_, error)] = [e for e in h.events if e[0] == "refused"]
        # Before registration no frame may be longer than 64 KiB.
        self.assertIn("Message too large: 66537 bytes (max: 65536)", str(error))


class FrameDeadlineTests(SynchronousTestCase):
    """
    Once registered, a frame the proxy starts must be complete within
    C{frame_timeout} of its start (the proxy's own rule for its agents): a
    proxy that stops mid-frame, or trickles one, is cut, and cannot hold the
    connection and the agent's buffer.  Before registration the registration
    timeout bounds everything.
    """

    def registered(self, **settings: Any) -> tuple[Harness, RecordingAgent]:
        agent = RecordingAgent()
        settings.setdefault("health_interval", 0)
        h = Harness(agent, **settings)
        h.register()
        h.sent()
        return h, agent

    def test_the_default_is_the_proxys_default_30s(self) -> None:
        h, _ = self.registered()
        self.assertEqual(h.settings.frame_timeout, 30.0)
        h.protocol.dataReceived(frame(REQUEST_HEADERS, headers_event("late"))[:20])
        h.clock.advance(29.9)
        self.assertFalse(h.transport.disconnecting)
        h.clock.advance(0.1)
        self.assertTrue(h.transport.disconnecting)

    def test_a_trickled_frame_closes_the_connection_at_the_deadline(self) -> None:
        h, agent = self.registered(frame_timeout=5)
        h.feed(REQUEST_HEADERS, headers_event("waiting"))
        trickled = frame(REQUEST_HEADERS, headers_event("trickled"))
        with captured_log() as events:
            for i in range(10):
                self.assertFalse(h.transport.disconnecting, f"closed after {i} bytes")
                h.protocol.dataReceived(trickled[i : i + 1])
                h.clock.advance(0.5)
        self.assertTrue(h.transport.disconnecting)
        self.assertEqual(agent.cancelled, ["waiting"])
        self.assertEqual(h.protocol.buffered_bytes, 0)
        self.assertIn(
            "Agent waf-1 closing connection waf-1-abc-1 with proxy test-proxy: a frame was not "
            "complete in time (10 bytes of a frame received, and the rest not within 5s)",
            [formatEvent(e) for e in events if e["log_level"].name == "warn"],
        )
        # The rest of the frame, late, is not read.
        h.protocol.dataReceived(trickled[10:])
        self.assertEqual(agent.seen[-1].metadata.correlation_id, "waiting")
        h.lose()
        self.assertEqual(
            h.events[-1],
            (
                "ended",
                "protocol error from proxy: Incomplete frame: 10 bytes of a frame received, "
                "and the rest not within 5s",
            ),
        )
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_a_proxy_that_stops_mid_frame_is_cut_and_a_deaf_one_aborted(self) -> None:
        h, _ = self.registered(frame_timeout=5, close_grace=2)
        h.protocol.dataReceived(frame(REQUEST_HEADERS, headers_event())[:30])
        h.clock.advance(5)
        self.assertTrue(h.transport.disconnecting)
        self.assertFalse(h.transport.disconnected)
        h.clock.advance(2)
        self.assertTrue(h.transport.disconnected, "a proxy that reads nothing is aborted")

    def test_a_frame_completed_in_time_is_served_and_the_next_has_its_own_time(self) -> None:
        h, agent = self.registered(frame_timeout=5)
        first = frame(REQUEST_HEADERS, headers_event("first"))
        second = frame(REQUEST_HEADERS, headers_event("second"))
        h.protocol.dataReceived(first[:20])
        h.clock.advance(4.9)
        h.protocol.dataReceived(first[20:] + second[:20])
        h.clock.advance(4.9)
        self.assertFalse(h.transport.disconnecting)
        self.assertEqual([e.metadata.correlation_id for e in agent.seen], ["first"])
        h.protocol.dataReceived(second[20:])
        h.clock.advance(60)
        self.assertFalse(h.transport.disconnecting)
        self.assertEqual([e.metadata.correlation_id for e in agent.seen], ["first", "second"])
        self.assertEqual(h.clock.getDelayedCalls(), [])
        # And a frame after them is held to the deadline again.
        h.protocol.dataReceived(first[:20])
        h.clock.advance(5)
        self.assertTrue(h.transport.disconnecting)

    def test_a_large_frame_arriving_steadily_within_the_deadline_is_served(self) -> None:
        # As on the proxy: the deadline is the whole frame's, from its first
        # byte; bytes that keep coming do not extend it.
        big = frame(REQUEST_HEADERS, headers_event("big", headers={"x-big": ["a" * (1024 * 1024)]}))
        h, agent = self.registered(frame_timeout=5)
        for i in range(0, len(big), 64 * 1024):
            h.protocol.dataReceived(big[i : i + 64 * 1024])
            h.clock.advance(0.25)  # 17 pieces: 4.25 s
        self.assertFalse(h.transport.disconnecting)
        self.assertEqual([e.metadata.correlation_id for e in agent.seen], ["big"])
        h, agent = self.registered(frame_timeout=5)
        for i in range(0, len(big), 64 * 1024):
            if h.transport.disconnecting:
                break
            h.protocol.dataReceived(big[i : i + 64 * 1024])
            h.clock.advance(0.5)  # the same frame at half the rate: 8.5 s
        self.assertTrue(h.transport.disconnecting)
        self.assertEqual(agent.seen, [])
        self.assertEqual(h.protocol.buffered_bytes, 0)

    def test_before_registration_the_registration_timeout_bounds_a_frame(self) -> None:
        h = Harness(frame_timeout=1, registration_timeout=10)
        h.protocol.dataReceived(frame(HANDSHAKE_RESPONSE, success_response())[:20])
        h.clock.advance(9.9)
        self.assertFalse(h.transport.disconnecting)
        h.clock.advance(0.1)
        [(kind, error)] = h.events
        self.assertEqual(kind, "refused")
        self.assertIn("no RegistrationResponse within 10s", str(error))

    def test_the_deadline_of_a_frame_begun_with_the_registration_answer_runs(self) -> None:
        h = Harness(frame_timeout=5, health_interval=0)
        h.sent()
        h.protocol.dataReceived(
            frame(HANDSHAKE_RESPONSE, success_response()) + frame(REQUEST_HEADERS, headers_event())[:20]
        )
        self.assertTrue(h.protocol.registered)
        h.clock.advance(5)
        self.assertTrue(h.transport.disconnecting)

    def test_a_connection_lost_mid_frame_leaves_no_timer_and_no_warning(self) -> None:
        h, _ = self.registered(frame_timeout=5)
        h.protocol.dataReceived(frame(REQUEST_HEADERS, headers_event())[:20])
        with captured_log() as events:
            h.lose()
            h.clock.advance(10)
        self.assertEqual(h.clock.getDelayedCalls(), [])
        self.assertEqual([e for e in events if e["log_level"].name == "warn"], [])
        self.assertEqual(
            h.events[-1], ("ended", "connection closed mid-frame (20 bytes of an incomplete frame)")
        )

    def test_the_deadline_must_be_positive(self) -> None:
        for value in (0, -1):
            self.assertRaises(ValueError, Harness, frame_timeout=value)
