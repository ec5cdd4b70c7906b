"""
An agent process killed with SIGKILL while it holds requests: every one of
them fails at once with "Connection closed" (not after its timeout), the
connections leave the pool, and nothing leaks.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Generator
from typing import Any

from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.trial.unittest import TestCase

from .invariants import Accounting, settle, wait_until
from .support import Program, headers, listen, temp_dir

HELD = 12


class AgentKilledTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_sigkill_mid_request_fails_every_pending_request_at_once(self) -> Generator[Any, Any, None]:
        yield settle()
        books = Accounting()
        directory = temp_dir(self)
        path = os.path.join(directory, "p.sock")
        # The request timeout is far longer than the test: any request that
        # ends did so because the proxy saw the connection go.
        listener = yield listen(self, f"unix:{path}:mode=600", request_timeout=120.0)
        agent = Program(
            self, directory, "sentinel-agent", "--connect", f"unix:{path}", "--agent-id", "victim",
            "--agent", "tests.reliability.agents:Holding", "--connections", "2", name="agent",
        )  # fmt: skip
        yield wait_until(lambda: len(listener.pool.connections("victim")) == 2, "two registered connections", 20)
        connections = listener.pool.connections("victim")

        waiting = [
            books.track(listener.pool.send_request_headers("victim", headers(f"k{i}", "/hold")), f"k{i}")
            for i in range(HELD)
        ]
        answered = yield listener.pool.send_request_headers("victim", headers("quick", "/"))
        self.assertEqual(answered.audit.custom["correlation_id"], "quick")
        yield wait_until(lambda: agent.count(r"holding k\d+") == HELD, "the agent to hold every request", 20)
        self.assertEqual(sum(c.in_flight for c in connections), HELD)
        self.assertTrue(all(c.in_flight for c in connections), "requests should be spread over both connections")

        os.kill(agent.pid, signal.SIGKILL)
        outcomes = yield gatherResults(waiting)
        self.assertEqual(outcomes, ["closed"] * HELD)
        self.assertEqual(agent.wait_exit(), -signal.SIGKILL)
        yield wait_until(lambda: len(listener.pool) == 0, "the pool to empty")
        for connection in connections:
            self.assertTrue(connection.is_closed)
            self.assertEqual(connection.in_flight, 0)
        disconnects = [e for e in books.events if "pending request(s) failed" in (e.get("log_format") or "")]
        self.assertEqual(sorted(e["failed"] for e in disconnects), [6, 6])
        self.assertEqual(listener.factory.registered_connections("victim"), 0)

        yield listener.stop()
        yield books.verify(self, [listener.factory])
