# -*- test-case-name: tests.agent.test_connector -*-
"""
L{AgentConnector}: keeps an agent connected to its proxies.

It dials client endpoints (C{unix:}, C{tcp:}, C{tls:} strings or any
L{IStreamClientEndpoint}), one per proxy, and keeps N connections
registered to each, each connection through a L{ClientService
<twisted.application.internet.ClientService>} that
reconnects with jittered exponential backoff.  The proxies are independent
of each other (L{ProxyConnections}).  A C{tcp:} or C{tls:} host name stands
for every address it resolves to, re-resolved periodically: new addresses
are dialled, the connections to addresses that left drained
(L{ResolvedProxies}).
Backoff grows with every attempt that ends without a registration
(transport failures and retryable rejections alike), and with every
registered connection lost within C{backoff_reset_after} seconds (10); it
starts over once a connection has stayed up that long.

A rejection that retrying cannot fix (protocol version, allowlist,
authentication, a malformed registration) stops every connection to that
proxy and is reported once, clearly; once every proxy has refused the
agent so, the connector stops (L{AgentConnector.when_failed}).  A
connection limit or a transport failure keeps the connection retrying.  Stopping drains: no new events, in-flight
handlers get a grace period, then the connections close.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Sequence
from typing import IO, Any, NoReturn

from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import (
    IHostnameResolver,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.logger import (
    Logger,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.python.failure import Failure

from .._ratelimit import LogRateLimiter
from .._redial import BACKOFF_RESET_AFTER
from ..errors import AgentProtocolError
from ..wire import MAX_INCOMPLETE_FRAME_BYTES, IncompleteFrameBudget
from ._interfaces import IAgent
from ._proxy_connections import ConnectionSlot, ProxyConnections
from ._resolve import ResolvedProxies, named_proxies
from .budget import DEFAULT_MAX_TOTAL_HELD_EVENT_BYTES, HeldEventBudget
from .protocol import AgentProtocol, AgentSettings

__all__ = ["AgentConnector", "ConnectionSlot", "ProxyConnections", "ResolvedProxies", "run_agent"]

#: The module's logger.
log = Logger(namespace="sentinel_twisted.agent.connector")


class AgentConnector(Service):
    """
    Keeps C{connections} registered connections of one agent to each of its
    proxies.

    @param agent: the L{IAgent} that answers the events.
    @param endpoint: the proxy to dial: a client endpoint string
        (C{unix:/run/sentinel.sock}, C{tcp:host=proxy:port=7000},
        C{tls:proxy:7000}) or endpoint object; or a list of them, one per
        proxy.  A C{tcp:} or C{tls:} string whose host is a name stands for
        every address the name resolves to (IPv4 if it has any, else IPv6),
        each a proxy of its own.
    @param agent_id: the id to register under.
    @param connections: how many connections to keep to each proxy (the
        proxy spreads requests over them).
    @param drain_grace: seconds in-flight handlers get when stopping.
    @param initial_delay: first retry delay, in seconds; each further
        failure multiplies it by C{factor}, up to C{max_delay}, plus
        C{jitter()} seconds.
    @param backoff_reset_after: seconds a registered connection must stay
        up for the delays to start over; one that ends sooner counts as a
        failed attempt (a proxy that registers the agent and drops the
        connection at once is not redialled about once a second).
    @param resolve_interval: seconds between resolutions of the host names;
        0 dials each name as one proxy (its endpoint picks an address).
    @param resolver: the L{IHostnameResolver} for the names (default: the
        reactor's C{nameResolver}).
    @param max_incomplete_frame_bytes: the bytes all its connections may
        hold in incomplete frames (each may declare up to 16 MiB); over it
        the connection holding the most is aborted, and dialled again.
    @param frame_budget: an L{IncompleteFrameBudget
        <sentinel_twisted.wire.IncompleteFrameBudget>} to share (with a
        listener, say) instead of one of C{max_incomplete_frame_bytes}.
    @param max_total_held_event_bytes: the bytes of events all its
        connections may hold at once, running and queued (each also holds at
        most C{max_held_event_bytes}); past it an event is answered at once
        with the error decision, status 503.
    @param held_event_budget: a L{HeldEventBudget
        <sentinel_twisted.agent.budget.HeldEventBudget>} to share (with a
        listener, say) instead of one of C{max_total_held_event_bytes}.
    @param settings_options: the rest of L{AgentSettings} (C{auth_token},
        C{metadata}, C{registration_timeout}, C{health_interval},
        C{max_concurrency}, C{max_queued}, C{max_held_event_bytes},
        C{max_event_values}, C{fail_open}, C{close_grace},
        C{frame_timeout}, C{write_stall_timeout}).
    @ivar reactor: the reactor it dials and resolves on.
    @ivar clock: the clock of its timers (the reactor).
    @ivar settings: what every connection registers with and how it serves
        (L{AgentSettings}).
    @ivar connection_count: how many connections it keeps to each proxy.
    @ivar drain_grace: seconds in-flight handlers get when it stops.
    @ivar backoff_reset_after: seconds a registered connection must stay up
        for its slot's delays to start over.
    @ivar resolve_interval: seconds between resolutions of the host names; 0:
        names are not resolved.
    @ivar resolver: the resolver of the host names, C{None} if the reactor has
        none.
    @ivar names: the host names standing for sets of proxies.
    @ivar endpoint: the endpoint, when one was given (the first one's
        otherwise).
    @ivar frame_budget: the bytes its connections hold in incomplete
        frames, against one limit.
    @ivar held_event_budget: the bytes of events its connections hold,
        against one limit.
    """

    def __init__(
        self,
        agent: IAgent,
        endpoint: str | IStreamClientEndpoint | Sequence[str | IStreamClientEndpoint],
        agent_id: str,
        *,
        connections: int = 1,
        reactor: Any = None,
        drain_grace: float = 30.0,
        initial_delay: float = 1.0,
        max_delay: float = 60.0,
        factor: float = 2.0,
        jitter: Callable[[], float] = random.random,
        backoff_reset_after: float = BACKOFF_RESET_AFTER,
        resolve_interval: float = 30.0,
        resolver: IHostnameResolver | None = None,
        max_incomplete_frame_bytes: int = MAX_INCOMPLETE_FRAME_BYTES,
        frame_budget: IncompleteFrameBudget | None = None,
        max_total_held_event_bytes: int = DEFAULT_MAX_TOTAL_HELD_EVENT_BYTES,
        held_event_budget: HeldEventBudget | None = None,
        **settings_options: Any,
    ) -> None:
        if connections < 1:
            raise ValueError(f"connections must be at least 1, got {connections!r}")
        if drain_grace < 0:
            raise ValueError(f"drain_grace must not be negative, got {drain_grace!r}")
        if not resolve_interval >= 0:
            raise ValueError(f"resolve_interval must not be negative, got {resolve_interval!r}")
        if not backoff_reset_after >= 0:
            raise ValueError(f"backoff_reset_after must not be negative, got {backoff_reset_after!r}")
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.clock: IReactorTime = reactor
        self.settings = AgentSettings(agent=agent, agent_id=agent_id, **settings_options)
        #: Rate limits the per-frame warnings of all its connections.
        self.log_limiter = LogRateLimiter(self.clock)
        self.frame_budget = (
            frame_budget if frame_budget is not None else IncompleteFrameBudget(max_incomplete_frame_bytes)
        )
        self.held_event_budget = (
            held_event_budget if held_event_budget is not None else HeldEventBudget(max_total_held_event_bytes)
        )
        self.connection_count = connections
        self.drain_grace = drain_grace
        self.backoff_reset_after = backoff_reset_after
        self.resolve_interval = resolve_interval
        if resolver is None:
            resolver = getattr(reactor, "nameResolver", None)
        self.resolver = resolver
        self._policy = backoffPolicy(initial_delay, max_delay, factor, jitter)
        endpoints = [endpoint] if isinstance(endpoint, str) or not isinstance(endpoint, Sequence) else list(endpoint)
        if not endpoints:
            raise ValueError("at least one endpoint is needed")
        #: The proxies dialled as given, and the host names standing for sets of proxies.
        self.static_proxies: list[ProxyConnections] = []
        self.names: list[ResolvedProxies] = []
        descriptions = []
        for each in endpoints:
            if isinstance(each, str):
                descriptions.append(each)
                parsed = self.endpoint_for(each)
                named = named_proxies(each)
                if named is not None and self.resolver is not None and resolve_interval > 0:
                    # A string an address cannot be put into fails now, not at the first resolution.
                    self.endpoint_for(named.address_description("192.0.2.1"))
                    self.names.append(ResolvedProxies(self, named, self.resolver))
                else:
                    self.static_proxies.append(ProxyConnections(self, each, parsed))
            else:
                parsed = each
                descriptions.append(repr(each))
                self.static_proxies.append(ProxyConnections(self, repr(each), each))
            if len(descriptions) == 1:
                self.endpoint: IStreamClientEndpoint = parsed
        #: The endpoints, as given, for logs.
        self.endpoint_description = ", ".join(descriptions)
        #: The rejection that stopped the connector, if one did.
        self.failure: AgentProtocolError | None = None
        self._stopping: Deferred[None] | None = None
        self._registered_waiters: list[Deferred[AgentProtocol]] = []
        self._failure_waiters: list[Deferred[AgentProtocolError]] = []

    def __repr__(self) -> str:
        return f"<AgentConnector {self.settings.agent_id} -> {self.endpoint_description}>"

    def endpoint_for(self, description: str) -> IStreamClientEndpoint:
        """The endpoint of a client endpoint string, for this connector's reactor."""
        endpoint: IStreamClientEndpoint = clientFromString(self.reactor, description)
        return endpoint

    def retry_delay(self, retries: int) -> float:
        """Seconds before retry number C{retries} (1 for the first)."""
        return float(self._policy(retries - 1))

    # -- queries ---------------------------------------------------------------

    def proxies(self) -> list[ProxyConnections]:
        """Every proxy dialled now (not those whose address left and that are draining)."""
        resolved = [p for name in self.names for p in name.proxies.values()]
        return [*self.static_proxies, *resolved]

    @property
    def slots(self) -> list[ConnectionSlot]:
        """Every connection slot, proxy by proxy."""
        return [slot for proxy in self.proxies() for slot in proxy.slots]

    def protocols(self) -> list[AgentProtocol]:
        """The registered connections, to every proxy."""
        return [p for proxy in self.proxies() for p in proxy.protocols()]

    @property
    def registered_count(self) -> int:
        """How many of the connections are registered now."""
        return sum(proxy.registered_count for proxy in self.proxies())

    def health(self) -> dict[str, Any]:
        """
        The connector's state, proxy by proxy: for each proxy its state
        (C{registered}: all N connections, C{partial}, C{connecting},
        C{rejected}, C{draining}, C{stopped}), registered count, retries
        and last error; and for each host name its addresses.
        """
        if self.failure is not None:
            state = "failed"
        else:
            state = "running" if self.running else "stopped"
        leaving = [p for name in self.names for p in name.leaving]
        return {
            "agent_id": self.settings.agent_id,
            "state": state,
            "registered": self.registered_count,
            "proxies": [p.health() for p in [*self.proxies(), *leaving]],
            "names": [name.health() for name in self.names],
        }

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
        """
        Fires (with the error as its result) once every proxy has refused
        the agent for good, which stops the connector.
        """
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
            "Agent {agent_id} connecting to {endpoint} with {count} connection(s) to each proxy",
            agent_id=self.settings.agent_id,
            endpoint=self.endpoint_description,
            count=self.connection_count,
        )
        for proxy in self.static_proxies:
            proxy.start()
        for name in self.names:
            name.start()

    def stopService(self) -> Deferred[None]:
        """Drain every registered connection, then stop reconnecting."""
        super().stopService()  # type: ignore[no-untyped-call]
        if self._stopping is None:
            stops = [p.stop() for p in self.static_proxies] + [n.stop() for n in self.names]
            self._stopping = DeferredList(stops, consumeErrors=True).addCallback(self._stopped)
        return self._stopping

    def _stopped(self, _: object) -> None:
        # Counts of rate-limited lines are reported now: no timer outlives the service.
        self.log_limiter.flush()

    # -- from the slots and names ----------------------------------------------------

    def slot_registered(self, slot: ConnectionSlot, protocol: AgentProtocol) -> None:
        """A slot registered: wake L{when_registered} waiters."""
        proxy = slot.proxy
        if proxy.registered_count == len(proxy.slots) and len(self.proxies()) > 1:
            log.info(
                "Agent {agent_id}: all {count} connection(s) to {proxy} registered",
                agent_id=self.settings.agent_id,
                count=len(proxy.slots),
                proxy=proxy.name,
            )
        waiters, self._registered_waiters = self._registered_waiters, []
        for waiter in waiters:
            waiter.callback(protocol)

    def slot_refused(self, slot: ConnectionSlot, protocol: AgentProtocol, error: AgentProtocolError) -> None:
        """A slot's registration failed: retry, or stop that proxy's connections on a fatal rejection."""
        proxy = slot.proxy
        if getattr(error, "retryable", True):
            log.warn(
                "Agent {agent_id} connection {index} to {proxy}: {error}; will retry",
                agent_id=self.settings.agent_id,
                index=slot.index,
                proxy=proxy.name,
                error=str(error),
            )
            return
        if proxy.failure is not None or not proxy.active:
            return
        proxy.refused_for_good(error)
        log.critical(
            "Agent {agent_id}: {error}. Retrying cannot fix this; stopping all "
            "{count} connection(s) to {proxy}. Check the agent id, token and protocol version.",
            agent_id=self.settings.agent_id,
            error=str(error),
            count=len(proxy.slots),
            proxy=proxy.name,
        )
        self._check_failed(error)

    def proxy_left(self, proxy: ProxyConnections) -> None:
        """A name no longer resolves to C{proxy}'s address: are the proxies left all refusing?"""
        self._check_failed(None)

    def _check_failed(self, error: AgentProtocolError | None) -> None:
        # The connector fails once every proxy it dials has refused the
        # agent for good: nothing is left that could serve it.
        proxies = self.proxies()
        if self.failure is not None or not proxies:
            return
        if any(name.resolved_at is None for name in self.names):
            return  # a name not resolved yet may bring proxies that accept
        failures = [p.failure for p in proxies]
        if any(f is None for f in failures):
            return
        failure = error if error is not None else failures[-1]
        assert failure is not None
        self.failure = failure
        if len(proxies) > 1:
            log.critical(
                "Agent {agent_id}: every proxy ({count}) refused the agent; stopping.",
                agent_id=self.settings.agent_id,
                count=len(proxies),
            )
        waiters, self._registered_waiters = self._registered_waiters, []
        for waiter in waiters:
            waiter.errback(Failure(failure))
        failure_waiters, self._failure_waiters = self._failure_waiters, []
        for failure_waiter in failure_waiters:
            failure_waiter.callback(failure)

    def slot_ended(self, slot: ConnectionSlot, protocol: AgentProtocol, detail: str) -> None:
        """A slot's connection ended; it reconnects while the connector runs."""
        if self.running and slot.proxy.active:
            self.log_limiter.info(
                log,
                f"{slot.log_key}:ended",
                "Agent {agent_id} connection {index} to {proxy} ended ({detail}); reconnecting",
                agent_id=self.settings.agent_id,
                index=slot.index,
                proxy=slot.proxy.name,
                detail=detail,
            )


def _failed(error: AgentProtocolError) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(Failure(error))
    return d


def run_agent(
    agent: IAgent,
    endpoint: str | Sequence[str],
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
