# -*- test-case-name: tests.gateway.test_status_page -*-
"""
The status page (C{GET /}): which agent decides, how fast, and what
failed, for a person; it reloads itself.

Plain HTML with inline SVG charts drawn here: nothing is fetched from
elsewhere and no script runs.  Everything a peer chose (agent ids,
connection ids, metadata) is escaped.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from html import escape
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..messages import EventType, HealthState
from ._families import quantile
from .history import History, Window
from .metrics import AGENT_DECISIONS, DECISIONS

if TYPE_CHECKING:
    from .resource import StatusResource

__all__ = ["REFRESH_SECONDS", "event_names", "format_age", "render_page"]

#: How often the page reloads itself.
REFRESH_SECONDS = 5

#: Denials and failures, as the request chart groups them.
_DENIED = ("block", "redirect", "challenge")
_FAILED = ("unavailable", "error", "too_large", "bad_request")

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1em;color:#222;max-width:1400px}
h1{font-size:1.25em;margin:0 0 .2em}h2{font-size:1.05em;margin:1.2em 0 .3em}
.scroll{overflow-x:auto}
table{border-collapse:collapse;margin:.3em 0}
th,td{border:1px solid #ccc;padding:.2em .5em;text-align:left;font-size:.85em;white-space:nowrap}
th{background:#eee}td.num{text-align:right}
tr.paused td,tr.blocked td{background:#fff4d6}.bad{color:#b00020;font-weight:bold}
.muted{color:#666;font-size:.85em}
.charts{display:flex;flex-wrap:wrap;gap:1em}
figure{margin:0;flex:1 1 320px;max-width:460px}
figcaption{font-size:.85em;margin-bottom:.2em}
svg{width:100%;height:auto;background:#fafafa;border:1px solid #ddd}
.key{display:inline-block;width:.8em;height:.8em;margin:0 .2em 0 .6em;vertical-align:middle}
"""


