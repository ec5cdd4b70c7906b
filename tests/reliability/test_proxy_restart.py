"""
The proxy goes away and comes back, three times, while our agent connector
keeps reconnecting: requests held by the agent at each restart fail with
"Connection closed" on the proxy side and are cancelled on the agent side;
the connector registers again (new connection ids) and serves; nothing
leaks on either side.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.trial.unittest import TestCase

from sentinel_twisted.agent import Agent, AgentConnector, allow

from .invariants import Accounting, settle, wait_until
from .support import Listener, headers, listen, temp_dir

CONNECTIONS = 2
HELD = 4


class HoldingAgent(Agent):
    """Holds C{/hold} requests until cancelled; allows the rest at once."""

    def __init__(self) -> None:
        self.held: dict[str, Deferred[Any]] = {}
        self.cancelled: list[str] = []

    def on_request_headers(self, event: Any) -> Any:
        cid = event.metadata.correlation_id
        if event.uri != "/hold":
            return allow()
        d: Deferred[Any] = Deferred(lambda _: self.cancelled.append(cid))
        self.held[cid] = d
        return d


class ProxyRestartTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_agent_connector_rides_out_three_proxy_restarts(self) -> Generator[Any, Any, None]:
        yield settle()
        books = Accounting()
        path = os.path.join(temp_dir(self), "p.sock")
        agent = HoldingAgent()
        connector = AgentConnector(
            agent, f"unix:{path}", "rider", connections=CONNECTIONS, reactor=reactor,
            initial_delay=0.02, max_delay=0.1, jitter=lambda: 0.0, drain_grace=1.0,
            health_interval=0,
        )  # fmt: skip
        connector.startService()
        self.addCleanup(lambda: connector.stopService() if connector.running else None)

        factories = []
        connection_ids: set[str] = set()
        for cycle in range(3):
            listener: Listener = yield listen(self, f"unix:{path}:mode=600", request_timeout=60.0)
            factories.append(listener.factory)
            pool = listener.pool
            yield wait_until(lambda pool=pool: len(pool.connections("rider")) == CONNECTIONS, "the connector to register", 20)
            ids = {c.connection_id for c in pool.connections("rider")}
            self.assertFalse(ids & connection_ids, "connection ids must be new after a restart")
            connection_ids |= ids

            answered = yield gatherResults(
                [books.track(pool.send_request_headers("rider", headers(f"c{cycle}-q{i}")), f"c{cycle}-q{i}") for i in range(6)]
            )
            self.assertEqual(answered, ["answer"] * 6)
            held = [
                books.track(pool.send_request_headers("rider", headers(f"c{cycle}-h{i}", "/hold")), f"c{cycle}-h{i}")
                for i in range(HELD)
            ]
            yield wait_until(lambda n=HELD * (cycle + 1): len(agent.held) == n, "the agent to hold the requests")

            # The proxy goes: gracefully, then abruptly (no flush), then gracefully.
            yield listener.port.stopListening()
            listener.port = None
            if cycle == 1:
                yield gatherResults([c.close("proxy killed", abort=True) for c in pool.connections()])
            else:
                yield pool.close_all("proxy restarting")
            outcomes = yield gatherResults(held)
            self.assertEqual(outcomes, ["closed"] * HELD)
            yield wait_until(lambda n=HELD * (cycle + 1): len(agent.cancelled) == n, "the agent to cancel its handlers")
            yield wait_until(lambda: connector.registered_count == 0, "the connector to see the proxy go")
            yield wait_until(lambda: all(s.retries >= 1 for s in connector.slots), "reconnection attempts")
            self.assertIsNone(connector.failure)

        # One last life, then everyone leaves.
        listener = yield listen(self, f"unix:{path}:mode=600")
        factories.append(listener.factory)
        yield wait_until(lambda: len(listener.pool.connections("rider")) == CONNECTIONS, "the final registration", 20)
        last = yield books.track(listener.pool.send_request_headers("rider", headers("last")), "last")
        self.assertEqual(last, "answer")
        yield connector.stopService()
        yield wait_until(lambda: len(listener.pool) == 0, "the connector to leave")
        yield listener.stop()
        self.assertEqual(sorted(agent.cancelled), sorted(agent.held))
        self.assertEqual(books.outcomes(), {"answer": 19, "closed": 3 * HELD})
        yield books.verify(self, factories)
