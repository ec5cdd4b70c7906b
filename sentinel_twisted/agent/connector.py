# -*- test-case-name: tests.agent.test_connector -*-
"""
L{AgentConnector}: keeps an agent connected to a proxy.

It dials a client endpoint (C{unix:}, C{tcp:}, C{tls:} strings or any
L{IStreamClientEndpoint}) and keeps N connections registered, each through
a L{ClientService} that reconnects with jittered exponential backoff.
Backoff grows with every attempt that ends without a registration
(transport failures and retryable rejections alike) and starts over after
a successful one.

A rejection that retrying cannot fix (protocol version, allowlist,
authentication, a malformed registration) stops every connection and is
reported once, clearly; a connection limit or a transport failure keeps
the connector retrying.  Stopping drains: no new events, in-flight
handlers get a grace period, then the connections close.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from typing import IO, Any, NoReturn

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IProtocolFactory, IReactorTime, IStreamClientEndpoint
from twisted.logger import (
    ILogObserver,
    LogEvent,
    Logger,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from ..errors import AgentProtocolError
from ._interfaces import IAgent
from .protocol import AgentClientFactory, AgentProtocol, AgentSettings

__all__ = ["AgentConnector", "ConnectionSlot", "run_agent"]

log = Logger(namespace="sentinel_twisted.agent.connector")


@implementer(IStreamClientEndpoint)
class _ReportingEndpoint:
    """Wraps an endpoint to log why a connection attempt failed."""

    def __init__(self, endpoint: IStreamClientEndpoint, slot: ConnectionSlot) -> None:
        self._endpoint = endpoint
        self._slot = slot

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        attempt: Deferred[Any] = self._endpoint.connect(factory)
        return attempt.addErrback(self._slot.connect_failed)


@implementer(ILogObserver)
class _Discard:
    def __call__(self, event: LogEvent) -> None:
        pass


class _ClientService(ClientService):
    # Our retry policy logs each retry with the agent id and our own count
    # (attempts since the last registration); ClientService's own line
    # counts differently and would contradict it.
    _log = Logger(namespace="sentinel_twisted.agent.connector", observer=_Discard())


class ConnectionSlot:
    """
    One of the connector's N connections: its L{ClientService}, its retry
    counter, and the protocol currently connected (if any).
    """

    def __init__(self, connector: AgentConnector, index: int, endpoint: IStreamClientEndpoint) -> None:
        self.connector = connector
        self.index = index
        #: Attempts in a row that ended without a registration.
        self.retries = 0
        self.protocol: AgentProtocol | None = None
        self.registered = False
        factory = AgentClientFactory(connector.settings, connector.clock, self)
        self.service = _ClientService(
            _ReportingEndpoint(endpoint, self),
            factory,
            retryPolicy=self._next_delay,
            clock=connector.clock,
        )

    def __repr__(self) -> str:
        return f"<ConnectionSlot {self.index} registered={self.registered} retries={self.retries}>"

    def _next_delay(self, attempt: int) -> float:
        # ClientService counts attempts since the last transport-level
        # connection; we count since the last registration, so that a proxy
        # that accepts the socket and refuses the agent still backs off.
        self.retries += 1
        delay = self.connector.retry_delay(self.retries)
        if not self.connector.running:
            # Stopping: the retry is about to be cancelled; do not announce it.
            return delay
        log.info(
            "Agent {agent_id} connection {index}: retry {retries} in {delay:.2f}s",
            agent_id=self.connector.settings.agent_id,
            index=self.index,
            retries=self.retries,
            delay=delay,
        )
        return delay

    def connect_failed(self, failure: Failure) -> Failure:
        """The connection attempt failed: a warning for the first in a row."""
        # The first failure in a row is a warning; the rest are in the retry lines.
        if self.retries == 0:
            log.warn(
                "Agent {agent_id} connection {index} cannot reach {endpoint}: {error}",
                agent_id=self.connector.settings.agent_id,
                index=self.index,
                endpoint=self.connector.endpoint_description,
                error=failure.getErrorMessage(),
            )
        return failure

    # -- ConnectionObserver ------------------------------------------------------

    def connection_registered(self, protocol: AgentProtocol) -> None:
        """The slot's connection registered; see L{ConnectionObserver <sentinel_twisted.agent.protocol.ConnectionObserver>}."""
        self.protocol = protocol
        self.registered = True
        self.retries = 0
        self.connector.slot_registered(self, protocol)

    def registration_refused(self, protocol: AgentProtocol, error: AgentProtocolError) -> None:
        """The slot's registration failed; see L{ConnectionObserver <sentinel_twisted.agent.protocol.ConnectionObserver>}."""
        self.registered = False
        self.connector.slot_refused(self, protocol, error)

    def connection_ended(self, protocol: AgentProtocol, detail: str) -> None:
        """The slot's connection ended; see L{ConnectionObserver <sentinel_twisted.agent.protocol.ConnectionObserver>}."""
        if self.protocol is protocol:
            self.protocol = None
        self.registered = False
        self.connector.slot_ended(self, protocol, detail)


