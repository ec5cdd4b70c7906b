"""
One request target for the agents and the upstream: the target is parsed
once (RFC 9112 section 3.2); what the agents judge is, byte for byte, what
the upstream receives, and a target that cannot be taken is refused
without asking any agent.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sentinel_twisted import messages as m
from sentinel_twisted.agent.rules import load_rules
from sentinel_twisted.gateway.config import GatewayConfig
from sentinel_twisted.gateway.exchange import Gateway
from sentinel_twisted.gateway.resource import GatewaySite
from sentinel_twisted.gateway.target import BadTarget, parse_target
from sentinel_twisted.gateway.upstream import ForwardRequest, HTTPUpstream, UpstreamResponse

from .._proxy_support import captured_log, log_text
from . import test_bodies
from .support import (
    REQUEST_HEADERS,
    Harness,
    OneAgentPool,
    ScriptedAgent,
    answer,
    block,
    wait_until,
)

RULES = Path(__file__).resolve().parents[2] / "examples" / "rules.toml"

#: The bypasses of issue 11: the old gateway showed the agents the raw
#: target and sent the upstream "/admin" (or "/admin" with a query).
BYPASSES = [
    b"http://x?/admin",
    b"http://x#/admin",
    b"http://x:1?a=/admin",
    b"admin",
    b"*admin",
]


def rule_agent(agent: ScriptedAgent, message_type: int, body: dict[str, Any]) -> dict[str, Any]:
    """The rule agent's verdict on examples/rules.toml, over the raw agent socket."""
    if message_type != REQUEST_HEADERS:
        return answer()
    event = msgspec.json.decode(json.dumps(body).encode(), type=m.RequestHeadersEvent)
    verdict = load_rules(RULES).evaluate(event)
    if verdict.decided_by is not None:
        return block(403, f"rule {verdict.decided_by.id}")
    return answer()


