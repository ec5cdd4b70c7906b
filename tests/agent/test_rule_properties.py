"""
Property-based tests of the rule agent's decisions (L{RuleSet.evaluate}
and L{RulesAgent}'s body phase) against a small model written from the
documentation alone (README "### Rules files", the comments of
C{examples/rules.toml}), not from the code:

 - C{method}: the method, in any case, is one of the rule's;
 - C{path}: the regex is found in the path (the target before its query;
   of an absolute-form target, after its authority) as sent,
   percent-decoded, normalised (C{//} collapsed, C{.} and C{..} resolved
   as RFC 3986 section 5.2.4 does, a trailing slash kept) or normalised
   without path parameters (C{;} to the end of a segment);
 - C{query}: found in the query as sent or decoded (C{+} a space);
 - a C{#}: the path and query are read both cut at it and with it;
 - C{client_ip}/C{client_ip_not}: the address (an IPv4-mapped one as
   IPv4, a network of them as the IPv4 network) is in one of the
   networks / in none; no address, or one that does not parse, is in none;
 - C{header = { name = regex }}: a value of that header (as sent or
   percent-decoded), its name in any case, however many times it is
   repeated; C{any_header}: any value as sent or percent-decoded; C{header_present}/C{header_missing};
 - C{body_contains}: the body, in however many chunks, contains the
   string as sent, inflated (C{gzip}, C{x-gzip}, C{deflate}) or, when it
   is a JSON document in UTF-16 or UTF-32 (as C{json.loads} tells it), as
   text; a body past C{max_inflated_size} is refused (C{413}) by default;
 - C{body}: the regex is found in the text, the form-decoded text or,
   for a JSON body, the text with JSON's string escapes decoded (a body
   shorter than the 8 KiB window is seen whole by its last chunk);
 - C{[request]}: past a bound (bytes of the target; header fields, each
   value one; bytes of names and values) 414 or 431, or with C{"allow"}
   no rule sees the request; percent-decoding is C{urllib}'s.

Beyond the model, the evasion properties: a path or query that an
upstream (a servlet container, Express, a Go server: each reading the
target in its documented way) takes for the one a rule is about must be
refused, however the client spells it.  And the compiler: any document
is either compiled or refused with a L{RulesError}, never a traceback,
and a method it takes is one a request can have.

Examples and deadlines are fixed (C{derandomize}): the module takes a few
seconds, the same examples every run.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, unquote_plus

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sentinel_twisted import messages as m
from sentinel_twisted.agent import RulesAgent, RulesError, parse_rules

from ._support import temp_path
from .test_rules import body, event

#: The settings of every property here: deterministic, no deadline (the
#: machine may be busy), and few enough examples to keep the module quick.
PROPERTY = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def _rules(*tables: dict[str, Any], **top: Any) -> Any:
    return parse_rules({"rules": list(tables), **top}, "properties.toml")


def _blocked(ruleset: Any, **kw: Any) -> bool:
    return isinstance(ruleset.evaluate(event(**kw)).response.build().decision, m.Block)


# -- The model, from the documentation ----------------------------------------


def remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4, step by step as the RFC writes it."""
    data, out = path, ""
    while data:
        if data.startswith("../"):
            data = data[3:]
        elif data.startswith("./"):
            data = data[2:]
        elif data.startswith("/./"):
            data = data[2:]
        elif data == "/.":
            data = "/"
        elif data.startswith("/../"):
            data = data[3:]
            out = out[: out.rfind("/")] if "/" in out else ""
        elif data == "/..":
            data = "/"
            out = out[: out.rfind("/")] if "/" in out else ""
        elif data in (".", ".."):
            data = ""
        else:
            start = 1 if data.startswith("/") else 0
            end = data.find("/", start)
            end = len(data) if end < 0 else end
            out, data = out + data[:end], data[end:]
    return out


def normalised(path: str) -> str:
    """C{//} collapsed, dot segments resolved, a trailing slash kept; empty is C{/}."""
    collapsed = re.sub("/{2,}", "/", path)
    return remove_dot_segments(collapsed) or "/"


def without_parameters(path: str) -> str:
    """Each segment's C{;} and what follows it (to the segment's end) gone."""
    return "/".join(segment.partition(";")[0] for segment in path.split("/"))


