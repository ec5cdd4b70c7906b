"""
The rule engine: each matcher, each action, errors naming file, rule and
reason, and reloads that keep the old rules when the new file is bad.
"""

from __future__ import annotations

import json
import os
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from sentinel_twisted import messages as m
from sentinel_twisted.agent import RulesAgent, RulesError, load_rules, parse_rules
from sentinel_twisted.agent.rules import BODY_WINDOW

from ._support import Harness, body_chunk_event, headers_event, temp_path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "rules.toml"


def event(**kw: Any) -> m.RequestHeadersEvent:
    return m.decode(json.dumps(headers_event(**kw)).encode(), m.RequestHeadersEvent)


def body(cid: str, data: bytes, index: int = 0, last: bool = False) -> m.RequestBodyChunkEvent:
    return m.decode(json.dumps(body_chunk_event(cid, data, index, last)).encode(), m.RequestBodyChunkEvent)


def rules(*tables: dict[str, Any], **top: Any) -> Any:
    return parse_rules({"rules": list(tables), **top}, "test.toml")


def decide(ruleset: Any, **kw: Any) -> m.AgentResponse:
    return ruleset.evaluate(event(**kw)).response.build()  # type: ignore[no-any-return]


BLOCK = {"block": True}

#: A C{[request]} table that lets any event through: for the tests of what
#: the rules make of requests larger than the default bounds take.
NO_REQUEST_BOUNDS = {
    "request": dict.fromkeys(("max_uri_length", "max_header_bytes", "max_headers", "max_method_length"), 1 << 24)
}


class _DecisionTestCase(SynchronousTestCase):
    def assertBlocked(self, ruleset: Any, **kw: Any) -> None:
        self.assertIsInstance(decide(ruleset, **kw).decision, m.Block, kw)

    def assertAllowed(self, ruleset: Any, **kw: Any) -> None:
        self.assertIsInstance(decide(ruleset, **kw).decision, m.Allow, kw)


