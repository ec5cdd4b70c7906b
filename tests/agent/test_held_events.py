"""
The bytes of events all the connections of an agent process hold, against
one limit (L{HeldEventBudget}), as each connection's own
C{max_held_event_bytes} bounds what it holds.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from sentinel_twisted import messages as m
from sentinel_twisted.agent import Agent, AgentClientFactory, AgentConnector, AgentListener, allow
from sentinel_twisted.agent.budget import DEFAULT_MAX_TOTAL_HELD_EVENT_BYTES, HeldEventBudget
from sentinel_twisted.agent.forward import ForwardAgentFactory
from sentinel_twisted.agent.protocol import AgentSettings

from .._proxy_support import captured_log
from ._support import (
    CANCEL,
    HANDSHAKE_REQUEST,
    HANDSHAKE_RESPONSE,
    REQUEST_HEADERS,
    RecordingAgent,
    frame,
    headers_event,
    parse_frames,
    success_response,
    temp_path,
)
from .test_backpressure import warnings
from .test_forward import handshake
from .test_tap_listen import parse

PAD = {"x-pad": ["p" * 3000]}
#: What one padded event with a two-character id counts for (its payload;
#: under 4 KiB, no values are counted).
SIZE = len(json.dumps(headers_event("xx", headers=PAD)).encode())


class Connections:
    """A dialled and a listening connection sharing one budget, each over a StringTransport."""

    def __init__(self, limit: int, **settings: Any) -> None:
        self.agent = RecordingAgent()
        self.clock = Clock()
        self.budget = HeldEventBudget(limit)
        options = {"agent": self.agent, "agent_id": "waf-1", "health_interval": 0, **settings}
        dialling = AgentClientFactory(AgentSettings(**options), self.clock, held_event_budget=self.budget)
        listening = ForwardAgentFactory(AgentSettings(**options), self.clock, held_event_budget=self.budget)
        self.reverse = dialling.buildProtocol(UNIXAddress(None))
        self.reverse_transport = StringTransport()
        self.reverse.makeConnection(self.reverse_transport)
        self.reverse.dataReceived(frame(HANDSHAKE_RESPONSE, success_response()))
        self.forward = listening.buildProtocol(UNIXAddress(None))
        self.forward_transport = StringTransport()
        self.forward.makeConnection(self.forward_transport)
        self.forward.dataReceived(frame(HANDSHAKE_REQUEST, handshake()))

    def send(self, protocol: Any, cid: str) -> None:
        protocol.dataReceived(frame(REQUEST_HEADERS, headers_event(cid, headers=PAD)))

    def overloaded(self, transport: StringTransport) -> list[str]:
        """The ids answered at once with 503."""
        return [
            body["audit"]["custom"]["correlation_id"]
            for kind, body in parse_frames(transport.value())
            if kind == 0x20 and (body["decision"].get("block") or {}).get("status") == 503
        ]


class HeldEventBudgetTests(SynchronousTestCase):
    def test_connections_together_are_bounded_by_the_shared_budget(self) -> None:
        # Each connection may hold three events; together they hold two.
        c = Connections(2 * SIZE + 10, max_held_event_bytes=3 * SIZE + 10)
        c.send(c.reverse, "r1")
        c.send(c.forward, "f1")
        self.assertEqual(c.budget.total, 2 * SIZE)
        with captured_log() as events:
            c.send(c.forward, "f2")
            c.send(c.reverse, "r2")
        self.assertEqual(sorted(c.agent.waiting), ["f1", "r1"])
        self.assertEqual(c.overloaded(c.forward_transport), ["f2"])
        self.assertEqual(c.overloaded(c.reverse_transport), ["r2"])
        self.assertEqual(c.budget.refused, 2)
        self.assertEqual(c.budget.total, 2 * SIZE)
        self.assertIn(
            f"Agent waf-1's proxy connections hold {2 * SIZE} bytes of events (limit {2 * SIZE + 10} "
            "for all of them) and the proxy keeps sending on connection waf-1-fwd-1; answering 'f2' "
            "with the error decision",
            warnings(events),
        )
        # Room again once one is answered.
        c.agent.answer("r1")
        c.send(c.forward, "f3")
        self.assertEqual(sorted(c.agent.waiting), ["f1", "f3"])

    def test_answers_cancels_and_lost_connections_give_their_bytes_back(self) -> None:
        c = Connections(10 * SIZE)
        for cid in ("r1", "r2", "r3"):
            c.send(c.reverse, cid)
        for cid in ("f1", "f2"):
            c.send(c.forward, cid)
        self.assertEqual(c.budget.total, 5 * SIZE)
        c.agent.answer("r1")
        c.reverse.dataReceived(frame(CANCEL, {"correlation_id": "r2", "reason": 0, "timestamp_ms": 1}))
        self.assertEqual(c.budget.total, 3 * SIZE)
        c.forward_transport.disconnecting = True
        c.forward.connectionLost()
        self.assertEqual(c.budget.total, SIZE)
        c.reverse.close()
        self.assertEqual(c.budget.total, 0)

    def test_one_event_is_served_when_nothing_is_held(self) -> None:
        c = Connections(10)
        c.send(c.forward, "alone")
        self.assertEqual(sorted(c.agent.waiting), ["alone"])
        c.send(c.reverse, "second")
        self.assertEqual(c.overloaded(c.reverse_transport), ["second"])

    def test_the_default_and_bad_limits(self) -> None:
        self.assertEqual(HeldEventBudget().limit, DEFAULT_MAX_TOTAL_HELD_EVENT_BYTES)
        self.assertEqual(DEFAULT_MAX_TOTAL_HELD_EVENT_BYTES, 256 * 1024 * 1024)
        for value in (0, -1):
            self.assertRaises(ValueError, HeldEventBudget, value)

    def test_a_connector_and_a_listener_have_one_of_their_own_unless_given_one(self) -> None:
        connector = AgentConnector(Agent(), "unix:/tmp/proxy.sock", "waf-1", reactor=Clock())
        self.assertEqual(connector.held_event_budget.limit, DEFAULT_MAX_TOTAL_HELD_EVENT_BYTES)
        listener = AgentListener(
            Agent(), "unix:/tmp/agent.sock", "waf-1", reactor=Clock(), max_total_held_event_bytes=1000
        )
        self.assertEqual(listener.factory.held_event_budget.limit, 1000)
        shared = HeldEventBudget(5000)
        connector = AgentConnector(Agent(), "unix:/tmp/proxy.sock", "waf-1", reactor=Clock(), held_event_budget=shared)
        self.assertIs(connector.held_event_budget, shared)


class OptionTests(SynchronousTestCase):
    def test_one_budget_for_every_proxy_connection(self) -> None:
        from sentinel_twisted.agent.tap import make_agent_service

        path = temp_path(self, "agent.sock")
        options = parse("--listen", f"unix:{path}", "--connect", "unix:/tmp/proxy.sock")
        service = make_agent_service(options, reactor=Clock())
        assert service.listener is not None and service.connector is not None
        self.assertIs(service.connector.held_event_budget, service.listener.factory.held_event_budget)
        self.assertEqual(service.connector.held_event_budget.limit, DEFAULT_MAX_TOTAL_HELD_EVENT_BYTES)
        options = parse("--connect", "unix:/tmp/proxy.sock", "--max-total-held-event-bytes", "1000")
        service = make_agent_service(options, reactor=Clock())
        assert service.connector is not None
        self.assertEqual(service.connector.held_event_budget.limit, 1000)

    def test_bad_values(self) -> None:
        for value in ("0", "-1", "many"):
            with self.subTest(value=value):
                error = self.assertRaises(
                    usage.UsageError, parse, "--connect", "unix:/tmp/p.sock", "--max-total-held-event-bytes", value
                )
                self.assertIn(f"--max-total-held-event-bytes: expected a positive integer, got {value!r}", str(error))


class _Scripted(Agent):
    """
    Request headers whose id starts with C{sync} are answered at once, with
    C{raise} raise, with C{broken} return an answer broken inside; the
    others wait on a Deferred the test answers, fails or leaves.
    """

    def __init__(self) -> None:
        self.waiting: list[Deferred[Any]] = []

    def on_request_headers(self, event: Any) -> Any:
        cid = event.metadata.correlation_id
        if cid.startswith("sync"):
            return allow()
        if cid.startswith("raise"):
            raise RuntimeError("boom")
        if cid.startswith("broken"):
            return m.AgentResponse(audit=None)  # type: ignore[arg-type]
        d: Deferred[Any] = Deferred()
        self.waiting.append(d)
        return d


_IDS = st.sampled_from(["a", "b", "c", "sync-1", "raise-1", "broken-1"])
_STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("event"), st.integers(0, 2), _IDS, st.integers(0, 3)),
        st.tuples(st.just("cancel"), st.integers(0, 2), _IDS),
        st.tuples(st.just("answer"), st.integers(0, 20)),
        st.tuples(st.just("fail"), st.integers(0, 20)),
        st.tuples(st.just("lose"), st.integers(0, 2)),
        st.tuples(st.just("close"), st.integers(0, 2)),
        st.tuples(st.just("drain"), st.integers(0, 2)),
        st.tuples(st.just("garble"), st.integers(0, 2)),
        st.tuples(st.just("time"), st.sampled_from([0.5, 2.0, 6.0])),
    ),
    max_size=40,
)


class BudgetAccountTests(SynchronousTestCase):
    """
    Whatever the proxy and the handlers do, the shared budget holds what the
    connections hold, and nothing once they are gone: a budget that drifts
    up answers 503 for good, one that drifts down lets more through.
    """

    @settings(max_examples=300, deadline=None, database=None)
    @given(_STEPS)
    def test_the_budget_is_what_the_connections_hold(self, steps: list[tuple[Any, ...]]) -> None:
        agent = _Scripted()
        clock = Clock()
        budget = HeldEventBudget(3 * SIZE)
        options = {
            "agent": agent,
            "agent_id": "waf-1",
            "health_interval": 0,
            "max_concurrency": 2,
            "max_queued": 2,
            "max_held_event_bytes": 2 * SIZE + 100,
        }
        dialling = AgentClientFactory(AgentSettings(**options), clock, held_event_budget=budget)
        listening = ForwardAgentFactory(
            AgentSettings(**options), clock, held_event_budget=budget, idle_timeout=5, max_connections=2
        )
        protocols: list[Any] = []
        for i in range(3):
            if i == 0:
                protocol = dialling.buildProtocol(UNIXAddress(None))
                opening = frame(HANDSHAKE_RESPONSE, success_response())
            else:
                protocol = listening.buildProtocol(UNIXAddress(None))
                opening = frame(HANDSHAKE_REQUEST, handshake())
            protocol.makeConnection(StringTransport())
            protocol.dataReceived(opening)
            protocols.append(protocol)

        def check() -> None:
            for p in protocols:
                held = sum(e.size for e in [*p._active.values(), *p._queue.values()])
                self.assertEqual(p._held_bytes, held)
            self.assertEqual(budget.total, sum(p._held_bytes for p in protocols))

        def lose(p: Any) -> None:
            if not p._transport_gone:
                p.transport.disconnecting = True
                p.connectionLost()

        for step in steps:
            kind, *args = step
            if kind == "event":
                index, cid, pad = args
                padding = {"x-pad": ["p" * (1000 * pad)]}
                protocols[index].dataReceived(frame(REQUEST_HEADERS, headers_event(cid, headers=padding)))
            elif kind == "cancel":
                index, cid = args
                cancel = {"correlation_id": cid, "reason": 0, "timestamp_ms": 1}
                protocols[index].dataReceived(frame(CANCEL, cancel))
            elif kind in ("answer", "fail"):
                waiting = [d for d in agent.waiting if not d.called]
                if waiting:
                    d = waiting[args[0] % len(waiting)]
                    if kind == "answer":
                        d.callback(allow())
                    else:
                        d.errback(RuntimeError("late failure"))
            elif kind == "lose":
                lose(protocols[args[0]])
            elif kind == "close":
                protocols[args[0]].close("test")
            elif kind == "drain":
                protocols[args[0]].drain(3)
            elif kind == "garble":
                protocols[args[0]].dataReceived(b"\x00\x00\x00\x00")
            else:
                clock.advance(args[0])
            check()
        for p in protocols:
            lose(p)
        for d in agent.waiting:
            if not d.called:
                d.callback(allow())
        check()
        self.assertEqual(budget.total, 0)
        # Nothing of the listener's is left behind: no connection, no timer.
        self.assertEqual(listening.connections, set())
        self.assertEqual((len(listening._never_used), len(listening._used)), (0, 0))
        self.assertEqual([c for c in clock.getDelayedCalls() if c.active()], [])
        self.flushLoggedErrors(RuntimeError, AttributeError)