def model_path_views(path: str) -> set[str]:
    decoded = unquote(path)
    return {path, decoded, normalised(decoded), normalised(without_parameters(decoded))}


def model_query_views(query: str) -> set[str]:
    return {query, unquote_plus(query)}


# -- What upstreams make of a target (their documented readings) -------------


def servlet_path(target: str) -> str:
    """Tomcat/Jetty: path before C{?}, parameters dropped, decoded, normalised."""
    path = target.partition("?")[0]
    return normalised(unquote(without_parameters(path)))


def express_path(target: str) -> str:
    """Node's C{url.parse} (Express): the path ends at C{?} or C{#}; a static server decodes and resolves it."""
    path = re.split("[?#]", target, maxsplit=1)[0]
    return normalised(unquote(path))


def go_path(target: str) -> str:
    """Go's C{ParseRequestURI}: the path ends at C{?} (a C{#} is part of it), decoded, cleaned."""
    return normalised(unquote(target.partition("?")[0]))


UPSTREAMS: dict[str, Callable[[str], str]] = {
    "servlet": servlet_path,
    "express": express_path,
    "go": go_path,
}


def express_query(target: str) -> list[tuple[str, str]]:
    """Express's query: after C{?}, up to C{#}, split on C{&}, each side decoded (C{+} a space)."""
    query = target.partition("?")[2].partition("#")[0]
    return [tuple(unquote_plus(side) for side in part.partition("=")[::2]) for part in query.split("&")]  # type: ignore[misc]


def go_query(target: str) -> list[tuple[str, str]]:
    """Go's C{URL.Query()} on a request URI: after C{?} to the end, C{&}-separated, decoded."""
    query = target.partition("?")[2]
    return [tuple(unquote_plus(side) for side in part.partition("=")[::2]) for part in query.split("&")]  # type: ignore[misc]


# -- Strategies -----------------------------------------------------------------


def _spell(text: str) -> st.SearchStrategy[str]:
    """C{text} with each character as it is, in the other case, or percent-encoded (either hex case)."""

    def one(char: str) -> st.SearchStrategy[str]:
        escape = f"%{ord(char):02X}"
        return st.sampled_from([char, char.swapcase(), escape, escape.lower()])

    return st.tuples(*map(one, text)).map("".join)


#: Path segments a client may put before or after the one a rule is about.
SEGMENTS = st.sampled_from(
    ["x", "", ".", "..", "%2e", "%2E%2e", ".%2e", "x;p", "..;", ".;", ";", "a;b=1", "%3b", "admin2", "%2f", "%2F"]
)

#: What may follow the segment a rule is about.
AFTER = st.sampled_from(
    ["", "/", "/users", ";x", ";jsessionid=1/users", "%3bx", "/.", "/..;/admin", "#", "#x", "#/x",
     "%2F", "%2fusers", "/%2e", "?a=1", "?", "#?a", "/./"]
)


@st.composite
def admin_targets(draw: st.DrawFn) -> str:
    """A request target that some upstream may take for C{/admin}."""
    before = draw(st.lists(SEGMENTS, max_size=4))
    separator = draw(st.sampled_from(["/", "//", "/./", "%2f", "%2F", "/x/../", "/x/..;/", "/x/%2e%2e/"]))
    admin = draw(_spell("admin"))
    prefix = "/" + "/".join(before) if before else ""
    target = prefix + separator + admin + draw(AFTER)
    if not target.startswith("/"):
        target = "/" + target
    if draw(st.booleans()):
        target = "http://example.com" + target
    return target