class MatcherTests(_DecisionTestCase):

    def test_method(self) -> None:
        r = rules({"id": "m", "match": {"method": ["delete", "PUT"]}, **BLOCK})
        self.assertBlocked(r, method="DELETE")
        self.assertBlocked(r, method="put")
        self.assertAllowed(r, method="GET")

    def test_path_regex_on_raw_and_normalised_path(self) -> None:
        r = rules({"id": "p", "match": {"path": "^/admin(/|$)"}, **BLOCK})
        self.assertBlocked(r, uri="/admin")
        self.assertBlocked(r, uri="/admin/users?x=1")
        self.assertBlocked(r, uri="/%61dmin")
        self.assertBlocked(r, uri="//admin")
        self.assertBlocked(r, uri="/public/../admin/")
        self.assertBlocked(r, uri="http://example.com/admin")
        self.assertAllowed(r, uri="/administrator")
        self.assertAllowed(r, uri="/?next=/admin")

    def test_path_parameters_are_dropped_as_servlet_containers_do(self) -> None:
        r = rules({"id": "p", "match": {"path": "^/admin(/|$)"}, **BLOCK})
        for uri in ["/admin;x", "/admin;jsessionid=1/users", "/admin%3bx", "/public/..;/admin",
                    "/public;a=1/../admin/", "/admin;"]:
            self.assertBlocked(r, uri=uri)
        for uri in ["/administrator;x", "/public;/admin-tools", "/?q=/admin;x"]:
            self.assertAllowed(r, uri=uri)

    def test_a_fragment_is_read_with_and_without_it(self) -> None:
        # Node's url.parse (Express) leaves "#..." out of an origin-form
        # target, so /admin#x is /admin there; Go keeps it in the path or
        # the query.  Either reading is matched.
        r = rules(
            {"id": "p", "match": {"path": "(?i)^/admin(/|$)"}, **BLOCK},
            {"id": "q", "match": {"query": "(?i)(union\\s+select|--\\s*$)"}, **BLOCK},
        )
        for uri in ["/admin#x", "/ADMIN#", "/admin;x#y", "/x/..%2fadmin#/x", "/search?id=1--#x",
                    "http://h/search?id=1--#x", "/search?id=1#union%20select", "http://h/search?id=1#+union+select"]:
            self.assertBlocked(r, uri=uri)
        for uri in ["/public#/admin", "/search?id=1#x", "/search#?id=1--x"]:
            self.assertAllowed(r, uri=uri)

    def test_trailing_slash_survives_dot_segment_normalisation(self) -> None:
        r = rules({"id": "dir", "match": {"path": "^/dir/$"}, **BLOCK})
        for uri in ["/dir/", "/x/../dir/", "/dir/./", "/dir//", "/dir/.", "/dir/sub/..", "/x/%2e%2e/dir/"]:
            self.assertBlocked(r, uri=uri)
        for uri in ["/dir", "/x/../dir", "/dir/sub", "/dir/sub/."]:
            self.assertAllowed(r, uri=uri)

    def test_any_header_value_raw_or_decoded(self) -> None:
        r = rules({"id": "h", "match": {"any_header": "(?i)union\\s+select"}, **BLOCK})
        self.assertBlocked(r, headers={"x-anything": ["1 UNION SELECT 2"]})
        self.assertBlocked(r, headers={"cookie": ["a=b", "id=1+union+select+2"]})
        self.assertBlocked(r, headers={"referer": ["http://x/?q=1%20union%20select"]})
        self.assertAllowed(r, headers={"x-anything": ["union", "select"]})
        self.assertAllowed(r, headers={})

    def test_uri_and_query(self) -> None:
        r = rules(
            {"id": "q", "match": {"query": "(?i)union\\s+select"}, **BLOCK},
            {"id": "u", "match": {"uri": "\\.php$"}, **BLOCK},
        )
        self.assertBlocked(r, uri="/items?id=1%20UNION%20SELECT%20x")
        self.assertBlocked(r, uri="/items?id=1+union+select+x")
        self.assertAllowed(r, uri="/union select")
        self.assertBlocked(r, uri="/index.php")
        self.assertAllowed(r, uri="/index.html")

    def test_header_value_presence_and_absence(self) -> None:
        r = rules(
            {"id": "ua", "match": {"header": {"User-Agent": "(?i)sqlmap"}}, **BLOCK},
            {"id": "dbg", "match": {"header_present": "x-debug"}, **BLOCK},
            {"id": "host", "match": {"header_missing": ["host"]}, **BLOCK},
        )
        host = {"Host": ["example.com"]}
        self.assertBlocked(r, headers={**host, "user-agent": ["sqlmap/1.7"]})
        self.assertAllowed(r, headers={**host, "user-agent": ["curl/8"]})
        self.assertBlocked(r, headers={**host, "X-Debug": ["1"]})
        self.assertBlocked(r, headers={})
        self.assertAllowed(r, headers=host)

    def test_header_value_raw_or_decoded(self) -> None:
        # As any_header: PHP's $_COOKIE and Express's cookie-parser decode
        # a cookie, so the percent-encoded one was the same injection.
        r = rules({"id": "c", "match": {"header": {"Cookie": "(?i)union\\s+select"}}, **BLOCK})
        for value in ["id=1 union select 2", "id=1%20UNION%20SELECT%202", "id=1+union+select+2"]:
            self.assertBlocked(r, headers={"cookie": ["a=b", value]})
        self.assertAllowed(r, headers={"cookie": ["id=1%20union"]})
        self.assertAllowed(r, headers={"x-other": ["1 union select 2"]})

    def test_header_value_any_of_several(self) -> None:
        r = rules({"id": "c", "match": {"header": {"cookie": "^admin="}}, **BLOCK})
        self.assertBlocked(r, headers={"cookie": ["a=1", "admin=1"]})
        self.assertAllowed(r, headers={"cookie": ["a=1"]})

    def test_client_ip_cidr(self) -> None:
        r = rules({"id": "ip", "match": {"client_ip": ["10.0.0.0/8", "2001:db8::/32"]}, **BLOCK})
        self.assertBlocked(r, client_ip="10.1.2.3")
        self.assertBlocked(r, client_ip="::ffff:10.1.2.3")
        self.assertBlocked(r, client_ip="2001:db8::1")
        self.assertAllowed(r, client_ip="192.0.2.1")
        self.assertAllowed(r, client_ip="not an address")

    def test_client_ip_networks_of_ipv4_mapped_addresses(self) -> None:
        # A mapped client address is matched as IPv4: a network written in
        # the mapped form (as dual-stack servers log IPv4 clients) matched
        # no client at all, and a block list so written let everyone in.
        r = rules({"id": "ip", "match": {"client_ip": ["::ffff:10.0.0.0/104", "::FFFF:192.0.2.1"]}, **BLOCK})
        for client in ["10.1.2.3", "::ffff:10.1.2.3", "192.0.2.1", "::ffff:c000:201"]:
            self.assertBlocked(r, client_ip=client)
        for client in ["11.0.0.1", "192.0.2.2", "2001:db8::1"]:
            self.assertAllowed(r, client_ip=client)
        r = rules({"id": "ip", "match": {"client_ip_not": ["::ffff:127.0.0.0/104"]}, **BLOCK})
        self.assertAllowed(r, client_ip="127.0.0.1")
        self.assertBlocked(r, client_ip="192.0.2.1")

    def test_client_ip_not(self) -> None:
        r = rules({"id": "ext", "match": {"path": "^/metrics$", "client_ip_not": "127.0.0.0/8"}, **BLOCK})
        self.assertAllowed(r, uri="/metrics", client_ip="127.0.0.1")
        self.assertBlocked(r, uri="/metrics", client_ip="192.0.2.1")
        self.assertBlocked(r, uri="/metrics", client_ip="garbage")

    def test_all_conditions_must_hold(self) -> None:
        r = rules({"id": "both", "match": {"method": "POST", "path": "^/login"}, **BLOCK})
        self.assertBlocked(r, method="POST", uri="/login")
        self.assertAllowed(r, method="GET", uri="/login")
        self.assertAllowed(r, method="POST", uri="/other")

    def test_body_contains_across_chunks(self) -> None:
        agent = _agent(self, {"id": "xss", "match": {"method": "POST", "body_contains": ["<script"]}, **BLOCK})
        self.assertEqual(agent.supported_events(), [1, 2, 5])
        first = agent.on_request_headers(event(cid="b1", method="POST")).build()  # type: ignore[union-attr]
        self.assertEqual(first.decision, m.ALLOW)
        self.assertTrue(first.needs_more)
        a = agent.on_request_body_chunk(body("b1", b"hello <scr", 0)).build()  # type: ignore[union-attr]
        self.assertEqual(a.decision, m.ALLOW)
        self.assertTrue(a.needs_more)
        b = agent.on_request_body_chunk(body("b1", b"ipt>alert(1)", 1)).build()  # type: ignore[union-attr]
        self.assertIsInstance(b.decision, m.Block)
        self.assertEqual(b.audit.rule_ids, ["xss"])

    def test_body_contains_matches_across_one_byte_chunks(self) -> None:
        agent = _agent(self, {"id": "xss", "match": {"body_contains": ["nothing", "<script>"]}, **BLOCK})
        agent.on_request_headers(event(cid="one"))
        data = b"aaaa<script>alert(1)"
        end = data.index(b">") + 1
        for index, byte in enumerate(data[:end]):
            answer = agent.on_request_body_chunk(body("one", bytes([byte]), index)).build()  # type: ignore[union-attr]
            if index < end - 1:
                self.assertEqual((answer.decision, answer.needs_more), (m.ALLOW, True), index)
        self.assertIsInstance(answer.decision, m.Block)
        self.assertEqual(answer.audit.rule_ids, ["xss"])

    def test_body_pattern_on_text_and_form_decoded_body(self) -> None:
        agent = _agent(self, {"id": "sqli", "match": {"body": "(?i)union\\s+select"}, **BLOCK})
        self.assertEqual(agent.supported_events(), [1, 2, 5])
        for cid, data in [("raw", b"id=1 UNION SELECT 2"), ("form", b"id=1+union+select+2"),
                          ("pct", b"id=1%20union%0Aselect"), ("json", b'{"id": "1 union select 2"}')]:
            self.assertTrue(agent.on_request_headers(event(cid=cid, method="POST")).build().needs_more)  # type: ignore[union-attr]
            answer = agent.on_request_body_chunk(body(cid, data, 0, last=True)).build()  # type: ignore[union-attr]
            self.assertIsInstance(answer.decision, m.Block, cid)
        agent.on_request_headers(event(cid="ok", method="POST"))
        answer = agent.on_request_body_chunk(body("ok", b"union=1&select=2", 0, last=True)).build()  # type: ignore[union-attr]
        self.assertEqual(answer.decision, m.ALLOW)
        self.assertEqual(len(agent._bodies), 0)

    def test_json_string_escapes_are_decoded_for_a_json_body(self) -> None:
        agent = _agent(self, {"id": "sqli", "match": {"body": "(?i)union\\s+select"}, **BLOCK})
        escaped = b'{"q": "1 \\u0055NION\\u0020\\u0053ELECT 2"}'
        for cid, content_type, data in [
            ("json", ["application/json"], escaped),
            ("json-charset", ["Application/JSON; charset=utf-8"], escaped),
            ("vendor", ["application/vnd.api+json"], escaped),
            ("newline", ["application/json"], b'{"q": "1 union\\nselect 2"}'),
            # No Content-Type: a body that starts as JSON is read as JSON.
            ("sniffed", None, b'  [' + escaped + b"]"),
        ]:
            headers = {"content-type": content_type} if content_type else {}
            agent.on_request_headers(event(cid=cid, method="POST", headers=headers))
            answer = agent.on_request_body_chunk(body(cid, data, 0, last=True)).build()  # type: ignore[union-attr]
            self.assertIsInstance(answer.decision, m.Block, cid)
        # Split across chunks, escapes and all.
        agent.on_request_headers(event(cid="split", method="POST", headers={"content-type": ["application/json"]}))
        for index in range(len(escaped)):
            answer = agent.on_request_body_chunk(body("split", escaped[index : index + 1], index)).build()  # type: ignore[union-attr]
            if not isinstance(answer.decision, m.Allow):
                break
        self.assertIsInstance(answer.decision, m.Block)
        # Another Content-Type: a body that starts as JSON is still read as
        # JSON (Starlette, Go's json.Decoder, Flask's force=True ignore the
        # type); one that does not is taken as it is.
        for cid, data, decision in [("text", escaped, m.Block), ("form", b"q=" + escaped[8:], m.Allow)]:
            agent.on_request_headers(event(cid=cid, method="POST", headers={"content-type": ["text/plain"]}))
            answer = agent.on_request_body_chunk(body(cid, data, 0, last=True)).build()  # type: ignore[union-attr]
            self.assertIsInstance(answer.decision, decision, cid)

    def test_json_unescaping(self) -> None:
        from sentinel_twisted.agent.rules._evaluate import _json_unescape

        self.assertEqual(_json_unescape('a\\u0055NION'), "aUNION")
        self.assertEqual(_json_unescape('\\ud83d\\ude00 \\ud800 \\"x\\" \\/\\t'), '\U0001f600 \ufffd "x" /\t')
        # An escaped backslash ends the escape: \\u0055 is a backslash and "u0055".
        self.assertEqual(_json_unescape('\\\\u0055'), "\\u0055")
        self.assertEqual(_json_unescape("no escapes"), "no escapes")

    def test_body_pattern_across_chunks_within_the_window(self) -> None:
        agent = _agent(self, {"id": "sqli", "match": {"body": "(?i)union\\s+select"}, **BLOCK})
        # A match as long as the window, split just after its first byte.
        spaces = b" " * (BODY_WINDOW - len(b"union") - len(b"select"))
        agent.on_request_headers(event(cid="w"))
        first = agent.on_request_body_chunk(body("w", b"x" * 100_000 + b"u", 0)).build()  # type: ignore[union-attr]
        self.assertEqual(first.decision, m.ALLOW)
        second = agent.on_request_body_chunk(body("w", b"nion" + spaces + b"select", 1)).build()  # type: ignore[union-attr]
        self.assertIsInstance(second.decision, m.Block)
        # What the window holds is bounded, however large the chunks.
        agent.on_request_headers(event(cid="big"))
        agent.on_request_body_chunk(body("big", b"y" * 100_000, 0))
        self.assertEqual(len(agent._bodies["big"].tail), BODY_WINDOW)

    def test_a_block_on_the_body_carries_what_the_headers_gathered(self) -> None:
        agent = _agent(
            self,
            {"id": "mark", "response_headers": {"set": {"x-sentinel-agent": "t"}}, "tags": ["seen"]},
            {"id": "xss", "match": {"body_contains": "<script"}, "block": {"status": 403}, "tags": ["xss"],
             "response_headers": {"set": {"x-rule": "xss"}}},
            {"id": "late", "response_headers": {"add": {"x-late": "1"}}},
        )
        headers = agent.on_request_headers(event(cid="c", method="POST")).build()  # type: ignore[union-attr]
        self.assertEqual(headers.response_headers, [m.SetHeader("x-sentinel-agent", "t"), m.AddHeader("x-late", "1")])
        blocked = agent.on_request_body_chunk(body("c", b"<script>", 0)).build()  # type: ignore[union-attr]
        self.assertEqual(blocked.decision, m.Block(403, "Forbidden", None))
        self.assertEqual(
            blocked.response_headers,
            [m.SetHeader("x-sentinel-agent", "t"), m.AddHeader("x-late", "1"), m.SetHeader("x-rule", "xss")],
        )
        self.assertEqual(blocked.audit.rule_ids, ["mark", "late", "xss"])
        self.assertEqual(blocked.audit.tags, ["seen", "xss"])

    def test_header_rules_further_down_decide_before_the_body_comes(self) -> None:
        # The README: every rule not on the body is checked at the headers,
        # so one further down the file decides before a body rule can.
        agent = _agent(
            self,
            {"id": "on-body", "match": {"body_contains": "evil"}, "block": {"status": 403}},
            {"id": "mark", "response_headers": {"set": {"x-mark": "1"}}},
            {"id": "on-header", "match": {"header_present": "x-b"}, "block": {"status": 401}},
        )
        answer = agent.on_request_headers(event(cid="h", method="POST", headers={"x-b": ["1"]})).build()  # type: ignore[union-attr]
        self.assertEqual((answer.decision.status, answer.needs_more), (401, False))  # type: ignore[union-attr]
        agent.on_request_headers(event(cid="b", method="POST"))
        answer = agent.on_request_body_chunk(body("b", b"evil", last=True)).build()  # type: ignore[union-attr]
        self.assertEqual(answer.decision.status, 403)  # type: ignore[union-attr]
        self.assertIn(m.SetHeader("x-mark", "1"), answer.response_headers)

    def test_clean_body_is_allowed_and_forgotten(self) -> None:
        agent = _agent(self, {"id": "xss", "match": {"body_contains": "<script"}, **BLOCK})
        agent.on_request_headers(event(cid="b2", method="POST"))
        last = agent.on_request_body_chunk(body("b2", b"fine", 0, last=True)).build()  # type: ignore[union-attr]
        self.assertEqual(last.decision, m.ALLOW)
        self.assertFalse(last.needs_more)
        self.assertEqual(len(agent._bodies), 0)
        agent.on_request_headers(event(cid="b3", method="GET"))
        agent.on_request_complete(m.RequestCompleteEvent(correlation_id="b3", status=200, duration_ms=1))
        self.assertEqual(len(agent._bodies), 0)

    def test_body_tracking_is_bounded(self) -> None:
        agent = _agent(self, {"id": "x", "match": {"body_contains": "bad"}, **BLOCK})
        agent.max_tracked_bodies = 3
        for i in range(10):
            agent.on_request_headers(event(cid=f"t{i}"))
        self.assertEqual(list(agent._bodies), ["t7", "t8", "t9"])