class ParseTests(SynchronousTestCase):
    def assertRefused(self, method: bytes, raw: bytes, code: int = 400) -> None:
        with self.assertRaises(BadTarget) as caught:
            parse_target(method, raw)
        self.assertEqual(caught.exception.code, code)

    def test_origin_form_is_kept_byte_for_byte(self) -> None:
        for raw in (b"/", b"/a/b?x=%2F&y=[1]&z=/../", b"/a//double", b"/%2e%2e%2e/admin", b"/.well-known/a..b", b"/a?"):
            self.assertEqual(parse_target(b"GET", raw).target, raw)
            self.assertIsNone(parse_target(b"GET", raw).authority)

    def test_dot_segments_are_refused(self) -> None:
        for raw in (
            b"/../private/keys",
            b"/%2e%2e/private/keys",
            b"/%2E%2e/x",
            b"/.%2e/x",
            b"/x/../../private/keys",
            b"/a/./b",
            b"/a/.",
            b"/a/..",
            b"/..?q",
            b"/..;/admin",
            b"/..%2fprivate/keys",
            b"/a%2F..%2Fb",
            b"/a%5c..",
            b"http://x/../a",
            b"http://x/a/%2e",
        ):
            with self.assertRaises(BadTarget, msg=raw) as caught:
                parse_target(b"GET", raw)
            self.assertEqual(caught.exception.code, 400)
            self.assertIn("dot segment", caught.exception.reason)

    def test_a_path_that_starts_with_two_slashes_is_refused(self) -> None:
        # An upstream resolving "//x/admin" as a URL reference reads host x
        # and path /admin, which rules on /admin would not have matched.
        for raw in (b"//x/admin", b"//", b"///admin", b"//x?q", b"http://h//x/admin", b"http://h//"):
            with self.assertRaises(BadTarget, msg=raw) as caught:
                parse_target(b"GET", raw)
            self.assertEqual(caught.exception.code, 400)
            self.assertIn("starts with //", caught.exception.reason)
        for raw in (b"/a//b", b"/x?//y", b"/%2F/x"):
            self.assertEqual(parse_target(b"GET", raw).target, raw)

    def test_dots_that_are_no_dot_segment_are_kept(self) -> None:
        for raw in (b"/.well-known/x", b"/a.b/c..d/...", b"/a/..b", b"/%2e%2e%2e", b"/%2ex", b"/x?a=/../b", b"/x?/.."):
            self.assertEqual(parse_target(b"GET", raw).target, raw)

    def test_absolute_form_becomes_its_path_and_query(self) -> None:
        target = parse_target(b"GET", b"HTTP://Example.COM:80/a?b")
        self.assertEqual((target.target, target.authority), (b"/a?b", b"example.com"))
        self.assertEqual(parse_target(b"GET", b"http://x").target, b"/")
        self.assertEqual(parse_target(b"GET", b"http://x?/admin").target, b"/?/admin")
        self.assertEqual(parse_target(b"GET", b"https://[::1]:8443/").authority, b"[::1]:8443")

    def test_absolute_form_authority_agrees_with_host(self) -> None:
        target = parse_target(b"GET", b"http://x:80/")
        self.assertTrue(target.names_host(b"X"))
        self.assertTrue(target.names_host(b"x:80"))
        self.assertFalse(target.names_host(b"y"))
        self.assertFalse(target.names_host(b"x:81"))
        self.assertFalse(parse_target(b"GET", b"https://x:80/").names_host(b"x"))

    def test_asterisk_form_only_for_options(self) -> None:
        self.assertEqual(parse_target(b"OPTIONS", b"*").target, b"*")
        self.assertRefused(b"GET", b"*")
        self.assertRefused(b"OPTIONS", b"*admin")

    def test_options_for_the_server_in_absolute_form_is_the_asterisk(self) -> None:
        # RFC 9112 section 3.2.4: no path and no query in an OPTIONS's URI
        # asks about the server, and the last proxy sends "*" for it.
        for raw in (b"http://x", b"HTTP://X:80", b"https://x:8443"):
            target = parse_target(b"OPTIONS", raw)
            self.assertEqual(target.target, b"*", raw)
            self.assertTrue(target.names_host(b"x:8443" if raw.endswith(b"8443") else b"x"))
        # A path, an empty query, or another method: a resource.
        self.assertEqual(parse_target(b"OPTIONS", b"http://x/").target, b"/")
        self.assertEqual(parse_target(b"OPTIONS", b"http://x?").target, b"/?")
        self.assertEqual(parse_target(b"GET", b"http://x").target, b"/")

    def test_connect_is_not_implemented(self) -> None:
        self.assertRefused(b"CONNECT", b"example.com:443", 501)
        self.assertRefused(b"CONNECT", b"/", 501)

    def test_authority_form_without_connect_is_refused(self) -> None:
        self.assertRefused(b"GET", b"example.com:443")

    def test_the_issues_bypasses_never_reach_the_upstream_as_admin(self) -> None:
        for raw in BYPASSES:
            try:
                target = parse_target(b"GET", raw).target
            except BadTarget:
                continue
            self.assertFalse(target.startswith(b"/admin"), raw)

    def test_what_is_not_a_target(self) -> None:
        for raw in (
            b"admin",
            b"*admin",
            b"/a#b",
            b"http://x#/admin",
            b"ftp://x/",
            b"http:///a",
            b"http://user@x/",
            b"http://x:y/",
            b"/a b",
            b"/a\\b",
            b"/\xc3\xa9",
            b"/%zz",
            b"/a?%4",
            b"/a?\x7f",
        ):
            self.assertRefused(b"GET", raw)


# -- the property, in memory ---------------------------------------------------------


class _RecordingConnection:
    """An agent connection that records what it is shown and allows it."""

    events = frozenset({m.EventType.REQUEST_HEADERS})
    is_closed = False

    def __init__(self, answer: m.AgentResponse | None = None) -> None:
        self.seen: list[m.RequestHeadersEvent] = []
        self.answer = answer or m.AgentResponse()

    def send_event_with(self, event: Any, answered: Any, failed: Any, arg: Any, correlation_id: str) -> None:
        self.seen.append(event)
        answered(self.answer, arg)

    def cancel_request(self, correlation_id: str, reason: int) -> bool:
        return False


class _Answer(UpstreamResponse):
    code = 200
    phrase = b"OK"
    length = 0

    def __init__(self) -> None:
        from twisted.web.http_headers import Headers

        self.headers = Headers()

    def deliver(self, sink: Any) -> None:
        sink.response_end(None)


