# -*- test-case-name: tests.agent.test_connector -*-
"""
The connections of an agent to one proxy: L{ProxyConnections} keeps N of
them, each a L{ConnectionSlot} with its own L{ClientService
<twisted.application.internet.ClientService>} and retry count, and stops
them all when the proxy refuses the agent for good.

The retry count starts over only once a registered connection has stayed
up the connector's C{backoff_reset_after} seconds (L{RedialBackoff
<sentinel_twisted._redial.RedialBackoff>}), and each slot's lines about a
connection coming and going are rate-limited apart from the other slots',
so a proxy that accepts, registers and drops every connection gets neither
a redial about once a second nor a log line for each.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IAddress, IProtocolFactory, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .._redial import QuietClientService, RedialBackoff
from ..errors import AgentProtocolError
from .protocol import AgentClientFactory, AgentProtocol

if TYPE_CHECKING:
    from .connector import AgentConnector

#: The module's logger (the connector's namespace).
log = Logger(namespace="sentinel_twisted.agent.connector")

# Names each slot's kinds of log line in the rate limiter.
_slots = itertools.count(1)


@implementer(IStreamClientEndpoint)
class _ReportingEndpoint:
    """Wraps an endpoint to log why a connection attempt failed."""

    def __init__(self, endpoint: IStreamClientEndpoint, slot: ConnectionSlot) -> None:
        self._endpoint = endpoint
        self._slot = slot

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        attempt: Deferred[Any] = self._endpoint.connect(factory)
        return attempt.addErrback(self._slot.connect_failed)


class _SlotFactory(AgentClientFactory):
    """An L{AgentClientFactory} whose connections log under their slot's key."""

    def __init__(self, slot: ConnectionSlot) -> None:
        connector = slot.connector
        super().__init__(
            connector.settings,
            connector.clock,
            slot,
            connector.log_limiter,
            frame_budget=connector.frame_budget,
            held_event_budget=connector.held_event_budget,
        )
        self.log_key = slot.log_key

    def buildProtocol(self, addr: IAddress) -> AgentProtocol:  # type: ignore[override]
        protocol = super().buildProtocol(addr)
        protocol.log_key = self.log_key
        return protocol


class ConnectionSlot:
    """
    One of the N connections to one proxy: its L{ClientService
    <twisted.application.internet.ClientService>}, its retry
    counter, and the protocol currently connected (if any).

    @ivar proxy: the proxy it connects to.
    @ivar connector: the connector it belongs to.
    @ivar index: its number among the proxy's connections, from 1.
    @ivar protocol: the protocol connected now, C{None} between connections.
    @ivar registered: the connection is registered with the proxy.
    @ivar backoff: the attempts in a row that failed, which the delay before
        the next one grows with: those that ended without a registration,
        and those whose registered connection ended within the connector's
        C{backoff_reset_after} seconds.
    @ivar log_key: names its kinds of log line in the connector's rate
        limiter (its connections' registered and ended lines, its retry
        lines).
    @ivar service: the L{ClientService
        <twisted.application.internet.ClientService>} that dials and redials it.
    """

    def __init__(self, proxy: ProxyConnections, index: int, endpoint: IStreamClientEndpoint) -> None:
        self.proxy = proxy
        self.connector = proxy.connector
        self.index = index
        self.backoff = RedialBackoff(self.connector.clock, self.connector.backoff_reset_after)
        self.log_key = f"slot-{next(_slots)}"
        self.protocol: AgentProtocol | None = None
        self.registered = False
        #: Why the last attempt failed, until a registration.
        self.last_error: str | None = None
        self.service = QuietClientService(
            _ReportingEndpoint(endpoint, self),
            _SlotFactory(self),
            retryPolicy=self._next_delay,
            clock=self.connector.clock,
        )

    def __repr__(self) -> str:
        return f"<ConnectionSlot {self.index} registered={self.registered} retries={self.retries}>"

    @property
    def retries(self) -> int:
        """Attempts in a row that failed (see L{backoff})."""
        return self.backoff.failures

    def _next_delay(self, attempt: int) -> float:
        # ClientService counts attempts since the last transport-level
        # connection; we count those that failed in a row (see backoff), so
        # that a proxy that accepts the socket and refuses the agent, or
        # registers it and drops the connection, still backs off.
        retries = self.backoff.attempt_failed()
        delay = self.connector.retry_delay(retries)
        if not self.connector.running or not self.proxy.active:
            # Stopping: the retry is about to be cancelled; do not announce it.
            return delay
        self.connector.log_limiter.info(
            log,
            f"{self.log_key}:retry",
            "Agent {agent_id} connection {index} to {proxy}: retry {retries} in {delay:.2f}s",
            agent_id=self.connector.settings.agent_id,
            index=self.index,
            proxy=self.proxy.name,
            retries=retries,
            delay=delay,
        )
        return delay

    def connect_failed(self, failure: Failure) -> Failure:
        """The connection attempt failed: a warning for the first in a row."""
        self.last_error = failure.getErrorMessage()
        # The first failure in a row is a warning; the rest are in the retry lines.
        if self.retries == 0:
            log.warn(
                "Agent {agent_id} connection {index} cannot reach {endpoint}: {error}",
                agent_id=self.connector.settings.agent_id,
                index=self.index,
                endpoint=self.proxy.name,
                error=self.last_error,
            )
        return failure

    # -- ConnectionObserver ------------------------------------------------------

    def connection_registered(self, protocol: AgentProtocol) -> None:
        """The slot's connection registered; see L{ConnectionObserver <sentinel_twisted.agent.protocol.ConnectionObserver>}."""
        self.protocol = protocol
        self.registered = True
        self.backoff.connection_up()
        self.last_error = None
        self.connector.slot_registered(self, protocol)

    def registration_refused(self, protocol: AgentProtocol, error: AgentProtocolError) -> None:
        """The slot's registration failed; see L{ConnectionObserver <sentinel_twisted.agent.protocol.ConnectionObserver>}."""
        self.registered = False
        self.last_error = str(error)
        self.connector.slot_refused(self, protocol, error)

    def connection_ended(self, protocol: AgentProtocol, detail: str) -> None:
        """The slot's connection ended; see L{ConnectionObserver <sentinel_twisted.agent.protocol.ConnectionObserver>}."""
        if self.protocol is protocol:
            self.protocol = None
        was_registered = self.registered
        self.registered = False
        if was_registered:
            self.last_error = detail
            self.backoff.connection_lost()
        self.connector.slot_ended(self, protocol, detail)