def _agent(case: SynchronousTestCase, *tables: dict[str, Any], **top: Any) -> RulesAgent:
    path = Path(temp_path(case, "rules.json"))
    path.write_text(json.dumps({"rules": list(tables), **top}))
    return RulesAgent(path)


class ConcurrencyTests(SynchronousTestCase):
    def test_max_concurrency_is_announced_and_used(self) -> None:
        path = temp_path(self, "rules.json")
        Path(path).write_text(json.dumps({"rules": [{"id": "b", "block": True}]}))
        self.assertEqual(RulesAgent(path).capabilities("a").limits.max_concurrency, 100)
        agent = RulesAgent(path, max_concurrency=3)
        capabilities = agent.capabilities("a")
        self.assertEqual(capabilities.limits.max_concurrency, 3)
        self.assertEqual(capabilities.features.concurrent_requests, 3)
        # A connection given no limit of its own takes the agent's.
        harness = Harness(agent)
        self.assertEqual(harness.protocol.limit, 3)
        agent.reload()
        self.assertEqual(agent.capabilities("a").limits.max_concurrency, 3)

    def test_max_concurrency_must_be_positive(self) -> None:
        path = temp_path(self, "rules.json")
        Path(path).write_text(json.dumps({"rules": [{"id": "b", "block": True}]}))
        for bad in (0, -1, True, 2.5):
            error = self.assertRaises(ValueError, RulesAgent, path, max_concurrency=bad)
            self.assertIn("max_concurrency must be a positive integer", str(error))


