"""
L{AgentConnector} with a Clock and a scripted endpoint: backoff timing,
which rejections stop retrying, N connections, and draining on stop.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from zope.interface import implementer

from sentinel_twisted._redial import BACKOFF_RESET_AFTER
from sentinel_twisted.agent import Agent, AgentConnector, RegistrationRejected

from .._proxy_support import captured_log
from ._support import (
    FLOW_CONTROL,
    HANDSHAKE_RESPONSE,
    REQUEST_HEADERS,
    RecordingAgent,
    failure_response,
    frame,
    headers_event,
    parse_frames,
    success_response,
)

LIMIT = "Connection limit reached: agent 'waf-1' already holds 1 registered connection (max: 1)"
NOT_ALLOWED = "Invalid message format: Agent 'waf-1' is not in the allowed list"


class Connection:
    """One scripted connection: the agent's protocol and its transport."""

    def __init__(self, endpoint: ScriptedEndpoint, protocol: Any) -> None:
        self.endpoint = endpoint
        self.protocol = protocol
        self.transport = StringTransport()
        self.lost = False
        protocol.makeConnection(self.transport)

    def feed(self, message_type: int, body: Any) -> None:
        self.protocol.dataReceived(frame(message_type, body))

    def frames(self) -> list[tuple[int, Any]]:
        return parse_frames(self.transport.value())

    def close(self) -> None:
        if not self.lost:
            self.lost = True
            self.protocol.connectionLost(Failure(ConnectionDone()))


@implementer(IStreamClientEndpoint)
class ScriptedEndpoint:
    """
    Each attempt takes the next outcome of C{script}: C{"refuse"} (the
    connect fails), C{"accept"} (registered), or a rejection text (the
    proxy answers success false and closes).  The last outcome repeats.
    """

    def __init__(self, clock: Clock, script: list[str]) -> None:
        self.clock = clock
        self.script = script
        self.attempts: list[float] = []
        self.connections: list[Connection] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        self.attempts.append(self.clock.seconds())
        outcome = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if outcome == "refuse":
            return fail(ConnectionRefusedError("scripted refusal"))
        connection = Connection(self, factory.buildProtocol(None))
        self.connections.append(connection)
        self.clock.callLater(0, self._answer, connection, outcome, f"c{len(self.connections)}")
        return succeed(connection.protocol)

    def _answer(self, connection: Connection, outcome: str, connection_id: str) -> None:
        if outcome == "accept":
            connection.feed(HANDSHAKE_RESPONSE, success_response(connection_id))
        else:
            connection.feed(HANDSHAKE_RESPONSE, failure_response(outcome))
            connection.close()

    def live(self) -> list[Connection]:
        return [c for c in self.connections if not c.lost]


def make(script: list[str], agent: Any = None, **kw: Any) -> tuple[AgentConnector, ScriptedEndpoint, Clock]:
    clock = Clock()
    endpoint = ScriptedEndpoint(clock, script)
    kw.setdefault("jitter", lambda: 0.0)
    kw.setdefault("health_interval", 0)
    connector = AgentConnector(
        agent if agent is not None else Agent(), endpoint, "waf-1", reactor=clock, **kw
    )
    return connector, endpoint, clock


def run(clock: Clock, seconds: float, step: float = 0.25) -> None:
    """Advance in steps; the scripted proxy answers in the same instant."""
    clock.advance(0)
    for _ in range(int(seconds / step)):
        clock.advance(step)
        clock.advance(0)


