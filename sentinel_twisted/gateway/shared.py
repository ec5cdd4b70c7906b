# -*- test-case-name: tests.gateway.test_units -*-
"""
What every exchange of a gateway shares: L{Gateway} (the pool, the
settings, the upstream, the metrics, the exchanges under way and the
shutdown that answers them), the L{GatewayMetricsSink} it reports to, and
the log lines about agents coming and going.  One request's way through
the agents is L{sentinel_twisted.gateway.exchange}.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from .._peertext import peer_text
from .._ratelimit import LogRateLimiter
from ..errors import (
    AgentUnavailable,
    ConnectionClosed,
    FlowControlPaused,
    InvalidMessage,
    RequestCancelled,
    RequestTimeout,
)
from ..proxy.connection import AgentConnection
from ..proxy.pool import PoolObserver
from .known import KnownAgents, log_forgotten

if TYPE_CHECKING:
    from ..proxy.pool import AgentPool
    from .config import GatewayConfig
    from .exchange import Exchange
    from .upstream import IUpstream

__all__ = ["Gateway", "GatewayMetricsSink", "NullMetrics", "failure_reason"]

#: The gateway's logger.
log = Logger(namespace="sentinel_twisted.gateway")

#: Characters of an agent id a log line quotes (as the listener's lines do).
_ID_IN_LOG = 64


def failure_reason(failure: Failure) -> str:
    """A short label for why an agent could not answer."""
    error = failure.value
    if isinstance(error, AgentUnavailable):
        return "unavailable"
    if isinstance(error, FlowControlPaused):
        return "paused"
    if isinstance(error, RequestTimeout):
        return "timeout"
    if isinstance(error, ConnectionClosed):
        return "disconnected"
    if isinstance(error, RequestCancelled):
        return "cancelled"
    if isinstance(error, InvalidMessage):
        return "invalid_answer"
    return "error"


class GatewayMetricsSink(Protocol):
    """What the gateway reports (see L{sentinel_twisted.status.metrics})."""

    def request_decided(self, decision: str, status: int, seconds: float) -> None:
        """
        A request ended with C{decision} (C{allow}, C{block}, C{unavailable},
        ...) and response C{status} (0: none) after C{seconds}.
        """

    def upstream_responded(self, outcome: str, seconds: float) -> None:
        """The upstream answered (C{response}), failed or timed out after C{seconds}."""

    def agent_decided(self, agent_id: str, decision: str) -> None:
        """An agent answered C{allow}, C{block}, C{redirect} or C{challenge}."""

    def agent_failed(self, agent_id: str, reason: str) -> None:
        """An agent could not answer (reason: see L{failure_reason})."""

    def fail_open_pass(self, agent_id: str, reason: str) -> None:
        """A request went on without the agent's decision (C{--fail-open})."""

    def cancel_sent(self, agent_id: str, reason: int) -> None:
        """A Cancel went to the agent (reason: a L{CancelReason <sentinel_twisted.messages.CancelReason>})."""

    def upstream_failed(self, kind: str) -> None:
        """The upstream failed: C{error} or C{timeout}."""


class NullMetrics:
    """A L{GatewayMetricsSink} that keeps nothing (a gateway without a status site)."""

    def request_decided(self, decision: str, status: int, seconds: float) -> None:
        """Nothing."""

    def upstream_responded(self, outcome: str, seconds: float) -> None:
        """Nothing."""

    def agent_decided(self, agent_id: str, decision: str) -> None:
        """Nothing."""

    def agent_failed(self, agent_id: str, reason: str) -> None:
        """Nothing."""

    def fail_open_pass(self, agent_id: str, reason: str) -> None:
        """Nothing."""

    def cancel_sent(self, agent_id: str, reason: int) -> None:
        """Nothing."""

    def upstream_failed(self, kind: str) -> None:
        """Nothing."""


