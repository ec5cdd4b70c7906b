# -*- test-case-name: tests.gateway.test_options -*-
"""
L{GatewayService}: the HTTP gateway and the status site as one service,
sharing the listener's agent pool.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.application import service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..status.health import Readiness
from ..status.history import History
from ..status.metrics import GatewayMetrics
from ..status.resource import StatusResource, StatusSite
from .config import GatewayConfig
from .echo import EchoUpstream
from .resource import GatewaySite
from .shared import Gateway
from .upstream import HTTPUpstream, IUpstream, upstream_trust_root

if TYPE_CHECKING:
    from ..proxy.factory import ReverseConnectionFactory

__all__ = ["GatewayService", "ListeningService"]

#: The gateway's logger.
log = Logger(namespace="sentinel_twisted.gateway")


class ListeningService(service.Service):
    """
    Listens on one endpoint while running.  A failure to listen is raised
    from C{startService} when it happens at once (so twistd stops with the
    reason), and logged otherwise.

    @ivar reactor: the reactor the endpoint is built on.
    @ivar description: the endpoint string.
    @ivar factory: the factory it listens with.
    @ivar what: what it listens for, for messages (C{HTTP clients}).
    @ivar port: the listening port, C{None} when not listening.
    @ivar listening: fires with the port once it listens.
    """

    def __init__(self, reactor: Any, description: str, factory: Any, what: str, endpoint: Any = None) -> None:
        self.reactor = reactor
        self.description = description
        #: The endpoint it listens on (default: parsed from C{description}).
        self.endpoint = endpoint
        self.factory = factory
        self.what = what
        self.port: IListeningPort | None = None
        self.listening: Deferred[IListeningPort] = Deferred()

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        endpoint = self.endpoint
        if endpoint is None:
            endpoint = serverFromString(self.reactor, self.description)
        outcome: list[Any] = []

        def listening(port: IListeningPort) -> IListeningPort:
            self.port = port
            outcome.append(port)
            self.listening.callback(port)
            return port

        def failed(failure: Failure) -> None:
            if not starting:
                # Failed later: nobody to raise to, so say it here.
                log.error(
                    "Cannot listen for {what} on {description}: {error}",
                    what=self.what,
                    description=self.description,
                    error=failure.getErrorMessage(),
                )
            outcome.append(failure)
            self.listening.errback(failure)
            self.listening.addErrback(lambda _: None)

        starting = [True]
        endpoint.listen(self.factory).addCallbacks(listening, failed)
        starting.clear()
        if outcome and isinstance(outcome[0], Failure):
            outcome[0].raiseException()

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        port, self.port = self.port, None
        if port is None:
            return succeed(None)
        stopped = port.stopListening()
        return stopped if stopped is not None else succeed(None)


class GatewayService(service.MultiService):
    """
    The gateway (C{http}) and status (C{status}) listeners; either may be
    C{None} to leave it out.

    @ivar factory: the listener whose pool the gateway sends requests to.
    @ivar config: the gateway's settings.
    @ivar shutdown_grace: seconds requests in flight get to finish when it
        stops.
    @ivar metrics: the listener's and gateway's metrics.
    @ivar history: snapshots of the metrics for the status page, C{None}
        without a status site.
    @ivar upstream: where allowed requests go (the echo when no upstream is
        set).
    @ivar gateway: what every exchange shares.
    @ivar http: the HTTP listener, C{None} when left out.
    @ivar status: the status site's listener, C{None} when left out.
    @ivar site: the gateway's site, C{None} without an HTTP listener.
    @ivar status_site: the status site, C{None} when left out.
    @ivar status_resource: the status site's root (only with a status site).
    @raise ValueError: if the configuration's C{upstream_ca} cannot be read.
    """

    def __init__(
        self,
        factory: ReverseConnectionFactory,
        config: GatewayConfig,
        *,
        http: str | None,
        status: str | None,
        reactor: Any = None,
        access_log: str | None = None,
        shutdown_grace: float = 0.0,
        readiness: Readiness | None = None,
        http_endpoint: Any = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.factory = factory
        self.config = config
        self.shutdown_grace = shutdown_grace
        self.metrics = GatewayMetrics(factory.pool, factory, upstream_timeout=config.upstream_timeout)
        self.history: History | None = None
        upstream: IUpstream
        if config.upstream is None:
            upstream = EchoUpstream()
        else:
            upstream = HTTPUpstream(
                reactor,
                config.upstream,
                timeout=config.upstream_timeout,
                max_connections=config.max_upstream_connections,
                trust_root=upstream_trust_root(config.upstream_ca),
            )
        self.upstream = upstream
        self.gateway = Gateway(factory.pool, config, upstream, self.metrics, reactor)
        if isinstance(upstream, HTTPUpstream):
            # One limiter for every line that clients, agents and the upstream trigger.
            upstream.log_limiter = self.gateway.log_limiter
        self.http: ListeningService | None = None
        self.status: ListeningService | None = None
        self.site: GatewaySite | None = None
        self.status_site: StatusSite | None = None
        if http is not None:
            self.site = GatewaySite(self.gateway, access_log=access_log, reactor=reactor)
            self.http = ListeningService(reactor, http, self.site, "HTTP clients", http_endpoint)
            self.http.setServiceParent(self)  # type: ignore[no-untyped-call]
        if status is not None:
            self.history = History(self.metrics, reactor)
            self.status_resource = StatusResource(
                factory.pool, self.metrics, self.describe(), self.history, readiness
            )
            self.status_site = StatusSite(self.status_resource, config.status_hosts, reactor=reactor)
            self.status = ListeningService(reactor, status, self.status_site, "the status page")
            self.status.setServiceParent(self)  # type: ignore[no-untyped-call]
        self._endpoints = (http, status)

    def describe(self) -> dict[str, Any]:
        """The gateway's settings as the status site's C{/agents} shows them."""
        return {
            "upstream": self.upstream.describe(),
            "agents": list(self.config.agents) or None,
            "fail_open": self.config.fail_open,
            "challenge_status": self.config.challenge_status,
        }

    def startService(self) -> None:
        self.metrics.attach()
        if self.history is not None:
            self.history.start()
        self.gateway.watch_agents()
        http, status = self._endpoints
        log.info(
            "Gateway on {http} to {upstream}; consulting {agents}; {policy}; status on {status}",
            http=http or "(off)",
            upstream=self.upstream.describe(),
            agents=", ".join(self.config.agents) or "every agent seen, registered now or not",
            policy="fail open" if self.config.fail_open else "fail closed",
            status=status or "(off)",
        )
        super().startService()  # type: ignore[no-untyped-call]

    def stopService(self) -> Deferred[Any]:
        """
        Stop listening, give the requests under way the shutdown grace
        period, answer the rest (L{Gateway.shut_down}), close the upstream
        connections.
        """
        stopped = super().stopService()  # type: ignore[no-untyped-call]
        self.metrics.detach()
        if self.history is not None:
            self.history.stop()
        self.gateway.unwatch_agents()
        drained = self.gateway.shut_down(self.shutdown_grace)
        closing = drained.addCallback(lambda _: self.upstream.close())
        done: Deferred[Any] = DeferredList([d for d in (stopped, closing) if d is not None])
        return done
