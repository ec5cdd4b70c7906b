"""
The bytes of events all the connections of an agent process hold, against
one limit (L{HeldEventBudget}), as each connection's own
C{max_held_event_bytes} bounds what it holds.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.address import UNIXAddress
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from sentinel_twisted.agent import Agent, AgentClientFactory, AgentConnector, AgentListener
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