class _RecordingUpstream:
    """Records the request target each forwarded request goes out with."""

    def __init__(self, url: str = "http://127.0.0.1:9/") -> None:
        self.http = HTTPUpstream(MemoryReactorClock(), url)
        self.targets: list[bytes] = []
        self.headers: list[dict[bytes, list[bytes]]] = []

    def forward(self, request: ForwardRequest) -> Deferred[UpstreamResponse]:
        self.targets.append(self.http.target(request.uri))
        self.headers.append({name.lower(): values for name, values in request.headers.getAllRawHeaders()})
        return succeed(_Answer())

    def close(self) -> Deferred[None]:
        return succeed(None)

    def describe(self) -> str:
        return "recorder"


_PIECES = st.sampled_from(
    ["/", "?", "#", "%", "%2e", "%2F", "%zz", "..", ".", "*", ":", "@", "\\", "[", "]", "admin", "a", "=", "&", "\x7f", "é"]
)
_PREFIXES = st.sampled_from(["", "/", "*", "http://x", "HTTP://X:80", "http://x:1", "https://x", "http://", "x:80", "//"])
targets = st.builds(
    lambda prefix, pieces: (prefix + "".join(pieces)).encode("utf-8"),
    _PREFIXES,
    st.lists(_PIECES, max_size=8),
)


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.sampled_from([b"GET", b"OPTIONS", b"DELETE", b"CONNECT"]), targets)
    def test_agents_judge_exactly_what_the_upstream_receives(self, method: bytes, target: bytes) -> None:
        connection = _RecordingConnection()
        upstream = _RecordingUpstream()
        reactor = MemoryReactorClock()
        gateway = Gateway(OneAgentPool(connection, "recorder"), GatewayConfig(), upstream, clock=reactor)  # type: ignore[arg-type]
        site = GatewaySite(gateway, reactor=reactor)
        channel = site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(method + b" " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        status = transport.value().split(b" ", 2)[1]
        if upstream.targets:
            # Accepted: one agent saw it, and the upstream got those bytes.
            (event,) = connection.seen
            self.assertEqual(upstream.targets, [event.uri.encode("utf-8")])
            self.assertNotIn(b"#", upstream.targets[0])
            self.assertEqual(status, b"200")
        else:
            # Refused before any agent was asked.
            self.assertEqual(connection.seen, [])
            self.assertIn(status, (b"400", b"501"))
        channel.connectionLost(None)


class InMemory:
    """
    One request head through a gateway in memory: C{status}, the events
    the recording agent was shown (C{seen}) and what the upstream received
    (C{upstream.targets}, C{upstream.headers}).
    """

    def __init__(
        self,
        head: bytes,
        upstream_url: str = "http://127.0.0.1:9/",
        peer: Any = None,
        answer: m.AgentResponse | None = None,
        **config: Any,
    ) -> None:
        connection = _RecordingConnection(answer)
        self.upstream = upstream = _RecordingUpstream(upstream_url)
        reactor = MemoryReactorClock()
        gateway = Gateway(OneAgentPool(connection, "recorder"), GatewayConfig(**config), upstream, clock=reactor)  # type: ignore[arg-type]
        channel = GatewaySite(gateway, reactor=reactor).buildProtocol(None)
        transport = StringTransport(peerAddress=peer)
        channel.makeConnection(transport)
        channel.dataReceived(head)
        channel.connectionLost(None)
        self.response = transport.value()
        self.status = self.response.split(b" ", 2)[1]
        self.seen = connection.seen


def serve_in_memory(head: bytes, upstream_url: str = "http://127.0.0.1:9/") -> tuple[bytes, list[Any], list[bytes]]:
    """The status, the agent's events and the upstream's targets of L{InMemory}."""
    served = InMemory(head, upstream_url)
    return served.status, served.seen, served.upstream.targets


class HostTests(SynchronousTestCase):
    """
    A C{Host} that is not C{host[:port]} is answered C{400} (RFC 9112
    section 3.2) before any agent is asked; it would have been the agents'
    C{server_name} and the upstream's C{X-Forwarded-Host}.
    """

    INVALID = [
        b"admin.internal, www.example.com",
        b"admin.internal,www.example.com",
        b"www.example.com@admin.internal",
        b"a b",
        b"",
        b"x/../y",
        b"[::1",
        b"[::1]x",
        b":80",
        b"h:8o",
        b"h\xc3\xa9",
    ]

    def test_invalid_hosts_ask_no_agent(self) -> None:
        for version in (b"HTTP/1.1", b"HTTP/1.0"):
            for host in self.INVALID:
                with captured_log() as events:
                    served = InMemory(b"GET / " + version + b"\r\nHost: " + host + b"\r\n\r\n")
                self.assertEqual((served.status, served.seen, served.upstream.targets), (b"400", [], []), host)
                self.assertIn("the Host header is not a valid host[:port]", log_text(events))

    def test_valid_hosts_are_the_agents_server_name_and_the_forwarded_host(self) -> None:
        for host, server_name in [
            (b"example.com", "example.com"),
            (b"Example.COM:8080", "Example.COM"),
            (b"127.0.0.1:80", "127.0.0.1"),
            (b"[::1]:8443", "::1"),
            (b"x%41", "x%41"),
        ]:
            served = InMemory(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
            self.assertEqual(served.status, b"200", host)
            (event,) = served.seen
            self.assertEqual(event.metadata.server_name, server_name)
            self.assertEqual(served.upstream.headers[0][b"x-forwarded-host"], [host])

    def test_an_absolute_form_authority_is_held_to_the_same_rules(self) -> None:
        # It is the Host, or must agree with it: a comma would make the
        # X-Forwarded-Host a list of two hosts all the same.
        for head in (
            b"GET http://admin.internal,www.example.com/ HTTP/1.1\r\nHost: admin.internal,www.example.com\r\n\r\n",
            b"GET http://admin.internal,www.example.com/ HTTP/1.0\r\n\r\n",
        ):
            served = InMemory(head)
            self.assertEqual((served.status, served.seen, served.upstream.targets), (b"400", [], []), head)

    def test_a_doubled_host_is_still_refused(self) -> None:
        served = InMemory(b"GET / HTTP/1.1\r\nHost: x\r\nHost: x\r\n\r\n")
        self.assertEqual((served.status, served.seen), (b"400", []))

    def test_an_http11_request_needs_a_host_whatever_its_target(self) -> None:
        # RFC 9112 section 3.2: 400 to any HTTP/1.1 request without Host,
        # an absolute-form one too (its authority stood for the Host).
        for target in (b"/x", b"http://example.com/x", b"*"):
            method = b"OPTIONS" if target == b"*" else b"GET"
            with captured_log() as events:
                served = InMemory(method + b" " + target + b" HTTP/1.1\r\n\r\n")
            self.assertEqual((served.status, served.seen, served.upstream.targets), (b"400", [], []), target)
            self.assertIn("an HTTP/1.1 request needs a Host header", log_text(events))

    def test_an_http10_request_may_have_no_host(self) -> None:
        for target, host in ((b"/x", None), (b"http://Example.com/x", ["example.com"])):
            served = InMemory(b"GET " + target + b" HTTP/1.0\r\n\r\n")
            self.assertEqual((served.status, served.upstream.targets), (b"200", [b"/x"]), target)
            (event,) = served.seen
            self.assertEqual(event.headers.get("host"), host)


class HeaderBytesTests(SynchronousTestCase):
    """
    A header value that is not UTF-8 is answered C{400} before any agent is
    asked: shown to them as U+FFFD, different values the upstream would
    receive would have been one to the agents.
    """

    def test_values_that_are_not_utf8_ask_no_agent(self) -> None:
        for value in (b"\xc0\xbcscript\xc0\xbe", b"\xff\xfe<", b"caf\xe9", b"\xed\xa0\x80"):
            with captured_log() as events:
                served = InMemory(b"GET / HTTP/1.1\r\nHost: x\r\nX-Name: ok\r\nX-Name: " + value + b"\r\n\r\n")
            self.assertEqual((served.status, served.seen, served.upstream.targets), (b"400", [], []), value)
            self.assertIn(b"X-Name header's value is not valid UTF-8", served.response)
            self.assertIn("Refused GET request: the X-Name header's value is not valid UTF-8", log_text(events))

    def test_a_control_character_in_a_value_asks_no_agent(self) -> None:
        # Found by test_differential: "X-A: \x01a" was forwarded as it was,
        # leaving its reading to the upstream's parser (RFC 9110 section 5.5
        # allows no control character but HTAB in a value).  A strict one
        # refuses the request; one that strips a value's ends as Python's
        # str.strip() does reads "admin\x0c" as "admin", which the agents
        # never saw.
        for value in (b"\x01a", b"admin\x0c", b"\x0badmin", b"a\x7fb", b"a\x1b[0m", b"\x08", b"\x1f"):
            with captured_log() as events:
                served = InMemory(b"GET / HTTP/1.1\r\nHost: example.com\r\nX-A: ok\r\nX-A: " + value + b"\r\n\r\n")
            self.assertEqual((served.status, served.seen, served.upstream.targets), (b"400", [], []), value)
            self.assertIn(b"the X-A header's value has a control character", served.response)
            self.assertIn("Refused GET request: the X-A header's value has a control character", log_text(events))

    def test_a_tab_inside_a_value_is_the_values_own(self) -> None:
        served = InMemory(b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\tb \t\r\nX-B: \xc2\xa0\xe2\x80\xa8\r\n\r\n")
        self.assertEqual(served.status, b"200")
        (event,) = served.seen
        self.assertEqual((event.headers["x-a"], event.headers["x-b"]), (["a\tb"], ["\u00a0\u2028"]))
        (upstream,) = served.upstream.headers
        self.assertEqual((upstream[b"x-a"], upstream[b"x-b"]), ([b"a\tb"], [b"\xc2\xa0\xe2\x80\xa8"]))

    def test_utf8_values_reach_the_agents_as_the_upstream_gets_them(self) -> None:
        served = InMemory(b"GET / HTTP/1.1\r\nHost: x\r\nX-Name: caf\xc3\xa9 \xe2\x9c\x93\r\n\r\n")
        self.assertEqual(served.status, b"200")
        (event,) = served.seen
        self.assertEqual(event.headers["x-name"], ["caf\u00e9 \u2713"])
        self.assertEqual(
            [v.encode("utf-8") for v in event.headers["x-name"]], served.upstream.headers[0][b"x-name"]
        )


class UpstreamPrefixTests(SynchronousTestCase):
    """
    Behind an C{--upstream} URL with a path, a dot segment would climb out
    of that path at the upstream (C{/public/../private}) while the agents
    were shown C{/../private}: it is refused before any agent is asked.
    """

    def test_dot_segments_cannot_leave_the_upstream_path(self) -> None:
        for target in (b"/../private/keys", b"/%2e%2e/private/keys", b"/x/../../private/keys", b"/..%2fprivate/keys"):
            status, seen, forwarded = serve_in_memory(
                b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n", "http://127.0.0.1:9/public"
            )
            self.assertEqual((status, seen, forwarded), (b"400", [], []), target)

    def test_an_international_upstream_is_addressed_as_its_uri(self) -> None:
        # Host in IDNA (the Host header, SNI and the name checked), path
        # percent-encoded: what goes on the wire, not a UnicodeEncodeError.
        upstream = HTTPUpstream(MemoryReactorClock(), "https://bücher.de/ä")
        self.assertEqual(upstream._host, b"xn--bcher-kva.de")
        self.assertEqual(upstream.target(b"/x"), b"/%C3%A4/x")

    def test_other_paths_go_behind_the_upstream_path(self) -> None:
        status, seen, forwarded = serve_in_memory(
            b"GET /docs/a..b HTTP/1.1\r\nHost: x\r\n\r\n", "http://127.0.0.1:9/public"
        )
        self.assertEqual(status, b"200")
        self.assertEqual([event.uri for event in seen], ["/docs/a..b"])
        self.assertEqual(forwarded, [b"/public/docs/a..b"])


# -- the bypasses over real sockets -------------------------------------------------


class BypassTests(TestCase):
    timeout = 30

    def test_the_rule_agent_judges_what_the_upstream_receives(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            agent = await h.agent("waf", decide=rule_agent)
            direct = await h.raw(b"GET /admin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            await direct.lost
            self.assertTrue(direct.received.startswith(b"HTTP/1.1 403 "), direct.received)
            for target in [*BYPASSES, b"http://x/admin", b"/a/../admin", b"/%61dmin", b"/?q=1"]:
                before = len(agent.of_type(REQUEST_HEADERS))
                client = await h.raw(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                await client.lost
                seen = agent.of_type(REQUEST_HEADERS)[before:]
                if client.received.startswith(b"HTTP/1.1 400 "):
                    self.assertEqual(seen, [], target)
                    continue
                (event,) = seen
                if client.received.startswith(b"HTTP/1.1 403 "):
                    continue
                self.assertTrue(client.received.startswith(b"HTTP/1.1 200 "), (target, client.received))
                self.assertEqual(h.upstream.requests[-1]["uri"], event["uri"], target)
            # The admin area was never reached, however it was spelt.
            self.assertEqual([r["uri"] for r in h.upstream.requests if "admin" in r["uri"]], ["/?/admin"])

        return ensureDeferred(go())

    def test_a_recording_agent_sees_the_forwarded_target(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            agent = await h.agent("recorder")
            for target, forwarded in [
                (b"http://x?/admin", "/?/admin"),
                (b"HTTP://X:80/p?q", "/p?q"),
                (b"/a/.b/..c/%2e%2e%2e?q=/../", "/a/.b/..c/%2e%2e%2e?q=/../"),
                (b"/%61dmin%2Fx", "/%61dmin%2Fx"),
            ]:
                client = await h.raw(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                await client.lost
                self.assertTrue(client.received.startswith(b"HTTP/1.1 200 "), (target, client.received))
                self.assertEqual(agent.of_type(REQUEST_HEADERS)[-1]["uri"], forwarded)
                self.assertEqual(h.upstream.requests[-1]["uri"], forwarded)

        return ensureDeferred(go())

    def test_refused_targets_ask_no_agent(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            agent = await h.agent("recorder")
            for request, status in [
                (b"GET http://x#/admin HTTP/1.1\r\nHost: x\r\n", b"400"),
                (b"GET http://x:1?a=/admin HTTP/1.1\r\nHost: x\r\n", b"400"),
                (b"GET admin HTTP/1.1\r\nHost: x\r\n", b"400"),
                (b"GET *admin HTTP/1.1\r\nHost: x\r\n", b"400"),
                (b"GET * HTTP/1.1\r\nHost: x\r\n", b"400"),
                (b"GET / HTTP/1.1\r\n", b"400"),
                (b"GET http://x/admin HTTP/1.1\r\n", b"400"),
                (b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n", b"400"),
                (b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n", b"501"),
                (b"GET /x/../admin HTTP/1.1\r\nHost: x\r\n", b"400"),
                (b"GET /%2e%2e/admin HTTP/1.1\r\nHost: x\r\n", b"400"),
                (b"GET //x/admin HTTP/1.1\r\nHost: x\r\n", b"400"),
            ]:
                client = await h.raw(request + b"Connection: close\r\n\r\n")
                await client.lost
                self.assertTrue(client.received.startswith(b"HTTP/1.1 " + status), (request, client.received))
            self.assertEqual(agent.events, [])
            self.assertEqual(h.upstream.requests, [])
            self.assertEqual(h.sample("sentinel_gateway_requests_total", decision="bad_request"), 12)

        return ensureDeferred(go())

    def assert_options_go_as_the_asterisk(self, target: bytes, upstream_path: str) -> Any:
        """C{OPTIONS target} is judged as C{*} and reaches the upstream as C{OPTIONS *}."""

        async def go() -> None:
            h = Harness(self)
            upstreams = await test_bodies.StreamingTests.raw_upstream(self, h)  # type: ignore[arg-type]
            await h.start("--upstream", f"http://127.0.0.1:{self.raw_port}{upstream_path}")
            agent = await h.agent("recorder")
            await h.raw(b"OPTIONS " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            await wait_until(lambda: bool(upstreams) and b"\r\n\r\n" in upstreams[0].received, what="the upstream request")
            self.assertEqual(agent.of_type(REQUEST_HEADERS)[0]["uri"], "*")
            self.assertTrue(upstreams[0].received.startswith(b"OPTIONS * HTTP/1.1\r\n"), upstreams[0].received)

        return ensureDeferred(go())

    def test_options_asterisk_is_judged_and_forwarded_as_is(self) -> Any:
        return self.assert_options_go_as_the_asterisk(b"*", "")

    def test_options_for_the_server_in_absolute_form_goes_as_the_asterisk(self) -> Any:
        # Not behind the --upstream URL's path either: the server itself.
        return self.assert_options_go_as_the_asterisk(b"http://x", "/base")

    def test_absolute_form_without_host_takes_its_authority(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            agent = await h.agent("recorder")
            client = await h.raw(b"GET http://Example.org/p HTTP/1.0\r\n\r\n")
            await client.lost
            (event,) = agent.of_type(REQUEST_HEADERS)
            self.assertEqual(event["uri"], "/p")
            self.assertEqual(event["headers"]["host"], ["example.org"])
            self.assertEqual(event["metadata"]["server_name"], "example.org")

        return ensureDeferred(go())
