"""
C{GET /healthz} on the status site: ready once the agent listener listens
and every C{--ready-agent} is registered; C{503} with the reasons before.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.test.requesthelper import DummyRequest

from sentinel_twisted.status.health import HealthzResource, Readiness
from sentinel_twisted.tap import Options

from .support import Harness


class FakePool:
    def __init__(self, connections: dict[str, int]) -> None:
        self.counts = connections

    def __contains__(self, agent_id: str) -> bool:
        return self.counts.get(agent_id, 0) > 0

    def connections(self, agent_id: str) -> list[object]:
        return [object()] * self.counts.get(agent_id, 0)


def render(resource: HealthzResource, method: bytes = b"GET") -> tuple[int, bytes, DummyRequest]:
    request = DummyRequest([b""])
    request.method = method
    body = resource.render(request)  # type: ignore[no-untyped-call]
    return request.responseCode or 200, body, request


class ReadinessTests(SynchronousTestCase):
    def test_ready_when_listening_and_no_agent_is_named(self) -> None:
        code, body, request = render(HealthzResource(FakePool({}), Readiness()))  # type: ignore[arg-type]
        self.assertEqual(code, 200)
        self.assertEqual(body, b'{"ready":true,"listening":true,"agents":{},"problems":[]}\n')
        self.assertEqual(request.responseHeaders.getRawHeaders(b"cache-control"), [b"no-store"])

    def test_not_ready_while_the_listener_does_not_listen(self) -> None:
        listening = [False]
        resource = HealthzResource(FakePool({}), Readiness(lambda: listening[0]))  # type: ignore[arg-type]
        code, body, _ = render(resource)
        self.assertEqual(code, 503)
        self.assertIn(b"the agent listener is not listening", body)
        listening[0] = True
        self.assertEqual(render(resource)[0], 200)

    def test_not_ready_until_each_named_agent_is_registered(self) -> None:
        pool = FakePool({"waf-1": 2})
        resource = HealthzResource(pool, Readiness(agents=("waf-1", "bot-1", "waf-1")))  # type: ignore[arg-type]
        code, body, _ = render(resource)
        self.assertEqual(code, 503)
        self.assertIn(b'"agents":{"waf-1":2,"bot-1":0}', body)
        self.assertIn(b"agent bot-1 is not registered", body)
        pool.counts["bot-1"] = 1
        self.assertEqual(render(resource)[0], 200)

    def test_head_has_no_body(self) -> None:
        code, body, request = render(HealthzResource(FakePool({}), Readiness(lambda: False)), b"HEAD")  # type: ignore[arg-type]
        self.assertEqual((code, body), (503, b""))
        self.assertNotEqual(request.responseHeaders.getRawHeaders(b"content-length"), [b"0"])


class ReadyAgentOptionTests(SynchronousTestCase):
    def parse(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(list(argv))
        return options

    def test_repeatable(self) -> None:
        options = self.parse("--ready-agent", "waf-1", "--ready-agent", "bot-1")
        self.assertEqual(options["ready-agents"], ["waf-1", "bot-1"])

    def test_an_agent_the_allowlist_refuses_is_an_error(self) -> None:
        error = self.assertRaises(usage.UsageError, self.parse, "--allow", "waf-*", "--ready-agent", "bot-1")
        self.assertIn("--ready-agent bot-1: --allow does not let this agent register", str(error))

    def test_needs_the_status_site(self) -> None:
        error = self.assertRaises(usage.UsageError, self.parse, "--status", "none", "--ready-agent", "waf-1")
        self.assertIn("--ready-agent needs the status site", str(error))

    def test_an_empty_id_is_an_error(self) -> None:
        error = self.assertRaises(usage.UsageError, self.parse, "--ready-agent", " ")
        self.assertIn("--ready-agent: an empty agent id", str(error))


class HealthzOverHTTPTests(TestCase):
    timeout = 20

    def test_ready_once_the_named_agent_registers(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start("--ready-agent", "waf")
            before = await h.status("/healthz")
            self.assertEqual(before.code, 503)
            self.assertEqual(before.json()["problems"], ["agent waf is not registered"])
            self.assertTrue(before.json()["listening"])
            await h.agent("waf")
            after = await h.status("/healthz")
            self.assertEqual((after.code, after.json()["ready"]), (200, True))
            # The listener stops (SIGTERM): not ready any more.
            for child in list(h.top):
                if hasattr(child, "endpoint") and hasattr(child, "port"):
                    await child.stopService()
            stopped = await h.status("/healthz")
            self.assertEqual(stopped.code, 503)
            self.assertIn("the agent listener is not listening", stopped.json()["problems"])

        return ensureDeferred(go())