class BackoffTests(SynchronousTestCase):
    def test_transport_failures_back_off_exponentially(self) -> None:
        connector, endpoint, clock = make(["refuse"], initial_delay=1, factor=2, max_delay=8)
        connector.startService()
        run(clock, 40)
        self.assertEqual(endpoint.attempts[:7], [0, 1, 3, 7, 15, 23, 31])
        self.assertIsNone(connector.failure)

    def test_jitter_is_added_to_each_delay(self) -> None:
        connector, endpoint, clock = make(["refuse"], initial_delay=1, factor=2, max_delay=8, jitter=lambda: 0.5)
        connector.startService()
        run(clock, 10)
        self.assertEqual(endpoint.attempts[:4], [0, 1.5, 4.0, 8.5])

    def test_connection_limit_keeps_retrying_with_growing_delays(self) -> None:
        connector, endpoint, clock = make([LIMIT], initial_delay=1, factor=2, max_delay=4)
        connector.startService()
        run(clock, 20)
        self.assertEqual(endpoint.attempts[:6], [0, 1, 3, 7, 11, 15])
        self.assertIsNone(connector.failure)
        self.assertTrue(connector.slots[0].service.running)

    def test_backoff_starts_over_once_a_registered_connection_stayed_up(self) -> None:
        connector, endpoint, clock = make(["refuse", "refuse", "refuse", "accept", "refuse"], initial_delay=1, factor=2)
        connector.startService()
        run(clock, 7)
        self.assertEqual(endpoint.attempts, [0, 1, 3, 7])
        self.assertEqual(connector.registered_count, 1)
        self.assertEqual(connector.slots[0].retries, 3)
        run(clock, BACKOFF_RESET_AFTER)
        self.assertEqual(connector.slots[0].retries, 0)
        self.assertEqual(connector.health()["proxies"][0]["retries"], 0)
        lost_at = clock.seconds()
        endpoint.connections[-1].close()
        run(clock, 4)
        self.assertEqual([t - lost_at for t in endpoint.attempts[4:]], [1, 3])

    def test_a_proxy_that_registers_and_drops_is_redialled_with_growing_delays(self) -> None:
        """
        A registration alone does not reset the backoff: a connection lost
        sooner than BACKOFF_RESET_AFTER counts as a failed attempt.
        """
        connector, endpoint, clock = make(["accept"], initial_delay=1, factor=2, max_delay=60)
        connector.startService()
        clock.advance(0)
        gaps = []
        for _ in range(8):
            [live] = endpoint.live()
            self.assertTrue(live.protocol.registered)
            lost_at = clock.seconds()
            live.close()
            attempts = len(endpoint.attempts)
            for _ in range(60 * 4):  # until the redial, at most 60 s
                run(clock, 0.25)
                if len(endpoint.attempts) > attempts:
                    break
            gaps.append(endpoint.attempts[-1] - lost_at)
        self.assertEqual(gaps, [1, 2, 4, 8, 16, 32, 60, 60])
        self.assertEqual(connector.slots[0].retries, 8)
        connector.stopService()

    def test_a_connection_lost_just_before_the_minimum_time_up_counts_as_failed(self) -> None:
        connector, endpoint, clock = make(["accept"], initial_delay=1, factor=2)
        connector.startService()
        clock.advance(0)
        for expected in (1, 2, 4):
            run(clock, BACKOFF_RESET_AFTER - 0.25)
            lost_at = clock.seconds()
            endpoint.live()[0].close()
            run(clock, expected)
            self.assertEqual(endpoint.attempts[-1] - lost_at, expected)
        connector.stopService()

    def test_the_minimum_time_up_is_a_setting(self) -> None:
        connector, endpoint, clock = make(["accept"], initial_delay=1, factor=2, backoff_reset_after=2)
        self.assertEqual(connector.slots[0].backoff.reset_after, 2)
        connector.startService()
        clock.advance(0)
        for _ in range(3):
            run(clock, 2)
            lost_at = clock.seconds()
            endpoint.live()[0].close()
            run(clock, 1)
            self.assertEqual(endpoint.attempts[-1] - lost_at, 1)
        self.assertRaises(ValueError, make, ["accept"], backoff_reset_after=-1)
        connector.stopService()

    def test_reconnects_after_the_connection_drops(self) -> None:
        connector, endpoint, clock = make(["accept"], initial_delay=1)
        connector.startService()
        clock.advance(0)
        first = self.successResultOf(connector.when_registered())
        endpoint.connections[0].close()
        self.assertEqual(connector.registered_count, 0)
        clock.advance(1)
        clock.advance(0)
        second = self.successResultOf(connector.when_registered())
        self.assertIsNot(first, second)
        self.assertEqual(second.connection_id, "c2")


