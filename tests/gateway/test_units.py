"""
The gateway's small pieces on their own: decisions, header operations,
body mutations, hop-by-hop headers, back-pressure, timestamps.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase
from twisted.web.http_headers import Headers

from sentinel_twisted import messages as m
from sentinel_twisted.gateway import metadata
from sentinel_twisted.gateway.body import Pressure, clamp_chunk_size
from sentinel_twisted.gateway.decisions import (
    apply_body_mutation,
    apply_header_ops,
    denial_for,
    drop_hop_by_hop,
)
from sentinel_twisted.gateway.exchange import Exchange
from sentinel_twisted.gateway.metadata import rfc3339_now
from sentinel_twisted.gateway.target import BadTarget

from .support import Harness


class DenialTests(TestCase):
    def test_block(self) -> None:
        denial = denial_for(m.Block(429, "slow down", {"Retry-After": "5"}))
        self.assertEqual((denial.label, denial.code, denial.body), ("block", 429, b"slow down"))
        self.assertIn(("Retry-After", "5"), denial.headers)
        self.assertIn(("Content-Type", "text/plain; charset=utf-8"), denial.headers)

    def test_block_keeps_its_content_type(self) -> None:
        denial = denial_for(m.Block(403, "{}", {"content-type": "application/json"}))
        self.assertEqual([h for h in denial.headers if h[0].lower() == "content-type"], [("content-type", "application/json")])

    def test_redirect(self) -> None:
        denial = denial_for(m.Redirect("/login", 303))
        self.assertEqual((denial.code, denial.headers, denial.body), (303, [("Location", "/login")], b""))

    def test_challenge(self) -> None:
        denial = denial_for(m.Challenge("captcha", {"k": "v"}), challenge_status=401)
        self.assertEqual(denial.code, 401)
        self.assertIn(("X-Sentinel-Challenge", "captcha"), denial.headers)
        self.assertEqual(json.loads(denial.body), {"challenge": "captcha", "params": {"k": "v"}})

    def test_allow_denies_nothing(self) -> None:
        self.assertRaises(ValueError, denial_for, m.ALLOW)


class HeaderTests(TestCase):
    def test_operations_in_order(self) -> None:
        headers = Headers({b"X-A": [b"1"], b"X-B": [b"2"]})
        apply_header_ops(
            headers,
            [m.SetHeader("x-a", "one"), m.AddHeader("X-B", "3"), m.RemoveHeader("x-b"), m.AddHeader("X-C", "c")],
        )
        self.assertEqual(headers.getRawHeaders(b"x-a"), [b"one"])
        self.assertFalse(headers.hasHeader(b"x-b"))
        self.assertEqual(headers.getRawHeaders(b"x-c"), [b"c"])

    def test_values_cannot_inject_headers(self) -> None:
        headers = Headers()
        apply_header_ops(headers, [m.SetHeader("X-A", "ok\r\nX-Evil: 1")])
        (value,) = headers.getRawHeaders(b"x-a")
        self.assertNotIn(b"\r", value)
        self.assertNotIn(b"\n", value)

    def test_unusable_header_name_is_skipped(self) -> None:
        headers = Headers()
        apply_header_ops(headers, [m.SetHeader("bad name\r\n", "x"), m.SetHeader("X-Good", "y")], "waf")
        self.assertEqual(list(headers.getAllRawHeaders()), [(b"X-Good", [b"y"])])

    def test_hop_by_hop_and_connection_listed_headers_dropped(self) -> None:
        source = Headers(
            {
                b"Connection": [b"keep-alive, X-Private"],
                b"Keep-Alive": [b"timeout=5"],
                b"Transfer-Encoding": [b"chunked"],
                b"Upgrade": [b"h2c"],
                b"X-Private": [b"1"],
                b"Host": [b"a"],
                b"X-Public": [b"2"],
            }
        )
        result = drop_hop_by_hop(source, (b"host",))
        self.assertEqual(dict(result.getAllRawHeaders()), {b"X-Public": [b"2"]})
        # The source is left alone.
        self.assertTrue(source.hasHeader(b"x-private"))


class BodyTests(TestCase):
    def test_mutations(self) -> None:
        chunk = b"data"
        self.assertEqual(apply_body_mutation(chunk, None), chunk)
        self.assertEqual(apply_body_mutation(chunk, m.BodyMutation.pass_through(0)), chunk)
        self.assertEqual(apply_body_mutation(chunk, m.BodyMutation.drop(0)), b"")
        self.assertEqual(apply_body_mutation(chunk, m.BodyMutation.replace(0, b"new")), b"new")
        self.assertRaises(ValueError, apply_body_mutation, chunk, m.BodyMutation(data="%%%", chunk_index=0))

    def test_chunk_size_bounds(self) -> None:
        self.assertEqual(clamp_chunk_size(0), 64 * 1024)
        self.assertEqual(clamp_chunk_size(10), 4 * 1024, "the floor")
        self.assertEqual(clamp_chunk_size(1), 4 * 1024)
        self.assertEqual(clamp_chunk_size(5000), 5000)
        self.assertEqual(clamp_chunk_size(1 << 40), 8 * 1024 * 1024)
        # The largest chunk's base64 fits in one 16 MiB frame.
        self.assertLess(len(base64.b64encode(b"x" * clamp_chunk_size(1 << 40))) + 200, 16 * 1024 * 1024)

    def test_pressure_pauses_above_high_and_resumes_below_low(self) -> None:
        calls: list[str] = []
        pressure = Pressure(lambda: calls.append("pause"), lambda: calls.append("resume"), 100, 50)
        pressure.add(100)
        self.assertEqual(calls, [])
        pressure.add(1)
        pressure.add(10)
        self.assertEqual(calls, ["pause"])
        pressure.sub(60)
        self.assertEqual(calls, ["pause"])
        pressure.sub(2)
        self.assertEqual(calls, ["pause", "resume"])
        pressure.add(200)
        pressure.release()
        self.assertEqual(calls, ["pause", "resume", "pause", "resume"])
        self.assertEqual(pressure.held, 0)


class TimestampTests(TestCase):
    def test_rfc3339(self) -> None:
        self.assertEqual(rfc3339_now(0), "1970-01-01T00:00:00Z")
        self.assertEqual(rfc3339_now(1767225600.9), "2026-01-01T00:00:00Z")
        self.assertRegex(rfc3339_now(), re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$"))


class HeaderMapTests(TestCase):
    """The agents' view of the request headers, and the name caches behind it."""

    def setUp(self) -> None:
        self.patch(metadata, "_names", {})
        self.patch(metadata, "_server_names", {})

    def test_names_lower_case_and_values_in_order(self) -> None:
        headers = metadata.header_map([(b"X-Tag", [b"a", b"b"]), (b"Host", [b"example.com:8080"])])
        self.assertEqual(headers, {"x-tag": ["a", "b"], "host": ["example.com:8080"]})
        self.assertEqual(metadata._host_name(headers), "example.com")
        self.assertEqual(metadata._host_name({"host": ["[::1]:80"]}), "::1")
        self.assertEqual(metadata._host_name({"host": [" ::1 "]}), "::1")
        self.assertIsNone(metadata._host_name({}))

    def test_request_headers_must_be_utf8(self) -> None:
        raw = {b"Host": [b"x"], b"X-Name": [b"caf\xc3\xa9", b"caf\xe9"]}
        with self.assertRaises(BadTarget) as caught:
            metadata.request_header_map(raw)
        self.assertEqual(caught.exception.code, 400)
        self.assertEqual(caught.exception.reason, "the X-Name header's value is not valid UTF-8")
        # Response headers (and the echo) are still shown with U+FFFD.
        self.assertEqual(metadata.header_map(raw.items())["x-name"], ["caf\u00e9", "caf\ufffd"])
        del raw[b"X-Name"][1]
        self.assertEqual(metadata.request_header_map(raw), {"host": ["x"], "x-name": ["caf\u00e9"]})

    def test_the_caches_have_bounds_clients_cannot_pass(self) -> None:
        self.patch(metadata, "_MAX_NAMES", 3)
        long_name = b"X-" + b"n" * 200
        metadata.header_map([(long_name, [b"1"])])
        for i in range(10):
            metadata.header_map([(b"X-%d" % i, [b"1"])])
            metadata._host_name({"host": [f"host-{i}.example"]})
        metadata._host_name({"host": ["h" * 200]})
        self.assertEqual(len(metadata._names), 3)
        self.assertNotIn(long_name, metadata._names)
        self.assertEqual(len(metadata._server_names), 3)
        # Past the bound, answers are the same, only not remembered.
        self.assertEqual(metadata.header_map([(b"X-9", [b"v"])]), {"x-9": ["v"]})
        self.assertEqual(metadata._host_name({"host": ["host-9.example:1"]}), "host-9.example")


class InternalErrorTests(TestCase):
    timeout = 20

    def test_a_bug_answers_500_and_is_logged(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            await h.agent("waf")

            def broken(self: Exchange, headers: Any) -> None:
                raise RuntimeError("bug")

            self.patch(Exchange, "_send_request_headers", broken)
            response = await h.get("/")
            self.assertEqual(response.code, 500)
            self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
            self.assertEqual(h.sample("sentinel_gateway_requests_total", decision="error"), 1)

        return ensureDeferred(go())