class ActionTests(SynchronousTestCase):
    def test_block_with_status_body_and_headers(self) -> None:
        r = rules({"id": "b", "block": {"status": 451, "body": "gone", "headers": {"Retry-After": "60"}}})
        response = decide(r)
        self.assertEqual(response.decision, m.Block(451, "gone", {"retry-after": "60"}))
        self.assertEqual(response.audit.rule_ids, ["b"])

    def test_block_defaults(self) -> None:
        self.assertEqual(decide(rules({"id": "b", "block": True})).decision, m.Block(403, "Forbidden", None))
        self.assertEqual(decide(rules({"id": "b", "block": {"status": 429}})).decision.body, "Too Many Requests")  # type: ignore[attr-defined]
        r = rules({"id": "b", "block": True}, defaults={"block_status": 404, "block_body": "nope"})
        self.assertEqual(decide(r).decision, m.Block(404, "nope", None))

    def test_redirect(self) -> None:
        r = rules({"id": "r", "match": {"path": "^/old"}, "redirect": {"url": "/new", "status": 301}})
        self.assertEqual(decide(r, uri="/old/page").decision, m.Redirect("/new", 301))
        self.assertEqual(decide(rules({"id": "r", "redirect": "/x"})).decision, m.Redirect("/x", 302))

    def test_require_header(self) -> None:
        r = rules({"id": "key", "match": {"path": "^/api/"}, "require_header": {"name": "X-Api-Key", "status": 401}})
        response = decide(r, uri="/api/items")
        self.assertEqual(response.decision, m.Block(401, "Missing required header: x-api-key", None))
        self.assertEqual(decide(r, uri="/api/items", headers={"x-api-key": ["k"]}).decision, m.ALLOW)
        self.assertEqual(decide(r, uri="/public").decision, m.ALLOW)
        short = rules({"id": "key", "require_header": "authorization"})
        self.assertEqual(decide(short).decision.status, 400)  # type: ignore[attr-defined]

    def test_header_operations_accumulate_until_a_decision(self) -> None:
        r = rules(
            {"id": "mark", "response_headers": {"set": {"x-agent": "t"}, "remove": "server"}},
            {"id": "req", "request_headers": {"add": {"x-checked": "1"}, "set": {"x-user": "u"}}, "tags": ["seen"]},
            {"id": "stop", "match": {"path": "^/stop"}, "block": True},
            {"id": "after", "response_headers": {"set": {"x-after": "1"}}},
        )
        allowed = decide(r, uri="/")
        self.assertEqual(allowed.decision, m.ALLOW)
        self.assertEqual(
            allowed.response_headers,
            [m.SetHeader("x-agent", "t"), m.RemoveHeader("server"), m.SetHeader("x-after", "1")],
        )
        self.assertEqual(allowed.request_headers, [m.SetHeader("x-user", "u"), m.AddHeader("x-checked", "1")])
        self.assertEqual(allowed.audit.rule_ids, ["mark", "req", "after"])
        self.assertEqual(allowed.audit.tags, ["seen"])
        blocked = decide(r, uri="/stop")
        self.assertIsInstance(blocked.decision, m.Block)
        self.assertEqual(blocked.audit.rule_ids, ["mark", "req", "stop"])
        self.assertNotIn(m.SetHeader("x-after", "1"), blocked.response_headers)

    def test_first_decision_wins(self) -> None:
        r = rules(
            {"id": "one", "match": {"path": "^/a"}, "redirect": "/b"},
            {"id": "two", "match": {"path": "^/a"}, "block": True},
        )
        self.assertEqual(decide(r, uri="/a").decision, m.Redirect("/b", 302))

    def test_disabled_rule_is_skipped(self) -> None:
        r = rules({"id": "off", "enabled": False, "block": True})
        self.assertEqual(len(r), 0)
        self.assertEqual(decide(r).decision, m.ALLOW)


