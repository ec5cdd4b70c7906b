"""
The README's demo pair end to end: C{twistd sentinel-reverse}'s gateway
with our rules agent (L{RulesAgent} on C{examples/rules.toml}, connected by
L{AgentConnector}) in front of a test upstream.  The classic injections are
refused wherever the client puts them (query, header, body), every refusal
carries the C{x-sentinel-agent} header, and ordinary requests go through.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from sentinel_twisted.agent import AgentConnector, RulesAgent

from .support import Harness, Response, wait_until

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "rules.toml"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


class ExampleRulesThroughTheGatewayTests(TestCase):
    timeout = 30

    async def start(self) -> Harness:
        h = await Harness(self).start()
        connector = AgentConnector(
            RulesAgent(EXAMPLE), f"unix:{h.socket}", "rules", reactor=reactor, health_interval=0
        )
        connector.startService()
        # Stopped before the harness closes (cleanups run last first).
        self.addCleanup(lambda: connector.stopService() if connector.running else None)
        await wait_until(lambda: "rules" in h.pool, what="the rules agent to register")
        return h

    def assertRefused(self, response: Response, what: str) -> None:
        self.assertEqual((response.code, response.body), (403, b"Request blocked"), what)
        self.assertEqual(response.header("x-sentinel-agent"), "sentinel-twisted", what)

    def test_injections_are_refused_in_query_header_and_body(self) -> Any:
        async def go() -> None:
            h = await self.start()
            for path in [
                "/items?id=1%20UNION%20SELECT%201",
                "/search?q=%3Cscript%3Ealert(1)%3C/script%3E",
                "/download?file=../../etc/passwd",
            ]:
                self.assertRefused(await h.get(path), path)
            for name, value in [
                ("X-Search", "1 UNION SELECT 1"),
                ("Referer", "http://example.com/?q=<script>alert(1)</script>"),
                ("X-File", "..%2F..%2Fetc%2Fpasswd"),
            ]:
                self.assertRefused(await h.get("/items", headers={name: value}), f"{name}: {value}")
            for data in [
                b"id=1+UNION+SELECT+password+FROM+users",
                b"comment=<script>alert(1)</script>",
                b"file=../../etc/passwd",
            ]:
                self.assertRefused(await h.post("/form", data, headers=FORM), repr(data))
            # The body was held until the agent had seen it: the upstream
            # never got a whole request for /form.
            self.assertEqual([r["uri"] for r in h.upstream.requests if r["uri"] == "/form"], [])

        return ensureDeferred(go())

    def test_ordinary_requests_go_through_marked(self) -> Any:
        async def go() -> None:
            h = await self.start()
            response = await h.get("/items?id=42", headers={"Referer": "http://example.com/a/b"})
            self.assertEqual((response.code, response.body), (200, b"upstream saw /items?id=42"))
            self.assertEqual(response.header("x-sentinel-agent"), "sentinel-twisted")
            body = b"name=O'Brien&comment=Select+a+union+rep"
            echoed = await h.post("/echo-body", body, headers=FORM)
            self.assertEqual((echoed.code, echoed.body), (200, body))
            self.assertEqual(echoed.header("x-sentinel-agent"), "sentinel-twisted")
            admin = await h.get("/admin")
            self.assertEqual((admin.code, admin.header("x-sentinel-agent")), (403, "sentinel-twisted"))

        return ensureDeferred(go())

    def test_admin_case_path_parameters_and_json_escapes_are_refused(self) -> Any:
        async def go() -> None:
            h = await self.start()
            for path in ["/ADMIN", "/admin;x", "/Admin;jsessionid=1/users"]:
                response = await h.get(path)
                self.assertEqual((response.code, response.header("x-sentinel-agent")), (403, "sentinel-twisted"), path)
            data = b'{"id": "1 \\u0055NION \\u0053ELECT password FROM users"}'
            self.assertRefused(
                await h.post("/json", data, headers={"Content-Type": "application/json"}), repr(data)
            )
            self.assertEqual([r["uri"] for r in h.upstream.requests if r["uri"] in ("/json", "/ADMIN")], [])
            ordinary = b'{"name": "Jos\\u00e9"}'
            echoed = await h.post("/echo-body", ordinary, headers={"Content-Type": "application/json"})
            self.assertEqual((echoed.code, echoed.body), (200, ordinary))

        return ensureDeferred(go())

    def test_evasions_do_not_reach_the_upstream(self) -> Any:
        """
        The spellings that property tests try on the rules alone
        (tests/agent/test_rule_properties.py), end to end: each is refused,
        by the gateway (400: a dot segment, a fragment) or by the rules
        (403), and the upstream sees none of them.
        """

        async def go() -> None:
            h = await self.start()
            for path in ["/%61dmin", "/ADM%49N/", "/admin%3bx", "/admin;", "//admin", "/x/..%2fadmin",
                         "/x/%2e%2e/admin", "/admin#x", "/items?id=1--#x", "/items?id=1+UNION%0aSELECT+1"]:
                response = await h.get(path)
                self.assertIn(response.code, (400, 403), path)
            for name in ["user-agent", "USER-AGENT", "User-Agent"]:
                response = await h.get("/x", headers={name: " Mozilla sqlmap/1.7"})
                self.assertEqual(response.code, 403, name)
            import gzip

            attack = b"comment=<script>alert(1)</script>"
            packed = gzip.compress(b"a=" + b"x" * 100_000 + b"&" + attack)
            for data, headers in [
                (packed, {**FORM, "Content-Encoding": "gzip"}),
                ('{"q": "<script>"}'.encode("utf-16"), {"Content-Type": "text/plain"}),
                (b'{"q": "\\u003cscript>"}', {"Content-Type": "text/plain"}),
            ]:
                chunks = [data[i : i + 7] for i in range(0, len(data), 7)] if len(data) < 100 else [
                    data[i : i + 4096] for i in range(0, len(data), 4096)
                ]
                response = await h.client.request("POST", h.url("/form"), headers=headers, chunks=chunks)
                self.assertRefused(response, repr(data[:20]))
            self.assertEqual(h.upstream.requests, [])

        return ensureDeferred(go())