class FrameDeadlineTests(SynchronousTestCase):
    def test_a_proxy_that_stalls_mid_frame_is_cut_and_redialled_after_the_backoff(self) -> None:
        """
        The frame deadline closes a registered connection as any lost
        connection is: the slot redials after its backoff, never at once,
        so a proxy that stalls every connection mid-frame gets one attempt
        per deadline and backoff, not a loop; and as none of its
        connections lasted, the backoff grows.
        """
        connector, endpoint, clock = make(["accept"], initial_delay=1, frame_timeout=5)
        self.assertEqual(connector.settings.frame_timeout, 5)
        connector.startService()
        clock.advance(0)
        for i in range(4):
            [live] = endpoint.live()
            self.assertTrue(live.protocol.registered)
            live.protocol.dataReceived(frame(REQUEST_HEADERS, headers_event())[:20])
            clock.advance(4.9)
            self.assertFalse(live.transport.disconnecting)
            clock.advance(0.1)
            self.assertTrue(live.transport.disconnecting)
            live.close()
            self.assertEqual(connector.registered_count, 0)
            self.assertIn("Incomplete frame: 20 bytes of a frame received", connector.slots[0].last_error or "")
            run(clock, 2**i)
        self.assertEqual(endpoint.attempts, [0, 6, 13, 22, 35])
        self.assertEqual(connector.registered_count, 1)
        self.assertEqual(connector.slots[0].retries, 4)
        connector.stopService()


class RejectionTests(SynchronousTestCase):
    def test_fatal_rejections_stop_every_connection(self) -> None:
        for text in (
            NOT_ALLOWED,
            "Protocol version mismatch: expected 2, got 3",
            "Invalid message format: Authentication required but no token provided",
            "Authentication failed: invalid token for agent 'waf-1'",
        ):
            connector, endpoint, clock = make(["accept", "accept", text], connections=3)
            failed = connector.when_failed()
            waiting = connector.when_registered()
            connector.startService()
            clock.advance(0)
            error = self.successResultOf(failed)
            self.assertIsInstance(error, RegistrationRejected)
            self.assertEqual(error.reason, text)
            self.assertIs(connector.failure, error)
            self.assertEqual(len(endpoint.attempts), 3)
            run(clock, 120)
            self.assertEqual(len(endpoint.attempts), 3, "no retry after a fatal rejection")
            self.assertFalse(any(s.service.running for s in connector.slots))
            self.assertTrue(all(c.transport.disconnecting or c.lost for c in endpoint.connections))
            self.successResultOf(waiting)  # one registered before the rejection
            self.failureResultOf(connector.when_registered(), RegistrationRejected)

    def test_when_registered_fails_on_a_fatal_rejection(self) -> None:
        connector, endpoint, clock = make([NOT_ALLOWED])
        waiting = connector.when_registered()
        connector.startService()
        clock.advance(0)
        failure = self.failureResultOf(waiting, RegistrationRejected)
        self.assertIn("not in the allowed list", str(failure.value))

    def test_restart_after_a_fatal_rejection_tries_again(self) -> None:
        connector, endpoint, clock = make([NOT_ALLOWED, "accept"])
        connector.startService()
        clock.advance(0)
        self.assertIsNotNone(connector.failure)
        self.successResultOf(connector.stopService())
        connector.startService()
        clock.advance(0)
        self.assertIsNone(connector.failure)
        self.assertEqual(connector.registered_count, 1)


class ConnectionsTests(SynchronousTestCase):
    def test_keeps_n_connections(self) -> None:
        connector, endpoint, clock = make(["accept"], connections=3)
        connector.startService()
        clock.advance(0)
        self.assertEqual(connector.registered_count, 3)
        self.assertEqual(len({p.connection_id for p in connector.protocols()}), 3)

    def test_invalid_arguments(self) -> None:
        self.assertRaises(ValueError, make, ["accept"], connections=0)
        self.assertRaises(ValueError, AgentConnector, Agent(), ScriptedEndpoint(Clock(), ["x"]), "", reactor=Clock())

    def test_endpoint_strings_are_parsed(self) -> None:
        connector = AgentConnector(Agent(), "unix:/tmp/nowhere.sock", "a", reactor=Clock())
        self.assertEqual(connector.endpoint_description, "unix:/tmp/nowhere.sock")
        self.assertEqual(connector.endpoint._path, "/tmp/nowhere.sock")  # type: ignore[attr-defined]

    def test_tcp_and_tls_endpoint_strings(self) -> None:
        from twisted.internet.endpoints import TCP4ClientEndpoint

        tcp = AgentConnector(Agent(), "tcp:host=127.0.0.1:port=7000", "a", reactor=Clock())
        self.assertIsInstance(tcp.endpoint, TCP4ClientEndpoint)
        try:
            import OpenSSL  # noqa: F401
            import service_identity  # noqa: F401
        except ImportError:
            raise SkipTest("tls: endpoints need pyOpenSSL and service_identity") from None
        tls = AgentConnector(Agent(), "tls:proxy.example:7000", "a", reactor=MemoryReactorClock())
        self.assertEqual(tls.endpoint_description, "tls:proxy.example:7000")
        self.assertTrue(IStreamClientEndpoint.providedBy(tls.endpoint))


