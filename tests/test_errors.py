"""
Error values carry the texts SPEC section 5 names.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.trial.unittest import TestCase

from sentinel_twisted import errors as e
from sentinel_twisted.messages import CancelReason


class TextTests(TestCase):
    def test_spec_texts(self) -> None:
        cases = [
            (e.ConnectionFailed("refused"), "Connection failed: refused"),
            (e.ConnectionClosed("agent went away"), "Connection closed"),
            (e.VersionMismatch(2, 1), "Protocol version mismatch: expected 2, got 1"),
            (e.MessageTooLarge(16777217, 16777216), "Message too large: 16777217 bytes (max: 16777216)"),
            (e.InvalidMessage("Zero-length message"), "Invalid message format: Zero-length message"),
            (e.RequestTimeout(30), "Timeout after 30s"),
            (e.AgentUnavailable("waf-1"), "Agent unavailable"),
            (e.SerializationError("bad"), "Serialization error: bad"),
            (e.FlowControlPaused("waf-1"), "Flow control paused: agent 'waf-1' requested backpressure"),
        ]
        for error, text in cases:
            self.assertEqual(str(error), text)
            self.assertIsInstance(error, e.AgentProtocolError)

    def test_connection_closed_keeps_its_detail(self) -> None:
        self.assertEqual(e.ConnectionClosed("agent went away").detail, "agent went away")

    def test_invalid_message_keeps_its_detail(self) -> None:
        self.assertEqual(e.InvalidMessage("x").detail, "x")

    def test_authentication_failed_names_the_agent_only(self) -> None:
        error = e.AuthenticationFailed("waf-1")
        self.assertEqual(str(error), "Authentication failed: invalid token for agent 'waf-1'")

    def test_connection_limit_text(self) -> None:
        self.assertEqual(
            str(e.ConnectionLimitReached("waf-1", 4)),
            "Connection limit reached: agent 'waf-1' already holds 4 registered connections (max: 4)",
        )
        self.assertIn("1 registered connection (max: 1)", str(e.ConnectionLimitReached("w", 1)))

    def test_duplicate_correlation_id_is_an_invalid_message(self) -> None:
        error = e.DuplicateCorrelationId("c-1")
        self.assertTrue(str(error).startswith("Invalid message format: "))
        self.assertIn("'c-1'", str(error))

    def test_request_cancelled_is_a_cancelled_error(self) -> None:
        error = e.RequestCancelled("c-1", CancelReason.PROXY_SHUTDOWN)
        self.assertIsInstance(error, CancelledError)
        self.assertIsInstance(error, e.AgentProtocolError)
        self.assertEqual(str(error), "Request cancelled: 'c-1' (proxy_shutdown)")
        self.assertEqual(error.reason, 4)

    def test_request_cancelled_with_unknown_reason(self) -> None:
        self.assertEqual(str(e.RequestCancelled("c", 42)), "Request cancelled: 'c' (42)")

    def test_request_timeout_keeps_its_fields(self) -> None:
        error = e.RequestTimeout(0.2, "c-9")
        self.assertEqual((error.seconds, error.correlation_id), (0.2, "c-9"))

    def test_base_error_without_arguments_names_its_class(self) -> None:
        self.assertEqual(str(e.AgentProtocolError()), "AgentProtocolError")


class DurationTests(TestCase):
    def test_rust_duration_debug_format(self) -> None:
        cases = {
            30: "30s",
            10.0: "10s",
            1.5: "1.5s",
            0.1: "100ms",
            0.2: "200ms",
            0.0015: "1.5ms",
            0.00025: "250µs",
            2.5e-7: "250ns",
            0: "0ns",
            90: "90s",
            1.25: "1.25s",
        }
        for seconds, text in cases.items():
            self.assertEqual(e.format_duration(seconds), text, seconds)
