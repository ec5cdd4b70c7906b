"""
An agent that registers properly and then sends garbage, over a real UNIX
socket.  Each kind of garbage gets a clear log line; a garbled message in a
sound frame keeps the connection (the stream is still in step), a broken
frame closes it (the stream no longer is); either way every pending
request ends.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Generator
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from ..rawagent import (
    AGENT_RESPONSE,
    CANCEL,
    FLOW_CONTROL,
    HANDSHAKE_RESPONSE,
    HEALTH_STATUS,
    REQUEST_HEADERS,
    RawAgentProtocol,
    answer,
    frame,
)
from .invariants import Accounting, settle, wait_until
from .support import headers, listen, temp_dir

TIMEOUT = 1  # the Cancel reason


class GarbageAfterRegistrationTests(TestCase):
    timeout = 20

    @inlineCallbacks
    def setUp(self) -> Generator[Any, Any, None]:
        yield settle()
        self.books = Accounting(extra_outcomes={"invalid-answer"})
        self.addCleanup(self.books.stop_observing)
        path = os.path.join(temp_dir(self), "p.sock")
        # Requests time out only when a test moves this clock: a loaded
        # machine cannot turn an answer into a timeout.
        self.clock = Clock()
        self.listener = yield listen(self, f"unix:{path}:mode=600", request_timeout=0.5, clock=self.clock)
        self.pool = self.listener.pool
        self.agent = RawAgentProtocol()
        yield connectProtocol(UNIXClientEndpoint(reactor, path), self.agent)
        message_type, body = yield self.agent.register("liar")
        self.assertEqual((message_type, body["success"]), (HANDSHAKE_RESPONSE, True))
        yield wait_until(lambda: "liar" in self.pool, "the registration")
        [self.connection] = self.pool.connections("liar")

    @inlineCallbacks
    def send(self, *cids: str) -> Generator[Any, Any, list[Any]]:
        """Requests the agent has received (and holds, unanswered)."""
        tracked = [self.books.track(self.pool.send_request_headers("liar", headers(c)), c) for c in cids]
        for cid in cids:
            message_type, body = yield self.agent.next_frame()
            self.assertEqual((message_type, body["metadata"]["correlation_id"]), (REQUEST_HEADERS, cid))
        return tracked

    @inlineCallbacks
    def still_works(self) -> Generator[Any, Any, None]:
        """The connection is kept: a new request is answered."""
        [done] = yield self.send("after")
        self.agent.send(AGENT_RESPONSE, answer("after"))
        outcome = yield done
        self.assertEqual(outcome, "answer")
        self.assertFalse(self.connection.is_closed)

    @inlineCallbacks
    def finish(self) -> Generator[Any, Any, None]:
        if not self.agent.lost:
            self.agent.transport.loseConnection()
        yield self.agent.closed
        yield wait_until(lambda: len(self.pool) == 0, "the pool to empty")
        yield self.listener.stop()
        yield self.books.verify(self, [self.listener.factory])

    def logged(self, text: str) -> None:
        self.assertIn(text, self.books.log_text())

    # -- garbled messages in sound frames: the connection stays ---------------

    @inlineCallbacks
    def test_malformed_json_answer(self) -> Generator[Any, Any, None]:
        [pending] = yield self.send("r1")
        self.agent.send(AGENT_RESPONSE, b"{this is not json")
        logged = f"Agent liar sent an invalid AgentResponse on connection {self.connection.connection_id}: Invalid message format:"
        yield wait_until(lambda: logged in self.books.log_text(), "the garbage to be read")
        # Nobody can tell whom it was for: the request ends by its timeout.
        self.assertFalse(pending.called)
        self.clock.advance(0.5)
        outcome = yield pending
        self.assertEqual(outcome, "timeout")
        message_type, body = yield self.agent.next_frame()
        self.assertEqual((message_type, body["correlation_id"], body["reason"]), (CANCEL, "r1", TIMEOUT))
        yield self.still_works()
        yield self.finish()

    @inlineCallbacks
    def test_answer_with_wrong_types_fails_its_request_at_once(self) -> Generator[Any, Any, None]:
        first, second = yield self.send("r1", "r2")
        self.agent.send(AGENT_RESPONSE, {"version": 2, "decision": 5, "audit": {"custom": {"correlation_id": "r1"}}})
        self.agent.send(AGENT_RESPONSE, {"version": "two", "decision": "allow", "audit": {"custom": {"correlation_id": "r2"}}})
        outcomes = yield gatherResults([first, second])
        self.assertEqual(outcomes, ["invalid-answer", "invalid-answer"])
        self.logged("Agent liar answered 'r1' on connection")
        self.logged("with an invalid AgentResponse: Invalid message format:")
        yield self.still_works()
        yield self.finish()

    @inlineCallbacks
    def test_deep_nesting_and_invalid_utf8_are_invalid_answers(self) -> Generator[Any, Any, None]:
        # Found by the fuzzer: msgspec lets these out as RecursionError and
        # (before 0.23) UnicodeDecodeError, which used to escape into the
        # reactor.  The texts asserted are ours, whatever msgspec says.
        first, second = yield self.send("r1", "r2")
        deep = b'{"version":2,"decision":"allow","audit":{"custom":{"correlation_id":"r1","x":' + b"[" * 5000
        self.agent.send(AGENT_RESPONSE, deep)
        self.agent.send(AGENT_RESPONSE, b'{"version":2,"decision":"allow","audit":{"tags":["\xff"],"custom":{"correlation_id":"r2"}}}')
        self.agent.send(AGENT_RESPONSE, answer("r1"))
        self.agent.send(AGENT_RESPONSE, answer("r2"))
        outcomes = yield gatherResults([first, second])
        # The deep one cannot be routed (it does not parse as a whole), so
        # r1 gets the good answer that follows.  The other's id is read
        # without decoding the rest, where the bad byte is: r2 fails at once
        # with the reason, and the later answer for it is dropped.
        self.assertEqual(outcomes, ["answer", "invalid-answer"])
        self.logged("Invalid message format: JSON nested too deeply")
        self.logged("Invalid message format: invalid UTF-8 at byte 50 (invalid start byte)")
        yield self.still_works()
        yield self.finish()

    @inlineCallbacks
    def test_invalid_control_messages_are_logged_and_ignored(self) -> Generator[Any, Any, None]:
        [pending] = yield self.send("r1")
        self.agent.send(FLOW_CONTROL, {"action": "sideways"})
        self.agent.send(HEALTH_STATUS, [1, 2, 3])
        self.agent.send(REQUEST_HEADERS, {"only": "the proxy sends these"})
        self.agent.send(AGENT_RESPONSE, answer("r1"))
        self.assertEqual((yield pending), "answer")
        self.logged("Agent liar sent an invalid FlowControl on connection")
        self.logged("Agent liar sent an invalid HealthStatus on connection")
        self.logged("Agent liar sent a RequestHeaders frame on connection")
        self.assertFalse(self.connection.is_paused)
        yield self.still_works()
        yield self.finish()

    @inlineCallbacks
    def test_answer_for_an_unknown_id_is_dropped(self) -> Generator[Any, Any, None]:
        [pending] = yield self.send("r1")
        self.agent.send(AGENT_RESPONSE, answer("nobody-asked"))
        self.agent.send(AGENT_RESPONSE, answer("r1"))
        self.assertEqual((yield pending), "answer")
        yield self.still_works()
        yield self.finish()

    # -- broken frames: the connection closes, pending requests fail ----------

    @inlineCallbacks
    def closes_with(self, garbage: bytes, reason: str) -> Generator[Any, Any, None]:
        pending = yield self.send("r1", "r2", "r3")
        self.agent.send_raw(garbage)
        outcomes = yield gatherResults(pending)
        self.assertEqual(outcomes, ["closed"] * 3)
        yield self.agent.closed
        self.logged(
            f"Agent liar connection {self.connection.connection_id} disconnected: {reason} (3 pending request(s) failed)"
        )
        yield self.finish()

    def test_unknown_type_byte(self) -> Any:
        return self.closes_with(struct.pack(">IB", 3, 0x99) + b"{}", "Invalid message format: Unknown message type: 0x99")

    def test_oversize_declared_length(self) -> Any:
        # Only the header is sent: the proxy must not wait for 4 GiB.
        return self.closes_with(
            struct.pack(">IB", 0xFFFFFFFF, AGENT_RESPONSE),
            "Message too large: 4294967295 bytes (max: 16777216)",
        )

    def test_one_byte_over_the_limit(self) -> Any:
        return self.closes_with(
            struct.pack(">IB", 16 * 1024 * 1024 + 1, AGENT_RESPONSE),
            "Message too large: 16777217 bytes (max: 16777216)",
        )

    def test_zero_length_frame(self) -> Any:
        return self.closes_with(struct.pack(">I", 0), "Invalid message format: Zero-length message")

    def test_valid_frame_then_garbage_in_one_write(self) -> Any:
        return self.closes_with(
            frame(AGENT_RESPONSE, answer("nobody")) + struct.pack(">IB", 2, 0x07) + b"x",
            "Invalid message format: Unknown message type: 0x07",
        )

    @inlineCallbacks
    def test_connection_closed_mid_frame(self) -> Generator[Any, Any, None]:
        pending = yield self.send("r1", "r2")
        self.agent.send_raw(struct.pack(">IB", 100, AGENT_RESPONSE) + b'{"version"')
        self.agent.transport.loseConnection()
        outcomes = yield gatherResults(pending)
        self.assertEqual(outcomes, ["closed", "closed"])
        yield wait_until(lambda: len(self.pool) == 0, "the pool to empty")
        self.logged("disconnected: connection closed mid-frame (15 bytes of an incomplete frame) (2 pending request(s) failed)")
        yield self.finish()
