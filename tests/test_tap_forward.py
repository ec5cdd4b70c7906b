"""
The forward-mode options of C{twistd sentinel-reverse} (C{--agent-endpoint},
C{--agent-connections}, C{--agent-encodings}) and the services they build.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import TestCase

from sentinel_twisted.proxy.dialled import DialledAgentService
from sentinel_twisted.tap import Options, StartupError, add_forward_agents, make_listener


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


class ForwardOptionsTests(TestCase):
    def test_defaults(self) -> None:
        options = parse()
        self.assertEqual(options["agent-endpoints"], [])
        self.assertEqual(options["agent-connections"], 4)
        self.assertEqual(options["agent-encodings"], ("msgpack", "json"))

    def test_every_option(self) -> None:
        options = parse(
            "--agent-endpoint", "waf=unix:/run/agents/waf.sock",
            "--agent-endpoint", "bot=tcp:127.0.0.1:7000",
            "--agent-connections", "2",
            "--agent-encodings", "json",
        )  # fmt: skip
        self.assertEqual(
            options["agent-endpoints"], [("waf", "unix:/run/agents/waf.sock"), ("bot", "tcp:127.0.0.1:7000")]
        )
        self.assertEqual(options["agent-connections"], 2)
        self.assertEqual(options["agent-encodings"], ("json",))

    def test_bad_values_are_usage_errors_naming_the_option(self) -> None:
        for argv, text in (
            (["--agent-endpoint", "waf"], "--agent-endpoint waf: expected ID=ENDPOINT"),
            (["--agent-endpoint", "waf=/run/a.sock"], "--agent-endpoint waf=/run/a.sock: expected a unix:PATH"),
            (["--agent-connections", "0"], "--agent-connections: expected a positive integer"),
            (["--agent-encodings", "cbor"], "--agent-encodings: unknown payload encoding 'cbor'"),
        ):
            with self.subTest(argv=argv):
                error = self.assertRaises(usage.UsageError, parse, *argv)
                self.assertIn(text, str(error))

    def test_connections_over_the_per_agent_cap_are_refused(self) -> None:
        error = self.assertRaises(
            usage.UsageError, parse, "--agent-endpoint", "waf=unix:/a", "--agent-connections", "5"
        )
        self.assertIn("exceed --max-connections-per-agent 4", str(error))
        # Two endpoints under one id share the cap.
        self.assertRaises(
            usage.UsageError,
            parse,
            *["--agent-endpoint", "waf=unix:/a", "--agent-endpoint", "waf=unix:/b", "--agent-connections", "3"],
        )
        parse("--agent-endpoint", "waf=unix:/a", "--agent-connections", "5", "--max-connections-per-agent", "5")


class AddForwardAgentsTests(TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="st-tap-fwd-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.reactor = MemoryReactorClock()

    def listener(self, *argv: str) -> tuple[Options, object]:
        options = parse("--listen", f"unix:{os.path.join(self.dir, 'r.sock')}", *argv)
        return options, make_listener(options, self.reactor)

    def test_one_service_per_endpoint_sharing_the_pool_and_limits(self) -> None:
        options, top = self.listener(
            "--agent-endpoint", "waf=unix:/run/agents/waf.sock",
            "--agent-endpoint", "bot=tcp:127.0.0.1:7000",
            "--agent-connections", "3",
            "--agent-encodings", "json",
            "--shutdown-grace", "2",
        )  # fmt: skip
        add_forward_agents(top, options, self.reactor)  # type: ignore[arg-type]
        dialled = [s for s in top if isinstance(s, DialledAgentService)]  # type: ignore[attr-defined]
        self.assertEqual([(s.agent_id, s.description) for s in dialled], options["agent-endpoints"])
        for service in dialled:
            self.assertEqual(len(service.factories), 3)
            self.assertEqual(service.grace, 2.0)
            for factory in service.factories:
                self.assertIs(factory.pool, top.factory.pool)  # type: ignore[attr-defined]
                self.assertIs(factory.config, options["config"])
                self.assertIs(factory.frame_budget, top.factory.frame_budget)  # type: ignore[attr-defined]
                self.assertEqual(factory.encodings, ("json",))

    def test_an_endpoint_that_does_not_parse_is_a_startup_error(self) -> None:
        options, top = self.listener("--agent-endpoint", "waf=tcp:nohostport")
        error = self.assertRaises(StartupError, add_forward_agents, top, options, self.reactor)
        self.assertIn("--agent-endpoint waf=tcp:nohostport", str(error))