class DrainOnStopTests(SynchronousTestCase):
    def test_stop_drains_then_closes_and_stops_retrying(self) -> None:
        agent = RecordingAgent()
        connector, endpoint, clock = make(["accept"], agent=agent, drain_grace=10)
        connector.startService()
        clock.advance(0)
        connection = endpoint.connections[0]
        connection.feed(REQUEST_HEADERS, headers_event("slow"))
        stopped = connector.stopService()
        self.assertIn((FLOW_CONTROL, {"action": 1}), connection.frames())
        self.assertFalse(connection.transport.disconnecting)
        self.assertNoResult(stopped)
        agent.answer("slow")
        self.assertTrue(connection.transport.disconnecting)
        connection.close()
        self.successResultOf(stopped)
        run(clock, 120)
        self.assertEqual(len(endpoint.attempts), 1)
        self.assertFalse(connector.slots[0].service.running)

    def test_grace_period_bounds_the_stop(self) -> None:
        agent = RecordingAgent()
        connector, endpoint, clock = make(["accept"], agent=agent, drain_grace=5)
        connector.startService()
        clock.advance(0)
        endpoint.connections[0].feed(REQUEST_HEADERS, headers_event("stuck"))
        stopped = connector.stopService()
        clock.advance(5)
        self.assertEqual(agent.cancelled, ["stuck"])
        endpoint.connections[0].close()
        self.successResultOf(stopped)

    def test_stop_while_waiting_to_retry(self) -> None:
        connector, endpoint, clock = make(["refuse"])
        connector.startService()
        self.successResultOf(connector.stopService())
        run(clock, 120)
        self.assertEqual(len(endpoint.attempts), 1)


class LogRateLimitTests(SynchronousTestCase):
    def test_the_lines_of_a_flapping_proxy_are_rate_limited_per_slot(self) -> None:
        """
        However short the delays (a 0.25 s backoff cap here), each slot's
        registered, ended, reconnecting and retry lines come a few per
        period, then one line with the count of the rest; the other slot's
        are counted apart.
        """
        connector, endpoint, clock = make(["accept"], connections=2, initial_delay=0.25, max_delay=0.25)
        with captured_log() as events:
            connector.startService()
            clock.advance(0)
            for _ in range(20):
                for connection in endpoint.live():
                    connection.close()
                run(clock, 0.25)
            self.assertEqual(len(endpoint.attempts), 42)
            run(clock, 10)
            connector.stopService()
        lines = [formatEvent(e) or "" for e in events]
        for needle in (" registered connection ", " ended: ", "; reconnecting", ": retry "):
            matching = [line for line in lines if needle in line]
            # 5 per slot as they come, then 1 per slot with the count of the rest.
            self.assertEqual(len(matching), 12, (needle, matching))
            self.assertEqual(len([line for line in matching if "more like it in the last 10 s" in line]), 2)


    def test_every_connection_and_reconnection_shares_the_connectors_limiter(self) -> None:
        """A proxy cannot reset the per-frame warning limit by reconnecting."""
        connector, endpoint, clock = make(["accept"], connections=2)
        connector.startService()
        run(clock, 1)
        endpoint.connections[0].close()
        run(clock, 5)
        self.assertGreaterEqual(len(endpoint.connections), 3)
        for connection in endpoint.connections:
            self.assertIs(connection.protocol.log_limiter, connector.log_limiter)
        self.assertIs(connector.log_limiter.clock, clock)
        connector.stopService()