class Gateway:
    """
    What every exchange shares: pool, settings, upstream, metrics.

    @ivar pool: the agents requests are sent to.
    @ivar config: the gateway's settings.
    @ivar upstream: where allowed requests go.
    @ivar metrics: what counts requests, decisions and latencies; one with
        a C{forget_agent(agent_id)} method (as
        L{GatewayMetrics <sentinel_twisted.status.metrics.GatewayMetrics>}
        has) is told when the gateway forgets an agent that is away, so
        that the agent's series go too.
    @ivar clock: the clock of timeouts and durations (the reactor by default).
    @ivar challenge_status: the status of a challenge decision's response
        (from the config).
    @ivar fail_open: an agent that cannot answer lets the request go on (from
        the config).
    @ivar known: without C{--agent}, the agents every request consults:
        each agent seen, connected or not (see
        L{sentinel_twisted.gateway.known}).
    """

    def __init__(
        self,
        pool: AgentPool,
        config: GatewayConfig,
        upstream: IUpstream,
        metrics: GatewayMetricsSink | None = None,
        clock: Any = None,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.pool = pool
        self.config = config
        self.upstream = upstream
        self.metrics: GatewayMetricsSink = metrics if metrics is not None else NullMetrics()
        self.clock = clock
        #: Keeps the lines that clients and agents trigger at will (agent
        #: failures, protected headers, bad statuses) to a few per kind.
        self.log_limiter = LogRateLimiter(clock)
        self.challenge_status = config.challenge_status
        self.fail_open = config.fail_open
        #: Request headers with an "_" in the name are kept (from the config).
        self.allow_underscore_headers = config.allow_underscore_headers
        #: Whether the upstream shows each agent's decision (the echo does).
        self.shows_decisions: bool = getattr(upstream, "shows_decisions", False)
        #: Exchanges whose client has not had its whole answer yet.
        self.exchanges: set[Exchange] = set()
        #: Shutting down: new requests get 503.
        self.stopping = False
        self.known = KnownAgents(config.max_known_agents)
        self._presence = _AgentPresence(self)
        if not config.agents:
            for agent_id in pool.agent_ids():
                self.known.arrived(agent_id)
            pool.add_observer(self._presence)

    def shut_down(self, grace: float) -> Deferred[None]:
        """
        Answer everyone: requests under way get up to C{grace} seconds to be
        answered as usual; then those not answered yet get C{503} and those
        whose response has started are cut off.  New requests get C{503}
        at once.  Fires when that is done.
        """
        self.stopping = True
        done: Deferred[None] = Deferred()
        clock = self.clock
        started = clock.seconds()
        if self.exchanges and grace > 0:
            log.info(
                "Shutting down the gateway: waiting up to {grace}s for {count} request(s)",
                grace=grace,
                count=len(self.exchanges),
            )

        def wait() -> None:
            if self.exchanges and clock.seconds() - started < grace:
                clock.callLater(min(0.05, grace), wait)
                return
            left = list(self.exchanges)
            if left:
                log.warn(
                    "Shutting down the gateway: {count} request(s) not answered after {grace}s; "
                    "answering 503 (or closing those mid-response)",
                    count=len(left),
                    grace=grace,
                )
            for exchange in left:
                exchange.shut_down()
            done.callback(None)

        wait()
        return done

    def agent_ids(self) -> Sequence[str]:
        """
        The agents every request consults: C{--agent}, else every agent
        seen (L{known}), registered now or not.
        """
        return self.config.agents or self.known.ids

    def forget_absent_agents(self, retired: Callable[[str], bool]) -> list[str]:
        """
        Forget the agents seen that are not registered now and C{retired}
        (a reload: the operator took them off the allowlist or the token
        file); say which.  Those forgotten.
        """
        pool = self.pool
        gone = self.known.forget_absent(pool.__contains__, retired)
        self._presence.absent.difference_update(gone)
        log_forgotten(log, gone)
        self._forget_series(gone)
        return gone

    def _forget_series(self, agent_ids: Sequence[str]) -> None:
        """
        Have the metrics forget the series of C{agent_ids}, agents the
        gateway no longer consults: requests counted their failures while
        they were away, and nothing else would take those series out.
        """
        forget = getattr(self.metrics, "forget_agent", None)
        if forget is not None:
            for agent_id in agent_ids:
                forget(agent_id)

    def take_known_agents(self, agent_ids: Sequence[str]) -> None:
        """
        Consult C{agent_ids} (a worker: the agents its group has seen),
        and the agents registered here besides.
        """
        pool = self.pool
        known = self.known
        before = known.ids
        known.replace(agent_ids, pool.__contains__)
        self._presence.absent.intersection_update(known.ids)
        now = set(known.ids)
        self._forget_series([a for a in before if a not in now and a not in pool])

    def watch_agents(self) -> None:
        """Say in the log when an agent leaves, and when it is back."""
        self.log_limiter.start()
        self._presence.watching = True

    def unwatch_agents(self) -> None:
        """
        Stop the log lines of L{watch_agents} (the gateway is stopping), and
        report what the limiter still holds back, leaving no timer behind.
        """
        self.log_limiter.stop()
        self._presence.watching = False


class _AgentPresence(PoolObserver):
    """
    Without C{--agent} the gateway consults every agent it has seen
    (L{Gateway.known}): this observer adds each agent that registers, and
    says in the log when one leaves (its requests are answered C{503}, or
    pass without it failing open, until it is back) and when it is back:
    an operator should hear of it once, not per request.

    An agent that registers and leaves in a loop would make a line per
    round: the lines go through the gateway's L{LogRateLimiter}, under one
    kind, so that the line reported at the end of a busy period is the
    latest news (absent or back).

    @ivar watching: whether to log (between L{Gateway.watch_agents} and
        L{Gateway.unwatch_agents}).
    """

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.watching = False
        #: Known agents whose last connection left, until they are back.
        self.absent: set[str] = set()

    def agent_registered(self, connection: AgentConnection) -> None:
        gateway = self.gateway
        agent_id = connection.agent_id
        known = gateway.known
        if not known.arrived(agent_id) and self.watching:
            gateway.log_limiter.warn(
                log,
                "agents_full",
                "Agent {agent_id} registered, but the gateway already knows {limit} agents: "
                "it is consulted while registered, and not when it leaves",
                agent_id=peer_text(agent_id, _ID_IN_LOG),
                limit=known.limit,
            )
        if agent_id in self.absent:
            self.absent.discard(agent_id)
            if self.watching:
                gateway.log_limiter.info(
                    log,
                    "agent_presence",
                    "Agent {agent_id} registered: requests are decided by it again",
                    agent_id=peer_text(agent_id, _ID_IN_LOG),
                )

    def agent_disconnected(self, connection: AgentConnection, reason: str) -> None:
        gateway = self.gateway
        agent_id = connection.agent_id
        if agent_id in gateway.pool:
            return
        gateway.known.left(agent_id)
        if agent_id not in gateway.known or agent_id in self.absent:
            return
        self.absent.add(agent_id)
        if self.watching:
            gateway.log_limiter.warn(
                log,
                "agent_presence",
                "Agent {agent_id} left: requests {outcome} until it registers again "
                "(a reload that retires it forgets it)",
                agent_id=peer_text(agent_id, _ID_IN_LOG),
                outcome="pass without it (fail open)" if gateway.fail_open else "are answered 503 (fail closed)",
            )
