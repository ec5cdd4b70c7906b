"""
Connection churn, 500 connections opened and closed per second for 3 s
(C{python -m benchmarks.churn} runs the same for 60 s): agents that
register and leave, abort, are closed by the proxy, answer a request or
leave it pending, or never register.  The books must balance.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.trial.unittest import TestCase

from benchmarks.churn import Churn

from .invariants import Accounting, settle, wait_until
from .support import listen, temp_dir

RATE = 500
SECONDS = 3


class ChurnTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_churn_keeps_the_books_balanced(self) -> Generator[Any, Any, None]:
        yield settle()
        books = Accounting()
        path = os.path.join(temp_dir(self), "c.sock")
        listener = yield listen(self, f"unix:{path}:mode=600:backlog=1024", max_connections_per_agent=1000)
        # The agents' give-up delay and the request timeout are wall-clock
        # safety nets; far longer than the test, they cannot fire on a
        # loaded machine and change the counts.
        churn = Churn(
            reactor, listener.factory, UNIXClientEndpoint(reactor, path),
            rate=RATE, duration=SECONDS, track=books.track, patience=30.0, request_timeout=60.0,
        )  # fmt: skip
        yield churn.run()
        factory = listener.factory
        yield wait_until(lambda: len(listener.pool) == 0 and factory.awaiting_registration == 0, "the proxy to see every agent go")
        report = churn.report()
        counts = report["counts"]
        self.assertEqual(counts["opened"], RATE * SECONDS)
        self.assertEqual(counts["closed"], RATE * SECONDS)
        self.assertEqual(counts.get("connect_failed", 0), 0)
        self.assertEqual(counts.get("refused", 0), 0)
        # Every connection the proxy accepted either registered or, for the
        # ones that never tried, left unregistered; nothing else.
        self.assertEqual(factory.registrations, counts["registered"])
        self.assertEqual(factory.registrations + counts["fate:never-registers"], RATE * SECONDS)
        self.assertEqual(books.sent, counts["requests_sent"])
        outcomes = books.outcomes()
        self.assertEqual(outcomes["answer"], counts["fate:answers"])
        self.assertEqual(set(outcomes), {"answer", "closed"})
        yield listener.stop()
        yield books.verify(self, [factory])
