"""
Hostile peers against the status site, the metrics and the log: whatever
agent ids, metadata, capabilities, health states, reports and socket names
agents choose (within what registration admits), the page is HTML whose
markup is all ours, C{/agents} is JSON that gives their values back,
C{/metrics} parses with C{prometheus_client}'s own parser and keeps no
series of an agent that left, a worker group's pages built from such
workers stay as sound, and every log line is one line, short, with no
control character and no token.

Everything runs in memory (a L{MemoryReactorClock}, L{StringTransport}s);
the examples are few and derandomized, so that the module stays fast.
"""

from __future__ import annotations

import json
import re
import unicodedata
from html.parser import HTMLParser
from types import SimpleNamespace
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent
from twisted.trial.unittest import SynchronousTestCase

from sentinel_twisted import messages as m
from sentinel_twisted._peertext import is_clean
from sentinel_twisted.proxy.auth import StaticTokenChecker
from sentinel_twisted.status.metrics import GatewayMetrics
from sentinel_twisted.status.resource import StatusResource
from sentinel_twisted.wire import MessageType, encode_frame
from sentinel_twisted.workers.status import GroupStatusResource, group_document, merge_metrics

from ._proxy_support import Proxy, captured_log, lose, take_frames

SETTINGS = settings(
    max_examples=25,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

#: The token every agent of these examples holds: never in a log line.
TOKEN = "secret-7f3a9c1e5b2d4f60"
#: A token that is not it.
WRONG = "secret-0000000000000000"

#: Text with what breaks markup, labels, JSON and log lines.
HOSTILE = st.sampled_from(
    [
        "</script><script>alert(1)</script>",
        '"><img src=x onerror=alert(1)>',
        "' onmouseover='alert(1)",
        "javascript:alert(1)",
        "<!--",
        "]]>",
        "&amp;&lt;&#x27;&",
        'a\\"b\\\\',
        "\\n",
        '{agent="x"} 1',
        "\u202eevil\u202c",
        "\u2028\u2029",
        "\x1b[31mred\x1b[0m",
        "\r\nInjected: line",
        "\x00\x07\x7f\x85",
        "\ufeff\u200b\u2066",
        "\U0001f4a9",
    ]
)


def _text(max_size: int) -> st.SearchStrategy[str]:
    return st.one_of(st.text(max_size=max_size), HOSTILE, st.builds("{}{}".format, HOSTILE, st.text(max_size=8)))


#: Agent ids that registration admits: up to 256 bytes, nothing hidden.
AGENT_IDS = _text(40).filter(lambda s: s != "" and is_clean(s) and len(s.encode()) <= 256)

#: Any JSON, as metadata, reports and configuration requests carry it.
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text(30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_text(12), children, max_size=4),
    max_leaves=10,
)

#: Where a connection comes from: TCP, or a UNIX socket the peer bound to a
#: name of its choosing (any bytes; an abstract one starts with a NUL).
PEERS = st.one_of(
    st.just(IPv4Address("TCP", "127.0.0.1", 40000)),
    st.binary(min_size=1, max_size=100).map(UNIXAddress),
    st.builds(lambda b: UNIXAddress(b"\x00" + b), st.binary(max_size=40)),
)

AGENT = st.fixed_dictionaries(
    {
        "agent_id": AGENT_IDS,
        "metadata": JSON,
        "name": _text(40),
        "version": _text(20),
        "events": st.lists(st.integers(min_value=-(2**31), max_value=2**31), max_size=5),
        "health": st.one_of(st.none(), st.integers(min_value=-(2**63), max_value=2**63 - 1)),
        "report": st.dictionaries(_text(20), JSON, max_size=3),
        "peer": PEERS,
    }
)


