"""
Stopping the gateway answers everyone: requests under way get the
shutdown grace period; after it, those not answered get 503 and those
whose response has started are cut off; new requests get 503 at once.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from . import test_bodies
from .support import CANCEL, REQUEST_HEADERS, Harness, wait_until

PROXY_SHUTDOWN = 4


async def stop(h: Harness) -> None:
    """Stop the services as SIGTERM does (the harness's cleanup then has nothing to stop)."""
    top, h.top = h.top, None
    await top.stopService()


class GatewayShutdownTests(TestCase):
    timeout = 30

    def test_a_request_waiting_on_the_upstream_gets_503_after_the_grace(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start("--shutdown-grace", "0.2")
            await h.agent("waf")
            client = await h.raw(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            await wait_until(lambda: bool(h.upstream.waiting), what="the upstream request")
            await stop(h)
            await wait_until(lambda: client.is_lost, what="the client to be answered and closed")
            self.assertTrue(client.received.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), client.received)
            self.assertIn(b"Connection: close\r\n", client.received)
            self.assertTrue(client.received.endswith(b"The gateway is shutting down.\n"))
            self.assertEqual(h.sample("sentinel_gateway_requests_total", decision="unavailable"), 1)

        return ensureDeferred(go())

    def test_a_request_still_deciding_gets_503_and_its_agent_a_cancel(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start("--shutdown-grace", "0.2")
            agent = await h.agent("waf", events=(1, 5), decide=lambda a, t, b: None)
            client = await h.raw(b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n")
            await agent.wait(lambda: bool(agent.held))
            await stop(h)
            await wait_until(lambda: client.is_lost, what="the client to be answered")
            self.assertTrue(client.received.startswith(b"HTTP/1.1 503 "), client.received)
            self.assertEqual([c["reason"] for c in agent.cancels], [PROXY_SHUTDOWN])
            # No RequestComplete for it: the agent is being disconnected.
            self.assertEqual([t for t, _ in agent.events], [REQUEST_HEADERS])
            self.assertNotIn(CANCEL, [t for t, _ in agent.events])

        return ensureDeferred(go())

    def test_an_answer_within_the_grace_goes_through(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start("--shutdown-grace", "10")
            await h.agent("waf")
            kept = await h.raw(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
            await wait_until(lambda: kept.received.endswith(b"upstream saw /first"), what="the first answer")
            client = await h.raw(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            await wait_until(lambda: bool(h.upstream.waiting), what="the upstream request")
            top, h.top = h.top, None
            stopping = top.stopService()
            # A new request on a connection kept alive meanwhile: 503 at once.
            kept.received = b""
            kept.transport.write(b"GET /late HTTP/1.1\r\nHost: x\r\n\r\n")
            await wait_until(lambda: kept.is_lost, what="the late request's answer")
            self.assertTrue(kept.received.startswith(b"HTTP/1.1 503 "), kept.received)
            self.assertIn(b"Connection: close\r\n", kept.received)
            request = h.upstream.waiting[0]
            request.setHeader(b"Content-Length", b"4")
            request.write(b"done")
            request.finish()
            await stopping
            await wait_until(lambda: client.received.endswith(b"done"), what="the answer")
            self.assertTrue(client.received.startswith(b"HTTP/1.1 200 OK\r\n"), client.received)

        return ensureDeferred(go())

    def test_a_response_mid_body_is_cut_off_after_the_grace(self) -> Any:
        async def go() -> None:
            h = Harness(self)
            upstreams = await test_bodies.StreamingTests.raw_upstream(self, h)  # type: ignore[arg-type]
            await h.start("--upstream", f"http://127.0.0.1:{self.raw_port}", "--shutdown-grace", "0.2")
            await h.agent("waf")
            client = await h.raw(b"GET /half HTTP/1.1\r\nHost: x\r\n\r\n")
            await wait_until(lambda: bool(upstreams) and upstreams[0].received.endswith(b"\r\n\r\n"), what="the request")
            upstreams[0].transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfirst")
            await wait_until(lambda: client.received.endswith(b"first"), what="the first half")
            await stop(h)
            await wait_until(lambda: client.is_lost, what="the client to be cut off")
            self.assertTrue(client.received.endswith(b"first"))
            await wait_until(lambda: upstreams[0].gone, what="the upstream connection to close")

        return ensureDeferred(go())