class PathModelTests(SynchronousTestCase):
    """The path views of the documentation, and what upstreams make of a path."""

    RULE = {"id": "no-admin", "match": {"path": "(?i)^/admin(/|$)"}, "block": True}

    @PROPERTY
    @given(admin_targets())
    @example("/admin#x")
    @example("/x/..%2Fadmin")
    @example("/admin;x")
    def test_no_upstream_reaches_admin_around_the_rule(self, target: str) -> None:
        """
        Whatever an upstream makes of the target (decoding, dot segments,
        parameters, a fragment), if it is C{/admin} or under it the rule
        on C{(?i)^/admin(/|$)} refuses it.
        """
        ruleset = _rules(self.RULE)
        origin = re.sub("^[a-z]+://[^/?#]*", "", target)
        reached = {
            name: path
            for name, read in UPSTREAMS.items()
            if re.match("(?i)/admin(/|$)", path := read(origin))
        }
        if reached:
            self.assertTrue(_blocked(ruleset, uri=target), f"{target!r} reaches {reached} unrefused")

    @PROPERTY
    @given(st.lists(st.one_of(SEGMENTS, _spell("admin")), max_size=6), st.sampled_from(["", "?q=/admin", "?q=1"]))
    def test_the_documented_views(self, segments: list[str], query: str) -> None:
        """A path rule matches exactly when one of the four documented views of the path does."""
        path = "/" + "/".join(segments)
        for pattern in ["(?i)^/admin(/|$)", "^/x/$", r"\.\.", "%2[eE]", ";", "^/$"]:
            ruleset = _rules({"id": "p", "match": {"path": pattern}, "block": True})
            expected = any(re.search(pattern, view) for view in model_path_views(path))
            self.assertEqual(_blocked(ruleset, uri=path + query), expected, (pattern, path + query))


@st.composite
def evil_queries(draw: st.DrawFn) -> str:
    """A target whose query carries C{evil} in a value, spelt any way, maybe with something after it."""
    before = draw(st.lists(st.sampled_from(["a=1", "id=1", "id=2", "i%64=3", "x", "", "b=+"]), max_size=3))
    key = draw(st.sampled_from(["q", "Q", "i%64", "q%5B%5D"]))
    value = draw(st.sampled_from(["", "1+", "1%20", "x"])) + draw(_spell("evil"))
    parts = [*before, f"{key}={value}"]
    tail = draw(st.sampled_from(["", "#", "#x", "#&q=ok", "&", "&z=1"]))
    target = "/search?" + "&".join(parts) + tail
    if draw(st.booleans()):
        # A fragment may hide the value instead.
        target = "/search?q=1#&" + "&".join(parts)
    if draw(st.booleans()):
        target = "http://example.com" + target
    return target


class QueryModelTests(SynchronousTestCase):
    """The query as the documentation says, and as upstreams parse it."""

    @PROPERTY
    @given(evil_queries())
    @example("/search?q=evil#")
    @example("/search?q=1--#x")
    @example("http://example.com/search?q=1#evil")
    def test_no_upstream_reads_a_value_around_the_rule(self, target: str) -> None:
        """
        A rule on C{(?i)evil} refuses a query any upstream reads C{evil}
        in; a rule on C{(?i)evil$} (or the example's C{--\\s*$}) one whose
        last value an upstream reads as ending so.
        """
        contains = _rules({"id": "q", "match": {"query": "(?i)evil"}, "block": True})
        ending = _rules({"id": "q", "match": {"query": "(?i)(evil|--)$"}, "block": True})
        for read in (express_query, go_query):
            pairs = read(target)
            if any("evil" in (k + "=" + v).lower() for k, v in pairs):
                self.assertTrue(_blocked(contains, uri=target), (read.__name__, target, pairs))
            if re.search("(?i)(evil|--)$", pairs[-1][1]):
                self.assertTrue(_blocked(ending, uri=target), (read.__name__, target, pairs))

    @PROPERTY
    @given(st.text(alphabet="ab%25+=&?2Ff", max_size=20))
    def test_the_documented_views(self, query: str) -> None:
        """A query rule matches exactly when the query as sent or decoded does."""
        for pattern in ["a b", "%", r"\+", "^a", "a$", "&a"]:
            ruleset = _rules({"id": "q", "match": {"query": pattern}, "block": True})
            expected = any(re.search(pattern, view) for view in model_query_views(query))
            self.assertEqual(_blocked(ruleset, uri="/p?" + query), expected, (pattern, query))


#: Header names a request may spell in any case.
NAMES = st.sampled_from(["user-agent", "x-evil", "cookie", "x-api-key"])


def _any_case(name: str) -> st.SearchStrategy[str]:
    return st.tuples(*(st.sampled_from([c.lower(), c.upper()]) for c in name)).map("".join)


@st.composite
def header_maps(draw: st.DrawFn) -> dict[str, list[str]]:
    """Headers as a proxy may send them: names in any case, a name under several spellings, values in odd spaces."""
    headers: dict[str, list[str]] = {}
    for name in draw(st.lists(NAMES, max_size=5)):
        spelt = draw(_any_case(name))
        values = draw(
            st.lists(
                st.sampled_from(["", " ", "sqlmap", " SQLMap/1.7 ", "curl", "\tsqlmap", "s%71lmap", "a+b", "1"]),
                max_size=3,
            )
        )
        headers.setdefault(spelt, []).extend(values)
    return headers