def registration(agent: dict[str, Any], token: str | None) -> bytes:
    request = m.RegistrationRequest(
        protocol_version=m.PROTOCOL_VERSION,
        agent_id=agent["agent_id"],
        capabilities=m.AgentCapabilities(
            agent_id=agent["agent_id"],
            name=agent["name"],
            version=agent["version"],
            supported_events=agent["events"],
            features=m.AgentFeatures(),
            limits=m.AgentLimits(),
        ),
        auth_token=token,
        metadata=agent["metadata"],
    )
    return encode_frame(MessageType.HANDSHAKE_REQUEST, m.encode(request))


class Scene:
    """
    A listener with its metrics and status site; agents register, send
    their control messages, have requests counted against them, and leave.
    """

    def __init__(self, token_checker: Any = None) -> None:
        self.proxy = Proxy(token_checker=token_checker)
        self.metrics = GatewayMetrics(self.proxy.pool, self.proxy.factory, process=False).attach()
        self.status = StatusResource(
            self.proxy.pool, self.metrics, gateway={"upstream": "http://127.0.0.1:1/", "fail_open": False}
        )
        self.protocols: list[Any] = []

    def connect(self, agent: dict[str, Any], token: str | None = TOKEN) -> tuple[Any, StringTransport]:
        address = agent["peer"]
        protocol = self.proxy.factory.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        protocol.makeConnection(transport)
        protocol.dataReceived(registration(agent, token))
        return protocol, transport

    def arrive(self, agent: dict[str, Any]) -> Any:
        """Register C{agent}; send its HealthStatus, MetricsReport and ConfigUpdateRequest."""
        protocol, transport = self.connect(agent)
        [(_, payload)] = take_frames(transport)
        response = m.decode(payload, m.RegistrationResponse)
        assert response.success, response.error
        connection = protocol.connection
        if agent["health"] is not None:
            protocol.dataReceived(encode_frame(MessageType.HEALTH_STATUS, m.encode({"state": agent["health"]})))
        report = m.encode(agent["report"])
        protocol.dataReceived(encode_frame(MessageType.METRICS_REPORT, report))
        protocol.dataReceived(encode_frame(MessageType.CONFIG_UPDATE_REQUEST, report))
        agent_id = agent["agent_id"]
        self.metrics.agent_failed(agent_id, "timeout")
        self.metrics.cancel_sent(agent_id, m.CancelReason.TIMEOUT)
        self.metrics.fail_open_pass(agent_id, "timeout")
        self.metrics.agent_decided(agent_id, "block")
        self.metrics.request_answered(connection, "cid", 0.002)
        self.protocols.append(protocol)
        return connection

    def refused(self, agent: dict[str, Any], token: str | None) -> None:
        """A registration the listener refuses (a wrong token, a bad id)."""
        protocol, transport = self.connect(agent, token)
        [(_, payload)] = take_frames(transport)
        assert not m.decode(payload, m.RegistrationResponse).success
        lose(protocol)

    def leave(self) -> None:
        for protocol in self.protocols:
            lose(protocol)
        self.protocols = []

    def page(self) -> str:
        return self.status.page()

    def agents(self) -> bytes:
        return msgspec.json.encode(self.status.document())

    def scrape(self) -> str:
        return self.metrics.render().decode("utf-8")


# -- checks -------------------------------------------------------------------

#: Our markup: each element the status pages use, with the attributes it may have.
_ELEMENTS = {
    "html": {"lang"},
    "head": set(),
    "meta": {"charset", "name", "content", "http-equiv"},
    "title": set(),
    "style": set(),
    "body": set(),
    "h1": set(),
    "h2": set(),
    "p": {"id", "class"},
    "span": {"id", "class", "style", "title"},
    "code": {"id"},
    "b": set(),
    "br": set(),
    "a": {"href"},
    "div": {"class"},
    "table": {"id"},
    "thead": set(),
    "tbody": set(),
    "tr": {
        "class",
        "data-agent",
        "data-agent-id",
        "data-connection-id",
        "data-decision",
        "data-code-class",
        "data-reason",
    },
    "th": set(),
    "td": {"class"},
    "figure": {"id"},
    "figcaption": set(),
    "svg": {"viewbox", "role", "aria-label"},
    "text": {"x", "y", "font-size", "fill"},
    "polyline": {"data-line", "fill", "stroke", "stroke-width", "points"},
}
_VOID = {"meta", "br"}
_ENTITIES = {"amp", "lt", "gt", "quot", "middot"}
_ATTRIBUTE = re.compile(r"""\s+[a-z-]+=(?:"[^"<]*"|'[^'<]*')""")
_HIDDEN = frozenset(("Cc", "Cf", "Zl", "Zp", "Cs"))