class ErrorTests(SynchronousTestCase):
    def problems(self, *tables: Any, **top: Any) -> list[str]:
        error = self.assertRaises(RulesError, parse_rules, {"rules": list(tables), **top}, "f.toml")
        self.assertTrue(all(line.startswith("f.toml: ") for line in str(error).splitlines()))
        return error.problems

    def test_each_problem_names_rule_and_reason(self) -> None:
        problems = self.problems(
            {"id": "ok", "block": True},
            {"id": "bad-regex", "match": {"path": "("}, "block": True},
            {"id": "bad-cidr", "match": {"client_ip": "10.0.0.0/33"}, "block": True},
            {"id": "typo", "mach": {}, "block": True},
            {"id": "nothing", "match": {"path": "^/"}},
            {"id": "two", "block": True, "redirect": "/x"},
            {"id": "status", "block": {"status": 700}},
            {"id": "ok", "block": True},
            {"block": True},
            {"id": "hdr", "request_headers": {"set": {"bad name": "v"}}},
            {"id": "body", "match": {"body_contains": "x"}, "request_headers": {"set": {"a": "b"}}},
            {"id": "redir", "redirect": {"url": "/x", "status": 200}},
        )
        text = "\n".join(problems)
        self.assertIn("rule 'bad-regex' (#2): match.path: invalid regular expression '('", text)
        self.assertIn("rule 'bad-cidr' (#3): match.client_ip:", text)
        self.assertIn("rule 'typo' (#4): unknown key 'mach'", text)
        self.assertIn("rule 'nothing' (#5): no action", text)
        self.assertIn("rule 'two' (#6): at most one of block, redirect, require_header", text)
        self.assertIn("rule 'status' (#7): block.status: status must be an integer from 400 to 599", text)
        self.assertIn("rule 'ok' (#8): duplicate id (first used by rule #1)", text)
        self.assertIn("rule #9: 'id' must be", text)
        self.assertIn("rule 'hdr' (#10): request_headers.set: invalid header name", text)
        self.assertIn("rule 'body' (#11): match.body_contains needs block or redirect", text)
        self.assertIn("rule 'redir' (#12): redirect.status: status must be an integer from 300 to 399", text)
        self.assertEqual(len(problems), 11)

    def test_a_block_status_outside_400_to_599_is_an_error(self) -> None:
        """
        The gateway answers C{500} in place of a block that is no client or
        server error, so such a status is a load error, not a silent C{500}
        at request time.
        """
        problems = self.problems(
            {"id": "found", "block": {"status": 302}},
            {"id": "ok", "block": {"status": 200}},
            {"id": "low", "block": {"status": 399}},
            {"id": "high", "block": {"status": 600}},
            {"id": "key", "require_header": {"name": "x-key", "status": 200}},
        )
        hint = "(a block answers with a client or server error; redirect takes 300 to 399)"
        self.assertEqual(
            problems,
            [
                f"rule 'found' (#1): block.status: status must be an integer from 400 to 599 {hint}, got 302",
                f"rule 'ok' (#2): block.status: status must be an integer from 400 to 599 {hint}, got 200",
                f"rule 'low' (#3): block.status: status must be an integer from 400 to 599 {hint}, got 399",
                f"rule 'high' (#4): block.status: status must be an integer from 400 to 599 {hint}, got 600",
                f"rule 'key' (#5): require_header.status: status must be an integer from 400 to 599 {hint}, got 200",
            ],
        )

    def test_a_default_block_status_outside_400_to_599_is_an_error(self) -> None:
        (problem,) = self.problems({"id": "b", "block": True}, defaults={"block_status": 301})
        self.assertEqual(
            problem,
            "defaults.block_status: status must be an integer from 400 to 599 "
            "(a block answers with a client or server error; redirect takes 300 to 399), got 301",
        )

    def test_block_statuses_400_and_599_compile(self) -> None:
        for status in (400, 599):
            r = rules(
                {"id": "b", "match": {"path": "^/b"}, "block": {"status": status}},
                {"id": "k", "match": {"path": "^/k"}, "require_header": {"name": "x-key", "status": status}},
                {"id": "d", "block": True},
                defaults={"block_status": status},
            )
            for path in ("/b", "/k", "/d"):
                self.assertEqual(decide(r, uri=path).decision.status, status, path)  # type: ignore[attr-defined]

    def test_a_header_name_ending_in_a_line_end_is_invalid(self) -> None:
        for name in ("x-foo\n", "x-foo\r\n", "\nx-foo"):
            (problem,) = self.problems({"id": "hdr", "request_headers": {"set": {name: "v"}}})
            self.assertIn("rule 'hdr' (#1): request_headers.set: invalid header name", problem)

    def test_unknown_keys_in_match_and_decision_tables(self) -> None:
        problems = self.problems(
            {"id": "m", "match": {"path": "^/", "paths": "^/x"}, **BLOCK},
            {"id": "b", "block": {"status": 403, "bdy": "x"}},
            {"id": "r", "redirect": {"url": "/x", "code": 301}},
            {"id": "q", "require_header": {"name": "x-key", "satus": 401}},
            {"id": "ok", "block": {"status": 403, "body": "x", "headers": {"a": "b"}}},
        )
        self.assertEqual(
            problems,
            [
                "rule 'm' (#1): match: unknown key 'paths' (known: any_header, body, body_contains, client_ip, "
                "client_ip_not, header, header_missing, header_present, method, path, query, uri)",
                "rule 'b' (#2): block: unknown key 'bdy' (known: body, headers, status)",
                "rule 'r' (#3): redirect: unknown key 'code' (known: status, url)",
                "rule 'q' (#4): require_header: unknown key 'satus' (known: body, name, status)",
            ],
        )

    def test_empty_body_contains_is_an_error(self) -> None:
        problems = self.problems(
            {"id": "e1", "match": {"body_contains": ""}, **BLOCK},
            {"id": "e2", "match": {"body_contains": ["<script", ""]}, **BLOCK},
            {"id": "e3", "match": {"body_contains": []}, **BLOCK},
        )
        self.assertEqual(len(problems), 3, problems)
        self.assertEqual(problems[0], "rule 'e1' (#1): match.body_contains: empty strings match everything")
        self.assertEqual(problems[1], "rule 'e2' (#2): match.body_contains: empty strings match everything")
        self.assertIn("rule 'e3' (#3): match.body_contains: expected a string or a non-empty list", problems[2])

    def test_body_pattern_problems(self) -> None:
        problems = self.problems(
            {"id": "both", "match": {"body": "x", "body_contains": "y"}, **BLOCK},
            {"id": "no-decision", "match": {"body": "x"}, "tags": ["t"]},
            {"id": "bad", "match": {"body": "("}, **BLOCK},
        )
        self.assertEqual(len(problems), 3, problems)
        self.assertIn("rule 'both' (#1): match: body and body_contains may be met by different chunks", problems[0])
        self.assertIn("rule 'no-decision' (#2): match.body needs block or redirect", problems[1])
        self.assertIn("rule 'bad' (#3): match.body: invalid regular expression '('", problems[2])

    def test_top_level_problems(self) -> None:
        self.assertIn("unknown key 'rule'", self.problems(rule=[])[0])
        error = self.assertRaises(RulesError, parse_rules, {"rules": {"id": "x"}}, "f.toml")
        self.assertIn("'rules' must be an array", str(error))

    def test_toml_syntax_error_names_the_file_and_line(self) -> None:
        path = temp_path(self, "rules.toml")
        Path(path).write_text('[[rules]]\nid = "x"\nblock = tru\n')
        error = self.assertRaises(RulesError, load_rules, path)
        self.assertIn(path, str(error))
        self.assertIn("invalid TOML", str(error))
        self.assertIn("line 3", str(error))

    def test_json_rules_and_json_errors(self) -> None:
        path = temp_path(self, "rules.json")
        Path(path).write_text(json.dumps({"rules": [{"id": "j", "block": True}]}))
        self.assertEqual(len(load_rules(path)), 1)
        Path(path).write_text("{")
        self.assertIn("invalid JSON", str(self.assertRaises(RulesError, load_rules, path)))

    def test_a_method_that_is_no_token_is_an_error(self) -> None:
        # No request with such a method reaches the rules: the rule (or,
        # for "GET POST", the whole rule) would silently never match.
        problems = self.problems(
            {"id": "empty", "match": {"method": ""}, **BLOCK},
            {"id": "two", "match": {"method": "GET POST"}, **BLOCK},
            {"id": "space", "match": {"method": ["GET", " PUT"]}, **BLOCK},
            {"id": "ok", "match": {"method": ["get", "PURGE", "M-SEARCH"]}, **BLOCK},
        )
        self.assertEqual(
            problems,
            [
                "rule 'empty' (#1): match.method: invalid method \"\" (a method is an HTTP token, as GET or PURGE)",
                "rule 'two' (#2): match.method: invalid method \"GET POST\" (a method is an HTTP token, as GET or PURGE)",
                "rule 'space' (#3): match.method: invalid method \" PUT\" (a method is an HTTP token, as GET or PURGE)",
            ],
        )

    def test_an_empty_header_table_is_an_error(self) -> None:
        # It was no condition: "block every request" for a rule meant to
        # look at some header.
        problems = self.problems({"id": "h", "match": {"path": "^/api/", "header": {}}, **BLOCK})
        self.assertEqual(problems, ['rule \'h\' (#1): match.header: no header named (give name = "regex")'])

    def test_a_string_that_is_no_text_is_an_error(self) -> None:
        # JSON's "\ud800" is a lone surrogate: body_contains failed with a
        # UnicodeEncodeError, a tag or a header value could not be sent.
        path = temp_path(self, "rules.json")
        Path(path).write_text(
            '{"rules": [{"id": "a", "match": {"body_contains": "\\ud800"}, "block": true},'
            ' {"id": "b", "tags": ["ok", "x\\udcff"]}]}'
        )
        error = self.assertRaises(RulesError, load_rules, path)
        self.assertEqual(
            error.problems,
            [
                'rules[0].match.body_contains: "\\ud800" holds a lone surrogate, which is not text',
                'rules[1].tags[1]: "x\\udcff" holds a lone surrogate, which is not text',
            ],
        )

    def test_a_json_key_given_twice_is_an_error(self) -> None:
        # json.loads keeps the last: the first "rules" went without a word.
        path = temp_path(self, "rules.json")
        Path(path).write_text('{"rules": [{"id": "a", "block": true}], "rules": []}')
        error = self.assertRaises(RulesError, load_rules, path)
        self.assertEqual(error.problems, ['invalid JSON: the key "rules" appears twice in one object'])

    def test_a_file_nested_too_deeply_is_an_error(self) -> None:
        # The parsers raised RecursionError, a traceback at start-up.
        for name, text, problem in [
            ("rules.json", "[" * 100_000, "invalid JSON: arrays or objects nested too deeply"),
            ("rules.toml", "x = " + "[" * 100_000, "invalid TOML: arrays or tables nested too deeply"),
            ("deep.json", '{"rules": [{"id": "a", "tags": ' + "[" * 100 + "]" * 100 + "}]}",
             "rules[0].tags" + "[0]" * 29 + ": tables and arrays nested more than 32 deep"),
        ]:
            path = temp_path(self, name)
            Path(path).write_text(text)
            self.assertEqual(self.assertRaises(RulesError, load_rules, path).problems, [problem])

    def test_missing_file(self) -> None:
        error = self.assertRaises(RulesError, load_rules, "/nonexistent/rules.toml")
        self.assertIn("/nonexistent/rules.toml: cannot read the rules file", str(error))

    def test_example_rules_load_and_behave(self) -> None:
        r = load_rules(EXAMPLE)
        self.assertEqual(decide(r, uri="/admin").decision.status, 403)  # type: ignore[attr-defined]
        self.assertEqual(decide(r, uri="/items?id=1'%20OR%20'1'='1").decision.status, 403)  # type: ignore[attr-defined]
        self.assertEqual(decide(r, uri="/items?id=1 UNION SELECT password FROM users").decision.status, 403)  # type: ignore[attr-defined]
        self.assertEqual(decide(r, uri="/", headers={"user-agent": ["sqlmap/1.7"]}).decision.status, 403)  # type: ignore[attr-defined]
        self.assertEqual(decide(r, uri="/old/x").decision, m.Redirect("/new", 301))
        ok = decide(r, uri="/items?id=42", headers={"user-agent": ["curl/8.5.0"]})
        self.assertEqual(ok.decision, m.ALLOW)
        self.assertIn(m.SetHeader("x-sentinel-agent", "sentinel-twisted"), ok.response_headers)