def _utc(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def format_age(seconds: float) -> str:
    """C{3 h 12 min}, C{5 min 3 s}, C{12 s}, C{2 d 4 h}: how long ago, to a person."""
    seconds = max(int(seconds), 0)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"


def event_names(numbers: Sequence[int]) -> list[str]:
    """C{request_headers}, C{request_body_chunk}, ... for event numbers (unknown ones as numbers)."""
    names = []
    for number in sorted(numbers):
        try:
            names.append(EventType(number).name.lower())
        except ValueError:
            names.append(str(number))
    return names


def health_name(state: int | None) -> str:
    """C{healthy}, C{degraded}, ... for a health state; C{unknown} before any."""
    if state is None:
        return "unknown"
    try:
        return HealthState(state).name.lower()
    except ValueError:
        return str(state)


def _short(number: float) -> str:
    """Three significant digits, never an exponent."""
    text = f"{number:.3g}"
    return f"{number:.0f}" if "e" in text else text


def _seconds(value: float | None) -> str:
    if value is None:
        return "–"
    if value < 0.9995:
        return f"{_short(value * 1000)} ms"
    return f"{_short(value)} s"


def _rate(value: float | None) -> str:
    if value is None:
        return "–"
    if value >= 1000:
        return f"{value:,.0f}/s"
    return f"{_short(value)}/s" if value else "0/s"


def _peer(c: Any) -> str:
    if c.peer_pid is None:
        return str(c.peer)
    return f"{c.peer} (pid {c.peer_pid}, uid {c.peer_uid})"


def _cell(css: str, text: object, numeric: bool = True) -> str:
    klass = f"num {css}" if numeric else css
    return f'<td class="{klass}">{escape(str(text))}</td>'


def _chart(
    chart_id: str, title: str, lines: list[tuple[str, str, list[float | None]]], show: Any
) -> str:
    """
    A small line chart as inline SVG: C{lines} of (label, colour, values),
    evenly spaced in time, scaled to the largest value.
    """
    width, height, pad = 300, 90, 4
    values = [v for _, _, vs in lines for v in vs if v is not None]
    top = max(values) if values else 0.0
    scale = top if top > 0 else 1.0
    points_count = max(max((len(vs) for _, _, vs in lines), default=0), 2)
    step = (width - 2 * pad) / max(points_count - 1, 1)
    drawn = []
    for label, colour, vs in lines:
        if len(vs) == 1:
            # One interval so far: a level line rather than an invisible dot.
            vs = [vs[0]] * points_count
        points = " ".join(
            f"{pad + i * step:.1f},{height - pad - (v / scale) * (height - 2 * pad):.1f}"
            for i, v in enumerate(vs)
            if v is not None
        )
        drawn.append(
            f'<polyline data-line="{escape(label)}" fill="none" stroke="{colour}" '
            f'stroke-width="1.5" points="{points}"/>'
        )
    keys = "".join(
        f'<span class="key" style="background:{colour}"></span>{escape(label)} '
        f"{escape(show(vs[-1] if vs else None))}"
        for label, colour, vs in lines
    )
    return (
        f'<figure id="{chart_id}"><figcaption><b>{escape(title)}</b>{keys}</figcaption>'
        f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">'
        f'<text x="{pad}" y="12" font-size="9" fill="#666">max {escape(show(top))}</text>'
        + "".join(drawn)
        + "</svg></figure>"
    )


def _charts(history: History | None) -> str:
    if history is None:
        return ""
    steps = history.steps()
    minutes = round(len(steps) * history.interval / 60)
    requests = _chart(
        "chart-requests",
        "Requests/s",
        [
            ("allowed", "#2a7", [w.requests(("allow",)) for w in steps]),
            ("denied", "#d80", [w.requests(_DENIED) for w in steps]),
            ("failed", "#c22", [w.requests(_FAILED) for w in steps]),
        ],
        _rate,
    )
    latency = _chart(
        "chart-latency",
        "Agent round trip",
        [
            ("p50", "#27c", [w.round_trip(0.5) for w in steps]),
            ("p99", "#a3c", [w.round_trip(0.99) for w in steps]),
        ],
        _seconds,
    )
    connections = _chart(
        "chart-connections",
        "Live agent connections",
        [("connections", "#555", [float(w.now.connections) for w in steps])],
        lambda v: "–" if v is None else f"{v:g}",
    )
    return (
        f'<h2>The last {max(minutes, 1)} min</h2><div class="charts">'
        f"{requests}{latency}{connections}</div>"
    )


def _gateway(status: StatusResource, window: Window | None) -> str:
    gateway = status.gateway or {}
    metrics = status.metrics
    snap = window.now if window is not None else metrics.snapshot()
    policy = (
        "fail open: when an agent cannot answer, the request goes on unchecked"
        if gateway.get("fail_open")
        else "fail closed: when an agent cannot answer, the client gets 503"
    )
    classes = ("2xx", "3xx", "4xx", "5xx", "none")
    class_cells = "".join(
        f'<tr data-code-class="{k}"><td>{k}</td>'
        + _cell("total", snap.code_classes.get(k, 0))
        + _cell("rate", _rate(window.code_class(k) if window else None))
        + "</tr>"
        for k in classes
    )
    decision_rows = "".join(
        f'<tr data-decision="{d}"><td>{d}</td>'
        + _cell("total", snap.requests.get(d, 0))
        + _cell("rate", _rate(window.requests((d,)) if window else None))
        + "</tr>"
        for d in DECISIONS
    )

    def q(kind: str, p: float) -> str:
        if window is not None:
            return _seconds(getattr(window, kind)(p))
        histogram = getattr(snap, kind)
        return _seconds(quantile(getattr(metrics, f"{kind}_buckets"), histogram.counts, p))

    return (
        '<h2>Gateway</h2><p id="gateway">'
        f'<span id="gateway-rps">{_rate(window.requests() if window else None)}</span> requests; '
        f'end to end p50 <span id="gateway-p50">{q("duration", 0.5)}</span>, '
        f'p99 <span id="gateway-p99">{q("duration", 0.99)}</span>; '
        f'upstream p50 <span id="upstream-p50">{q("upstream", 0.5)}</span>, '
        f'p99 <span id="upstream-p99">{q("upstream", 0.99)}</span>; '
        f'fail-open passes: <span id="fail-open-passes">{snap.fail_open}</span><br>'
        f'Failure policy: <span id="policy-text">{escape(policy)}</span></p>'
        '<div class="charts"><div class="scroll"><table id="status-classes"><thead><tr>'
        "<th>responses</th><th>total</th><th>last min</th></tr></thead>"
        f"<tbody>{class_cells}</tbody></table></div>"
        '<div class="scroll"><table id="requests"><thead><tr><th>decision</th><th>requests</th>'
        f"<th>last min</th></tr></thead><tbody>{decision_rows}</tbody></table></div></div>"
    )


def _agents(status: StatusResource, window: Window | None, now: float) -> str:
    stats = status.pool.stats()
    if not stats:
        return '<h2>Agents</h2><p id="no-agents">No agent is connected.</p>'
    snap = window.now if window is not None else status.metrics.snapshot()
    agent_rows = []
    connection_rows = []
    metrics = status.metrics
    for info in stats:
        agent_id = info.agent_id
        totals = snap.agents.get(agent_id)
        decisions = " · ".join(
            f"{d} {totals.decisions.get(d, 0)}" for d in AGENT_DECISIONS if totals and totals.decisions.get(d)
        )
        failures = sum(totals.failures.values()) if totals else 0
        write_blocked = sum(1 for c in info.connections if c.write_blocked)
        modes = sorted({f"{c.mode} ({c.encoding})" for c in info.connections})
        agent_rows.append(
            f'<tr data-agent="{escape(agent_id)}">'
            + _cell("agent", agent_id, numeric=False)
            + _cell("mode", ", ".join(modes), numeric=False)
            + _cell("connections", len(info.connections))
            + _cell("rps", _rate(window.agent_rate(agent_id) if window else None))
            + _cell("decisions", decisions or "–", numeric=False)
            + _cell("p50", _seconds(window.agent_round_trip(agent_id, 0.5) if window else None))
            + _cell("p99", _seconds(window.agent_round_trip(agent_id, 0.99) if window else None))
            + _cell("timeouts", totals.timeouts if totals else 0)
            + _cell("failures", failures)
            + _cell("cancels", totals.cancels if totals else 0)
            + _cell("paused", info.paused_connections)
            + _cell("write-blocked", write_blocked)
            + "</tr>"
        )
        for c in info.connections:
            answered = metrics.connection_round_trips(c.connection_id)
            p50 = p99 = None
            if answered is not None:
                p50 = quantile(metrics.round_trip_buckets, answered.counts, 0.5)
                p99 = quantile(metrics.round_trip_buckets, answered.counts, 0.99)
            row_class = "paused" if c.paused else "blocked" if c.write_blocked else "live"
            connection_rows.append(
                f'<tr class="{row_class}" data-agent-id="{escape(agent_id)}" '
                f'data-connection-id="{escape(c.connection_id)}">'
                + _cell("agent", agent_id, numeric=False)
                + _cell("connection", c.connection_id, numeric=False)
                + _cell("peer", _peer(c), numeric=False)
                + _cell("in-flight", c.in_flight)
                + _cell("flow", "paused" if c.paused else "open", numeric=False)
                + _cell("write", "blocked" if c.write_blocked else "ok", numeric=False)
                + _cell("health", health_name(c.health), numeric=False)
                + _cell("events", ", ".join(event_names(c.capabilities.supported_events)), numeric=False)
                + _cell("answered", answered.count if answered is not None else 0)
                + _cell("p50", _seconds(p50))
                + _cell("p99", _seconds(p99))
                + _cell("age", format_age(now - c.connected_since), numeric=False)
                + "</tr>"
            )
    return (
        '<h2>Agents</h2><div class="scroll"><table id="agents"><thead><tr><th>agent</th><th>mode</th>'
        "<th>conns</th><th>answers/s</th><th>decisions</th><th>p50</th><th>p99</th>"
        "<th>timeouts</th><th>failures</th><th>cancels</th><th>paused</th><th>write-blocked</th>"
        f'</tr></thead><tbody>{"".join(agent_rows)}</tbody></table></div>'
        '<h2>Connections</h2><div class="scroll"><table id="connections"><thead><tr><th>agent</th>'
        "<th>connection</th><th>peer</th><th>in flight</th><th>flow</th><th>write</th>"
        "<th>health</th><th>events</th><th>answered</th><th>p50</th><th>p99</th><th>age</th>"
        f'</tr></thead><tbody>{"".join(connection_rows)}</tbody></table></div>'
    )


def _rejections(status: StatusResource, now: float) -> str:
    factory = status.metrics.factory
    if factory is None:
        return ""
    rejections = factory.rejections
    if not rejections:
        return '<h2>Registration rejections</h2><p id="no-rejections">None.</p>'
    rows = "".join(
        f'<tr data-reason="{escape(reason)}"><td>{escape(reason)}</td>' + _cell("count", count) + "</tr>"
        for reason, count in sorted(rejections.items())
    )
    last = factory.last_rejection
    if last is not None:
        shown = (
            f'<p id="last-rejection">Last: agent <code id="last-rejected-agent">'
            f'{escape(last.agent_id or "(unknown)")}</code> from '
            f'<span id="last-rejected-peer">{escape(last.peer)}</span> '
            f'(<span id="last-rejected-reason">{escape(last.reason)}</span>), '
            f'<span id="last-rejected-age" title="{_utc(last.at)}">{format_age(now - last.at)}</span> ago '
            f'(<span id="last-rejected-time">{_utc(last.at)}</span>)</p>'
        )
    else:
        shown = ""
    return (
        '<h2>Registration rejections</h2><div class="scroll"><table id="rejections"><thead><tr>'
        f"<th>reason</th><th>count</th></tr></thead><tbody>{rows}</tbody></table></div>{shown}"
    )


def render_page(status: StatusResource) -> str:
    """The whole page."""
    now = time.time()
    history = status.history
    window = history.last_window() if history is not None else None
    stats = status.pool.stats()
    gateway = status.gateway or {}
    consulted = gateway.get("agents") or ["every agent seen, registered now or not"]
    factory = status.metrics.factory
    registrations = factory.registrations if factory is not None else 0
    connections = sum(len(i.connections) for i in stats)
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">'
        "<title>sentinel-reverse status</title>"
        f"<style>{_STYLE}</style></head><body>"
        f"<h1>sentinel-reverse {escape(__version__)}</h1>"
        f'<p id="summary"><span id="agent-count">{len(stats)}</span> agent(s), '
        f'<span id="connection-count">{connections}</span> connection(s); '
        f'registrations: <span id="registrations">{registrations}</span>; '
        f'upstream: <span id="upstream">{escape(str(gateway.get("upstream", "-")))}</span>; '
        f'consulted: <span id="consulted">{escape(", ".join(consulted))}</span>; '
        f'failure policy: <span id="policy">{"fail open" if gateway.get("fail_open") else "fail closed"}</span></p>'
        + _charts(history)
        + _agents(status, window, now)
        + _gateway(status, window)
        + _rejections(status, now)
        + f'<p class="muted">Rates and quantiles: the last {int(history.window) if history else 60} s. '
        f"Refreshes every {REFRESH_SECONDS} s. "
        '<a href="/agents">/agents</a> (JSON) · <a href="/metrics">/metrics</a> (Prometheus)</p>'
        "</body></html>\n"
    )