class AgentConnector(Service):
    """
    Keeps C{connections} registered connections of one agent to a proxy.

    @param agent: the L{IAgent} that answers the events.
    @param endpoint: a client endpoint string (C{unix:/run/sentinel.sock},
        C{tcp:host=proxy:port=7000}, C{tls:proxy:7000}) or endpoint object.
    @param agent_id: the id to register under.
    @param connections: how many connections to keep (the proxy spreads
        requests over them).
    @param drain_grace: seconds in-flight handlers get when stopping.
    @param initial_delay: first retry delay, in seconds; each further
        failure multiplies it by C{factor}, up to C{max_delay}, plus
        C{jitter()} seconds.
    @param settings_options: the rest of L{AgentSettings} (C{auth_token},
        C{metadata}, C{registration_timeout}, C{health_interval},
        C{max_concurrency}, C{max_queued}, C{fail_open}).
    """

    def __init__(
        self,
        agent: IAgent,
        endpoint: str | IStreamClientEndpoint,
        agent_id: str,
        *,
        connections: int = 1,
        reactor: Any = None,
        drain_grace: float = 30.0,
        initial_delay: float = 1.0,
        max_delay: float = 60.0,
        factor: float = 2.0,
        jitter: Callable[[], float] = random.random,
        **settings_options: Any,
    ) -> None:
        if connections < 1:
            raise ValueError(f"connections must be at least 1, got {connections!r}")
        if drain_grace < 0:
            raise ValueError(f"drain_grace must not be negative, got {drain_grace!r}")
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.clock: IReactorTime = reactor
        self.settings = AgentSettings(agent=agent, agent_id=agent_id, **settings_options)
        if isinstance(endpoint, str):
            self.endpoint_description = endpoint
            self.endpoint: IStreamClientEndpoint = clientFromString(reactor, endpoint)
        else:
            self.endpoint_description = repr(endpoint)
            self.endpoint = endpoint
        self.drain_grace = drain_grace
        self._policy = backoffPolicy(initial_delay, max_delay, factor, jitter)
        self.slots = [ConnectionSlot(self, i + 1, self.endpoint) for i in range(connections)]
        #: The rejection that stopped the connector, if one did.
        self.failure: AgentProtocolError | None = None
        self._stopping: Deferred[None] | None = None
        self._registered_waiters: list[Deferred[AgentProtocol]] = []
        self._failure_waiters: list[Deferred[AgentProtocolError]] = []

    def __repr__(self) -> str:
        return f"<AgentConnector {self.settings.agent_id} -> {self.endpoint_description}>"

    def retry_delay(self, retries: int) -> float:
        """Seconds before retry number C{retries} (1 for the first)."""
        return float(self._policy(retries - 1))

    # -- queries ---------------------------------------------------------------

    def protocols(self) -> list[AgentProtocol]:
        """The registered connections."""
        return [s.protocol for s in self.slots if s.registered and s.protocol is not None]

    @property
    def registered_count(self) -> int:
        """How many of the connections are registered now."""
        return sum(1 for s in self.slots if s.registered)

    def when_registered(self) -> Deferred[AgentProtocol]:
        """
        Fires with a registered connection (now, if one is), or fails with
        the rejection that stopped the connector.
        """
        if self.failure is not None:
            return _failed(self.failure)
        protocols = self.protocols()
        if protocols:
            return succeed(protocols[0])
        waiter: Deferred[AgentProtocol] = Deferred()
        self._registered_waiters.append(waiter)
        return waiter

    def when_failed(self) -> Deferred[AgentProtocolError]:
        """Fires (with the error as its result) if a fatal rejection stops the connector."""
        if self.failure is not None:
            return succeed(self.failure)
        waiter: Deferred[AgentProtocolError] = Deferred()
        self._failure_waiters.append(waiter)
        return waiter

    # -- service -------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.failure = None
        self._stopping = None
        log.info(
            "Agent {agent_id} connecting to {endpoint} with {count} connection(s)",
            agent_id=self.settings.agent_id,
            endpoint=self.endpoint_description,
            count=len(self.slots),
        )
        for slot in self.slots:
            slot.retries = 0
            slot.service.startService()

    def stopService(self) -> Deferred[None]:
        """Drain every registered connection, then stop reconnecting."""
        super().stopService()  # type: ignore[no-untyped-call]
        if self._stopping is None:
            self._stopping = self._drain_and_stop()
        return self._stopping

    def _drain_and_stop(self) -> Deferred[None]:
        drains = [p.drain(self.drain_grace) for p in self.protocols()]
        result: Deferred[None] = Deferred()

        def stop_services(_: object) -> None:
            stops = [s.service.stopService() for s in self.slots if s.service.running]
            DeferredList(stops, consumeErrors=True).addCallback(lambda _: result.callback(None))

        DeferredList(drains, consumeErrors=True).addCallback(stop_services)
        return result

    # -- from the slots ----------------------------------------------------------

    def slot_registered(self, slot: ConnectionSlot, protocol: AgentProtocol) -> None:
        """A slot registered: wake L{when_registered} waiters."""
        waiters, self._registered_waiters = self._registered_waiters, []
        for waiter in waiters:
            waiter.callback(protocol)

    def slot_refused(self, slot: ConnectionSlot, protocol: AgentProtocol, error: AgentProtocolError) -> None:
        """A slot's registration failed: retry, or stop the connector on a fatal rejection."""
        if getattr(error, "retryable", True):
            log.warn(
                "Agent {agent_id} connection {index}: {error}; will retry",
                agent_id=self.settings.agent_id,
                index=slot.index,
                error=str(error),
            )
            return
        if self.failure is not None:
            return
        self.failure = error
        log.critical(
            "Agent {agent_id}: {error}. Retrying cannot fix this; stopping all "
            "{count} connection(s). Check the agent id, token and protocol version.",
            agent_id=self.settings.agent_id,
            error=str(error),
            count=len(self.slots),
        )
        for other in self.slots:
            if other.service.running:
                other.service.stopService()
        waiters, self._registered_waiters = self._registered_waiters, []
        for waiter in waiters:
            waiter.errback(Failure(error))
        failure_waiters, self._failure_waiters = self._failure_waiters, []
        for failure_waiter in failure_waiters:
            failure_waiter.callback(error)

    def slot_ended(self, slot: ConnectionSlot, protocol: AgentProtocol, detail: str) -> None:
        """A slot's connection ended; it reconnects while the connector runs."""
        if self.running and self.failure is None:
            log.info(
                "Agent {agent_id} connection {index} ended ({detail}); reconnecting",
                agent_id=self.settings.agent_id,
                index=slot.index,
                detail=detail,
            )


def _failed(error: AgentProtocolError) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(Failure(error))
    return d



def run_agent(
    agent: IAgent,
    endpoint: str,
    agent_id: str,
    *,
    log_to: IO[str] | None = sys.stderr,
    **options: Any,
) -> NoReturn:
    """
    Run C{agent} until interrupted: the whole program of a small agent.

    Logs go to C{log_to} (C{None}: leave logging alone).  SIGINT and
    SIGTERM drain the connections before exiting with status 0; a
    rejection that retrying cannot fix exits with status 1.
    """
    from twisted.internet.task import react

    if log_to is not None:
        globalLogBeginner.beginLoggingTo([textFileLogObserver(log_to)])

    def main(reactor: Any) -> Deferred[None]:
        connector = AgentConnector(agent, endpoint, agent_id, reactor=reactor, **options)
        reactor.addSystemEventTrigger("before", "shutdown", connector.stopService)
        connector.startService()

        def fatal(error: AgentProtocolError) -> None:
            raise SystemExit(1)

        return connector.when_failed().addCallback(fatal)

    react(main)
    raise SystemExit(0)  # react exits; this line is for type checkers
