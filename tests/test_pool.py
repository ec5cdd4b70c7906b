"""
L{AgentPool}: membership, routing (skip paused, least in flight, round
robin among equals), observers and statistics.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from sentinel_twisted import messages as m
from sentinel_twisted.errors import (
    AgentUnavailable,
    ConnectionClosed,
    FlowControlPaused,
    RequestCancelled,
)
from sentinel_twisted.proxy.connection import AgentConnection
from sentinel_twisted.proxy.pool import IAgentPoolObserver, PoolObserver
from sentinel_twisted.proxy.protocol import _holding
from sentinel_twisted.wire import MessageType, encode_frame

from ._proxy_support import (
    Proxy,
    answer_frame,
    captured_log,
    lose,
    request_headers,
    take_frames,
)
from .test_connection import SENDERS, all_events


class Recorder(PoolObserver):
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def agent_registered(self, connection: AgentConnection) -> None:
        self.calls.append(("registered", connection.connection_id))

    def agent_disconnected(self, connection: AgentConnection, reason: str) -> None:
        self.calls.append(("disconnected", connection.connection_id, reason))

    def health_changed(self, connection: AgentConnection, state: int | None) -> None:
        self.calls.append(("health", connection.connection_id, state))

    def flow_control_changed(self, connection: AgentConnection, paused: bool) -> None:
        self.calls.append(("flow", connection.connection_id, paused))

    def metrics_reported(self, connection: AgentConnection, report: dict[str, Any]) -> None:
        self.calls.append(("metrics", connection.connection_id, report))

    def config_update_requested(self, connection: AgentConnection, request: dict[str, Any]) -> None:
        self.calls.append(("config", connection.connection_id, request))

    def request_answered(self, connection: AgentConnection, correlation_id: str, seconds: float) -> None:
        self.calls.append(("answered", connection.connection_id, correlation_id, seconds))


class Broken(PoolObserver):
    def __getattribute__(self, name: str) -> Any:
        if name.startswith(("agent_", "health", "flow", "metrics", "config", "request")):
            def fail(*args: Any) -> None:
                raise RuntimeError(f"observer bug in {name}")
            return fail
        return super().__getattribute__(name)


def pause(protocol: Any, action: Any = 1) -> None:
    protocol.dataReceived(encode_frame(MessageType.FLOW_CONTROL, json.dumps({"action": action}).encode()))


class PoolTestCase(TestCase):
    def setUp(self) -> None:
        self.proxy = Proxy(max_connections_per_agent=10)
        self.pool = self.proxy.pool

    def register(self, agent_id: str = "waf-1") -> tuple[Any, Any, AgentConnection]:
        return self.proxy.register(agent_id)


class MembershipTests(PoolTestCase):
    def test_connections_join_in_registration_order(self) -> None:
        conns = [self.register("waf-1")[2] for _ in range(3)]
        self.assertEqual(self.pool.connections("waf-1"), conns)
        self.assertEqual(len(self.pool), 3)
        self.assertIn("waf-1", self.pool)

    def test_agents_are_listed_in_order_of_registration(self) -> None:
        for agent_id in ("b", "a", "c", "a"):
            self.register(agent_id)
        self.assertEqual(self.pool.agent_ids(), ["b", "a", "c"])

    def test_lost_connection_leaves_the_pool(self) -> None:
        protocol, _, first = self.register("waf-1")
        _, _, second = self.register("waf-1")
        lose(protocol)
        self.assertEqual(self.pool.connections("waf-1"), [second])
        self.assertIsNone(self.pool.connection(first.connection_id))

    def test_last_connection_lost_removes_the_agent(self) -> None:
        protocol, _, _ = self.register("waf-1")
        lose(protocol)
        self.assertNotIn("waf-1", self.pool)
        self.assertEqual(self.pool.agent_ids(), [])
        self.assertEqual(len(self.pool), 0)

    def test_round_robin_state_goes_with_the_last_connection(self) -> None:
        protocol, _, _ = self.register("waf-1")
        other, _, _ = self.register("waf-1")
        self.pool.select("waf-1")
        self.assertIn("waf-1", self.pool._turn)
        lose(protocol)
        self.assertIn("waf-1", self.pool._turn)
        lose(other)
        self.assertNotIn("waf-1", self.pool._turn)

    def test_the_last_choice_goes_with_its_connection(self) -> None:
        # The connection an agent's last request went to is not kept once
        # it has left the pool.
        protocol, _, first = self.register("waf-1")
        self.register("waf-1")
        self.assertIs(self.pool.select("waf-1"), first)
        self.assertIs(self.pool._last["waf-1"][0], first)
        lose(protocol)
        self.assertNotIn("waf-1", self.pool._last)

    def test_connection_by_id(self) -> None:
        _, _, connection = self.register()
        self.assertIs(self.pool.connection(connection.connection_id), connection)

    def test_removing_an_unknown_connection_does_nothing(self) -> None:
        _, _, connection = self.register()
        self.pool.remove(connection)
        self.pool.remove(connection)
        self.assertEqual(len(self.pool), 0)

    def test_in_flight_sums_every_connection(self) -> None:
        _, _, a = self.register("a")
        _, _, b = self.register("b")
        a.send_request_headers(request_headers("1"))
        b.send_request_headers(request_headers("2"))
        b.send_request_headers(request_headers("3"))
        self.assertEqual(self.pool.in_flight, 3)


class SelectionTests(PoolTestCase):
    def test_unknown_agent_is_unavailable(self) -> None:
        with self.assertRaises(AgentUnavailable) as caught:
            self.pool.select("nobody")
        self.assertEqual(str(caught.exception), "Agent unavailable")

    def test_single_paused_connection_is_flow_control_paused(self) -> None:
        protocol, _, _ = self.register()
        pause(protocol)
        with self.assertRaises(FlowControlPaused) as caught:
            self.pool.select("waf-1")
        self.assertEqual(
            str(caught.exception), "Flow control paused: agent 'waf-1' requested backpressure"
        )

    def test_all_paused_is_flow_control_paused(self) -> None:
        for _ in range(3):
            pause(self.register()[0])
        self.assertRaises(FlowControlPaused, self.pool.select, "waf-1")

    def test_paused_connections_are_skipped(self) -> None:
        first, _, _ = self.register()
        _, _, second = self.register()
        third, _, _ = self.register()
        pause(first)
        pause(third)
        for _ in range(5):
            self.assertIs(self.pool.select("waf-1"), second)

    def test_resumed_connection_is_used_again(self) -> None:
        protocol, _, connection = self.register()
        pause(protocol)
        pause(protocol, 2)
        self.assertIs(self.pool.select("waf-1"), connection)

    def test_struct_form_pause_is_honoured(self) -> None:
        protocol, _, _ = self.register()
        pause(protocol, {"type": "pause"})
        self.assertRaises(FlowControlPaused, self.pool.select, "waf-1")

    def test_least_in_flight_is_chosen(self) -> None:
        conns = [self.register()[2] for _ in range(3)]
        for i in range(2):
            conns[0].send_request_headers(request_headers(f"a{i}"))
        conns[2].send_request_headers(request_headers("c"))
        for _ in range(4):
            self.assertIs(self.pool.select("waf-1"), conns[1])

    def test_round_robin_among_equals(self) -> None:
        conns = [self.register()[2] for _ in range(3)]
        chosen = [self.pool.select("waf-1") for _ in range(6)]
        self.assertEqual(chosen, conns + conns)

    def test_sending_spreads_requests_over_connections(self) -> None:
        conns = [self.register()[2] for _ in range(3)]
        for i in range(9):
            self.pool.send_request_headers("waf-1", request_headers(f"r{i}"))
        self.assertEqual([c.in_flight for c in conns], [3, 3, 3])

    def test_a_choice_of_an_earlier_read_is_not_joined(self) -> None:
        # The connection an agent's last request went to is joined without
        # a scan only within the holding period it was chosen in: later, a
        # connection that went idle meanwhile wins again, even when the
        # earlier choice holds frames once more.
        first, _, one = self.register()
        second, _, two = self.register()
        waiting = [one.send_request_headers(request_headers(f"a-{n}")) for n in range(50)]
        waiting += [two.send_request_headers(request_headers(f"b-{n}")) for n in range(51)]
        for d in waiting:
            d.addErrback(lambda f: None)
        self.assertIs(self.pool.select("waf-1"), one)
        for n in range(51):
            second.dataReceived(answer_frame(f"b-{n}"))
        self.assertEqual((one.in_flight, two.in_flight), (50, 0))
        _holding[first] = None
        self.addCleanup(_holding.clear)
        self.assertIs(self.pool.select("waf-1"), two)

    def test_closing_connection_is_skipped(self) -> None:
        _, _, first = self.register()
        _, _, second = self.register()
        first.mark_closing("closing")
        self.assertIs(self.pool.select("waf-1"), second)

    def test_only_closing_connections_is_agent_unavailable(self) -> None:
        # A connection being closed (drained, lost) leaves the pool: the
        # agent asked for no backpressure, so FlowControlPaused would lie.
        _, _, only = self.register()
        only.mark_closing("closing")
        with self.assertRaises(AgentUnavailable) as caught:
            self.pool.select("waf-1")
        self.assertEqual(str(caught.exception), "Agent unavailable")
        _, _, second = self.register()
        second.mark_closing("closing")
        self.assertRaises(AgentUnavailable, self.pool.select, "waf-1")

    def test_closing_and_paused_connections_are_flow_control_paused(self) -> None:
        _, _, first = self.register()
        second, _, _ = self.register()
        first.mark_closing("closing")
        pause(second)
        self.assertRaises(FlowControlPaused, self.pool.select, "waf-1")

    def test_request_failed_by_a_lost_connection_finds_the_agent_unavailable(self) -> None:
        # Its failure arrives while the lost connection is still listed: a
        # caller that tries the agent again learns that it has no connection.
        protocol, _, _ = self.register()
        retried: list[BaseException] = []

        def retry(failure: Any) -> None:
            failure.trap(ConnectionClosed)
            try:
                self.pool.select("waf-1")
            except Exception as e:
                retried.append(e)

        self.pool.send_request_headers("waf-1", request_headers("a")).addErrback(retry)
        lose(protocol)
        self.assertEqual([type(e) for e in retried], [AgentUnavailable])


class SendingTests(PoolTestCase):
    def test_every_send_method_routes_to_a_connection(self) -> None:
        _, transport, _ = self.register()
        for i, (sender, event) in enumerate(zip(SENDERS, all_events(), strict=True)):
            getattr(self.pool, sender)("waf-1", event, f"c{i}")
        frames = take_frames(transport)
        self.assertEqual([t for t, _ in frames], [e.message_type for e in all_events()])

    def test_answer_reaches_the_caller(self) -> None:
        protocol, _, _ = self.register()
        deferred = self.pool.send_request_headers("waf-1", request_headers("a"))
        protocol.dataReceived(answer_frame("a", m.Block(451)))
        self.assertEqual(self.successResultOf(deferred).decision, m.Block(451))

    def test_send_to_unknown_agent_fails_with_agent_unavailable(self) -> None:
        self.failureResultOf(
            self.pool.send_request_headers("nobody", request_headers("a")), AgentUnavailable
        )

    def test_send_to_paused_agent_fails_with_flow_control_paused(self) -> None:
        protocol, transport, _ = self.register()
        pause(protocol)
        take_frames(transport)
        self.failureResultOf(
            self.pool.send_request_headers("waf-1", request_headers("a")), FlowControlPaused
        )
        self.assertEqual(transport.value(), b"")

    def test_cancel_request_finds_the_connection(self) -> None:
        self.register()
        _, transport, _ = self.register()
        self.pool.select("waf-1")  # the next request goes to the second connection
        deferred = self.pool.send_request_headers("waf-1", request_headers("x"))
        take_frames(transport)
        self.assertTrue(self.pool.cancel_request("x", m.CancelReason.UPSTREAM_ERROR))
        [(kind, payload)] = take_frames(transport)
        self.assertEqual(kind, MessageType.CANCEL)
        self.assertEqual(json.loads(payload)["reason"], 3)
        self.failureResultOf(deferred, RequestCancelled)
        self.assertFalse(self.pool.cancel_request("x"))

    def test_cancel_request_cancels_an_id_on_every_agent_holding_it(self) -> None:
        # The gateway sends one request's id to every agent it consults.
        _, transport_a, a = self.register("a")
        _, transport_b, b = self.register("b")
        waiting = [conn.send_request_headers(request_headers("shared")) for conn in (a, b)]
        take_frames(transport_a)
        take_frames(transport_b)
        self.assertTrue(self.pool.cancel_request("shared", m.CancelReason.CLIENT_DISCONNECT))
        for transport in (transport_a, transport_b):
            [(kind, payload)] = take_frames(transport)
            self.assertEqual(kind, MessageType.CANCEL)
            self.assertEqual(json.loads(payload)["reason"], 0)
        for deferred in waiting:
            self.failureResultOf(deferred, RequestCancelled)
        self.assertEqual(self.pool.in_flight, 0)
        self.assertFalse(self.pool.cancel_request("shared"))

    def test_cancel_all_counts_every_agent(self) -> None:
        _, _, a = self.register("a")
        _, _, b = self.register("b")
        a.send_request_headers(request_headers("1")).addErrback(lambda f: None)
        b.send_request_headers(request_headers("2")).addErrback(lambda f: None)
        b.send_request_headers(request_headers("3")).addErrback(lambda f: None)
        self.assertEqual(self.pool.cancel_all(agent_id="b"), 2)
        self.assertEqual(self.pool.cancel_all(), 1)
        self.assertEqual(self.pool.in_flight, 0)

    def test_close_all_fires_when_every_connection_is_gone(self) -> None:
        protocols = [self.register(agent)[0] for agent in ("a", "b")]
        deferred = self.pool.close_all()
        self.assertNoResult(deferred)
        for protocol in protocols:
            self.assertTrue(protocol.transport.disconnecting)
            lose(protocol)
        self.successResultOf(deferred)
        self.assertEqual(len(self.pool), 0)

    def test_connection_loss_fails_pool_requests(self) -> None:
        protocol, _, _ = self.register()
        deferred = self.pool.send_request_headers("waf-1", request_headers("a"))
        lose(protocol)
        self.failureResultOf(deferred, ConnectionClosed)
        self.assertEqual(self.pool.in_flight, 0)


class ObserverTests(PoolTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.recorder = Recorder()
        self.pool.add_observer(self.recorder)

    def test_pool_observer_provides_the_interface(self) -> None:
        self.assertTrue(verifyObject(IAgentPoolObserver, PoolObserver()))

    def test_registration_and_loss_are_observed(self) -> None:
        protocol, _, connection = self.register()
        lose(protocol)
        cid = connection.connection_id
        self.assertEqual(
            self.recorder.calls,
            [("registered", cid), ("disconnected", cid, "connection closed by agent")],
        )

    def test_control_messages_are_observed(self) -> None:
        protocol, _, connection = self.register()
        cid = connection.connection_id
        protocol.dataReceived(
            encode_frame(MessageType.HEALTH_STATUS, b'{"state": 2}')
            + encode_frame(MessageType.FLOW_CONTROL, b'{"action": 1}')
            + encode_frame(MessageType.METRICS_REPORT, b'{"counters": []}')
            + encode_frame(MessageType.CONFIG_UPDATE_REQUEST, b'{"request_id": "r"}')
        )
        self.assertEqual(
            self.recorder.calls[1:],
            [
                ("health", cid, 2),
                ("flow", cid, True),
                ("metrics", cid, {"counters": []}),
                ("config", cid, {"request_id": "r"}),
            ],
        )

    def test_answers_are_observed_with_their_round_trip(self) -> None:
        protocol, _, connection = self.register()
        self.pool.send_request_headers("waf-1", request_headers("a"))
        self.proxy.clock.advance(0.125)
        protocol.dataReceived(answer_frame("a"))
        self.assertIn(("answered", connection.connection_id, "a", 0.125), self.recorder.calls)

    def test_answers_are_timed_only_while_an_observer_wants_them(self) -> None:
        # PoolObserver's own request_answered does nothing: not an answer observer.
        self.pool.remove_observer(self.recorder)
        self.pool.add_observer(PoolObserver())
        self.assertIsNone(self.pool._answer_observer)
        self.pool.add_observer(self.recorder)
        # One observer: its connections call it without the pool in between.
        self.assertEqual(self.pool._answer_observer, self.recorder.request_answered)
        second = Recorder()
        self.pool.add_observer(second)
        self.assertEqual(self.pool._answer_observer, self.pool._connection_answered)
        self.pool.remove_observer(self.recorder)
        self.assertEqual(self.pool._answer_observer, second.request_answered)
        self.pool.remove_observer(second)
        self.assertIsNone(self.pool._answer_observer)

    def answered_with_only(self, observer: Any) -> Any:
        """One answer with C{observer} the pool's only one; the failure logged."""
        self.pool.remove_observer(self.recorder)
        self.pool.add_observer(observer)
        protocol, _, connection = self.register()
        deferred = self.pool.send_request_headers("waf-1", request_headers("a"))
        with captured_log() as events:
            protocol.dataReceived(answer_frame("a"))
        self.assertTrue(self.successResultOf(deferred).is_allow)
        [event] = [e for e in events if "log_failure" in e]
        self.assertIs(event["observer"], observer)
        return event

    def test_the_one_observers_exception_is_logged_and_the_answer_goes_on(self) -> None:
        event = self.answered_with_only(Broken())
        self.assertEqual(event["method"], "request_answered")
        # Its agent_registered failed too, at registration.
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_an_observer_that_leaves_and_raises_is_named(self) -> None:
        pool = self.pool

        class Leaving(Recorder):
            def request_answered(self, connection: AgentConnection, correlation_id: str, seconds: float) -> None:
                pool.remove_observer(self)
                raise RuntimeError("observer bug")

        self.answered_with_only(Leaving())
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertIsNone(self.pool._answer_observer)

    def test_answers_are_observed_by_the_observers_there_at_the_time(self) -> None:
        protocol, _, connection = self.register()
        second = Recorder()

        class Leaving(PoolObserver):
            def request_answered(inner, connection: AgentConnection, correlation_id: str, seconds: float) -> None:
                self.pool.remove_observer(inner)
                self.pool.add_observer(second)

        self.pool.add_observer(Leaving())
        for cid in ("a", "b"):
            self.pool.send_request_headers("waf-1", request_headers(cid))
            protocol.dataReceived(answer_frame(cid))
        answered = [c[2] for c in self.recorder.calls if c[0] == "answered"]
        self.assertEqual(answered, ["a", "b"])
        # Added during the first notification: told from the second on.
        self.assertEqual([c[2] for c in second.calls if c[0] == "answered"], ["b"])
        self.pool.remove_observer(self.recorder)
        self.pool.send_request_headers("waf-1", request_headers("c"))
        protocol.dataReceived(answer_frame("c"))
        self.assertEqual([c[2] for c in self.recorder.calls if c[0] == "answered"], ["a", "b"])

    def test_observer_exceptions_do_not_break_the_pool(self) -> None:
        self.pool.remove_observer(self.recorder)
        self.pool.add_observer(Broken())
        self.pool.add_observer(self.recorder)
        with captured_log() as events:
            protocol, _, connection = self.register()
            deferred = self.pool.send_request_headers("waf-1", request_headers("a"))
            protocol.dataReceived(
                encode_frame(MessageType.HEALTH_STATUS, b'{"state": 1}') + answer_frame("a")
            )
            lose(protocol)
        self.assertTrue(self.successResultOf(deferred).is_allow)
        self.assertEqual(
            [c[0] for c in self.recorder.calls], ["registered", "health", "answered", "disconnected"]
        )
        failures = [e for e in events if "log_failure" in e]
        self.assertEqual(len(failures), 4)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 4)
        self.assertEqual(self.pool.agent_ids(), [])
        self.assertEqual(self.proxy.factory.registered_connections("waf-1"), 0)

    def test_observer_without_every_method_is_fine(self) -> None:
        class OnlyRegistrations:
            def __init__(self) -> None:
                self.seen: list[str] = []

            def agent_registered(self, connection: AgentConnection) -> None:
                self.seen.append(connection.agent_id)

        partial = OnlyRegistrations()
        self.pool.add_observer(partial)  # type: ignore[arg-type]
        protocol, _, _ = self.register()
        protocol.dataReceived(encode_frame(MessageType.FLOW_CONTROL, b'{"action": 1}'))
        lose(protocol)
        self.assertEqual(partial.seen, ["waf-1"])

    def test_removed_observer_hears_nothing(self) -> None:
        self.pool.remove_observer(self.recorder)
        self.register()
        self.assertEqual(self.recorder.calls, [])


