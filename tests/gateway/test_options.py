"""
The gateway's options of C{twistd sentinel-reverse} and the services they build.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import TestCase

from sentinel_twisted.gateway.config import GatewayConfig
from sentinel_twisted.gateway.echo import EchoUpstream
from sentinel_twisted.gateway.service import GatewayService
from sentinel_twisted.gateway.upstream import HTTPUpstream
from sentinel_twisted.tap import DEFAULT_HTTP, DEFAULT_STATUS, Options, add_gateway, make_listener


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", *argv])
    return options


class GatewayOptionsTests(TestCase):
    def test_defaults(self) -> None:
        options = parse()
        self.assertEqual(DEFAULT_HTTP, "tcp:8080:interface=127.0.0.1")
        self.assertEqual(DEFAULT_STATUS, "tcp:9901:interface=127.0.0.1")
        self.assertEqual(options["http"], DEFAULT_HTTP + f":backlog={options['backlog']}")
        self.assertEqual(options["status"], DEFAULT_STATUS + f":backlog={options['backlog']}")
        self.assertEqual(options["gateway"], GatewayConfig())
        config = options["gateway"]
        self.assertEqual(config.agents, ())
        self.assertFalse(config.fail_open)
        self.assertIsNone(config.upstream)
        self.assertEqual(config.upstream_timeout, 30.0)
        self.assertEqual(config.challenge_status, 403)
        self.assertFalse(config.allow_underscore_headers)

    def test_every_option(self) -> None:
        options = parse(
            "--http", "ssl:8443:privateKey=k.pem",
            "--status", "unix:/tmp/status.sock",
            "--upstream", "http://127.0.0.1:9000/app",
            "--upstream-timeout", "2.5",
            "--agent", "waf",
            "--agent", "auth",
            "--agent", "waf",
            "--fail-open",
            "--challenge-status", "429",
            "--access-log", "/tmp/access.log",
            "--allow-underscore-headers",
        )  # fmt: skip
        self.assertEqual(options["http"], f"ssl:8443:privateKey=k.pem:backlog={options['backlog']}")
        self.assertEqual(options["status"], f"unix:/tmp/status.sock:backlog={options['backlog']}")
        config = options["gateway"]
        self.assertEqual(config.agents, ("waf", "auth"))
        self.assertTrue(config.fail_open)
        self.assertEqual(config.upstream, "http://127.0.0.1:9000/app")
        self.assertEqual(config.upstream_timeout, 2.5)
        self.assertEqual(config.challenge_status, 429)
        self.assertEqual(options["access-log"], "/tmp/access.log")
        self.assertTrue(config.allow_underscore_headers)

    def test_none_turns_a_listener_off(self) -> None:
        options = parse("--http", "none", "--status", "none")
        self.assertIsNone(options["http"])
        self.assertIsNone(options["status"])
        top = make_listener(options, MemoryReactorClock())
        add_gateway(top, options, MemoryReactorClock())
        self.assertEqual([s for s in top if isinstance(s, GatewayService)], [])

    def test_bad_values_name_their_option(self) -> None:
        for argv, text in [
            (("--upstream", "ftp://files.example/"), "--upstream"),
            (("--upstream", "http://"), "no host"),
            (("--upstream", "http://a.example/?q=1"), "query"),
            (("--challenge-status", "99"), "--challenge-status"),
            (("--challenge-status", "teapot"), "--challenge-status"),
            (("--upstream-timeout", "0"), "--upstream-timeout"),
        ]:
            error = self.assertRaises(usage.UsageError, parse, *argv)
            self.assertIn(text, str(error), argv)

    def test_an_upstream_scheme_in_upper_case(self) -> None:
        # A scheme is case-insensitive: HTTPS:// is https://, CA file and all.
        ca = self.mktemp()
        with open(ca, "w") as f:
            f.write("unread until the gateway is built")
        config = parse("--upstream", "HTTPS://Upstream.example:8443/app", "--upstream-ca", ca)["gateway"]
        self.assertEqual((config.upstream, config.upstream_ca), ("HTTPS://Upstream.example:8443/app", ca))
        # The default ports: 443 for HTTPS://, 80 for Http://, not named in Host.
        self.assertEqual(HTTPUpstream(MemoryReactorClock(), "HTTPS://upstream.example/app")._host, b"upstream.example")
        self.assertEqual(HTTPUpstream(MemoryReactorClock(), "Http://upstream.example/app")._host, b"upstream.example")

    def test_slow_client_limits(self) -> None:
        config = parse()["gateway"]
        self.assertEqual((config.min_body_rate, config.send_timeout), (1024, 30.0))
        config = parse("--min-body-rate", "200", "--send-timeout", "2.5")["gateway"]
        self.assertEqual((config.min_body_rate, config.send_timeout), (200, 2.5))
        for argv in [
            ("--min-body-rate", "0"),
            ("--min-body-rate", "1.5"),
            ("--min-body-rate", "fast"),
            ("--send-timeout", "0"),
            ("--send-timeout", "-1"),
            ("--send-timeout", "inf"),
            ("--send-timeout", "nan"),
        ]:
            error = self.assertRaises(usage.UsageError, parse, *argv)
            self.assertIn(argv[0], str(error), argv)

    def test_empty_agent_or_status_host_is_refused(self) -> None:
        for argv, text in [
            (("--agent", ""), "--agent: an empty agent id"),
            (("--agent", "waf", "--agent", " "), "--agent: an empty agent id"),
            (("--status-host", ""), "--status-host: an empty host name"),
            (("--status-host", "\t"), "--status-host: an empty host name"),
        ]:
            error = self.assertRaises(usage.UsageError, parse, *argv)
            self.assertIn(text, str(error), argv)
            self.assertNotIn("\n", str(error), argv)

    def test_service_listens_where_told(self) -> None:
        reactor = MemoryReactorClock()
        options = parse()
        top = make_listener(options, reactor)
        add_gateway(top, options, reactor)
        (gateway,) = [s for s in top if isinstance(s, GatewayService)]
        self.assertIsInstance(gateway.upstream, EchoUpstream)
        self.assertIs(gateway.gateway.pool, top.factory.pool)
        top.startService()
        self.addCleanup(top.stopService)
        listening = {(port, interface) for port, _, _, interface in reactor.tcpServers}
        self.assertIn((8080, "127.0.0.1"), listening)
        self.assertIn((9901, "127.0.0.1"), listening)

    def test_upstream_url_makes_an_http_upstream(self) -> None:
        reactor = MemoryReactorClock()
        options = parse("--upstream", "https://backend.example:8443/base/")
        top = make_listener(options, reactor)
        add_gateway(top, options, reactor)
        (gateway,) = [s for s in top if isinstance(s, GatewayService)]
        upstream: Any = gateway.upstream
        self.assertIsInstance(upstream, HTTPUpstream)
        self.assertEqual(upstream.target(b"/x?y"), b"/base/x?y")
        self.assertEqual(upstream.target(b"*"), b"*")
        self.assertEqual(upstream._host, b"backend.example:8443")
        self.assertEqual(upstream.pool.maxPersistentPerHost, 64)