class HeaderModelTests(SynchronousTestCase):
    """Header conditions, whatever the case of the names and however they repeat."""

    @PROPERTY
    @given(header_maps(), st.sampled_from(["GET", "get", "Post", "DELETE", "TRACE"]))
    def test_header_conditions(self, headers: dict[str, list[str]], method: str) -> None:
        by_name: dict[str, list[str]] = {}
        for name, values in headers.items():
            by_name.setdefault(name.lower(), []).extend(values)
        present = {n for n in by_name}
        everything = [v for vs in by_name.values() for v in vs]

        def views(name: str) -> list[str]:
            # A named header's values, as sent or percent-decoded.
            return [x for v in by_name.get(name, []) for x in (v, unquote_plus(v))]

        cases: list[tuple[dict[str, Any], bool]] = [
            ({"header": {"User-Agent": "(?i)sqlmap"}}, any(re.search("(?i)sqlmap", v) for v in views("user-agent"))),
            ({"header": {"user-agent": "^$"}}, "" in views("user-agent")),
            ({"header": {"user-agent": "a b"}}, any("a b" in v for v in views("user-agent"))),
            (
                {"header": {"user-agent": "sqlmap", "cookie": "1"}},
                any("sqlmap" in v for v in views("user-agent")) and any("1" in v for v in views("cookie")),
            ),
            (
                {"any_header": "(?i)sqlmap"},
                any(re.search("(?i)sqlmap", x) for v in everything for x in (v, unquote_plus(v))),
            ),
            ({"any_header": "a b"}, any("a b" in x for v in everything for x in (v, unquote_plus(v)))),
            ({"header_present": ["X-Evil", "cookie"]}, {"x-evil", "cookie"} <= present),
            ({"header_missing": "x-api-key"}, "x-api-key" not in present),
            ({"method": ["get", "POST"]}, method.upper() in {"GET", "POST"}),
            ({"method": "TRACE", "header_present": "x-evil"}, method.upper() == "TRACE" and "x-evil" in present),
        ]
        for match, expected in cases:
            ruleset = _rules({"id": "h", "match": match, "block": True})
            self.assertEqual(_blocked(ruleset, headers=headers, method=method), expected, (match, headers, method))

    @PROPERTY
    @given(header_maps())
    def test_require_header(self, headers: dict[str, list[str]]) -> None:
        """C{require_header} blocks exactly when no spelling of the name is there."""
        ruleset = _rules({"id": "key", "require_header": "X-API-Key"})
        missing = all(name.lower() != "x-api-key" for name in headers)
        self.assertEqual(_blocked(ruleset, headers=headers), missing, headers)


#: Client addresses as proxies write them, and networks as operators do.
ADDRESSES = st.sampled_from(
    ["10.1.2.3", "::ffff:10.1.2.3", "::FFFF:a01:203", "192.0.2.1", "2001:db8::1", "fe80::1%eth0", "", "unknown",
     "10.1.2.3:5555", "010.001.002.003", "::1", "127.0.0.1"]
)
NETWORKS = st.lists(
    st.sampled_from(["10.0.0.0/8", "::ffff:10.0.0.0/104", "192.0.2.1", "::ffff:192.0.2.1/128", "2001:db8::/32",
                     "fe80::/10", "::1/128", "127.0.0.0/8"]),
    min_size=1,
    max_size=3,
)


def _client(text: str) -> Any:
    import ipaddress

    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped or address


def _in(text: str, networks: list[str]) -> bool:
    """The documentation's reading: a mapped address (and a network of them) is IPv4; no address is in none."""
    import ipaddress

    address = _client(text)
    if address is None:
        return False
    for cidr in networks:
        network = ipaddress.ip_network(cidr, strict=False)
        if network.version == 6 and network.subnet_of(ipaddress.IPv6Network("::ffff:0:0/96")):
            network = ipaddress.ip_network((network.network_address.ipv4_mapped, network.prefixlen - 96))
        if network.version == address.version and address in network:
            return True
    return False


