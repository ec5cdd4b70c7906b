"""
The bounds of the rules file's C{[request]} table: a request whose target
or headers are past them is refused (C{414}, C{431}) or, by the policy, let
through unmatched, before anything of it is decoded or searched; a warning
says so, a line per kind per period.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from sentinel_twisted import messages as m
from sentinel_twisted.agent import RulesAgent, RulesError, load_rules, parse_rules
from sentinel_twisted.agent.rules import RequestPolicy, _evaluate, _model

from ._support import REQUEST_HEADERS, Harness, headers_event, temp_path
from .test_rules import EXAMPLE, body, event

MIB = 1024 * 1024

#: Rules that look at every view of the request: any of them running on a
#: request past the bounds would decide (block it, or add an operation).
CATCH_ALL = [
    {"id": "mark", "request_headers": {"set": {"x-seen": "1"}}, "tags": ["seen"]},
    {"id": "any-header", "match": {"any_header": "never"}, "block": True},
    {"id": "uri", "match": {"uri": "never"}, "block": True},
    {"id": "xss-body", "match": {"body": "<script"}, "block": True},
    {"id": "everything", "match": {"path": "^/"}, "block": {"status": 403, "body": "caught"}},
]

#: A target of 1 MiB of C{/%2e}: the text percent-decoding costs most on.
LONG_URI = "/" + "%2e/" * (MIB // 4)

#: 1 MiB of headers, in one value, in many fields of one name, and spread
#: over many names (each within the count bound).
LARGE_HEADERS = [
    {"x-big": ["%2e" * (MIB // 3)]},
    {"x-many": ["a" * 1024] * 1000},
    {f"x-{i}": ["%41" * 350] for i in range(1000)},
]


def _never(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("a request past the bounds was decoded")


def _agent(case: SynchronousTestCase, *tables: dict[str, Any], **top: Any) -> tuple[RulesAgent, MemoryReactorClock]:
    path = Path(temp_path(case, "rules.json"))
    path.write_text(json.dumps({"rules": list(tables or CATCH_ALL), **top}))
    clock = MemoryReactorClock()
    return RulesAgent(path, clock=clock), clock


def _answer(agent: RulesAgent, **kw: Any) -> m.AgentResponse:
    return agent.on_request_headers(event(**kw)).build()  # type: ignore[union-attr]


class _NoViewsTestCase(SynchronousTestCase):
    """Nothing of the request is decoded, normalised or searched."""

    def setUp(self) -> None:
        self.patch(_evaluate, "_RequestView", _never)
        self.patch(_evaluate, "percent_decoded", _never)
        self.patch(_model, "percent_decoded", _never)
        self.patch(_model, "_normalize_path", _never)
        self.patch(_model, "_target_parts", _never)


class BlockTests(_NoViewsTestCase):
    """Past the bounds, by default: refused, with the status and the reason."""

    def assertRefused(self, answer: m.AgentResponse, status: int, code: str, bound: str) -> None:
        decision = answer.decision
        assert isinstance(decision, m.Block), decision
        self.assertEqual(decision.status, status)
        self.assertTrue(decision.body and decision.body.startswith("Request cannot be inspected: "), decision.body)
        self.assertIn(bound, decision.body or "")
        self.assertLess(len(decision.body or ""), 200)
        self.assertEqual(answer.audit.reason_codes, [code])
        self.assertEqual(answer.audit.tags, ["request-uninspectable"])
        self.assertEqual(answer.audit.rule_ids, [])
        self.assertEqual(answer.request_headers, [])
        self.assertFalse(answer.needs_more)

    def test_a_long_target_gets_414(self) -> None:
        agent, _ = _agent(self)
        for uri in [LONG_URI, "http://host" + LONG_URI, "h" + LONG_URI, "/?" + "q=%41" * (MIB // 5)]:
            self.assertRefused(_answer(agent, uri=uri), 414, "uri_too_long", "max_uri_length (65,536)")
        answer = _answer(agent, uri="/" + "a" * (MIB - 1))
        self.assertEqual(
            answer.decision.body,  # type: ignore[union-attr]
            "Request cannot be inspected: the request target is 1,048,576 bytes long, over max_uri_length (65,536)",
        )

    def test_large_headers_get_431(self) -> None:
        agent, _ = _agent(self)
        for headers in LARGE_HEADERS:
            answer = _answer(agent, headers=headers)
            self.assertRefused(answer, 431, "headers_too_large", "max_header_bytes (262,144 bytes)")

    def test_too_many_header_fields_get_431(self) -> None:
        agent, _ = _agent(self)
        for headers in [
            {"x": [""] * 1001},
            {f"x-{i}": ["v"] for i in range(100_000)},
            # A name with no value is a field all the same (header_present sees it).
            {f"x-{i}": [] for i in range(1001)},
            {"a": ["1"] * 600, "b": ["2"] * 401},
        ]:
            answer = _answer(agent, headers=headers)
            self.assertRefused(answer, 431, "too_many_headers", "more than 1,000 header fields (max_headers)")

    def test_a_name_counts_with_each_of_its_values(self) -> None:
        # As on the lines of an HTTP/1.1 head: 300 empty values of a
        # name of 1,000 characters are 300,000 bytes.
        agent, _ = _agent(self)
        answer = _answer(agent, headers={"n" * 1000: [""] * 300})
        self.assertRefused(answer, 431, "headers_too_large", "max_header_bytes")

    def test_bytes_are_counted_in_utf8(self) -> None:
        # 40,001 characters, 80,001 bytes: as the proxy received them.
        agent, _ = _agent(self)
        answer = _answer(agent, uri="/" + "\u00e9" * 40_000)
        self.assertRefused(answer, 414, "uri_too_long", "more than 65,536 bytes long")
        answer = _answer(agent, headers={"x": ["\u20ac" * 90_000]})
        self.assertRefused(answer, 431, "headers_too_large", "max_header_bytes")

    def test_over_the_wire(self) -> None:
        # A RequestHeaders event of megabytes, as a proxy sends it.
        agent, _ = _agent(self)
        harness = Harness(agent)
        harness.register()
        harness.sent()
        harness.feed(REQUEST_HEADERS, headers_event("big", uri=LONG_URI, headers=LARGE_HEADERS[0]))
        [answer] = harness.answers()
        self.assertEqual(answer["decision"]["block"]["status"], 414)
        self.assertEqual(answer["audit"]["reason_codes"], ["uri_too_long"])
        harness.feed(REQUEST_HEADERS, headers_event("many", headers=LARGE_HEADERS[2]))
        [answer] = harness.answers()
        self.assertEqual(answer["decision"]["block"]["status"], 431)


class MethodAndClientTests(_NoViewsTestCase):
    """
    The method and the client address, which rules match too (C{method},
    C{client_ip}): past their bounds, or a method that is no HTTP token,
    the request is refused before either is upper-cased or parsed.
    """

    assertRefused = BlockTests.assertRefused

    def test_a_long_method_gets_501(self) -> None:
        agent, _ = _agent(self)
        for method in ["A" * 65, "GET" * 100_000, "A" * (16 * MIB - 4096), "\u017f" * MIB]:
            answer = _answer(agent, method=method)
            self.assertRefused(answer, 501, "method_too_long", "max_method_length (64)")
        answer = _answer(agent, method="A" * MIB)
        self.assertEqual(
            answer.decision.body,  # type: ignore[union-attr]
            "Request cannot be inspected: the request method is 1,048,576 characters long, over max_method_length (64)",
        )

    def test_a_method_that_is_no_token_gets_400(self) -> None:
        # RFC 9110 section 9.1: a method is a token.  Upper-cased, some of
        # these were other methods ("po\u017ft" is "POST").
        agent, _ = _agent(self)
        for method in ["", "GET\x00", "G T", "GET\r\nX", "po\u017ft", "\u0130NFO", "GET/", "(GET)", "\x1b[2J", "G\u2028"]:
            answer = _answer(agent, method=method)
            self.assertRefused(answer, 400, "method_invalid", "the request method is not an HTTP token")

    def test_a_long_client_address_gets_400(self) -> None:
        agent, _ = _agent(self)
        for client_ip in ["1" * 62, "1" * (16 * MIB - 4096), ":" * MIB, "1." * MIB, "fe80::1%" + "e" * 1000]:
            answer = _answer(agent, client_ip=client_ip)
            self.assertRefused(answer, 400, "client_address_too_long", "longest IP address (61 characters)")

    def test_over_the_wire(self) -> None:
        agent, _ = _agent(self)
        harness = Harness(agent)
        harness.register()
        harness.sent()
        harness.feed(REQUEST_HEADERS, headers_event("m", method="M" * (4 * MIB)))
        [answer] = harness.answers()
        self.assertEqual(answer["decision"]["block"]["status"], 501)
        self.assertEqual(answer["audit"]["reason_codes"], ["method_too_long"])
        harness.feed(REQUEST_HEADERS, headers_event("c", client_ip=":" * (4 * MIB)))
        [answer] = harness.answers()
        self.assertEqual(answer["decision"]["block"]["status"], 400)
        self.assertEqual(answer["audit"]["reason_codes"], ["client_address_too_long"])


class MethodAndClientWithinTheBoundsTests(SynchronousTestCase):
    """Methods and client addresses within the bounds are matched as before; past them, refused."""

    def test_methods_within_the_bounds_are_matched_as_before(self) -> None:
        rules = [
            {"id": "m", "match": {"method": ["PATCH", "M-SEARCH", "X" * 64, "!#$%&'*+-.^_`|~09AZAZ"]}, "block": True},
            {"id": "rest", "match": {"path": "^/"}, "block": {"status": 418}},
        ]
        agent, _ = _agent(self, *rules)
        for method in ["PATCH", "patch", "m-search", "X" * 64, "x" * 64, "!#$%&'*+-.^_`|~09azAZ"]:
            self.assertEqual(_answer(agent, method=method).decision.status, 403, method)  # type: ignore[union-attr]
        for method in ["GET", "POST", "UPDATEREDIRECTREF", "BASELINE-CONTROL", "X" * 63]:
            self.assertEqual(_answer(agent, method=method).decision.status, 418, method)  # type: ignore[union-attr]
        # Past the bound: refused, and the rules never see it.
        self.assertEqual(_answer(agent, method="X" * 65).decision.status, 501)  # type: ignore[union-attr]

    def test_client_addresses_within_the_bound_are_matched_as_before(self) -> None:
        rules = [
            {"id": "in", "match": {"client_ip": ["203.0.113.0/24", "ffff:ffff::/32", "fe80::/10"]}, "block": True},
            {"id": "rest", "match": {"path": "^/"}, "block": {"status": 418}},
        ]
        agent, _ = _agent(self, *rules)
        # The longest text of an IPv6 address, with the longest zone an
        # interface name makes (IFNAMSIZ).
        longest = "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255%" + "e" * 15
        self.assertEqual(len(longest), 61)
        for client_ip in ["203.0.113.7", "::ffff:203.0.113.7", longest, "fe80::1%eth0", "fe80::1%4294967295"]:
            self.assertEqual(_answer(agent, client_ip=client_ip).decision.status, 403, client_ip)  # type: ignore[union-attr]
        # No address (a proxy's UNIX socket), or one that is none: in no network, as before.
        for client_ip in ["", "198.51.100.1", "unknown", "x" * 61]:
            self.assertEqual(_answer(agent, client_ip=client_ip).decision.status, 418, client_ip)  # type: ignore[union-attr]
        self.assertEqual(_answer(agent, client_ip=longest + "e").decision.status, 400)  # type: ignore[union-attr]


class ReadingTests(SynchronousTestCase):
    """Telling a request is past the bounds reads no more of it than the bounds."""

    def test_lengths_are_read_and_fields_counted_no_further_than_the_bounds(self) -> None:
        read: list[int] = []

        class Values(list[str]):
            def __iter__(self) -> Iterator[str]:
                for value in super().__iter__():
                    read.append(1)
                    yield value

        class Headers(dict[str, list[str]]):
            def items(self) -> Any:
                for item in super().items():
                    read.append(1)
                    yield item

        policy = RequestPolicy()
        self.assertEqual(policy.check("/" * (16 * MIB), {}).code, "uri_too_long")  # type: ignore[union-attr]
        many_names = Headers({f"x-{i}": Values(["v"]) for i in range(100_000)})
        self.assertEqual(policy.check("/", many_names).code, "too_many_headers")  # type: ignore[union-attr]
        # 1,001 names read, and no more values than fields allowed.
        self.assertLessEqual(len(read), 1001 + 1000)
        read.clear()
        many_values = Headers({"x": Values([""] * 1_000_000)})
        self.assertEqual(policy.check("/", many_values).code, "too_many_headers")  # type: ignore[union-attr]
        self.assertEqual(len(read), 1)
        read.clear()
        long_values = Headers({"x": Values(["v" * MIB] * 100)})
        self.assertEqual(policy.check("/", long_values).code, "headers_too_large")  # type: ignore[union-attr]
        self.assertEqual(len(read), 2)

    def test_within_the_bounds(self) -> None:
        policy = RequestPolicy("block", max_uri_length=10, max_header_bytes=10, max_headers=2)
        self.assertIsNone(policy.check("/123456789", {"abcde": ["12345"]}))
        self.assertIsNone(policy.check("/1234567\u00e9", {"a": ["1234"], "b": []}))
        self.assertEqual(policy.check("/123456789" + "0", {}).code, "uri_too_long")  # type: ignore[union-attr]
        self.assertEqual(policy.check("/12345678\u00e9", {}).code, "uri_too_long")  # type: ignore[union-attr]
        self.assertEqual(policy.check("/", {"abcde": ["123456"]}).code, "headers_too_large")  # type: ignore[union-attr]
        self.assertEqual(policy.check("/", {"abcde": ["1234\u00e9"]}).code, "headers_too_large")  # type: ignore[union-attr]
        self.assertEqual(policy.check("/", {"a": ["1", "2"], "b": []}).code, "too_many_headers")  # type: ignore[union-attr]

    def test_the_method_and_the_client_address(self) -> None:
        policy = RequestPolicy("block", max_method_length=6)
        self.assertIsNone(policy.check("/", {}, method="DELETE", client_ip="2001:db8::1"))
        self.assertIsNone(policy.check("/", {}, method="x", client_ip=""))
        self.assertEqual(policy.check("/", {}, method="OPTIONS").code, "method_too_long")  # type: ignore[union-attr]
        self.assertEqual(policy.check("/", {}, method="G\u00c9T").code, "method_invalid")  # type: ignore[union-attr]
        self.assertEqual(policy.check("/", {}, method="").code, "method_invalid")  # type: ignore[union-attr]
        self.assertEqual(policy.check("/", {}, client_ip="1" * 62).code, "client_address_too_long")  # type: ignore[union-attr]
        # Not given: not checked.
        self.assertIsNone(policy.check("/", {}))


class PolicyTests(SynchronousTestCase):
    def test_defaults_leave_ordinary_requests_to_the_rules(self) -> None:
        self.assertEqual(parse_rules({"rules": []}).request, RequestPolicy("block", 65_536, 262_144, 1000, 64))
        self.assertEqual(load_rules(EXAMPLE).request, RequestPolicy())
        # A request line of 8 KiB and a head of 100 headers of 1 KiB: as
        # large as common servers take; the rules see them.
        agent, _ = _agent(self)
        headers = {f"x-{i}": ["v" * 1024] for i in range(100)}
        answer = _answer(agent, uri="/" + "a" * 8191, headers=headers)
        self.assertEqual(answer.decision, m.Block(403, "caught", None))
        self.assertEqual(answer.audit.rule_ids, ["mark", "everything"])

    def test_limits_are_configurable(self) -> None:
        request = {"max_uri_length": 100, "max_header_bytes": 50, "max_headers": 3, "max_method_length": 7}
        agent, _ = _agent(self, request=request)
        self.assertEqual(agent.ruleset.request, RequestPolicy("block", 100, 50, 3, 7))
        self.assertEqual(_answer(agent, method="OPTIONS").decision.status, 403)  # type: ignore[union-attr]
        self.assertEqual(_answer(agent, method="PROPFIND").decision.status, 501)  # type: ignore[union-attr]
        self.assertEqual(_answer(agent, uri="/" + "a" * 99).decision.status, 403)  # type: ignore[union-attr]
        self.assertEqual(_answer(agent, uri="/" + "a" * 100).decision.status, 414)  # type: ignore[union-attr]
        self.assertEqual(_answer(agent, headers={"x": ["a" * 49]}).decision.status, 403)  # type: ignore[union-attr]
        self.assertEqual(_answer(agent, headers={"x": ["a" * 50]}).decision.status, 431)  # type: ignore[union-attr]
        self.assertEqual(_answer(agent, headers={"x": ["1", "2", "3"]}).decision.status, 403)  # type: ignore[union-attr]
        self.assertEqual(_answer(agent, headers={"x": ["1", "2"], "y": ["3", "4"]}).decision.status, 431)  # type: ignore[union-attr]
        # Raised, the rules see what they did not.
        agent, _ = _agent(self, request={"max_uri_length": 2 * MIB, "max_method_length": 1000})
        self.assertEqual(_answer(agent, uri=LONG_URI).decision.status, 403)  # type: ignore[union-attr]
        self.assertEqual(_answer(agent, method="M" * 1000).decision.status, 403)  # type: ignore[union-attr]

    def test_a_reload_applies_the_new_bounds(self) -> None:
        agent, _ = _agent(self)
        self.assertEqual(_answer(agent, uri="/" + "a" * 1000).decision.status, 403)  # type: ignore[union-attr]
        Path(agent.path).write_text(json.dumps({"rules": CATCH_ALL, "request": {"max_uri_length": 500}}))
        self.assertTrue(agent.reload())
        self.assertEqual(_answer(agent, uri="/" + "a" * 1000).decision.status, 414)  # type: ignore[union-attr]
        Path(agent.path).write_text(json.dumps({"rules": CATCH_ALL, "request": {"max_uri_length": 0}}))
        self.assertFalse(agent.reload())
        self.assertEqual(agent.ruleset.request.max_uri_length, 500)

    def test_a_ruleset_made_in_code_has_the_bounds(self) -> None:
        ruleset = _evaluate.RuleSet(parse_rules({"rules": CATCH_ALL}).rules)
        answer = ruleset.evaluate(event(uri=LONG_URI)).response.build()
        self.assertEqual(answer.decision.status, 414)  # type: ignore[union-attr]


class AllowPolicyTests(_NoViewsTestCase):
    """C{uninspectable = "allow"}: let through unmatched, and told in the log."""

    def setUp(self) -> None:
        super().setUp()
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def warnings(self) -> list[str]:
        return [
            formatEvent(e)
            for e in self.events
            if e.get("log_level") == LogLevel.warn and "too large to inspect" in e.get("log_format", "")
        ]

    def test_let_through_unmatched(self) -> None:
        agent, _ = _agent(self, request={"uninspectable": "allow"})
        for kw in [
            {"uri": LONG_URI},
            *({"headers": h} for h in LARGE_HEADERS),
            {"headers": {"x": [""] * 5000}},
            {"method": "P" * MIB},
            {"method": "PO\u017fT"},
            {"client_ip": "1" * MIB},
        ]:
            kw.setdefault("method", "POST")
            answer = _answer(agent, **kw)
            self.assertEqual(answer.decision, m.ALLOW)
            # No rule ran: no operation, no rule id, no body asked for.
            self.assertEqual(answer.request_headers, [])
            self.assertEqual(answer.audit.rule_ids, [])
            self.assertEqual(answer.audit.tags, ["request-uninspectable"])
            self.assertEqual(len(answer.audit.reason_codes), 1)
            self.assertFalse(answer.needs_more)
        self.assertEqual(agent._bodies, {})
        self.assertIsInstance(agent.on_request_body_chunk(body("req-1", b"<script>", last=True)).build().decision, m.Allow)  # type: ignore[union-attr]

    def test_logged_once_per_period_per_kind(self) -> None:
        agent, clock = _agent(self, request={"uninspectable": "allow"})
        hostile = "\x1b[2J\n2026-01-01T00:00:00+0000 [sentinel_twisted#critical] forged\u2028"
        for _ in range(5):
            _answer(agent, uri=LONG_URI + hostile, client_ip="1" + hostile, cid="c" + hostile)
        [line] = self.warnings()
        self.assertIn("allowed unmatched by the [request] policy", line)
        self.assertIn("the request target is", line)
        self.assertLess(len(line), 1000)
        for bad in ("\x1b", "\n", "\u2028"):
            self.assertNotIn(bad, line)
        # Headers are another kind: a line of their own.
        _answer(agent, headers=LARGE_HEADERS[0])
        self.assertEqual(len(self.warnings()), 2)
        # The period over, the others are counted in one line.
        clock.advance(10)
        lines = self.warnings()
        self.assertEqual(len(lines), 3)
        # The last of the four others, and the three before it.
        self.assertIn("and 3 more like it in the last 10 s", lines[2])
        # A new period: a line at once.
        clock.advance(10)
        _answer(agent, uri=LONG_URI)
        self.assertEqual(len(self.warnings()), 4)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_a_method_or_client_address_is_logged_cut_and_escaped(self) -> None:
        agent, _ = _agent(self)
        hostile = "\x1b[2J\n2026-01-01T00:00:00+0000 [sentinel_twisted#critical] forged\u2028"
        _answer(agent, method="GET\x1b[2J\n\u2028")
        _answer(agent, method=hostile * 100_000)
        _answer(agent, client_ip="1" + hostile * 100_000)
        lines = [
            formatEvent(e) for e in self.events if e.get("log_format", "").startswith("Request ")
        ]
        self.assertEqual(len(lines), 3, lines)
        self.assertIn("Request cannot be inspected, blocked (400): the request method is not an HTTP token", lines[0])
        self.assertIn("Request too large to inspect, blocked (501): the request method is", lines[1])
        self.assertIn("Request too large to inspect, blocked (400): the client address is", lines[2])
        for line in lines:
            self.assertLess(len(line), 1000)
            for bad in ("\x1b", "\n", "\u2028"):
                self.assertNotIn(bad, line)
            self.assertIn("\\x1b", line)

    def test_blocks_are_logged_alike(self) -> None:
        agent, clock = _agent(self)
        for _ in range(3):
            _answer(agent, uri=LONG_URI)
        [line] = self.warnings()
        self.assertIn("Request too large to inspect, blocked (414): the request target is", line)
        clock.advance(10)
        self.assertIn("and 1 more like it", self.warnings()[-1])


class LoadErrorTests(SynchronousTestCase):
    def problems(self, table: Any) -> list[str]:
        error = self.assertRaises(RulesError, parse_rules, {"rules": [], "request": table}, "f.toml")
        self.assertTrue(all(line.startswith("f.toml: ") for line in str(error).splitlines()))
        return error.problems

    def test_each_problem_names_the_key(self) -> None:
        no_limit = ' (0 is not "no limit": events are at most 16,777,216 bytes, so 16777216 lets any through)'
        for table, problem in [
            ({"max_uri": 1}, "request: unknown key 'max_uri' (known: max_header_bytes, max_headers, max_method_length, max_uri_length, uninspectable)"),
            ({"uninspectable": "maybe"}, 'request.uninspectable: expected "block" or "allow", got "maybe"'),
            ({"max_uri_length": 0}, "request.max_uri_length: expected a positive integer, got 0" + no_limit),
            ({"max_header_bytes": -1}, "request.max_header_bytes: expected a positive integer, got -1"),
            ({"max_headers": True}, "request.max_headers: expected a positive integer, got true"),
            ({"max_method_length": 0}, "request.max_method_length: expected a positive integer, got 0" + no_limit),
            ({"max_client_ip_length": 64}, "request: unknown key 'max_client_ip_length' (known: max_header_bytes, max_headers, max_method_length, max_uri_length, uninspectable)"),
            ({"max_headers": 1.5}, "request.max_headers: expected a positive integer, got 1.5"),
            ({"max_uri_length": "64k"}, 'request.max_uri_length: expected a positive integer, got "64k"'),
            ("block", 'request: expected a table, got "block"'),
        ]:
            self.assertEqual(self.problems(table), [problem])

    def test_all_at_once(self) -> None:
        problems = self.problems({"max_uri_length": 0, "max_headers": -5, "uninspectable": 1, "x": 1})
        self.assertEqual(len(problems), 4, problems)

    def test_in_a_file(self) -> None:
        path = temp_path(self, "rules.toml")
        Path(path).write_text('[request]\nmax_uri_length = 0\nmax_header_bytes = 8192\n\n[[rules]]\nid = "x"\nblock = true\n')
        error = self.assertRaises(RulesError, load_rules, path)
        self.assertIn(f"{path}: request.max_uri_length: expected a positive integer, got 0 (0 is not", str(error))
        Path(path).write_text('[request]\nuninspectable = "allow"\nmax_uri_length = 8192\nmax_header_bytes = 16384\nmax_headers = 100\n')
        self.assertEqual(load_rules(path).request, RequestPolicy("allow", 8192, 16384, 100))
