"""
The accounting invariant every fault test ends with.

Whatever the fault (an agent killed, stalled, lying or flooding), the proxy
side must come out of it with its books balanced:

  - every request sent got exactly one outcome: an answer, a timeout, a
    cancellation or a connection-closed error (requests refused before
    anything was sent, e.g. no agent connected, are counted apart);
  - no registered connection has anything in flight;
  - the pool is empty once every agent has left, and no connection still
    awaits registration;
  - no file descriptor leaked (C{/proc/self/fd} counted before and after,
    waiting a little for the reactor to close what it is closing);
  - no Deferred was garbage-collected with an unhandled failure, and
    nothing else was logged as a failure.

L{Accounting} records all of that; L{Accounting.verify} checks it.
"""

from __future__ import annotations

import gc
import os
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from sentinel_twisted import messages as m
from sentinel_twisted.errors import (
    AgentUnavailable,
    ConnectionClosed,
    FlowControlPaused,
    InvalidMessage,
    RequestCancelled,
    RequestTimeout,
)

#: What may happen to a request that was sent.
SENT_OUTCOMES = frozenset({"answer", "timeout", "cancel", "closed"})


def open_fds() -> dict[int, str]:
    """This process's open file descriptors and what they point at."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            found[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            # The descriptor listdir itself used, closed again by now.
            continue
    return found


def _reserve_twisted_fd() -> None:
    """
    Twisted keeps one descriptor (C{/dev/null}) in reserve for life once a
    port listens, to accept-and-close when out of descriptors; make it exist
    before a baseline is taken, so that it does not count as a leak.
    """
    from twisted.internet import tcp

    reservation = getattr(tcp, "_reservedFD", None)
    if reservation is not None:
        reservation.reserve()


def classify(result: object) -> str:
    """The outcome a request's Deferred fired with."""
    if isinstance(result, m.AgentResponse):
        return "answer"
    if isinstance(result, Failure):
        error = result.value
        if isinstance(error, RequestTimeout):
            return "timeout"
        if isinstance(error, (RequestCancelled, CancelledError)):
            return "cancel"
        if isinstance(error, ConnectionClosed):
            return "closed"
        if isinstance(error, InvalidMessage):
            return "invalid-answer"
        if isinstance(error, (AgentUnavailable, FlowControlPaused)):
            return "refused"
        return f"error:{type(error).__name__}"
    return f"result:{type(result).__name__}"


class _Request:
    __slots__ = ("label", "outcomes", "deferred")

    def __init__(self, label: str) -> None:
        self.label = label
        self.outcomes: list[str] = []