class ClientAddressTests(SynchronousTestCase):
    @PROPERTY
    @given(ADDRESSES, NETWORKS)
    def test_client_ip_and_client_ip_not(self, client: str, networks: list[str]) -> None:
        inside = _rules({"id": "in", "match": {"client_ip": networks}, "block": True})
        outside = _rules({"id": "out", "match": {"client_ip_not": networks}, "block": True})
        self.assertEqual(_blocked(inside, client_ip=client), _in(client, networks), (client, networks))
        self.assertEqual(_blocked(outside, client_ip=client), not _in(client, networks), (client, networks))


# -- Bounds ------------------------------------------------------------------------


class RequestBoundTests(SynchronousTestCase):
    """
    The C{[request]} bounds: bytes (UTF-8) of the target; header fields
    (each value one, a name with none once) and the bytes of names and
    values (a name with each of its values).  Past one: 414 or 431, or
    with C{"allow"} no rule sees the request.
    """

    @settings(PROPERTY, max_examples=100)
    @given(
        st.text(alphabet="a/é%", max_size=40),
        st.dictionaries(
            st.text(alphabet="xé-", min_size=1, max_size=5),
            st.lists(st.text(alphabet="vé ", max_size=6), max_size=3),
            max_size=4,
        ),
        st.integers(1, 60),
        st.integers(1, 8),
        st.integers(1, 80),
        st.sampled_from(["block", "allow"]),
    )
    def test_bounds(
        self, path: str, headers: dict[str, list[str]], uri_bound: int, fields_bound: int, bytes_bound: int, policy: str
    ) -> None:
        uri = "/" + path
        request = {
            "uninspectable": policy,
            "max_uri_length": uri_bound,
            "max_headers": fields_bound,
            "max_header_bytes": bytes_bound,
        }
        ruleset = _rules({"id": "all", "block": {"status": 499}}, request=request)
        fields = sum(max(len(vs), 1) for vs in headers.values())
        size = sum(len(n.encode()) * max(len(vs), 1) + sum(len(v.encode()) for v in vs) for n, vs in headers.items())
        decision = ruleset.evaluate(event(uri=uri, headers=headers)).response.build().decision
        if len(uri.encode()) > uri_bound:
            status = 414
        elif fields > fields_bound or size > bytes_bound:
            status = 431
        else:
            # Within the bounds: the rule that blocks everything saw it.
            self.assertEqual(decision, m.Block(499, "Status 499", None), (uri, headers))
            return
        if policy == "allow":
            self.assertEqual(decision, m.ALLOW, (uri, headers, fields, size))
        else:
            self.assertEqual(getattr(decision, "status", None), status, (uri, headers, fields, size))


