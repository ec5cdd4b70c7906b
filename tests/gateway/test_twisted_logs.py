"""
Lines that Twisted itself logs for what a peer sends (here: an upstream),
kept to a few per period like the gateway's own.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent
from twisted.trial.unittest import TestCase

from sentinel_twisted._ratelimit import LogRateLimiter

from .._proxy_support import captured_log
from .support import Harness, listen_for


class _InterimUpstream(Protocol):
    """An upstream that sends many interim (1xx) responses before its answer."""

    interim = 200

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" in data:
            self.transport.write(
                b"HTTP/1.1 103 Early Hints\r\n\r\n" * self.interim
                + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
            )


class UpstreamInterimResponseTests(TestCase):
    timeout = 20

    async def interim_upstream(self) -> str:
        port = await listen_for(self, Factory.forProtocol(_InterimUpstream))
        return f"http://127.0.0.1:{port.getHost().port}"

    def test_interim_responses_log_a_few_lines_per_period(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start("--upstream", await self.interim_upstream())
            await h.agent("waf")
            clock = Clock()
            limiter = h.gateway_service.upstream.log_limiter = LogRateLimiter(clock)
            with captured_log() as events:
                response = await h.get("/")
                clock.advance(limiter.period)
            self.assertEqual((response.code, response.body), (200, b"ok"))
            interim = [formatEvent(e) or "" for e in events if "103" in (formatEvent(e) or "")]
            self.assertEqual(len(interim), limiter.burst + 1, interim)
            self.assertTrue(
                all(
                    e["log_level"] is LogLevel.info and e["log_namespace"] == "sentinel_twisted.gateway"
                    for e in events
                    if "103" in (formatEvent(e) or "")
                )
            )
            self.assertIn("interim 103 response; ignoring it", interim[0])
            self.assertIn(f"and {_InterimUpstream.interim - limiter.burst - 1:,} more like it", interim[-1])

        return ensureDeferred(go())

    def test_the_upstream_shares_the_gateway_limiter(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start("--upstream", await self.interim_upstream())
            service = h.gateway_service
            self.assertIs(service.upstream.log_limiter, service.gateway.log_limiter)

        return ensureDeferred(go())
