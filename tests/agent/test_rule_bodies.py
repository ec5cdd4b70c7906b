"""
Body rules match a request body as an upstream may decode it: inflated
(C{Content-Encoding: gzip}, C{deflate}), and a JSON document in UTF-16 or
UTF-32 as text, whatever its Content-Type; a body they cannot decode is
refused, or let through by the rules file's C{[body]} policy.
"""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path
from typing import Any

from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from sentinel_twisted import messages as m
from sentinel_twisted.agent import RulesAgent, RulesError, parse_rules
from sentinel_twisted.agent.rules._decode import INFLATE_PIECE, BodyPolicy, Inflater, json_charset

from ._support import headers_event, temp_path
from .test_rules import NO_REQUEST_BOUNDS, body, event

DOC = '{"comment": "<script>alert(1)</script>"}'
BENIGN = '{"comment": "a <b>bold</b> remark, no scripts"}'
XSS = {"id": "xss-body", "match": {"body": "(?i)<script"}, "block": {"status": 403, "body": "Request blocked"}}
NEEDLE = {"id": "needle", "match": {"body_contains": "<script"}, "block": True}


def _agent(case: SynchronousTestCase, *tables: dict[str, Any], **top: Any) -> RulesAgent:
    path = Path(temp_path(case, "rules.json"))
    path.write_text(json.dumps({"rules": list(tables or [XSS]), **top}))
    return RulesAgent(path)


def _send(
    agent: RulesAgent,
    data: bytes,
    headers: dict[str, list[str]] | None = None,
    size: int | None = None,
    cid: str = "c",
) -> m.AgentResponse:
    """The answer that decides on C{data} sent in chunks of C{size} bytes (all at once: C{None})."""
    first = agent.on_request_headers(event(cid=cid, method="POST", headers=headers or {})).build()  # type: ignore[union-attr]
    assert first.needs_more
    step = size or max(len(data), 1)
    chunks = [data[i : i + step] for i in range(0, len(data), step)] or [b""]
    for index, chunk in enumerate(chunks):
        answer = agent.on_request_body_chunk(body(cid, chunk, index, last=index == len(chunks) - 1)).build()  # type: ignore[union-attr]
        if not isinstance(answer.decision, m.Allow):
            break
    return answer  # type: ignore[no-any-return]


JSON_TYPE = {"content-type": ["application/json"]}


class CharsetTests(SynchronousTestCase):
    def test_utf16_and_utf32_json_is_matched_as_text(self) -> None:
        agent = _agent(self)
        for encoding in ("utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be", "utf-8-sig"):
            # json.loads(bytes) reads every one of these as the document.
            self.assertEqual(json.loads(DOC.encode(encoding)), json.loads(DOC))
            for size in (None, 1, 3):
                answer = _send(agent, DOC.encode(encoding), JSON_TYPE, size)
                self.assertIsInstance(answer.decision, m.Block, (encoding, size))
                self.assertEqual(answer.audit.rule_ids, ["xss-body"])

    def test_utf16_json_escapes_and_body_contains(self) -> None:
        escaped = DOC.replace("<", "\\u003c")
        for agent in (_agent(self), _agent(self, NEEDLE)):
            for encoding in ("utf-16-le", "utf-32"):
                # No Content-Type, and a type that is not JSON: the zero bytes tell.
                for headers in ({}, {"content-type": ["text/plain"]}):
                    data = (escaped if agent.ruleset.rules[0].body is not None else DOC).encode(encoding)
                    answer = _send(agent, data, headers)
                    self.assertIsInstance(answer.decision, m.Block, (encoding, headers))

    def test_json_escapes_are_decoded_whatever_the_content_type(self) -> None:
        agent = _agent(self)
        escaped = DOC.replace("<", "\\u003c").encode()
        for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/octet-stream"):
            for data in (escaped, b"\r\n " + escaped, b"\xef\xbb\xbf" + escaped, b'["\\u003cscript>"]', b'"\\u003cscript>"'):
                answer = _send(agent, data, {"content-type": [content_type]})
                self.assertIsInstance(answer.decision, m.Block, (content_type, data))

    def test_benign_utf16_json_is_allowed(self) -> None:
        agent = _agent(self)
        for encoding in ("utf-16", "utf-16-le", "utf-32"):
            for size in (None, 1):
                answer = _send(agent, BENIGN.encode(encoding), JSON_TYPE, size)
                self.assertEqual(answer.decision, m.ALLOW, encoding)
                self.assertFalse(answer.needs_more)
        self.assertEqual(len(agent._bodies), 0)
        # Text that is not JSON keeps its escapes.
        answer = _send(agent, b"note=\\u003cscript>", {"content-type": ["text/plain"]})
        self.assertEqual(answer.decision, m.ALLOW)

    def test_json_charset_detection(self) -> None:
        for encoding in ("utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"):
            self.assertEqual(json_charset('{"a"'.encode(encoding)[:4]), encoding)
            self.assertEqual(json_charset(" {".encode(encoding)[:4]), encoding)
        self.assertEqual(json_charset("{".encode("utf-16-le")), "utf-16-le")
        self.assertEqual(json_charset("1".encode("utf-16-be")), "utf-16-be")
        self.assertEqual(json_charset(b'{"a"'), "utf-8")
        self.assertEqual(json_charset(b"{"), "utf-8")