class StrictPage(HTMLParser):
    """
    A page read strictly: elements and attributes from L{_ELEMENTS} only,
    every attribute quoted, every element closed in order, no comment,
    no stray C{<}, no entity we do not write; C{tags} is the markup's
    outline (elements and attribute names, without any text or value).
    """

    def __init__(self, page: str) -> None:
        super().__init__(convert_charrefs=False)
        self.problems: list[str] = []
        self.tags: list[tuple[str, ...]] = []
        self.values: list[str] = []
        self.text: list[str] = []
        self.open: list[str] = []
        self.feed(page)
        self.close()
        if self.open:
            self.problems.append(f"unclosed {self.open}")

    def _start(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        allowed = _ELEMENTS.get(tag)
        if allowed is None:
            self.problems.append(f"element <{tag}>")
            return
        names = tuple(name for name, _ in attrs)
        if not set(names) <= allowed:
            self.problems.append(f"<{tag}> with {names}")
        raw = self.get_starttag_text() or ""
        inside = raw[1 + len(tag) :].rstrip(">").rstrip("/")
        if _ATTRIBUTE.sub("", inside).strip():
            self.problems.append(f"attributes not all quoted: {raw!r}")
        self.tags.append((tag, *names))
        self.values += [value or "" for _, value in attrs]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._start(tag, attrs)
        if tag not in _VOID:
            self.open.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._start(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        self.tags.append(("/" + tag,))
        if not self.open or self.open.pop() != tag:
            self.problems.append(f"</{tag}> out of order")

    def handle_data(self, data: str) -> None:
        if "<" in data:
            self.problems.append(f"a stray < in {data!r}")
        self.text.append(data)

    def handle_entityref(self, name: str) -> None:
        if name not in _ENTITIES:
            self.problems.append(f"&{name};")

    def handle_charref(self, name: str) -> None:
        if name != "x27":
            self.problems.append(f"&#{name};")

    def handle_comment(self, data: str) -> None:
        self.problems.append(f"a comment {data!r}")

    def handle_decl(self, decl: str) -> None:
        if decl.lower() != "doctype html":
            self.problems.append(f"<!{decl}>")

    def handle_pi(self, data: str) -> None:
        self.problems.append(f"<?{data}>")

    def unknown_decl(self, data: str) -> None:
        self.problems.append(f"<![{data}]>")


def strict_page(test: SynchronousTestCase, page: str) -> StrictPage:
    """The page read by L{StrictPage}, which found nothing wrong; nothing hidden in its text."""
    page.encode("utf-8")
    parsed = StrictPage(page)
    test.assertEqual(parsed.problems, [])
    hidden = [c for c in page if c != "\n" and unicodedata.category(c) in _HIDDEN]
    test.assertEqual(hidden, [], "control, format or separator characters on the page")
    return parsed


def strict_json(body: bytes) -> Any:
    """C{body} as JSON, refusing what JSON has no place for (NaN, Infinity)."""

    def constant(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(body.decode("utf-8"), parse_constant=constant)


def series(text: str) -> list[tuple[str, dict[str, str]]]:
    """Every sample of an exposition, read by prometheus_client's own parser."""
    return [(s.name, s.labels) for family in text_string_to_metric_families(text) for s in family.samples]


def log_lines(test: SynchronousTestCase, events: list[Any]) -> list[str]:
    """Each event as a log file would carry it: one short line, nothing hidden, no token."""
    lines = []
    for event in events:
        text = formatEvent(event)
        if event.get("log_failure") is not None:
            test.fail(f"an error was logged: {text}\n{event['log_failure'].getTraceback()}")
        test.assertLess(len(text), 1200, text)
        hidden = [c for c in text if unicodedata.category(c) in _HIDDEN]
        test.assertEqual(hidden, [], f"hidden characters in {text!r}")
        for secret in (TOKEN, WRONG):
            test.assertNotIn(secret, text)
            test.assertNotIn(secret, repr(dict(event)))
        lines.append(text)
    return lines


# -- properties ---------------------------------------------------------------


class HostileAgentsTests(SynchronousTestCase):
    """Agents that choose every string they can, against each view of the status."""

    def scene(self, agents: list[dict[str, Any]]) -> tuple[Scene, list[Any]]:
        checker = StaticTokenChecker({a["agent_id"]: TOKEN for a in agents})
        scene = Scene(token_checker=checker)
        with captured_log() as events:
            connections = [scene.arrive(a) for a in agents]
            scene.refused(agents[0], WRONG)
            # Last, so that the page shows it: an id no registration admits.
            scene.refused({**agents[0], "agent_id": agents[0]["agent_id"] + "\u202e\x1b[2J<b>\n"}, TOKEN)
            log_lines(self, events)
        return scene, connections

    @SETTINGS
    @given(st.lists(AGENT, min_size=1, max_size=4))
    def test_the_page_is_our_markup_whatever_agents_send(self, agents: list[dict[str, Any]]) -> None:
        scene, connections = self.scene(agents)
        page = strict_page(self, scene.page())
        # Benign ids in the same places (in the order of first registration,
        # which decides the rows) make the same outline: no peer text made an
        # element or an attribute.
        order = list(dict.fromkeys(a["agent_id"] for a in agents))
        plain = [{**a, "agent_id": f"agent-{order.index(a['agent_id'])}"} for a in agents]
        benign, _ = self.scene(plain)
        self.assertEqual(page.tags, StrictPage(benign.page()).tags)
        # Each id is given back whole where the page names it.
        for connection in connections:
            self.assertIn(connection.agent_id, page.values)
            self.assertIn(connection.connection_id, page.values)

    @SETTINGS
    @given(st.lists(AGENT, min_size=1, max_size=4))
    def test_agents_is_json_that_gives_back_what_agents_sent(self, agents: list[dict[str, Any]]) -> None:
        scene, connections = self.scene(agents)
        document = strict_json(scene.agents())
        shown = {
            c["connection_id"]: c for agent in document["agents"] for c in agent["connections"]
        }
        for agent, connection in zip(agents, connections, strict=True):
            entry = shown[connection.connection_id]
            self.assertEqual(entry["metadata"], agent["metadata"])
            self.assertEqual(entry["capabilities"]["name"], agent["name"])
            self.assertEqual(entry["health"], agent["health"])
            self.assertIsInstance(entry["peer"], str)
            entry["peer"].encode("utf-8")

    @SETTINGS
    @given(st.lists(AGENT, min_size=1, max_size=4))
    def test_metrics_parse_and_forget_agents_that_left(self, agents: list[dict[str, Any]]) -> None:
        scene, _ = self.scene(agents)
        labelled = {labels["agent"] for _, labels in series(scene.scrape()) if "agent" in labels}
        self.assertEqual(labelled, {a["agent_id"] for a in agents})
        with captured_log() as events:
            scene.leave()
            log_lines(self, events)
        left = series(scene.scrape())
        self.assertEqual([s for s in left if "agent" in s[1]], [])
        # What is left is the size it is after one plain agent's visit.
        plain, _ = self.scene([{**agents[0], "agent_id": "plain"}])
        plain.leave()
        self.assertEqual(len(left), len(series(plain.scrape())))


class HostileWorkersTests(SynchronousTestCase):
    """A worker group's pages, gathered from workers whose agents chose every string."""

    @settings(SETTINGS, max_examples=20)
    @given(st.lists(AGENT, min_size=1, max_size=3), st.lists(AGENT, min_size=1, max_size=3))
    def test_the_group_pages_stay_sound(self, first: list[dict[str, Any]], second: list[dict[str, Any]]) -> None:
        scenes = [Scene(), Scene()]
        for scene, agents in zip(scenes, (first, second), strict=True):
            for agent in agents:
                scene.arrive(agent)
        workers = [
            SimpleNamespace(
                index=i, pid=1000 + i, stopping=False, restarts=0, connections=len(s.protocols), control=object()
            )
            for i, s in enumerate(scenes, 1)
        ]
        snapshots: list[Any] = [
            (w, {"agents": s.agents(), "metrics": s.metrics.render(), "ready": True})
            for w, s in zip(workers, scenes, strict=True)
        ]
        group = SimpleNamespace(factory=scenes[0].proxy.factory, workers=workers, handed_over=0)
        site = GroupStatusResource(group, lambda: True)  # type: ignore[arg-type]
        with captured_log() as events:
            code, page = site.page(snapshots)
            _, agents = site.agents(snapshots)
            _, metrics = site.metrics(snapshots)
            log_lines(self, events)
            self.assertEqual([formatEvent(e) for e in events], [])
        self.assertEqual(code, 200)
        strict_page(self, page.decode("utf-8"))
        document = strict_json(agents)
        self.assertEqual(document, strict_json(json.dumps(group_document(snapshots)).encode()))
        ids = {a["agent_id"] for a in first + second}
        self.assertEqual({a["agent_id"] for a in document["agents"]}, ids)
        labelled = {
            (labels["agent"], labels["worker"]) for _, labels in series(metrics.decode()) if "agent" in labels
        }
        self.assertEqual({agent for agent, _ in labelled}, ids)
        merge_metrics([("1", metrics)])


#: Frames an agent may send on a registered connection that each make a
#: log line: broken or misplaced control messages, unknown answers.
FLOOD = st.lists(
    st.one_of(
        st.tuples(
            st.sampled_from(
                [
                    MessageType.HEALTH_STATUS,
                    MessageType.FLOW_CONTROL,
                    MessageType.PING,
                    MessageType.PONG,
                    MessageType.METRICS_REPORT,
                    MessageType.CONFIG_UPDATE_REQUEST,
                    MessageType.AGENT_RESPONSE,
                    MessageType.HANDSHAKE_REQUEST,
                    MessageType.REQUEST_HEADERS,
                ]
            ),
            st.one_of(
                st.binary(min_size=1, max_size=40),
                JSON.map(lambda value: msgspec.json.encode(value) or b"null"),
                _text(40).map(lambda t: msgspec.json.encode({"state": t, "audit": {"custom": {"correlation_id": t}}})),
            ),
        ),
    ),
    min_size=1,
    max_size=30,
)


class FloodTests(SynchronousTestCase):
    """An agent that sends broken frames as fast as it can."""

    @SETTINGS
    @given(AGENT, FLOOD)
    def test_a_flood_makes_a_few_lines_per_kind(self, agent: dict[str, Any], frames: list[tuple[int, bytes]]) -> None:
        scene = Scene(token_checker=StaticTokenChecker({agent["agent_id"]: TOKEN}))
        with captured_log() as events:
            scene.arrive(agent)
            [protocol] = scene.protocols
            before = len(events)
            # Each frame forty times over, within one period of the limiter.
            data = b"".join(encode_frame(kind, payload) for kind, payload in frames) * 40
            protocol.dataReceived(data)
            during = len(events) - before
            scene.proxy.clock.advance(10)
            after = len(events) - before - during
            log_lines(self, events)
        # Five lines of each kind of line per period (an invalid control
        # message, an invalid answer, an unknown correlation id, a frame only
        # the proxy sends, a second handshake, flow control), then one with
        # the count of the rest.
        self.assertLessEqual(during, 5 * 6)
        self.assertLessEqual(after, 6)