class PercentDecodingTests(SynchronousTestCase):
    """The agent's own decoder of long texts is urllib's C{unquote} (C{unquote_plus}), as documented."""

    @settings(PROPERTY, max_examples=60)
    @given(
        st.lists(
            st.sampled_from(["%41", "%e2%82", "%AC", "%C3", "%ff", "%", "%4", "%zz", "a", "+", "é", "%25", "%F0%9F%98"]),
            min_size=1,
            max_size=40,
        ),
        st.integers(4097 // 3, 1400),
    )
    def test_same_as_urllib(self, pieces: list[str], repeat: int) -> None:
        from sentinel_twisted.agent.rules._model import percent_decoded

        text = ("".join(pieces) * repeat)[: 4097 + repeat * 7]
        self.assertEqual(percent_decoded(text), unquote(text))
        self.assertEqual(percent_decoded(text, plus=True), unquote_plus(text))


# -- Bodies -----------------------------------------------------------------------


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    edges = [0, *points, len(data)]
    pieces = [data[a:b] for a, b in zip(edges, edges[1:], strict=False)]
    return [p for p in pieces if p] or [b""]


def _body_answer(
    case: SynchronousTestCase, ruleset: Any, data: bytes, cuts: list[int], headers: dict[str, list[str]] | None = None
) -> m.AgentResponse:
    """The answer that decides on C{data}, sent to a fresh agent with C{ruleset} in the chunks C{cuts} makes."""
    path = getattr(case, "_rules_path", None)
    if path is None:
        path = case._rules_path = temp_path(case, "rules.toml")  # type: ignore[attr-defined]
        with open(path, "w") as f:
            f.write('[[rules]]\nid = "x"\ntags = ["x"]\n')
    agent = RulesAgent(path)
    agent.ruleset = ruleset
    first = agent.on_request_headers(event(cid="c", method="POST", headers=headers or {})).build()  # type: ignore[union-attr]
    if not first.needs_more:
        return first  # type: ignore[no-any-return]
    chunks = _chunks(data, cuts)
    answer = first
    for index, chunk in enumerate(chunks):
        answer = agent.on_request_body_chunk(body("c", chunk, index, last=index == len(chunks) - 1)).build()  # type: ignore[union-attr]
        if not isinstance(answer.decision, m.Allow):
            break
    return answer  # type: ignore[no-any-return]


def model_body_texts(data: bytes) -> list[bytes]:
    """The body as sent and, for a JSON document in another charset, as UTF-8 text (C{json.detect_encoding})."""
    views = [data]
    charset = json.detect_encoding(data)
    if not charset.startswith("utf-8"):
        views.append(data.decode(charset, "replace").encode("utf-8"))
    return views


#: Bytes a body is made of: the needle's, zero bytes (UTF-16/32), BOMs, escapes.
BODY_BYTES = st.lists(
    st.sampled_from([b"<", b"script", b"s", b"\x00", b"\xff\xfe", b"\xfe\xff", b"{", b"%3C", b" ", b"\\u003c", b"\xc3"]),
    max_size=12,
).map(b"".join)


class BodyModelTests(SynchronousTestCase):
    """Body rules over chunks cut anywhere, compressed and in other charsets."""

    NEEDLE = {"id": "needle", "match": {"body_contains": "<script"}, "block": True}

    @PROPERTY
    @given(BODY_BYTES, st.lists(st.integers(0, 64), max_size=4))
    def test_body_contains(self, data: bytes, cuts: list[int]) -> None:
        expected = any(b"<script" in view for view in model_body_texts(data))
        answer = _body_answer(self, _rules(self.NEEDLE), data, cuts)
        self.assertEqual(isinstance(answer.decision, m.Block), expected, (data, cuts))

    @PROPERTY
    @given(BODY_BYTES, st.lists(st.integers(0, 64), max_size=4))
    def test_body_pattern(self, data: bytes, cuts: list[int]) -> None:
        """Short bodies: the last chunk sees them whole (the window is 8 KiB)."""
        ruleset = _rules({"id": "xss", "match": {"body": "(?i)<script"}, "block": True})
        text = data.decode("utf-8", "replace")
        views = [text, unquote_plus(text)]
        start = data.removeprefix(b"\xef\xbb\xbf").lstrip()
        if start[:1] in (b"{", b"[", b'"'):
            views.append(text.replace("\\u003c", "<"))
        views += [v.decode("utf-8") for v in model_body_texts(data)[1:]]
        expected = any(re.search("(?i)<script", v) for v in views)
        answer = _body_answer(self, ruleset, data, cuts)
        self.assertEqual(isinstance(answer.decision, m.Block), expected, (data, cuts))

    @PROPERTY
    @given(
        st.binary(max_size=40),
        st.sampled_from(["gzip", "x-gzip", "GZip", "deflate", "deflate-raw"]),
        st.lists(st.integers(0, 120), max_size=4),
        st.booleans(),
    )
    def test_compressed_bodies(self, padding: bytes, coding: str, cuts: list[int], needle: bool) -> None:
        """A needle in the inflated body is found wherever the compressed stream is cut."""
        plain = padding + (b"<script" if needle else b"") + padding
        if coding == "deflate":
            data = zlib.compress(plain)
        elif coding == "deflate-raw":
            compressor = zlib.compressobj(wbits=-15)
            data, coding = compressor.compress(plain) + compressor.flush(), "deflate"
        else:
            data = gzip.compress(plain)
        headers = {"Content-Encoding": [coding]}
        expected = any(b"<script" in view for view in model_body_texts(plain))
        answer = _body_answer(self, _rules(self.NEEDLE), data, cuts, headers)
        self.assertEqual(isinstance(answer.decision, m.Block), expected, (plain, coding, cuts))

    @PROPERTY
    @given(st.integers(1, 4000), st.lists(st.integers(0, 200), max_size=3), st.sampled_from(["block", "allow"]))
    def test_past_max_inflated_size(self, size: int, cuts: list[int], policy: str) -> None:
        """Past C{max_inflated_size}: refused with 413 by default, let through with C{"allow"}."""
        bound = 1000
        ruleset = _rules(self.NEEDLE, body={"max_inflated_size": bound, "uninspectable": policy})
        answer = _body_answer(self, ruleset, gzip.compress(b"a" * size), cuts, {"content-encoding": ["gzip"]})
        if size > bound and policy == "block":
            self.assertEqual(answer.decision, m.Block(413, answer.decision.body, None), size)  # type: ignore[union-attr]
        else:
            self.assertIsInstance(answer.decision, m.Allow, size)

    def test_empty_bodies_are_allowed(self) -> None:
        for headers in [{}, {"content-encoding": ["gzip"]}, {"content-type": ["application/json"]}]:
            answer = _body_answer(self, _rules(self.NEEDLE), b"", [], headers)
            self.assertIsInstance(answer.decision, m.Allow, headers)


# -- The compiler -----------------------------------------------------------------

#: Values a hostile rules file may hold anywhere: strings of every kind
#: (lone surrogates too: JSON's C{"\\udcff"} makes one), numbers, tables.
LEAVES = st.one_of(
    st.text(max_size=8),
    st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=2),
    st.sampled_from(["GET", "get", "GET POST", "", " ", "(", "(?=x)", "10.0.0.0/8", "::1/129", "x-a", "block", "allow"]),
    st.integers(-2, 70000),
    st.booleans(),
    st.floats(allow_nan=False),
    st.none(),
)

