# -*- test-case-name: tests.gateway.test_status -*-
"""
The status site: C{GET /agents} (JSON), C{GET /metrics} (Prometheus text)
and C{GET /} (a small HTML page of the same for a person, refreshing
itself).
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterable
from html import escape
from typing import TYPE_CHECKING, Any

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.web import pages, server
from twisted.web.resource import Resource

from .. import __version__
from ..messages import HealthState

if TYPE_CHECKING:
    from ..pool import AgentPool
    from .metrics import GatewayMetrics

__all__ = ["REFRESH_SECONDS", "StatusResource", "StatusSite", "agents_document"]

#: How often the HTML page reloads itself.
REFRESH_SECONDS = 5

_encoder = msgspec.json.Encoder()


def _rfc3339(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def health_name(state: int | None) -> str:
    """C{healthy}, C{degraded}, ... for a health state; C{unknown} before any."""
    if state is None:
        return "unknown"
    try:
        return HealthState(state).name.lower()
    except ValueError:
        return str(state)


def agents_document(pool: AgentPool, gateway: dict[str, Any] | None = None) -> dict[str, Any]:
    """What C{GET /agents} shows: each agent and its connections."""
    agents = []
    for info in pool.stats():
        connections = []
        for c in info.connections:
            connections.append(
                {
                    "connection_id": c.connection_id,
                    "peer": c.peer,
                    "mode": c.mode,
                    "encoding": c.encoding,
                    "in_flight": c.in_flight,
                    "paused": c.paused,
                    "health": c.health,
                    "health_name": health_name(c.health),
                    "capabilities": c.capabilities,
                    "metadata": c.metadata,
                    "connected_since": _rfc3339(c.connected_since),
                    "connected_since_epoch": c.connected_since,
                }
            )
        agents.append(
            {
                "agent_id": info.agent_id,
                "in_flight": info.in_flight,
                "paused_connections": info.paused_connections,
                "connections": connections,
            }
        )
    document: dict[str, Any] = {"agents": agents}
    if gateway is not None:
        document["gateway"] = gateway
    return document


_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; margin-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.8em 0; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: left; font-size: 0.9em; }
th { background: #eee; }
td.num { text-align: right; }
tr.paused td { background: #fff4d6; }
.muted { color: #666; font-size: 0.85em; }
"""


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
        return self.status.metrics.render()

    render_HEAD = _render_head


class StatusResource(Resource):
    """The status site's root."""

    def __init__(
        self, pool: AgentPool, metrics: GatewayMetrics, gateway: dict[str, Any] | None = None
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.pool = pool
        self.metrics = metrics
        self.gateway = gateway
        self.putChild(b"", _Page(self))
        self.putChild(b"agents", _Agents(self))
        self.putChild(b"metrics", _Metrics(self))

    def getChild(self, path: bytes, request: Any) -> Any:
        return pages.notFound()

    def document(self) -> dict[str, Any]:
        """What C{GET /agents} shows (see L{agents_document})."""
        return agents_document(self.pool, self.gateway)

    def _sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.metrics.registry.get_sample_value(name, labels or {})
        return value or 0.0

    def page(self) -> str:
        """The HTML status page: the connections, the settings and the request counts."""
        stats = self.pool.stats()
        rows = []
        for info in stats:
            for c in info.connections:
                events = ", ".join(str(n) for n in sorted(c.capabilities.supported_events))
                rows.append(
                    f'<tr class="{"paused" if c.paused else "live"}" '
                    f'data-agent-id="{escape(info.agent_id)}" '
                    f'data-connection-id="{escape(c.connection_id)}">'
                    f'<td class="agent">{escape(info.agent_id)}</td>'
                    f'<td class="connection">{escape(c.connection_id)}</td>'
                    f'<td class="peer">{escape(c.peer)}</td>'
                    f'<td class="mode">{escape(c.mode)} ({escape(c.encoding)})</td>'
                    f'<td class="num in-flight">{c.in_flight}</td>'
                    f'<td class="flow">{"paused" if c.paused else "open"}</td>'
                    f'<td class="health">{escape(health_name(c.health))}</td>'
                    f'<td class="events">{escape(events)}</td>'
                    f'<td class="since">{_rfc3339(c.connected_since)}</td>'
                    "</tr>"
                )
        connections = sum(len(i.connections) for i in stats)
        if rows:
            table = (
                '<table id="connections"><thead><tr><th>agent</th><th>connection</th><th>peer</th><th>mode</th>'
                "<th>in flight</th><th>flow</th><th>health</th><th>events</th>"
                "<th>connected since</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
            )
        else:
            table = '<p id="no-agents">No agent is connected.</p>'
        decisions = (
            "allow",
            "block",
            "redirect",
            "challenge",
            "unavailable",
            "too_large",
            "client_closed",
            "bad_request",
        )
        request_rows = "".join(
            f'<tr data-decision="{d}"><td>{d}</td><td class="num">'
            f'{int(self._sample("sentinel_gateway_requests_total", {"decision": d}))}</td></tr>'
            for d in decisions
        )
        gateway = self.gateway or {}
        consulted = gateway.get("agents") or ["every registered agent"]
        return (
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">'
            "<title>sentinel-reverse status</title>"
            f"<style>{_STYLE}</style></head><body>"
            f"<h1>sentinel-reverse {escape(__version__)}</h1>"
            f'<p id="summary"><span id="agent-count">{len(stats)}</span> agent(s), '
            f'<span id="connection-count">{connections}</span> connection(s); '
            f'registrations: <span id="registrations">{int(self._sample("sentinel_agent_registrations_total"))}</span>; '
            f'upstream: <span id="upstream">{escape(str(gateway.get("upstream", "-")))}</span>; '
            f'consulted: <span id="consulted">{escape(", ".join(consulted))}</span>; '
            f'failure policy: <span id="policy">{"fail open" if gateway.get("fail_open") else "fail closed"}</span></p>'
            f"{table}"
            f'<table id="requests"><thead><tr><th>decision</th><th>requests</th></tr></thead>'
            f"<tbody>{request_rows}</tbody></table>"
            f'<p class="muted">Refreshes every {REFRESH_SECONDS} s. '
            '<a href="/agents">/agents</a> (JSON) · <a href="/metrics">/metrics</a> (Prometheus)</p>'
            "</body></html>\n"
        )


_MISDIRECTED = pages.errorPage(
    421,
    "Misdirected Request",
    "This status site answers only to its own address or the names given with --status-host.",
)


def _host_name(value: bytes) -> str:
    """The host of a C{Host} header value, lower-case, without port or brackets."""
    text = value.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1 : text.find("]")] if "]" in text else text
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


class StatusSite(server.Site):
    """
    The status site; requests to it are not access-logged.

    It answers only requests whose C{Host} names it: the address the
    connection arrived on, C{localhost} on a loopback address, or one of
    C{hosts}.  A page from elsewhere whose name was made to resolve to this
    address (DNS rebinding) sends its own name, and gets C{421}.
    """

    noisy = False

    def __init__(self, status: StatusResource, hosts: Iterable[str] = (), **kwargs: Any) -> None:
        super().__init__(status, **kwargs)  # type: ignore[no-untyped-call]
        self.displayTracebacks = False
        self.hosts = frozenset(h.lower() for h in hosts)

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
            # HTTP/1.0 without Host: no browser sends that.
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
        if not self.names_me(request):
            return _MISDIRECTED
        return super().getResourceFor(request)  # type: ignore[no-untyped-call]

    def log(self, request: Any) -> None:
        pass