def _deflate_raw(data: bytes) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    return packer.compress(data) + packer.flush()


class ContentCodingTests(SynchronousTestCase):
    def test_compressed_bodies_are_inflated(self) -> None:
        agent = _agent(self)
        doc = DOC.encode()
        for coding, data in [
            ("gzip", gzip.compress(doc)),
            ("x-gzip", gzip.compress(doc)),
            ("GZip", gzip.compress(doc)),
            ("deflate", zlib.compress(doc)),
            ("deflate", _deflate_raw(doc)),
            # Two gzip members: gzip (and Node's zlib) read both.
            ("gzip", gzip.compress(b'{"a": "harmless"}') + gzip.compress(doc)),
            ("gzip", gzip.compress(DOC.encode("utf-16"))),
            ("gzip", gzip.compress(DOC.replace("<", "\\u003c").encode())),
            ("identity, gzip", gzip.compress(doc)),
        ]:
            for size in (None, 1, 7):
                answer = _send(agent, data, {"content-encoding": [coding], **JSON_TYPE}, size)
                self.assertIsInstance(answer.decision, m.Block, (coding, data, size))
                self.assertEqual(answer.audit.rule_ids, ["xss-body"])
        needle = _agent(self, NEEDLE)
        answer = _send(needle, gzip.compress(doc), {"content-encoding": ["gzip"]}, 5)
        self.assertEqual(answer.audit.rule_ids, ["needle"])

    def test_benign_compressed_bodies_are_allowed(self) -> None:
        agent = _agent(self)
        for coding, data in [
            ("gzip", gzip.compress(BENIGN.encode())),
            ("deflate", zlib.compress(BENIGN.encode())),
            ("gzip", gzip.compress(BENIGN.encode("utf-16"))),
            # Well compressed, but within the bounds.
            ("gzip", gzip.compress(b'{"pad": "' + b" " * 900_000 + b'"}')),
            ("gzip", b""),
        ]:
            for size in (None, 2):
                answer = _send(agent, data, {"content-encoding": [coding]}, size)
                self.assertEqual(answer.decision, m.ALLOW, (coding, size))
                self.assertFalse(answer.needs_more)
        self.assertEqual(len(agent._bodies), 0)

    def test_a_match_across_pieces_of_the_inflated_body(self) -> None:
        agent = _agent(self)
        # The payload straddles the first piece of inflated output.
        data = b"x" * (INFLATE_PIECE - 3) + DOC.encode()
        answer = _send(agent, gzip.compress(data), {"content-encoding": ["gzip"]})
        self.assertIsInstance(answer.decision, m.Block)