class Accounting:
    """
    Books for one fault test.  Create it before the fault (it takes the
    file descriptor baseline), L{track} every request, then yield
    L{verify} once every agent has gone and every port is closed.

    @ivar extra_outcomes: outcomes besides L{SENT_OUTCOMES} this test
        allows for sent requests (C{"invalid-answer"} for agents that answer
        garbage).
    """

    def __init__(self, extra_outcomes: Iterable[str] = ()) -> None:
        self.allowed = SENT_OUTCOMES | frozenset(extra_outcomes)
        self.requests: list[_Request] = []
        self.refused = 0
        self.failures: list[LogEvent] = []
        self.events: list[LogEvent] = []
        _reserve_twisted_fd()
        self.fds_before = open_fds()
        globalLogPublisher.addObserver(self._observe)

    def _observe(self, event: LogEvent) -> None:
        self.events.append(event)
        if "log_failure" in event:
            self.failures.append(event)

    def stop_observing(self) -> None:
        try:
            globalLogPublisher.removeObserver(self._observe)
        except ValueError:
            pass

    # -- requests --------------------------------------------------------------

    def track(self, deferred: Deferred[Any], label: str = "") -> Deferred[Any]:
        """
        Record the outcome(s) of a request's Deferred.  A Deferred that has
        already failed with a refusal (no agent, every connection paused)
        was never sent: it is counted in L{refused} instead.

        The returned Deferred fires with the outcome's name (never fails),
        so tests can wait on it.
        """
        request = _Request(label or f"request-{len(self.requests) + 1}")

        def record(result: object) -> str:
            outcome = classify(result)
            request.outcomes.append(outcome)
            return outcome

        done: Deferred[Any] = deferred.addBoth(record)
        if request.outcomes == ["refused"]:
            self.refused += 1
        else:
            self.requests.append(request)
        return done

    def outcomes(self) -> Counter[str]:
        """How many requests ended each way (C{"pending"}: not yet)."""
        counts: Counter[str] = Counter()
        for request in self.requests:
            counts[request.outcomes[0] if request.outcomes else "pending"] += 1
        return counts

    @property
    def sent(self) -> int:
        return len(self.requests)

    def log_text(self) -> str:
        return "\n".join(formatEvent(e) or "" for e in self.events)

    # -- checks ----------------------------------------------------------------

    def check_requests(self, test: Any) -> None:
        problems = []
        for request in self.requests:
            if len(request.outcomes) != 1:
                problems.append(f"{request.label}: {len(request.outcomes)} outcomes {request.outcomes}")
            elif request.outcomes[0] not in self.allowed:
                problems.append(f"{request.label}: unexpected outcome {request.outcomes[0]}")
        test.assertEqual(problems, [], f"requests without exactly one allowed outcome ({self.outcomes()})")

    def check_pool(self, test: Any, factories: Iterable[Any]) -> None:
        for factory in factories:
            pool = factory.pool
            test.assertEqual(
                [(c.connection_id, c.in_flight) for c in pool.connections() if c.in_flight],
                [],
                "requests still in flight",
            )
            test.assertEqual(len(pool), 0, f"connections left in the pool: {pool.connections()}")
            test.assertEqual(pool.in_flight, 0)
            test.assertEqual(factory.awaiting_registration, 0, "connections still awaiting registration")
            test.assertEqual(
                {k: v for k, v in factory._registered_per_agent.items() if v},
                {},
                "registration slots not released",
            )

    @inlineCallbacks
    def check_fds(self, test: Any, timeout: float = 5.0) -> Generator[Any, Any, None]:
        """
        No descriptor opened since the baseline is still open.  The reactor
        closes sockets on its next iterations, so wait up to C{timeout}.
        """
        deadline = time.monotonic() + timeout
        while True:
            now = open_fds()
            leaked = {fd: target for fd, target in now.items() if self.fds_before.get(fd) != target}
            if not leaked or time.monotonic() > deadline:
                break
            yield deferLater(reactor, 0.02, lambda: None)  # type: ignore[arg-type]
        test.assertEqual(leaked, {}, f"file descriptors leaked ({len(self.fds_before)} before, {len(now)} after)")

    def check_logged_failures(self, test: Any) -> None:
        # A Deferred with an unhandled failure reports it when collected.
        gc.collect()
        unhandled = [e for e in self.failures if "Unhandled error in Deferred" in (e.get("log_format") or "")]
        test.assertEqual(
            [formatEvent(e) + "\n" + e["log_failure"].getTraceback() for e in unhandled],
            [],
            "a Deferred was garbage-collected with an unhandled failure",
        )
        test.assertEqual(
            [formatEvent(e) + "\n" + e["log_failure"].getTraceback() for e in self.failures],
            [],
            "failures were logged",
        )

    @inlineCallbacks
    def verify(
        self,
        test: Any,
        factories: Iterable[Any] = (),
        fds: bool = True,
        also: Callable[[], None] | None = None,
    ) -> Generator[Any, Any, None]:
        """
        Check the whole invariant.  Call it after every agent has left and
        every listening port is closed.
        """
        try:
            factories = list(factories)
            self.check_requests(test)
            self.check_pool(test, factories)
            if also is not None:
                also()
            if fds:
                yield self.check_fds(test)
            self.check_logged_failures(test)
        finally:
            self.stop_observing()


@inlineCallbacks
def wait_until(condition: Callable[[], Any], what: str, timeout: float = 10.0) -> Generator[Any, Any, Any]:
    """Poll C{condition} every 10 ms on the real reactor; fail after C{timeout}."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout}s waiting for {what}")
        yield deferLater(reactor, 0.01, lambda: None)  # type: ignore[arg-type]


def settle() -> Deferred[None]:
    """One reactor iteration, so the reactor's own descriptors exist before a baseline."""
    return deferLater(reactor, 0, lambda: None)  # type: ignore[arg-type]
