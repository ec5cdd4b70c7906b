"""
An agent that registers and then stops reading, next to a healthy
connection of the same agent.  The proxy must not buffer without bound:
the transport pauses the connection (producer/consumer back-pressure), the
stall is reported (a log line, C{ConnectionInfo.write_blocked}), new
requests go to the healthy connection, and after C{write_stall_timeout}
the stalled connection is aborted with every request on it failed.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Generator
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import TestCase

from ..rawagent import HANDSHAKE_REQUEST, frame, registration
from .invariants import Accounting, settle, wait_until
from .support import connect_answering, headers, listen, temp_dir

PADDING = 64 * 1024


class StalledAgentTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_a_stalled_connection_is_reported_routed_around_and_aborted(self) -> Generator[Any, Any, None]:
        yield settle()
        books = Accounting()
        path = os.path.join(temp_dir(self), "p.sock")
        # write_stall_timeout follows the request timeout (1 s).  Both run on
        # a clock the test moves: nothing times out while the test looks, and
        # the stall ends the stalled connection when the clock says so.
        clock = Clock()
        listener = yield listen(self, f"unix:{path}:mode=600", request_timeout=1.0, clock=clock)
        pool = listener.pool

        stalled_socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stalled_socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled_socket.connect(path)
        stalled_socket.sendall(frame(HANDSHAKE_REQUEST, registration("waf")))
        yield wait_until(lambda: len(pool.connections("waf")) == 1, "the stalling agent to register")
        [stalled] = pool.connections("waf")
        healthy_agent = yield connect_answering(path, "waf")
        [healthy] = [c for c in pool.connections("waf") if c is not stalled]

        big = headers("big")
        big.headers["x-padding"] = ["p" * PADDING]
        stalled_requests = []
        for i in range(2000):
            if stalled.is_write_blocked:
                # Still blocked once the kernel has taken what it will take?
                yield deferLater(reactor, 0.05, lambda: None)  # type: ignore[arg-type]
                if stalled.is_write_blocked:
                    break
            stalled_requests.append(
                books.track(stalled.send_request_headers(big, correlation_id=f"s{i}", timeout=30), f"s{i}")
            )
            yield deferLater(reactor, 0, lambda: None)  # type: ignore[arg-type]
        self.assertTrue(stalled.is_write_blocked, "the transport never paused the stalled connection")
        # Bounded: the proxy stopped taking requests for it after a few
        # socket buffers' worth, far below the 2000 offered.
        self.assertLess(len(stalled_requests) * PADDING, 8 * 1024 * 1024)

        # Reported: a log line, and the connection's info.
        self.assertIn(f"Agent waf is not reading connection {stalled.connection_id}", books.log_text())
        [agent_info] = pool.stats()
        blocked = {c.connection_id: c.write_blocked for c in agent_info.connections}
        self.assertEqual(blocked, {stalled.connection_id: True, healthy.connection_id: False})

        # Routed around: every new request goes to the healthy connection.
        answers = yield gatherResults(
            [books.track(pool.send_request_headers("waf", headers(f"h{i}")), f"h{i}") for i in range(20)]
        )
        self.assertEqual(answers, ["answer"] * 20)
        self.assertEqual(healthy_agent.answered, 20)

        # Aborted after the stall timeout; everything pending on it failed.
        self.assertFalse(stalled.is_closed)
        clock.advance(1.0)
        outcomes = yield gatherResults(stalled_requests)
        self.assertEqual(set(outcomes), {"closed"})
        self.assertTrue(stalled.is_closed)
        yield wait_until(lambda: pool.connections("waf") == [healthy], "the stalled connection to leave the pool")
        self.assertIn("agent stopped reading: write buffer full for 1s", books.log_text())

        stalled_socket.close()
        healthy_agent.transport.loseConnection()
        yield healthy_agent.closed
        yield wait_until(lambda: len(pool) == 0, "the healthy connection to leave")
        yield listener.stop()
        yield books.verify(self, [listener.factory])