class BoundTests(SynchronousTestCase):
    def test_a_decompression_bomb_stops_at_the_size_bound(self) -> None:
        bomb = gzip.compress(b" " * (64 * 1024 * 1024) + DOC.encode())
        agent = _agent(self, body={"max_inflated_size": 200_000, "max_inflate_ratio": 100_000})
        answer = _send(agent, bomb, {"content-encoding": ["gzip"]}, 4096)
        self.assertEqual(answer.decision, m.Block(413, "Request body cannot be inspected: "
                                                  "the request body inflates past 200000 bytes", None))
        self.assertEqual(answer.audit.reason_codes, ["body_inflate_limit"])
        self.assertEqual(answer.audit.tags, ["body-uninspectable"])
        self.assertEqual(len(agent._bodies), 0)

    def test_the_inflater_produces_at_most_the_bound_in_bounded_pieces(self) -> None:
        bomb = gzip.compress(b"\0" * (32 * 1024 * 1024))
        inflater = Inflater("gzip", BodyPolicy(max_inflated_size=300_000, max_inflate_ratio=10**9))
        pieces = list(inflater.feed(bomb))
        self.assertLessEqual(max(map(len, pieces)), INFLATE_PIECE)
        self.assertLessEqual(sum(map(len, pieces)), 300_000 + 1)
        self.assertIsNotNone(inflater.failure)
        self.assertEqual(list(inflater.feed(bomb)), [])

    def test_the_ratio_bound(self) -> None:
        # 4 MiB from about 4 KiB: within the default size bound, past the ratio.
        bomb = gzip.compress(b"\0" * (4 * 1024 * 1024))
        answer = _send(_agent(self), bomb, {"content-encoding": ["gzip"]}, 1024)
        self.assertEqual(answer.decision.status, 413)  # type: ignore[union-attr]
        self.assertIn("inflates more than 100 times", answer.decision.body)  # type: ignore[union-attr]
        loose = _agent(self, body={"max_inflate_ratio": 10_000})
        self.assertEqual(_send(loose, bomb, {"content-encoding": ["gzip"]}, 1024).decision, m.ALLOW)


    def test_compressed_bodies_inflated_at_once_are_bounded(self) -> None:
        agent = _agent(self)
        agent.max_inflating_bodies = 2
        gzipped = {"content-encoding": ["gzip"]}
        for cid in ("a", "b", "c"):
            agent.on_request_headers(event(cid=cid, method="POST", headers=gzipped))
        self.assertEqual(agent._inflating, {"a", "b"})
        answer = agent.on_request_body_chunk(body("c", gzip.compress(BENIGN.encode()), 0, last=True)).build()  # type: ignore[union-attr]
        self.assertEqual(answer.decision.status, 503)  # type: ignore[union-attr]
        self.assertEqual(answer.audit.reason_codes, ["body_inflate_busy"])
        # A body without a content coding is not held back.
        self.assertEqual(_send(agent, BENIGN.encode(), cid="plain").decision, m.ALLOW)
        # A finished body frees its place, and so does one forgotten.
        agent.on_request_body_chunk(body("a", gzip.compress(BENIGN.encode()), 0, last=True))
        agent.on_request_complete(m.RequestCompleteEvent(correlation_id="b", status=200, duration_ms=1))
        self.assertEqual(agent._inflating, set())
        self.assertIsInstance(_send(agent, gzip.compress(DOC.encode()), gzipped, cid="d").decision, m.Block)
        agent.max_inflating_bodies, agent.max_tracked_bodies = 10, 2
        for cid in ("e", "f", "g"):
            agent.on_request_headers(event(cid=cid, method="POST", headers=gzipped))
        self.assertEqual(agent._inflating, {"f", "g"})