KEYS = st.sampled_from(
    ["id", "match", "block", "redirect", "require_header", "request_headers", "response_headers", "tags",
     "enabled", "description", "method", "path", "uri", "query", "header", "any_header", "header_present",
     "header_missing", "client_ip", "client_ip_not", "body", "body_contains", "status", "url", "name", "set",
     "add", "remove", "headers", "uninspectable", "max_inflated_size", "max_uri_length", "x"]
)

VALUES = st.recursive(
    LEAVES,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(KEYS, inner, max_size=4)),
    max_leaves=12,
)


MATCH_KEYS = st.sampled_from(
    ["method", "path", "uri", "query", "header", "any_header", "header_present", "header_missing",
     "client_ip", "client_ip_not", "body", "body_contains", "x"]
)

ACTIONS = st.sampled_from(
    [
        {"block": True},
        {"redirect": "/elsewhere"},
        {"tags": ["t"]},
        {"require_header": "x-key"},
        {"request_headers": {"set": {"x-a": "1"}}},
    ]
)


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    """A rules document, mostly sound, with hostile values where a file may put them."""
    rules = []
    for i in range(draw(st.integers(1, 3))):
        rule: dict[str, Any] = {"id": f"r{i}", **draw(ACTIONS)}
        if draw(st.booleans()):
            rule["match"] = draw(st.dictionaries(MATCH_KEYS, st.one_of(LEAVES, VALUES), min_size=1, max_size=2))
        if draw(st.integers(0, 3)) == 0:
            rule.update(draw(st.dictionaries(KEYS, VALUES, max_size=2)))
        rules.append(rule)
    document: dict[str, Any] = {"rules": rules}
    for key in draw(st.lists(st.sampled_from(["defaults", "body", "request", "other"]), max_size=2)):
        document[key] = draw(st.one_of(VALUES, st.dictionaries(KEYS, LEAVES, max_size=3)))
    return document


class CompilerTests(SynchronousTestCase):
    """Any document is compiled or refused with every problem named, never a traceback."""

    @settings(PROPERTY, max_examples=200)
    @given(documents())
    def test_compiled_or_refused(self, document: dict[str, Any]) -> None:
        try:
            ruleset = parse_rules(document, "hostile.json")
        except RulesError as e:
            self.assertTrue(e.problems)
            for problem in e.problems:
                self.assertNotIn("Traceback", problem)
            return
        for rule in ruleset.rules:
            # A method no request can have would make the rule do nothing.
            for method in rule.methods or ():
                self.assertRegex(method, r"^[!#$%&'*+\-.^_`|~0-9A-Z]+$", document)
            # What a matched rule does goes out on the wire: it must be text.
            json.dumps([rule.id, rule.tags, str(rule.decision)], ensure_ascii=False).encode("utf-8")

