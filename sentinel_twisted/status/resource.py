# -*- test-case-name: tests.gateway.test_status -*-
"""
The status site: C{GET /agents} (JSON), C{GET /metrics} (Prometheus text),
C{GET /healthz} (readiness, see L{health <sentinel_twisted.status.health>})
and C{GET /} (a small HTML page of the same for a person, refreshing
itself).
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import pages, server
from twisted.web.resource import Resource

from .._deadlines import DeadlineChannel
from .._hostname import valid_host
from .._persistence import check_persistence
from .._ratelimit import LogRateLimiter
from .._reading import read_plainly
from ..endpoints import RefusedConnection
from ._families import quantile
from .health import HealthzResource, Readiness
from .page import REFRESH_SECONDS, event_names, health_name, render_page

if TYPE_CHECKING:
    from ..proxy.pool import AgentPool
    from .history import History
    from .metrics import GatewayMetrics

__all__ = [
    "REFRESH_SECONDS",
    "STATUS_HEADER_TIMEOUT",
    "StatusResource",
    "StatusSite",
    "agents_document",
]


_encoder = msgspec.json.Encoder()


def _rfc3339(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def agents_document(
    pool: AgentPool, gateway: dict[str, Any] | None = None, metrics: GatewayMetrics | None = None
) -> dict[str, Any]:
    """
    What C{GET /agents} shows: each agent and its connections (with their
    round trips when C{metrics} is given).
    """
    agents = []
    for info in pool.stats():
        connections = []
        for c in info.connections:
            round_trips = metrics.connection_round_trips(c.connection_id) if metrics else None
            latency: dict[str, Any] = {"answered": 0, "mean_seconds": None}
            if metrics is not None:
                bounds = metrics.round_trip_buckets
                counts = round_trips.counts if round_trips is not None else [0]
                latency["p50_seconds"] = quantile(bounds, counts, 0.5)
                latency["p99_seconds"] = quantile(bounds, counts, 0.99)
            if round_trips is not None and round_trips.count:
                latency["answered"] = round_trips.count
                latency["mean_seconds"] = round_trips.total / round_trips.count
            connections.append(
                {
                    "connection_id": c.connection_id,
                    "peer": c.peer,
                    "peer_pid": c.peer_pid,
                    "peer_uid": c.peer_uid,
                    "mode": c.mode,
                    "encoding": c.encoding,
                    "in_flight": c.in_flight,
                    "paused": c.paused,
                    "write_blocked": c.write_blocked,
                    "health": c.health,
                    "health_name": health_name(c.health),
                    "capabilities": c.capabilities,
                    "events": event_names(c.capabilities.supported_events),
                    "metadata": c.metadata,
                    "connected_since": _rfc3339(c.connected_since),
                    "connected_since_epoch": c.connected_since,
                    "events_sent": c.events_sent,
                    "timeouts": c.timeouts,
                    "cancels_sent": c.cancels_sent,
                    "round_trip": latency,
                }
            )
        agents.append(
            {
                "agent_id": info.agent_id,
                "in_flight": info.in_flight,
                "paused_connections": info.paused_connections,
                "write_blocked_connections": sum(1 for c in info.connections if c.write_blocked),
                "connections": connections,
            }
        )
    document: dict[str, Any] = {"agents": agents}
    if gateway is not None:
        document["gateway"] = gateway
    return document


def _render_head(resource: Any, request: Any) -> bytes:
    """
    C{HEAD}: the C{GET} response's headers and length without its body
    (rendering C{GET} for C{HEAD} makes C{twisted.web} log a warning).
    """
    body: bytes = resource.render_GET(request)
    request.setHeader(b"Content-Length", b"%d" % len(body))
    return b""


class _Page(Resource):
    isLeaf = True

    def __init__(self, status: StatusResource) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.status = status

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        return self.status.page().encode("utf-8")

    render_HEAD = _render_head


class _Agents(Resource):
    isLeaf = True

    def __init__(self, status: StatusResource) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.status = status

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        return _encoder.encode(self.status.document()) + b"\n"

    render_HEAD = _render_head


class _Metrics(Resource):
    isLeaf = True

    def __init__(self, status: StatusResource) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.status = status

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"Cache-Control", b"no-store")
        return self.status.metrics.render()

    render_HEAD = _render_head


class StatusResource(Resource):
    """
    The status site's root.

    @ivar pool: the agents it shows.
    @ivar metrics: the metrics it shows.
    @ivar gateway: the gateway's settings for C{/agents}, C{None} without a
        gateway.
    """

    def __init__(
        self,
        pool: AgentPool,
        metrics: GatewayMetrics,
        gateway: dict[str, Any] | None = None,
        history: History | None = None,
        readiness: Readiness | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.pool = pool
        self.metrics = metrics
        self.gateway = gateway
        #: The last minutes of the metrics: rates, quantiles and charts.
        self.history = history
        self.putChild(b"", _Page(self))
        self.putChild(b"agents", _Agents(self))
        self.putChild(b"metrics", _Metrics(self))
        self.putChild(b"healthz", HealthzResource(pool, readiness))

    def getChild(self, path: bytes, request: Any) -> Any:
        return pages.notFound()

    def document(self) -> dict[str, Any]:
        """What C{GET /agents} shows (see L{agents_document})."""
        return agents_document(self.pool, self.gateway, self.metrics)

    def page(self) -> str:
        """The HTML status page (see L{sentinel_twisted.status.page})."""
        return render_page(self)


class _Refusal(Resource):
    """
    A plain-text refusal of any request, with its status's phrase given:
    C{twisted.web} knows no phrase for 421 (C{pages.errorPage} would send
    C{Unknown Status}).
    """

    isLeaf = True

    def __init__(self, code: int, phrase: bytes, explanation: bytes) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.code = code
        self.phrase = phrase
        self.body = b"%d %s\n%s\n" % (code, phrase, explanation)

    def render(self, request: Any) -> bytes:
        request.setResponseCode(self.code, self.phrase)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return self.body


#: A C{Host} that names another site (DNS rebinding).
_MISDIRECTED = _Refusal(
    421,
    b"Misdirected Request",
    b"This status site answers only to its own address or the names given with --status-host.",
)
#: An HTTP/1.1 request without a C{Host}, any request with more than one,
#: or one that is not C{host[:port]} (RFC 9112 section 3.2).
_NO_ONE_HOST = _Refusal(
    400, b"Bad Request", b"A request needs one Host header, host[:port] (only an HTTP/1.0 request may leave it out)."
)


def _host_name(value: bytes) -> str:
    """The host of a C{Host} header value, lower-case, without port or brackets."""
    text = value.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1 : text.find("]")] if "]" in text else text
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


#: The status site's logger.
log = Logger(namespace="sentinel_twisted.status")

#: The most connections the status site holds at once: past it a new one is
#: closed as soon as it is made (browsers and scrapers need a few).
STATUS_MAX_CONNECTIONS = 64

#: The C{Content-Security-Policy} of every status site response: nothing is
#: fetched or run, only the page's own inline style applies.
STATUS_CONTENT_POLICY = b"default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"

#: Seconds a status site client has to send a whole request head, from
#: connecting or from the end of its previous response.
STATUS_HEADER_TIMEOUT = 60.0


class _StatusChannel(DeadlineChannel):
    """
    HTTP/1.1, read with C{recv()} on a UNIX socket (see L{read_plainly}),
    closed after a request with C{close} among its C{Connection} options
    (see L{check_persistence}).

    Each request head must arrive whole within the site's C{header_timeout}
    (see L{DeadlineChannel}): a client that trickles a byte now and then
    gets C{408}, and cannot hold one of the site's few connections.

    The site only answers C{GET}s: a request that announces a body
    (C{Content-Length} above 0, or chunked) gets C{413} and the connection
    is closed before any of the body is read, which Twisted would otherwise
    take whole, spooling a large one to a temporary file.
    """

    site: StatusSite
    head_timeout_line = "A status site client sent no complete request head in {timeout}s; answering 408"
    #: Whether a request announced a body: nothing more is read.
    body_refused = False

    def makeConnection(self, transport: Any) -> None:
        read_plainly(transport)
        super().makeConnection(transport)  # type: ignore[no-untyped-call]

    def allHeadersReceived(self) -> None:
        if self.length != 0:
            self.body_refused = True
            transport: Any = self.transport
            transport.write(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self.loseConnection()
            return
        super().allHeadersReceived()

    def checkPersistence(self, request: Any, version: bytes) -> bool:
        """
        Whether the connection stays open after C{request}'s response: not
        after C{close} among the options of any C{Connection} field, as on
        the gateway (see
        L{check_persistence <sentinel_twisted._persistence.check_persistence>}).
        """
        return check_persistence(request, version, self._command)

    def rawDataReceived(self, data: bytes) -> None:
        if self.body_refused:
            return
        super().rawDataReceived(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.site.connections -= 1
        super().connectionLost(reason)

    def _warn(self, kind: str, format: str, /, **fields: Any) -> None:
        self.site.log_limiter.warn(log, f"status_{kind}", format, **fields)


class StatusSite(server.Site):
    """
    The status site; requests to it are not access-logged.

    It answers only requests whose C{Host} names it: the address the
    connection arrived on, C{localhost} on a loopback address, or one of
    C{hosts}.  A page from elsewhere whose name was made to resolve to this
    address (DNS rebinding) sends its own name, and gets C{421}.  An
    HTTP/1.1 request without a C{Host}, one with two, or one that is not
    C{host[:port]} gets C{400} (RFC 9112 section 3.2).

    It holds at most C{max_connections} connections at once, and each must
    send every request head whole within C{header_timeout} seconds of
    connecting or of the end of its previous response (else C{408} and the
    connection closes, or an idle one is closed), however it trickles its
    bytes; Twisted also closes one that stays quiet for C{timeout} seconds
    (a minute by default).  Whoever can reach it cannot hold the process's
    file descriptors, nor its places.

    @cvar noisy: C{False}: no log line for each connection.
    @ivar displayTracebacks: C{False}: an error page never shows a traceback.
    @ivar hosts: the other C{Host} names it answers to, lower-case.
    @ivar max_connections: the most connections held at once.
    @ivar header_timeout: seconds a client has for each request head.
    @ivar connections: connections open now.
    @ivar log_limiter: keeps the site's warnings about its clients to a few
        per period.
    """

    noisy = False
    protocol = _StatusChannel  # type: ignore[assignment]

    def __init__(
        self,
        status: StatusResource,
        hosts: Iterable[str] = (),
        max_connections: int = STATUS_MAX_CONNECTIONS,
        header_timeout: float = STATUS_HEADER_TIMEOUT,
        **kwargs: Any,
    ) -> None:
        super().__init__(status, **kwargs)  # type: ignore[no-untyped-call]
        self.displayTracebacks = False
        self.hosts = frozenset(h.lower() for h in hosts)
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.connections = 0
        self.log_limiter = LogRateLimiter(self.reactor)

    def buildProtocol(self, addr: Any) -> Any:
        if self.connections >= self.max_connections:
            self.log_limiter.warn(
                log,
                "status_connection_limit",
                "{count} status site connections; closing new ones",
                count=self.connections,
            )
            return RefusedConnection()
        channel = super().buildProtocol(addr)  # type: ignore[no-untyped-call]
        if channel is not None:
            self.connections += 1
            channel.header_timeout = self.header_timeout
        return channel

    def acceptableProtocols(self) -> list[bytes]:
        """
        HTTP/1.1 alone, for TLS to offer (ALPN): its channel speaks no
        HTTP/2, which Twisted's C{Site} offers when C{h2} is installed.
        """
        return [b"http/1.1"]

    def names_me(self, request: Any) -> bool:
        """
        Whether the request's C{Host} names this site: its own address,
        C{localhost} on a loopback address, or a C{--status-host} name.  A
        page served from another name that resolves here (DNS rebinding)
        is refused.
        """
        local = request.getHost()
        if not isinstance(local, (IPv4Address, IPv6Address)):
            # A UNIX socket: no browser reaches it by name.
            return True
        values = request.requestHeaders.getRawHeaders(b"host")
        if not values:
            # HTTP/1.0 without Host (HTTP/1.1 gets 400 before this): no
            # browser sends that.
            return True
        if len(values) > 1:
            return False
        name = _host_name(values[0])
        if name in self.hosts or name == local.host.lower():
            return True
        try:
            loopback = ipaddress.ip_address(local.host).is_loopback
        except ValueError:
            loopback = False
        return loopback and name == "localhost"

    def getResourceFor(self, request: Any) -> Any:
        # Every answer, refusals too: what agents chose is in them (an id
        # of <script>...), so no browser may take one for another type, and
        # the page loads nothing and runs no script whatever it holds.
        headers = request.responseHeaders
        headers.setRawHeaders(b"X-Content-Type-Options", [b"nosniff"])
        headers.setRawHeaders(b"Content-Security-Policy", [STATUS_CONTENT_POLICY])
        hosts = request.requestHeaders.getRawHeaders(b"host")
        if (hosts is None and request.clientproto == b"HTTP/1.1") or (
            hosts is not None and (len(hosts) > 1 or not valid_host(hosts[0].strip(b" \t")))
        ):
            return _NO_ONE_HOST
        if not self.names_me(request):
            return _MISDIRECTED
        return super().getResourceFor(request)  # type: ignore[no-untyped-call]

    def log(self, request: Any) -> None:
        pass