class UninspectableTests(SynchronousTestCase):
    def test_unsupported_codings_are_blocked_by_default(self) -> None:
        agent = _agent(self)
        for value, shown in [
            (["br"], "an unsupported content coding (br)"),
            (["zstd"], "an unsupported content coding (zstd)"),
            (["gzip, br"], "stacked content codings (gzip, br)"),
            (["gzip", "gzip"], "stacked content codings (gzip, gzip)"),
        ]:
            answer = _send(agent, b"\x0b\x02\x80hello", {"content-encoding": value})
            self.assertEqual(answer.decision, m.Block(415, f"Request body cannot be inspected: request body has {shown}", None))
            self.assertEqual(answer.audit.reason_codes, ["body_coding_unsupported"])
        # An empty body has nothing to inspect.
        self.assertEqual(_send(agent, b"", {"content-encoding": ["br"]}).decision, m.ALLOW)

    def test_a_long_content_encoding_costs_little_and_is_named_short(self) -> None:
        # A header of a million codings (or one coding of a million
        # characters) is read no further than it takes to know the body
        # cannot be decoded, and the refusal names the first few, cut.
        from sentinel_twisted.agent.rules._decode import content_codings

        many = {"content-encoding": ["x," * 1_000_000]}
        self.assertLessEqual(len(content_codings(many)), 10)
        self.assertLessEqual(len(content_codings({"content-encoding": ["gzip"] * 1_000_000})), 10)
        agent = _agent(self, **NO_REQUEST_BOUNDS)
        for headers in (many, {"content-encoding": ["z" * 1_000_000]}, {"content-encoding": ["a,b", "z" * 100_000] * 5}):
            answer = _send(agent, b"data", headers)
            self.assertEqual(answer.decision.status, 415)  # type: ignore[union-attr]
            self.assertLess(len(answer.decision.body), 1000)  # type: ignore[union-attr]
        answer = _send(agent, b"data", {"content-encoding": ["gzip, " * 20]})
        self.assertEqual(
            answer.decision.body,  # type: ignore[union-attr]
            "Request body cannot be inspected: request body has stacked content codings "
            "(gzip, gzip, gzip, gzip, gzip, gzip, gzip, gzip, ...)",
        )

    def test_corrupt_and_truncated_streams_are_blocked_by_default(self) -> None:
        agent = _agent(self)
        whole = gzip.compress(BENIGN.encode())
        for data, reason in [
            (BENIGN.encode(), "not a valid gzip stream"),
            (whole[: len(whole) // 2], "ends early"),
            (whole + b"trailing", "data after its gzip stream"),
        ]:
            for size in (None, 3):
                answer = _send(agent, data, {"content-encoding": ["gzip"]}, size)
                self.assertEqual(answer.decision.status, 400, (data, size))  # type: ignore[union-attr]
                self.assertIn(reason, answer.decision.body)  # type: ignore[union-attr]
                self.assertEqual(answer.audit.reason_codes, ["body_coding_corrupt"])

    def test_the_allow_policy_lets_them_through_still_matching_what_it_can(self) -> None:
        agent = _agent(self, body={"uninspectable": "allow", "max_inflated_size": 100_000})
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for coding, data in [
            ("br", b"\x0b\x02\x80hello"),
            ("gzip", b"not gzip"),
            ("gzip", gzip.compress(b" " * 1_000_000 + DOC.encode())),
        ]:
            answer = _send(agent, data, {"content-encoding": [coding]}, 1000)
            self.assertEqual(answer.decision, m.ALLOW, coding)
        self.assertEqual(len([e for e in events if "not fully inspected" in e.get("log_format", "")]), 3)
        # What is sent, and what was inflated before the bound, is still matched.
        self.assertIsInstance(_send(agent, DOC.encode(), {"content-encoding": ["br"]}).decision, m.Block)
        early = gzip.compress(DOC.encode() + b" " * 1_000_000)
        self.assertIsInstance(_send(agent, early, {"content-encoding": ["gzip"]}).decision, m.Block)

    def test_a_block_for_an_uninspectable_body_carries_the_header_phase(self) -> None:
        agent = _agent(self, {"id": "mark", "response_headers": {"set": {"x-seen": "1"}}, "tags": ["seen"]}, XSS)
        answer = _send(agent, b"data", {"content-encoding": ["br"]})
        self.assertEqual(answer.response_headers, [m.SetHeader("x-seen", "1")])
        self.assertEqual(answer.audit.rule_ids, ["mark"])
        self.assertEqual(answer.audit.tags, ["seen", "body-uninspectable"])


class PolicyFileTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        self.assertEqual(parse_rules({"rules": []}).body, BodyPolicy("block", 10 * 1024 * 1024, 100))
        policy = parse_rules({"rules": [], "body": {"uninspectable": "allow", "max_inflated_size": 5, "max_inflate_ratio": 7}}).body
        self.assertEqual(policy, BodyPolicy("allow", 5, 7))

    def test_problems_are_reported(self) -> None:
        for table, problem in [
            ({"uninspectable": "maybe"}, 'body.uninspectable: expected "block" or "allow", got "maybe"'),
            ({"max_inflated_size": 0}, "body.max_inflated_size: expected a positive integer, got 0"),
            ({"max_inflate_ratio": True}, "body.max_inflate_ratio: expected a positive integer, got true"),
            ({"size": 1}, "body: unknown key 'size'"),
            ("block", 'body: expected a table, got "block"'),
        ]:
            error = self.assertRaises(RulesError, parse_rules, {"rules": [], "body": table}, "f.toml")
            self.assertIn(problem, str(error), table)


def _memory_kept(agent: RulesAgent, frames: list[bytes]) -> int:
    """
    The bytes still allocated after C{agent} has been handed the
    RequestHeaders events in C{frames}, each decoded (and let go) as it
    comes, as the proxy sends them.
    """
    import gc
    import tracemalloc

    gc.collect()
    tracemalloc.start()
    try:
        for frame in frames:
            agent.on_request_headers(m.decode(frame, m.RequestHeadersEvent))
        gc.collect()
        kept, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return kept


class EvictionTests(SynchronousTestCase):
    """More requests awaiting a body scan than remembered: the oldest's chunks are not let through unchecked."""

    def test_a_pushed_out_body_gets_the_policy_answer(self) -> None:
        agent = _agent(self)
        agent.max_tracked_bodies = 2
        for cid in ("a", "b", "c"):
            agent.on_request_headers(event(cid=cid, method="POST", headers={}))
        self.assertEqual(list(agent._bodies), ["b", "c"])
        answer = agent.on_request_body_chunk(body("a", DOC.encode(), 0, last=True)).build()  # type: ignore[union-attr]
        self.assertEqual(answer.decision.status, 503)  # type: ignore[union-attr]
        self.assertEqual(answer.audit.reason_codes, ["body_scan_evicted"])
        # Answered once: it is forgotten then, as a RequestComplete forgets it.
        self.assertEqual(agent._evicted, {})
        # The others are scanned as before.
        self.assertIsInstance(_send(agent, DOC.encode(), cid="b").decision, m.Block)

    def test_the_allow_policy_lets_a_pushed_out_body_through(self) -> None:
        agent = _agent(self, body={"uninspectable": "allow"})
        agent.max_tracked_bodies = 1
        for cid in ("a", "b"):
            agent.on_request_headers(event(cid=cid, method="POST", headers={}))
        answer = agent.on_request_body_chunk(body("a", DOC.encode(), 0, last=True)).build()  # type: ignore[union-attr]
        self.assertEqual(answer.decision, m.ALLOW)

    def test_pushed_out_bodies_are_bounded_and_let_go(self) -> None:
        agent = _agent(self)
        agent.max_tracked_bodies = 2
        for index in range(10):
            agent.on_request_headers(event(cid=f"r{index}", method="POST", headers={}))
        self.assertEqual(len(agent._bodies), 2)
        self.assertEqual(list(agent._evicted), ["r6", "r7"])
        scan = agent._evicted["r6"]
        self.assertIsNone(scan.inflater)
        agent.on_request_complete(m.RequestCompleteEvent(correlation_id="r6", status=200, duration_ms=1))
        self.assertNotIn("r6", agent._evicted)

    def test_a_waiting_body_keeps_little_of_its_request(self) -> None:
        # Up to 10,000 requests wait for their bodies, and as many pushed
        # out: each kept its target (64 KiB within the [request] bounds)
        # for the log lines, 1.25 GiB in all.  Only what a line shows is kept.
        agent = _agent(self)
        agent.max_tracked_bodies = 100
        # As the proxy sends them: each event is made (and let go) as it comes.
        frames = [
            json.dumps(
                headers_event(f"r{index}", method="POST", uri="/" + "a" * 65_534, client_ip="2001:db8::1", headers={})
            ).encode()
            for index in range(200)
        ]
        kept = _memory_kept(agent, frames)
        self.assertEqual((len(agent._bodies), len(agent._evicted)), (100, 100))
        self.assertLess(kept / 200, 8 * 1024)
        # The log lines are as before: the target cut short, the chunk named.
        events_logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events_logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, events_logged.append)
        agent.on_request_body_chunk(body("r199", DOC.encode(), 3, last=True))
        agent.on_request_body_chunk(body("r0", DOC.encode(), 5, last=True))
        from twisted.logger import formatEvent

        decided, evicted = (formatEvent(e) for e in events_logged)
        self.assertRegex(decided, r"^Rule xss-body blocked \(403\): POST /a+\[\.\.\.65535 characters, cut\.\.\.\]a+ \(body chunk 3\) from 2001:db8::1 \[r199\]$")
        self.assertRegex(evicted, r"^Request body cannot be inspected, blocked \(503\): .* POST /a+\[\.\.\.65535 characters, cut\.\.\.\]a+ \(body chunk 5\) from 2001:db8::1 \[r0\]$")

    def test_a_waiting_body_is_remembered_by_a_digest_of_a_long_correlation_id(self) -> None:
        # The proxy chooses the ids, up to a frame's 16 MiB: 20,000
        # requests awaiting their bodies (and pushed out) held as many.
        agent = _agent(self)
        agent.max_tracked_bodies = 10
        ids = [f"{index:04d}" + "c" * 100_000 for index in range(20)]
        frames = [
            json.dumps(headers_event(cid, method="POST", uri="/submit", headers={})).encode() for cid in ids
        ]
        kept = _memory_kept(agent, frames)
        self.assertEqual((len(agent._bodies), len(agent._evicted)), (10, 10))
        self.assertLess(kept / 20, 8 * 1024, "the ids are not kept")
        # Their chunks still find their scans: the rule blocks the newest,
        # the policy answers the one pushed out; an id one character off
        # finds neither.
        blocked = agent.on_request_body_chunk(body(ids[-1], DOC.encode(), 0, last=True))
        self.assertEqual(blocked.decision.status, 403)  # type: ignore[union-attr]
        evicted = agent.on_request_body_chunk(body(ids[0], DOC.encode(), 0, last=True))
        self.assertEqual(evicted.decision.status, 503)  # type: ignore[union-attr]
        other = agent.on_request_body_chunk(body(ids[1][:-1] + "d", DOC.encode(), 0, last=True))
        self.assertEqual(other.decision, m.Allow())
        agent.on_request_complete(m.RequestCompleteEvent(correlation_id=ids[1], status=200, duration_ms=1))
        self.assertEqual(len(agent._evicted), 8)
        # A short id is kept as it is.
        short = json.dumps(headers_event("short", method="POST", uri="/x", headers={})).encode()
        agent.on_request_headers(m.decode(short, m.RequestHeadersEvent))
        self.assertIn("short", agent._bodies)