class StatsTests(PoolTestCase):
    def test_stats_per_agent(self) -> None:
        first_protocol, _, first = self.register("waf-1")
        _, _, second = self.register("waf-1")
        _, _, other = self.register("auth")
        first.send_request_headers(request_headers("a"))
        first.send_request_headers(request_headers("b"))
        second.send_request_headers(request_headers("c"))
        pause(first_protocol)
        first_protocol.dataReceived(encode_frame(MessageType.HEALTH_STATUS, b'{"state": 2}'))
        stats = self.pool.stats()
        self.assertEqual([s.agent_id for s in stats], ["waf-1", "auth"])
        waf = stats[0]
        self.assertEqual(waf.in_flight, 3)
        self.assertEqual(waf.paused_connections, 1)
        self.assertEqual(
            [c.connection_id for c in waf.connections], [first.connection_id, second.connection_id]
        )
        info = waf.connections[0]
        self.assertEqual(info.in_flight, 2)
        self.assertTrue(info.paused)
        self.assertEqual(info.health, 2)
        self.assertEqual(info.capabilities.agent_id, "waf-1")
        self.assertIsNone(info.metadata)
        self.assertGreater(info.connected_since, 0)
        self.assertEqual(stats[1].connections[0].connection_id, other.connection_id)

    def test_stats_encode_as_json(self) -> None:
        self.register()
        doc = json.loads(m.encode(self.pool.stats()))
        self.assertEqual(doc[0]["agent_id"], "waf-1")
        self.assertIn("connected_since", doc[0]["connections"][0])

    def test_stats_of_an_empty_pool(self) -> None:
        self.assertEqual(self.pool.stats(), [])
