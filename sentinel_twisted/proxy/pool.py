# -*- test-case-name: tests.test_pool -*-
"""
L{AgentPool}: registered agent connections by agent id.

Connections join on registration and leave when lost.  Sending by agent id
picks a connection: paused ones are skipped, then the one with the fewest
requests in flight, round robin among equals.  Observers
(L{IAgentPoolObserver}) hear about registrations, departures and the
agents' control messages.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

import msgspec
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from .. import messages as m
from ..errors import AgentProtocolError, AgentUnavailable, FlowControlPaused
from ..forward import ENCODINGS
from ._interfaces import IAgentPoolObserver
from .connection import AgentConnection, ConnectionInfo
from .dialled import DialledAgentService
from .protocol import _hold_period
from .protocol import _holding as _held_for_send

if TYPE_CHECKING:
    from .config import ReverseConnectionConfig

__all__ = ["AgentInfo", "AgentPool", "IAgentPoolObserver", "PoolObserver"]

#: The module's logger.
log = Logger(namespace="sentinel_twisted.pool")


@implementer(IAgentPoolObserver)
class PoolObserver:
    """An observer that ignores everything; subclass what you need."""

    def agent_registered(self, connection: AgentConnection) -> None:
        """Nothing; see L{IAgentPoolObserver.agent_registered}."""
        pass

    def agent_disconnected(self, connection: AgentConnection, reason: str) -> None:
        """Nothing; see L{IAgentPoolObserver.agent_disconnected}."""
        pass

    def health_changed(self, connection: AgentConnection, state: int | None) -> None:
        """Nothing; see L{IAgentPoolObserver.health_changed}."""
        pass

    def flow_control_changed(self, connection: AgentConnection, paused: bool) -> None:
        """Nothing; see L{IAgentPoolObserver.flow_control_changed}."""
        pass

    def metrics_reported(self, connection: AgentConnection, report: dict[str, Any]) -> None:
        """Nothing; see L{IAgentPoolObserver.metrics_reported}."""
        pass

    def config_update_requested(self, connection: AgentConnection, request: dict[str, Any]) -> None:
        """Nothing; see L{IAgentPoolObserver.config_update_requested}."""
        pass

    def request_answered(self, connection: AgentConnection, correlation_id: str, seconds: float) -> None:
        """
        Nothing.  Not part of L{IAgentPoolObserver}: observers that have this
        method are told each answer, C{seconds} after its event was sent.
        """
        pass


class AgentInfo(msgspec.Struct, kw_only=True):
    """
    Per-agent statistics, from L{AgentPool.stats}.

    @ivar agent_id: the agent's id.
    @ivar connections: a snapshot of each registered connection.
    @ivar in_flight: requests sent to the agent and not answered yet.
    @ivar paused_connections: connections the agent has paused.
    """

    agent_id: str
    connections: list[ConnectionInfo]
    in_flight: int
    paused_connections: int


def _refusal(agent_id: str, conns: list[AgentConnection]) -> AgentProtocolError:
    """
    Why none of C{conns}, an agent's connections, takes a request: the agent
    holds back requests while one of them stays open; once every one is
    being closed (drained, or lost with its requests' failures still being
    delivered), the agent has no connection to wait for.
    """
    held = [conn for conn in conns if not conn.is_closed]
    if held:
        return FlowControlPaused(agent_id, not_reading=not any(conn.is_paused for conn in held))
    return AgentUnavailable(agent_id)


class AgentPool:
    """
    The registered agent connections, by agent id: where requests are sent.

    The listener (L{ReverseConnectionFactory
    <sentinel_twisted.proxy.factory.ReverseConnectionFactory>}) adds a connection
    when it registers and removes it when it is lost; its C{pool} attribute
    is the pool to use.  Sending by agent id picks a connection with
    L{select}: paused connections are skipped, then an idle one wins, then
    the one with the fewest requests in flight, round robin among equals.
    But while frames wait to leave together (written as answers are read,
    or under L{HOLD_FRAMES_FOR_TURN
    <sentinel_twisted.proxy.protocol.HOLD_FRAMES_FOR_TURN>}), a request
    joins the connection the agent's previous one went to, without a scan,
    as long as that holds at most L{batch_slack} requests more than the
    least loaded connection did when it was chosen: the frames then share
    one send (within one read, a connection that went idle meanwhile may
    be passed over, by that much at most)::

        d = factory.pool.send_request_headers("waf", event)
        d.addCallback(lambda answer: answer.is_allow)

    Every C{send_*} method returns a L{Deferred
    <twisted.internet.defer.Deferred>} that fires with the agent's
    L{AgentResponse <sentinel_twisted.messages.AgentResponse>} or fails with
    an L{AgentProtocolError <sentinel_twisted.errors.AgentProtocolError>}:
    L{AgentUnavailable <sentinel_twisted.errors.AgentUnavailable>} (no
    connection of the agent), L{FlowControlPaused
    <sentinel_twisted.errors.FlowControlPaused>} (all of them paused),
    L{RequestTimeout <sentinel_twisted.errors.RequestTimeout>},
    L{ConnectionClosed <sentinel_twisted.errors.ConnectionClosed>} (lost
    while waiting), L{RequestCancelled
    <sentinel_twisted.errors.RequestCancelled>} (the Deferred was
    cancelled) or L{InvalidMessage <sentinel_twisted.errors.InvalidMessage>}
    (the agent's answer could not be read).  Nothing is raised at the call.

    Observers (L{IAgentPoolObserver}, L{add_observer}) hear about
    registrations, departures and the agents' control messages.

    @ivar dial_failures: failed handshakes of dialled agents, counted by
        reason.
    @cvar batch_slack: how many requests in flight a connection that already
        holds frames for the next send may have above the least loaded
        connection of its agent and still be given the next request.
    """

    batch_slack = 16

    def __init__(self) -> None:
        self._agents: dict[str, list[AgentConnection]] = {}
        self._by_id: dict[str, AgentConnection] = {}
        self._turn: dict[str, int] = {}
        # The connection each agent's last request went to, with the load
        # the scan that chose it found least and the holding period it was
        # chosen in (see select).
        self._last: dict[str, tuple[AgentConnection, int, int]] = {}
        #: The requests waiting on its connections now and ever sent on them
        #: (their pending tables share it): its connections' reads compare
        #: the two (see _PooledConnectionProtocol).
        self.pending_counts: list[int] = [0, 0]
        self._observers: list[Any] = []
        # The observers' request_answered, once per add or removal rather
        # than looked up per answer (PoolObserver's own does nothing).
        self._on_answered: list[Any] = []
        #: What its connections tell of each answer (they work out its time
        #: only then): the one observer's request_answered, called
        #: directly; for several, L{_connection_answered}; C{None} for none.
        self._answer_observer: Any = None
        #: Handshakes of dialled agents (L{connect_agent}) that succeeded,
        #: and those that failed by reason (for the status site's metrics).
        self.dial_handshakes = 0
        self.dial_failures: Counter[str] = Counter()

    # -- membership -----------------------------------------------------------

    def add(self, connection: AgentConnection) -> None:
        """
        Add a registered connection (the listener does this); observers hear
        C{agent_registered}.
        """
        self._agents.setdefault(connection.agent_id, []).append(connection)
        self._by_id[connection.connection_id] = connection
        connection.listener = self
        self._notify("agent_registered", connection)

    def remove(self, connection: AgentConnection, reason: str = "") -> None:
        """
        Remove a connection (the listener does this when it is lost); observers
        hear C{agent_disconnected} with C{reason}.  A connection not in the pool
        is ignored.
        """
        conns = self._agents.get(connection.agent_id)
        if conns is None or connection not in conns:
            return
        conns.remove(connection)
        last = self._last.get(connection.agent_id)
        if last is not None and last[0] is connection:
            del self._last[connection.agent_id]
        if not conns:
            del self._agents[connection.agent_id]
            self._turn.pop(connection.agent_id, None)
        self._by_id.pop(connection.connection_id, None)
        self._notify("agent_disconnected", connection, reason)

    def add_observer(self, observer: IAgentPoolObserver) -> None:
        """
        Tell C{observer} about what happens from now on (its exceptions are
        logged, never raised here).
        """
        self._observers.append(observer)
        self._answer_observers_changed()

    def remove_observer(self, observer: IAgentPoolObserver) -> None:
        """
        Stop telling C{observer}.

        @raise ValueError: it was not added.
        """
        self._observers.remove(observer)
        self._answer_observers_changed()

    def _answer_observers_changed(self) -> None:
        # A new list each time: a notification under way keeps its own.
        callbacks = []
        for observer in self._observers:
            callback = getattr(observer, "request_answered", None)
            if callback is not None and getattr(callback, "__func__", None) is not PoolObserver.request_answered:
                callbacks.append((observer, callback))
        self._on_answered = callbacks
        if not callbacks:
            self._answer_observer = None
        elif len(callbacks) == 1:
            self._answer_observer = callbacks[0][1]
        else:
            self._answer_observer = self._connection_answered

    def connect_agent(
        self,
        endpoint: str | IStreamClientEndpoint,
        agent_id: str | None = None,
        connections: int = 1,
        *,
        config: ReverseConnectionConfig | None = None,
        encodings: tuple[str, ...] = ENCODINGS,
        clock: Any = None,
        grace: float = 0.0,
        **options: Any,
    ) -> DialledAgentService:
        """
        Dial a listening agent (forward mode) and keep C{connections}
        connections to it in this pool, redialling with jittered backoff
        (reset by a connection that stays up C{backoff_reset_after}
        seconds, 10 by default, after its handshake)::

            service = pool.connect_agent("unix:/run/agents/waf.sock", "waf")
            ...
            await service.stopService()

        Each connection offers C{encodings} (MessagePack, then JSON, by
        default) and speaks the one the agent picks; it joins the pool under
        C{agent_id}, or the id the agent announces (C{capabilities.agent_id})
        when that is C{None}.  From then on it is a connection like any
        other: selection, flow control, health, timeouts, observers.

        @param endpoint: a client endpoint, or its string (C{unix:PATH},
            C{tcp:HOST:PORT}, C{tls:HOST:PORT}).
        @param config: timeouts, frame limits, the proxy id sent in the
            handshake and the per-agent connection cap
            (C{max_connections_per_agent}, which C{connections} may not
            exceed); the listener's defaults when C{None}.
        @param clock: the reactor (for strings, and the timers).
        @param grace: seconds stopping the service gives the requests in
            flight on its connections.
        @return: the started L{DialledAgentService
            <sentinel_twisted.proxy.dialled.DialledAgentService>}; stop it to close
            the connections and stop redialling.
        @raise ValueError: C{connections} below 1 or over the cap, an unknown
            encoding, or an endpoint string that does not parse.
        """
        from twisted.internet.endpoints import clientFromString

        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        if isinstance(endpoint, str):
            description, dialled = endpoint, clientFromString(clock, endpoint)
        else:
            description, dialled = repr(endpoint), endpoint
        service = DialledAgentService(
            dialled,
            self,
            description=description,
            agent_id=agent_id,
            connections=connections,
            grace=grace,
            clock=clock,
            config=config,
            encodings=encodings,
            **options,
        )
        service.startService()
        return service

    def _notify(self, method: str, *args: Any) -> None:
        for observer in list(self._observers):
            callback = getattr(observer, method, None)
            if callback is None:
                continue
            try:
                callback(*args)
            except Exception:
                log.failure("Pool observer {observer!r} failed in {method}", observer=observer, method=method)

    # -- queries --------------------------------------------------------------

    def agent_ids(self) -> list[str]:
        """Registered agents, in order of their first live registration."""
        return list(self._agents)

    def __contains__(self, agent_id: object) -> bool:
        return agent_id in self._agents

    def __len__(self) -> int:
        """The number of registered connections."""
        return len(self._by_id)

    def connections(self, agent_id: str | None = None) -> list[AgentConnection]:
        """
        The registered connections of C{agent_id}, or of every agent; a new list,
        so the pool may change while it is used.
        """
        if agent_id is None:
            return list(self._by_id.values())
        return list(self._agents.get(agent_id, ()))

    def connection(self, connection_id: str) -> AgentConnection | None:
        """The connection with this id, or C{None} if it is not registered."""
        return self._by_id.get(connection_id)

    @property
    def in_flight(self) -> int:
        """Requests sent and not answered yet, over every connection."""
        return sum(c.in_flight for c in self._by_id.values())

    def stats(self) -> list[AgentInfo]:
        """
        A snapshot per agent, in registration order: what the status site's
        C{/agents} shows.
        """
        result = []
        for agent_id, conns in self._agents.items():
            infos = [c.info() for c in conns]
            result.append(
                AgentInfo(
                    agent_id=agent_id,
                    connections=infos,
                    in_flight=sum(i.in_flight for i in infos),
                    paused_connections=sum(1 for i in infos if i.paused),
                )
            )
        return result

    # -- routing ----------------------------------------------------------------

    def select(self, agent_id: str) -> AgentConnection:
        """
        The connection a new request of C{agent_id} should use.

        @raise AgentUnavailable: no connection of the agent is registered,
            or every one is being closed (it leaves the pool).
        @raise FlowControlPaused: no connection of the agent takes a request,
            and one that is not closing is paused (or does not read what it
            is sent).
        """
        conns = self._agents.get(agent_id)
        if not conns:
            raise AgentUnavailable(agent_id)
        count = len(conns)
        if count == 1:
            only = conns[0]
            if only.can_accept_requests:
                return only
            raise _refusal(agent_id, conns)
        # Frames written while answers are read (or held for the reactor's
        # turn) leave together, one send per connection: a request that
        # joins the frames its agent's last request left waiting costs no
        # send of its own (nor the agent a wake-up), and no scan, as long as
        # that connection stays within the slack of the load the scan that
        # chose it found least, in this holding period.
        period = _hold_period[0]
        last = self._last.get(agent_id)
        if last is not None:
            conn, least, chosen_in = last
            if (
                chosen_in == period
                and conn._sink in _held_for_send
                and not conn._unavailable
                and len(conn._pending._entries) <= least + self.batch_slack
            ):
                return conn
        # The least loaded connection that can take a request; ties go to
        # the first in this turn's order, which rotates per request.  This
        # runs per request: the connection's state is read inline (what its
        # _selection_load() says).
        turns = self._turn
        i = start = turns.get(agent_id, 0) % count
        turns[agent_id] = start + 1
        best: AgentConnection | None = None
        best_load = 0
        while True:
            conn = conns[i]
            if not conn._unavailable:
                load = len(conn._pending._entries)
                if not load:
                    # Nothing beats an idle connection.
                    self._last[agent_id] = (conn, 0, period)
                    return conn
                if best is None or load < best_load:
                    best, best_load = conn, load
            i += 1
            if i == count:
                i = 0
            if i == start:
                break
        if best is None:
            raise _refusal(agent_id, conns)
        self._last[agent_id] = (best, best_load, period)
        return best

    def send_event(
        self,
        agent_id: str,
        event: m.Event,
        correlation_id: str | None = None,
        timeout: float | None = None,
    ) -> Deferred[m.AgentResponse]:
        """
        Send an event to one connection of C{agent_id} (see L{select}).
        Follow-up events of the same request (body chunks, response
        headers) should go to the same connection: use L{select} once and
        the connection's own C{send_*} methods after.

        @return: fires with the agent's L{AgentResponse
            <sentinel_twisted.messages.AgentResponse>}; fails with
            L{AgentUnavailable <sentinel_twisted.errors.AgentUnavailable>} or
            L{FlowControlPaused <sentinel_twisted.errors.FlowControlPaused>}
            when no connection can take it, and as L{AgentConnection.send_event
            <sentinel_twisted.proxy.connection.AgentConnection.send_event>} says
            after.
        """
        try:
            conn = self.select(agent_id)
        except AgentProtocolError as e:
            return fail(e)
        return conn.send_event(event, correlation_id, timeout)

    def send_request_headers(
        self, agent_id: str, event: m.RequestHeadersEvent, correlation_id: str | None = None, timeout: float | None = None
    ) -> Deferred[m.AgentResponse]:
        """
        Send a L{RequestHeadersEvent <sentinel_twisted.messages.RequestHeadersEvent>}
        to a connection of C{agent_id} (see L{send_event}).
        The first event of a request; send its later events to the same
        connection (L{select} and the connection's own C{send_*} methods).

        @return: fires with the agent's L{AgentResponse
            <sentinel_twisted.messages.AgentResponse>}, or fails as
            L{send_event} says.
        """
        # send_event inlined: this is the call of every proxied request.
        try:
            conn = self.select(agent_id)
        except AgentProtocolError as e:
            return fail(e)
        return conn.send_event(event, correlation_id, timeout)

    def send_request_body_chunk(
        self, agent_id: str, event: m.RequestBodyChunkEvent, correlation_id: str | None = None, timeout: float | None = None
    ) -> Deferred[m.AgentResponse]:
        """
        Send a L{RequestBodyChunkEvent <sentinel_twisted.messages.RequestBodyChunkEvent>}
        to a connection of C{agent_id} (see L{send_event}).

        @return: fires with the agent's L{AgentResponse
            <sentinel_twisted.messages.AgentResponse>}, or fails as
            L{send_event} says.
        """
        return self.send_event(agent_id, event, correlation_id, timeout)

    def send_response_headers(
        self, agent_id: str, event: m.ResponseHeadersEvent, correlation_id: str | None = None, timeout: float | None = None
    ) -> Deferred[m.AgentResponse]:
        """
        Send a L{ResponseHeadersEvent <sentinel_twisted.messages.ResponseHeadersEvent>}
        to a connection of C{agent_id} (see L{send_event}).

        @return: fires with the agent's L{AgentResponse
            <sentinel_twisted.messages.AgentResponse>}, or fails as
            L{send_event} says.
        """
        return self.send_event(agent_id, event, correlation_id, timeout)

    def send_response_body_chunk(
        self, agent_id: str, event: m.ResponseBodyChunkEvent, correlation_id: str | None = None, timeout: float | None = None
    ) -> Deferred[m.AgentResponse]:
        """
        Send a L{ResponseBodyChunkEvent <sentinel_twisted.messages.ResponseBodyChunkEvent>}
        to a connection of C{agent_id} (see L{send_event}).

        @return: fires with the agent's L{AgentResponse
            <sentinel_twisted.messages.AgentResponse>}, or fails as
            L{send_event} says.
        """
        return self.send_event(agent_id, event, correlation_id, timeout)

    def send_request_complete(
        self, agent_id: str, event: m.RequestCompleteEvent, correlation_id: str | None = None, timeout: float | None = None
    ) -> Deferred[m.AgentResponse]:
        """
        Send a L{RequestCompleteEvent <sentinel_twisted.messages.RequestCompleteEvent>}
        to a connection of C{agent_id} (see L{send_event}).

        @return: fires with the agent's L{AgentResponse
            <sentinel_twisted.messages.AgentResponse>}, or fails as
            L{send_event} says.
        """
        return self.send_event(agent_id, event, correlation_id, timeout)

    def send_websocket_frame(
        self, agent_id: str, event: m.WebSocketFrameEvent, correlation_id: str | None = None, timeout: float | None = None
    ) -> Deferred[m.AgentResponse]:
        """
        Send a L{WebSocketFrameEvent <sentinel_twisted.messages.WebSocketFrameEvent>}
        to a connection of C{agent_id} (see L{send_event}).

        @return: fires with the agent's L{AgentResponse
            <sentinel_twisted.messages.AgentResponse>}, or fails as
            L{send_event} says.
        """
        return self.send_event(agent_id, event, correlation_id, timeout)

    def send_guardrail_inspect(
        self, agent_id: str, event: m.GuardrailInspectEvent, correlation_id: str | None = None, timeout: float | None = None
    ) -> Deferred[m.AgentResponse]:
        """
        Send a L{GuardrailInspectEvent <sentinel_twisted.messages.GuardrailInspectEvent>}
        to a connection of C{agent_id} (see L{send_event}).

        @return: fires with the agent's L{AgentResponse
            <sentinel_twisted.messages.AgentResponse>}, or fails as
            L{send_event} says.
        """
        return self.send_event(agent_id, event, correlation_id, timeout)

    def send_configure(
        self, agent_id: str, event: m.ConfigureEvent, correlation_id: str | None = None, timeout: float | None = None
    ) -> Deferred[m.AgentResponse]:
        """
        Send a L{ConfigureEvent <sentinel_twisted.messages.ConfigureEvent>}
        to a connection of C{agent_id} (see L{send_event}).

        @return: fires with the agent's L{AgentResponse
            <sentinel_twisted.messages.AgentResponse>}, or fails as
            L{send_event} says.
        """
        return self.send_event(agent_id, event, correlation_id, timeout)

    def cancel_request(
        self, correlation_id: str, reason: int = m.CancelReason.MANUAL, agent_id: str | None = None
    ) -> bool:
        """
        Cancel a request wherever it waits: on every connection that holds
        C{correlation_id} (of every agent, or only of C{agent_id}), since
        one id may be sent to several agents (the gateway does).  C{True}
        if it waited anywhere.
        """
        cancelled = False
        for conn in self.connections(agent_id):
            if conn.cancel_request(correlation_id, reason):
                cancelled = True
        return cancelled

    def cancel_all(self, reason: int = m.CancelReason.MANUAL, agent_id: str | None = None) -> int:
        """Cancel every waiting request (of one agent, or all); returns the count."""
        return sum(conn.cancel_all(reason) for conn in self.connections(agent_id))

    def close_all(self, detail: str = "proxy shutting down") -> Deferred[list[None]]:
        """Close every connection; fires when all are gone."""
        from twisted.internet.defer import gatherResults

        return gatherResults([conn.close(detail) for conn in self.connections()])

    # -- _ConnectionListener (called by connections) ---------------------------

    def _connection_flow_changed(self, connection: AgentConnection, paused: bool) -> None:
        self._notify("flow_control_changed", connection, paused)

    def _connection_health_changed(self, connection: AgentConnection, state: int | None) -> None:
        self._notify("health_changed", connection, state)

    def _connection_metrics(self, connection: AgentConnection, report: dict[str, Any]) -> None:
        self._notify("metrics_reported", connection, report)

    def _connection_config_update(self, connection: AgentConnection, request: dict[str, Any]) -> None:
        self._notify("config_update_requested", connection, request)

    def _connection_answered(self, connection: AgentConnection, correlation_id: str, seconds: float) -> None:
        for _, callback in self._on_answered:
            try:
                callback(connection, correlation_id, seconds)
            except Exception:
                self._answer_observer_failed(callback)

    def _answer_observer_failed(self, callback: Any) -> None:
        """Log what an observer's C{request_answered} raised (call it where it is caught)."""
        # One that removed itself before it raised is no longer listed: its method names it.
        observer = next((o for o, c in self._on_answered if c is callback), getattr(callback, "__self__", callback))
        log.failure("Pool observer {observer!r} failed in {method}", observer=observer, method="request_answered")