class ProxyConnections:
    """
    The connector's N connections to one proxy, kept up independently of
    its other proxies: a proxy that is down, or that refuses the agent for
    good, leaves the connections to the others alone.

    @ivar name: the proxy in logs and health: its endpoint string, and the
        address for one of the proxies a host name stands for.
    @ivar address: that address, or C{None}.
    @ivar failure: the rejection that retrying cannot fix, if this proxy
        sent one; its connections are then stopped.
    @ivar connector: the connector it belongs to.
    @ivar endpoint: the client endpoint of the proxy.
    @ivar slots: its connection slots.
    """

    def __init__(
        self,
        connector: AgentConnector,
        name: str,
        endpoint: IStreamClientEndpoint,
        address: str | None = None,
    ) -> None:
        self.connector = connector
        self.name = name
        self.endpoint = endpoint
        self.address = address
        self.slots = [ConnectionSlot(self, i + 1, endpoint) for i in range(connector.connection_count)]
        self.failure: AgentProtocolError | None = None
        #: Started and not stopping.
        self.active = False
        self._stopping: Deferred[None] | None = None

    def __repr__(self) -> str:
        return f"<ProxyConnections {self.name} registered={self.registered_count}/{len(self.slots)}>"

    def protocols(self) -> list[AgentProtocol]:
        """The registered connections to this proxy."""
        return [s.protocol for s in self.slots if s.registered and s.protocol is not None]

    @property
    def registered_count(self) -> int:
        """How many of the connections to this proxy are registered now."""
        return sum(1 for s in self.slots if s.registered)

    @property
    def state(self) -> str:
        """C{registered} (all N), C{partial}, C{connecting}, C{rejected}, C{draining} or C{stopped}."""
        if self.failure is not None:
            return "rejected"
        if self._stopping is not None:
            return "stopped" if self._stopping.called else "draining"
        if not self.active:
            return "stopped"
        registered = self.registered_count
        if registered == len(self.slots):
            return "registered"
        return "partial" if registered else "connecting"

    def health(self) -> dict[str, Any]:
        """This proxy's state, for L{AgentConnector.health}."""
        errors = [s.last_error for s in self.slots if s.last_error]
        return {
            "proxy": self.name,
            "address": self.address,
            "state": self.state,
            "registered": self.registered_count,
            "connections": len(self.slots),
            "proxy_ids": sorted({p.proxy_id for p in self.protocols()}),
            "retries": max(s.retries for s in self.slots),
            "last_error": str(self.failure) if self.failure is not None else (errors[-1] if errors else None),
        }

    def start(self) -> None:
        """Dial the proxy: start every connection's service."""
        self.failure = None
        self._stopping = None
        self.active = True
        for slot in self.slots:
            slot.backoff.reset()
            slot.last_error = None
            slot.service.startService()

    def stop(self) -> Deferred[None]:
        """Drain the registered connections, then stop reconnecting."""
        self.active = False
        if self._stopping is None:
            self._stopping = self._drain_and_stop()
        return self._stopping

    def _drain_and_stop(self) -> Deferred[None]:
        drains = [p.drain(self.connector.drain_grace) for p in self.protocols()]
        result: Deferred[None] = Deferred()

        def stop_services(_: object) -> None:
            stops = [s.service.stopService() for s in self.slots if s.service.running]
            DeferredList(stops, consumeErrors=True).addCallback(lambda _: result.callback(None))

        DeferredList(drains, consumeErrors=True).addCallback(stop_services)
        return result

    def refused_for_good(self, error: AgentProtocolError) -> None:
        """A rejection that retrying cannot fix: stop every connection to this proxy."""
        self.failure = error
        self.active = False
        for slot in self.slots:
            if slot.service.running:
                slot.service.stopService()