class LinearTimeMatchingTests(_DecisionTestCase):
    """
    Rule patterns are RE2: no pattern makes matching backtrack.  With
    Python's C{re} the first test below does not finish (forty repetitions
    of C{" /* */"} already take longer than twenty seconds).
    """

    def setUp(self) -> None:
        # A backtracking engine would make the tests below hang, not fail:
        # make sure of the engine first.
        pattern = rules({"id": "p", "match": {"path": "^/"}, **BLOCK}).rules[0].path
        self.assertNotIsInstance(pattern, re.Pattern)
        self.assertEqual(type(pattern).__module__, "re2")

    def test_a_pattern_that_backtracks_in_re_is_linear(self) -> None:
        r = rules({"id": "nested", "match": {"query": "( |/\\*.*\\*/)+x$"}, **BLOCK})
        self.assertAllowed(r, uri="/?" + " /* */" * 4000)
        self.assertBlocked(r, uri="/?" + " /* */" * 4000 + "x")

    def test_the_example_sqli_rule_on_a_hostile_query(self) -> None:
        r = load_rules(EXAMPLE)
        hostile = "/items?q=union" + "%20/*%20*/" * 4000 + "%20x"
        self.assertEqual(decide(r, uri=hostile).decision, m.ALLOW)
        attack = "/items?q=union" + "%20/*%20*/" * 4000 + "%20select%201"
        self.assertEqual(decide(r, uri=attack).decision.status, 403)  # type: ignore[attr-defined]

    def test_lookaround_and_backreferences_are_load_errors(self) -> None:
        for pattern, reason in [
            ("^/(?!public)", "invalid perl operator: (?!"),
            ("(?<=/)admin", "invalid perl operator: (?<"),
            ("(a)\\1", "invalid escape sequence: \\1"),
        ]:
            error = self.assertRaises(
                RulesError, parse_rules, {"rules": [{"id": "r", "match": {"path": pattern}, **BLOCK}]}, "f.toml"
            )
            self.assertIn(f"rule 'r' (#1): match.path: invalid regular expression {pattern!r}: {reason}", str(error))


class ReloadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = temp_path(self, "rules.toml")
        self.write('[[rules]]\nid = "a"\nmatch = { path = "^/a" }\nblock = true\n')
        self.agent = RulesAgent(self.path)

    def write(self, text: str) -> None:
        Path(self.path).write_text(textwrap.dedent(text))

    def status_of(self, uri: str) -> Any:
        decision = self.agent.on_request_headers(event(uri=uri)).build().decision  # type: ignore[union-attr]
        return getattr(decision, "status", "allow")

    def test_reload_applies_new_rules(self) -> None:
        self.write('[[rules]]\nid = "b"\nmatch = { path = "^/b" }\nblock = { status = 410 }\n')
        self.assertTrue(self.agent.reload())
        self.assertEqual(self.status_of("/a"), "allow")
        self.assertEqual(self.status_of("/b"), 410)

    def test_bad_file_keeps_the_old_rules(self) -> None:
        self.write('[[rules]]\nid = "b"\nmatch = { path = "(" }\nblock = true\n')
        self.assertFalse(self.agent.reload())
        self.assertEqual(self.status_of("/a"), 403)
        self.write("this is not toml [")
        self.assertFalse(self.agent.reload())
        os.unlink(self.path)
        self.assertFalse(self.agent.reload())
        self.assertEqual(self.status_of("/a"), 403)

    def test_start_up_error_is_raised(self) -> None:
        self.write('[[rules]]\nid = "b"\nblock = { status = "x" }\n')
        error = self.assertRaises(RulesError, RulesAgent, self.path)
        self.assertIn(f"{self.path}: rule 'b' (#1): block.status", str(error))


class DecisionLogTests(SynchronousTestCase):
    """The line a rule decision logs quotes the proxy's text cut short and escaped."""

    HOSTILE = "\x1b[2J\n2026-01-01T00:00:00+0000 [sentinel_twisted#critical] forged\u2028"
    #: A method of 100,000 characters (a token: one that is not is refused
    #: before any rule sees it), and a client address as long as one may be.
    LONG_METHOD = "X" * 100_000
    CLIENT = ("1" + HOSTILE)[:61]

    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def lines(self) -> list[str]:
        return [formatEvent(e) for e in self.events]

    def assert_safe(self, lines: list[str], needle: str) -> None:
        chosen = [line for line in lines if needle in line]
        self.assertTrue(chosen, lines)
        for line in chosen:
            self.assertLess(len(line), 2000)
            for bad in ("\x1b", "\n", "\u2028"):
                self.assertNotIn(bad, line)
            self.assertIn("\\x1b", line)

    def test_a_block_by_headers(self) -> None:
        agent = _agent(self, {"id": "b", "match": {"path": "^/admin"}, "block": True}, **NO_REQUEST_BOUNDS)
        hostile = self.HOSTILE + "x" * 100_000
        agent.on_request_headers(
            event(cid="c" + hostile, uri="/admin?" + hostile, method="GET" + self.LONG_METHOD, client_ip=self.CLIENT)
        )
        self.assert_safe(self.lines(), "Rule b blocked")

    def test_a_block_by_body(self) -> None:
        agent = _agent(self, {"id": "xss", "match": {"body": "<script"}, "block": True}, **NO_REQUEST_BOUNDS)
        hostile = self.HOSTILE + "x" * 100_000
        cid = "c" + hostile
        agent.on_request_headers(
            event(cid=cid, uri="/?" + hostile, method="POST" + self.LONG_METHOD, client_ip=self.CLIENT, headers={})
        )
        agent.on_request_body_chunk(body(cid, b"<script>", last=True))
        self.assert_safe(self.lines(), "Rule xss blocked")

    def test_an_uninspectable_body(self) -> None:
        agent = _agent(self, {"id": "xss", "match": {"body": "<script"}, "block": True}, **NO_REQUEST_BOUNDS)
        hostile = self.HOSTILE + "x" * 100_000
        cid = "c" + hostile
        coding = ", ".join(["x" + self.HOSTILE] * 2000)
        agent.on_request_headers(
            event(
                cid=cid, uri="/?" + hostile, method="POST", client_ip=self.CLIENT,
                headers={"content-encoding": [coding]},
            )
        )
        agent.on_request_body_chunk(body(cid, b"data", last=True))
        self.assert_safe(self.lines(), "cannot be inspected")


class PercentDecodingTests(SynchronousTestCase):
    """The rules' percent-decoding: urllib's result, without its cost on long texts."""

    def test_same_as_urllib(self) -> None:
        import random
        from urllib.parse import unquote, unquote_plus

        from sentinel_twisted.agent.rules._model import percent_decoded

        pieces = ["%", "%4", "%41", "%C3", "%A9", "%E2%82%AC", "%e2%82", "%80", "%FF", "%F0%9F%98", "%G1",
                  "a", "+", "é", "\U0001f600", "/", ";", "%%", "%2", "%zz", "\x00", "%00", "%ED%A0%80", "%C0%AF"]
        rng = random.Random(7)
        for _ in range(400):
            text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 40))) * rng.choice([1, 150])
            self.assertEqual(percent_decoded(text), unquote(text), text[:100])
            self.assertEqual(percent_decoded(text, plus=True), unquote_plus(text), text[:100])
        # Runs of escapes longer than one match, whose characters' bytes
        # straddle two matches.
        for text in ("%E2%82%AC" * 2000, "%F0%9F%98%80" * 1500 + "a" + "%41" * 5000, "x%C3%A9" * 3000):
            self.assertEqual(percent_decoded(text), unquote(text), text[:100])

    def test_long_texts_cost_memory_in_proportion(self) -> None:
        # urllib splits a text at every "%": a URI of a million escapes
        # became a million strings (hundreds of megabytes for a 16 MiB
        # event, seconds of the reactor's time).
        import tracemalloc

        from sentinel_twisted.agent.rules._model import percent_decoded

        for text in ("%41" * 1_000_000, "+%2" * 1_000_000, "%E2%82%AC" * 300_000):
            tracemalloc.start()
            try:
                percent_decoded(text, plus=True)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            self.assertLess(peak, 8 * len(text), text[:9])


def _normalized_as_before(path: str) -> str:
    """What the rules made of a path with C{posixpath.normpath} whole: the reference."""
    import posixpath

    if not path:
        return "/"
    collapsed = re.sub(r"/{2,}", "/", path)
    normalized = posixpath.normpath(collapsed)
    if normalized == ".":
        normalized = "/"
    directory = collapsed.endswith("/") or collapsed.rpartition("/")[2] in (".", "..")
    if directory and not normalized.endswith("/"):
        normalized += "/"
    return normalized


