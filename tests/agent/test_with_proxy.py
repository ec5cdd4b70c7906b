"""
Our agent against this project's proxy side (L{ReverseConnectionFactory}
and L{AgentPool}) over real UNIX sockets in a temporary directory:
registration and every rejection, reconnection after the proxy restarts,
cancel, flow control, health, ping, and draining on stop.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Generator
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.trial.unittest import TestCase

from sentinel_twisted import messages as m
from sentinel_twisted.agent import AgentConnector, RegistrationRejected, block
from sentinel_twisted.errors import FlowControlPaused, RequestCancelled
from sentinel_twisted.proxy.auth import StaticTokenChecker
from sentinel_twisted.proxy.config import ReverseConnectionConfig
from sentinel_twisted.proxy.factory import ReverseConnectionFactory

from ._support import RecordingAgent, wait_for


def headers(cid: str, uri: str = "/") -> m.RequestHeadersEvent:
    return m.RequestHeadersEvent(
        metadata=m.RequestMetadata(
            correlation_id=cid, request_id=cid, client_ip="127.0.0.1", client_port=1, timestamp="t"
        ),
        method="GET",
        uri=uri,
    )


class WithOurProxyTests(TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="sentinel-agent-")
        self.path = os.path.join(self.dir, "proxy.sock")
        self.port: Any = None
        self.connectors: list[AgentConnector] = []

    @inlineCallbacks
    def tearDown(self) -> Generator[Any, Any, None]:
        for connector in self.connectors:
            if connector.running:
                yield connector.stopService()
        if self.port is not None:
            yield self.stop_proxy()
        if os.path.exists(self.path):
            os.unlink(self.path)
        os.rmdir(self.dir)

    @inlineCallbacks
    def start_proxy(self, token_checker: Any = None, **config: Any) -> Generator[Any, Any, ReverseConnectionFactory]:
        self.factory = ReverseConnectionFactory(
            ReverseConnectionConfig(**config), token_checker=token_checker, clock=reactor
        )
        self.port = yield UNIXServerEndpoint(reactor, self.path).listen(self.factory)
        return self.factory

    @inlineCallbacks
    def stop_proxy(self) -> Generator[Any, Any, None]:
        port, self.port = self.port, None
        yield port.stopListening()
        yield self.factory.pool.close_all("proxy restarting")

    def agent(self, agent: Any = None, **kw: Any) -> AgentConnector:
        kw.setdefault("initial_delay", 0.02)
        kw.setdefault("max_delay", 0.1)
        kw.setdefault("jitter", lambda: 0.0)
        kw.setdefault("drain_grace", 2.0)
        kw.setdefault("agent_id", "waf-1")
        connector = AgentConnector(
            agent if agent is not None else RecordingAgent(), f"unix:{self.path}", reactor=reactor, **kw
        )
        self.connectors.append(connector)
        connector.startService()
        return connector

    # -- registration -------------------------------------------------------------

    @inlineCallbacks
    def test_registers_and_answers(self) -> Generator[Any, Any, None]:
        factory = yield self.start_proxy()
        agent = RecordingAgent()
        connector = self.agent(agent)
        protocol = yield connector.when_registered()
        self.assertEqual(factory.pool.agent_ids(), ["waf-1"])
        [conn] = factory.pool.connections("waf-1")
        self.assertEqual(conn.connection_id, protocol.connection_id)
        self.assertEqual(conn.capabilities.supported_events, [1])
        pending = factory.pool.send_request_headers("waf-1", headers("q1", "/admin"))
        yield wait_for(lambda: "q1" in agent.waiting, "the handler to run")
        agent.answer("q1", block(403, "Forbidden"))
        answer = yield pending
        self.assertEqual(answer.decision, m.Block(403, "Forbidden", None))
        self.assertEqual(answer.correlation_id, "q1")

    @inlineCallbacks
    def test_n_connections(self) -> Generator[Any, Any, None]:
        factory = yield self.start_proxy()
        connector = self.agent(connections=3)
        yield wait_for(lambda: connector.registered_count == 3, "three registrations")
        self.assertEqual(len(factory.pool.connections("waf-1")), 3)

    @inlineCallbacks
    def check_fatal(self, connector: AgentConnector, text: str) -> Generator[Any, Any, None]:
        error = yield connector.when_failed()
        self.assertIsInstance(error, RegistrationRejected)
        self.assertIn(text, str(error))
        self.assertFalse(any(s.service.running for s in connector.slots))
        self.assertEqual(len(self.factory.pool), 0)

    @inlineCallbacks
    def test_not_in_allowlist_stops(self) -> Generator[Any, Any, None]:
        yield self.start_proxy(allowed_agents=["other-*"])
        yield self.check_fatal(self.agent(), "Agent 'waf-1' is not in the allowed list")

    @inlineCallbacks
    def test_missing_token_stops(self) -> Generator[Any, Any, None]:
        yield self.start_proxy(require_auth=True)
        yield self.check_fatal(self.agent(), "Authentication required but no token provided")

    @inlineCallbacks
    def test_wrong_token_stops(self) -> Generator[Any, Any, None]:
        yield self.start_proxy(StaticTokenChecker({"waf-1": "right"}), require_auth=True)
        yield self.check_fatal(self.agent(auth_token="wrong"), "Authentication failed")

    @inlineCallbacks
    def test_right_token_registers(self) -> Generator[Any, Any, None]:
        factory = yield self.start_proxy(StaticTokenChecker({"waf-1": "right"}), require_auth=True)
        connector = self.agent(auth_token="right")
        yield connector.when_registered()
        self.assertEqual(len(factory.pool), 1)

    @inlineCallbacks
    def test_connection_limit_keeps_retrying(self) -> Generator[Any, Any, None]:
        factory = yield self.start_proxy(max_connections_per_agent=1)
        connector = self.agent(connections=2)
        yield wait_for(
            lambda: connector.registered_count == 1 and max(s.retries for s in connector.slots) >= 3,
            "repeated retries of the second connection",
        )
        self.assertIsNone(connector.failure)
        self.assertTrue(all(s.service.running for s in connector.slots))
        self.assertGreaterEqual(factory.rejections["connection_limit"], 3)

    @inlineCallbacks
    def test_reconnects_after_the_proxy_restarts(self) -> Generator[Any, Any, None]:
        factory = yield self.start_proxy()
        # A registered connection resets the retry count at once (not after 10 s).
        connector = self.agent(backoff_reset_after=0)
        first = yield connector.when_registered()
        yield self.stop_proxy()
        yield wait_for(lambda: connector.registered_count == 0, "the agent to see the proxy go")
        yield wait_for(lambda: connector.slots[0].retries >= 2, "failing reconnection attempts")
        factory = yield self.start_proxy()
        second = yield connector.when_registered()
        self.assertIsNot(first, second)
        self.assertNotEqual(first.connection_id, second.connection_id)
        yield wait_for(lambda: len(factory.pool) == 1, "the proxy to see the agent")
        self.assertEqual(connector.slots[0].retries, 0)

    # -- after registration --------------------------------------------------------

    @inlineCallbacks
    def test_cancel_reaches_the_handler(self) -> Generator[Any, Any, None]:
        factory = yield self.start_proxy()
        agent = RecordingAgent()
        connector = self.agent(agent)
        protocol = yield connector.when_registered()
        pending = factory.pool.send_request_headers("waf-1", headers("c1"))
        yield wait_for(lambda: "c1" in agent.waiting, "the handler to run")
        self.assertTrue(factory.pool.cancel_request("c1", m.CancelReason.CLIENT_DISCONNECT))
        yield self.assertFailure(pending, RequestCancelled)
        yield wait_for(lambda: agent.cancelled == ["c1"], "the handler's Deferred to be cancelled")
        self.assertEqual(protocol.stats["answers"], 0)
        self.assertEqual(protocol.in_flight, 0)

    @inlineCallbacks
    def test_flow_control_pauses_and_resumes_the_proxy(self) -> Generator[Any, Any, None]:
        factory = yield self.start_proxy()
        agent = RecordingAgent()
        connector = self.agent(agent, max_concurrency=2)
        yield connector.when_registered()
        [conn] = factory.pool.connections("waf-1")
        answers = [factory.pool.send_request_headers("waf-1", headers(f"f{i}")) for i in range(2)]
        yield wait_for(lambda: conn.is_paused, "the pause to reach the proxy")
        self.assertRaises(FlowControlPaused, factory.pool.select, "waf-1")
        agent.answer("f0")
        agent.answer("f1")
        yield wait_for(lambda: not conn.is_paused, "the resume to reach the proxy")
        results = yield Deferred.fromCoroutine(_gather(answers))
        self.assertEqual([r.correlation_id for r in results], ["f0", "f1"])

    @inlineCallbacks
    def test_health_and_ping(self) -> Generator[Any, Any, None]:
        factory = yield self.start_proxy()
        connector = self.agent()
        yield connector.when_registered()
        [conn] = factory.pool.connections("waf-1")
        yield wait_for(lambda: conn.health_state == 1, "a health report")
        rtt = yield conn.ping()
        self.assertGreaterEqual(rtt, 0)

    @inlineCallbacks
    def test_stop_drains_in_flight_requests(self) -> Generator[Any, Any, None]:
        factory = yield self.start_proxy()
        agent = RecordingAgent()
        connector = self.agent(agent)
        yield connector.when_registered()
        [conn] = factory.pool.connections("waf-1")
        pending = factory.pool.send_request_headers("waf-1", headers("d1"))
        yield wait_for(lambda: "d1" in agent.waiting, "the handler to run")
        stopped = connector.stopService()
        yield wait_for(lambda: conn.is_paused and conn.health_state == 3, "pause and draining")
        self.assertNoResult(stopped)
        agent.answer("d1", block(503))
        answer = yield pending
        self.assertEqual(answer.decision.status, 503)  # type: ignore[attr-defined]
        yield stopped
        yield wait_for(lambda: len(factory.pool) == 0, "the connection to close")


async def _gather(deferreds: list[Deferred[Any]]) -> list[Any]:
    return [await d for d in deferreds]