def _peak_of(function: Any, *args: Any) -> tuple[int, Any]:
    """
    The most memory Python allocated at once while C{function(*args)} ran,
    and what it returned.
    """
    import tracemalloc

    tracemalloc.start()
    try:
        result = function(*args)
        return tracemalloc.get_traced_memory()[1], result
    finally:
        tracemalloc.stop()


class PathNormalisationTests(_DecisionTestCase):
    """
    Paths are normalised piece by piece: the same paths as with
    C{posixpath.normpath} on the whole path, at a cost in memory in
    proportion to the path (a string per segment made a 4 MiB path of
    C{/a;b} cost 75 MB).
    """

    PIECES = ["/", "//", ".", "..", "...", "a", "bc", ";", ";x", ";/", "..;", ".;", "%2e", "é",
              "\U0001f600", "a.", ".a", "?", ":"]

    def assertNormalizedAsBefore(self, path: str) -> None:
        from sentinel_twisted.agent.rules._model import _normalize_path

        self.assertEqual(_normalize_path(path), _normalized_as_before(path), path[:100])
        without_parameters = re.sub(r";[^/]*", "", path)
        self.assertEqual(
            _normalize_path(path, drop_parameters=True), _normalized_as_before(without_parameters), path[:100]
        )

    def test_the_same_paths_as_normalising_them_whole(self) -> None:
        import random

        from sentinel_twisted.agent.rules import _model

        rng = random.Random(11)
        # Pieces of a few characters make every place a piece may end in
        # (a dot segment, a parameter, a run of slashes, a ".." that
        # takes segments off several pieces before it) come up.
        for size in (1, 2, 3, 5, 8, 8192):
            self.patch(_model, "_PATH_PIECE", size)
            for _ in range(1500):
                path = "".join(rng.choice(self.PIECES) for _ in range(rng.randint(0, 25)))
                self.assertNormalizedAsBefore(path)
                self.assertNormalizedAsBefore("/" + path)

    def test_long_and_deep_paths(self) -> None:
        # Longer than a piece: ".." segments that climb back over many
        # pieces, relative paths that climb above their start, segments
        # longer than a piece, runs of slashes across pieces.
        for path in [
            "/a" * 50_000 + "/.." * 50_000 + "/admin",
            "/a" * 50_000 + "/.." * 49_999 + "/",
            "/" + "/b;x/c/." * 20_000 + "/.." * 30_000,
            "../" * 40_000 + "a/b",
            "x/" * 10_000 + "../" * 30_000 + "y",
            "/" + "z" * 100_000 + "/..",
            "/x/" + "z" * 100_000 + "/y/../..;/",
            "/" * 100_000 + "a" + "/" * 100_000 + "." + "/" * 100_000,
            ";p/" + "q/" * 10_000 + "..;/" * 10_001 + "admin",
        ]:
            self.assertNormalizedAsBefore(path)

    def test_hostile_paths_cost_memory_in_proportion(self) -> None:
        # Rules on every view of the target, so each view is made and
        # searched.
        r = rules(
            {"id": "p", "match": {"path": "^/admin(/|$)"}, **BLOCK},
            {"id": "u", "match": {"uri": "x$"}, **BLOCK},
            {"id": "q", "match": {"query": "union"}, **BLOCK},
            **NO_REQUEST_BOUNDS,
        )

        def decision(request: m.RequestHeadersEvent) -> m.Decision:
            return r.evaluate(request).response.build().decision

        size = 4 * 1024 * 1024
        for uri in [
            "/a/." * (size // 4),
            "/a;b" * (size // 4),
            "/ab/cd/../.." * (size // 12) + "/admin",
            "http://h" + "//ab" * (size // 4) + "?q",
            "/\u20ac;/." * (size // 5),
        ]:
            request = event(uri=uri)
            peak, decided = _peak_of(decision, request)
            # The URI's own size: a character is 2 bytes in "\u20ac" text.
            self.assertLess(peak, 4 * sys.getsizeof(request.uri), uri[:20])
            self.assertIsInstance(decided, m.Block if uri.endswith("/admin") else m.Allow, uri[:20])


class AbsoluteFormTargetTests(_DecisionTestCase):
    """
    An absolute-form target (C{http://host/admin}) is split as urllib
    splits it, without urllib's refusals and without its cache.
    """

    def test_split_as_urllib_splits_it(self) -> None:
        import random
        from urllib.parse import urlsplit

        from sentinel_twisted.agent.rules._model import _target_parts

        pieces = ["http:", "HTTPS:", "x+y.z-1:", "1a:", ":", "//", "/", "?", "#", "a", "@", " ", "\t",
                  "\n", "\x00", "%2F", ";", "..", "é"]
        # Python 3.10 takes a scheme that does not start with a letter
        # too (RFC 3986 section 3.1 does not, nor does Python 3.11).
        letter_first = sys.version_info < (3, 11)
        rng = random.Random(5)
        compared = 0
        for _ in range(20_000):
            uri = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
            if uri.startswith("/") or (letter_first and not ("a" <= uri[0].lower() <= "z")):
                continue
            parts = urlsplit(uri)
            self.assertEqual(_target_parts(uri), (parts.path, parts.query), repr(uri))
            compared += 1
        self.assertGreater(compared, 4_000)

    def test_a_host_urllib_refuses_does_not_fail_the_event(self) -> None:
        # urlsplit raises ValueError on these: the event failed, and with
        # --fail-open the request went on unjudged.
        r = rules({"id": "p", "match": {"path": "^/admin(/|$)"}, **BLOCK})
        for uri in ["http://[/admin", "http://[::1/admin", "http://a]/admin", "http://[x]/admin",
                    "http://x\u2100/admin", "https://\uff03@x/admin?q"]:
            self.assertBlocked(r, uri=uri)
        self.assertAllowed(r, uri="http://[/public")

    def test_nothing_is_remembered(self) -> None:
        # urlsplit caches the last 128 URLs it split (20 on Python 3.10),
        # with their parts: as many events of 16 MiB, and a copy of each.
        r = rules({"id": "p", "match": {"path": "^/admin(/|$)"}, **BLOCK}, **NO_REQUEST_BOUNDS)
        requests = [event(uri=f"http://h{i}/" + "a" * 1024 * 1024) for i in range(3)]

        def evaluate() -> None:
            for request in requests:
                r.evaluate(request)

        import tracemalloc

        tracemalloc.start()
        try:
            evaluate()
            left = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        self.assertLess(left, 1024 * 1024)
