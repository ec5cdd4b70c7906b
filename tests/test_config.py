"""
L{ReverseConnectionConfig} defaults and validation, and the agent
allowlist (exact ids and globs).
"""

from __future__ import annotations

import attrs
from twisted.trial.unittest import TestCase

from sentinel_twisted.endpoints import system_max_backlog
from sentinel_twisted.proxy.config import AgentAllowlist, ReverseConnectionConfig


class ConfigTests(TestCase):
    def test_reference_defaults(self) -> None:
        config = ReverseConnectionConfig()
        self.assertEqual(config.backlog, system_max_backlog())
        self.assertEqual(config.handshake_timeout, 10.0)
        self.assertEqual(config.max_connections_per_agent, 4)
        self.assertFalse(config.allowed_agents)
        self.assertFalse(config.require_auth)
        self.assertEqual(config.request_timeout, 30.0)
        self.assertEqual(config.proxy_id, "sentinel-proxy")
        self.assertEqual(config.max_pending_registrations, 1024)
        self.assertEqual(config.close_grace, 5.0)
        self.assertEqual(config.max_pending_registrations_per_peer, 64)

    def test_non_positive_values_are_refused(self) -> None:
        for name in (
            "handshake_timeout",
            "request_timeout",
            "max_connections_per_agent",
            "max_pending_registrations",
            "close_grace",
            "max_pending_registrations_per_peer",
        ):
            for value in (0, -1):
                with self.assertRaises(ValueError, msg=name) as caught:
                    ReverseConnectionConfig(**{name: value})
                self.assertIn(name, str(caught.exception))

    def test_fractional_timeouts_are_allowed(self) -> None:
        config = ReverseConnectionConfig(handshake_timeout=0.25, request_timeout=1.5)
        self.assertEqual((config.handshake_timeout, config.request_timeout), (0.25, 1.5))

    def test_allowed_agents_from_a_list(self) -> None:
        config = ReverseConnectionConfig(allowed_agents=["waf-1", "auth-*"])
        self.assertIsInstance(config.allowed_agents, AgentAllowlist)
        self.assertEqual(config.allowed_agents.patterns, ("waf-1", "auth-*"))

    def test_allowed_agents_from_one_string_is_one_pattern(self) -> None:
        config = ReverseConnectionConfig(allowed_agents="waf-1")  # type: ignore[arg-type]
        self.assertEqual(config.allowed_agents.patterns, ("waf-1",))

    def test_config_is_immutable(self) -> None:
        config = ReverseConnectionConfig()
        with self.assertRaises(attrs.exceptions.FrozenInstanceError):
            config.request_timeout = 1  # type: ignore[misc]

    def test_evolve_keeps_validation(self) -> None:
        config = ReverseConnectionConfig()
        self.assertEqual(attrs.evolve(config, request_timeout=3).request_timeout, 3)
        self.assertRaises(ValueError, attrs.evolve, config, request_timeout=0)


class AllowlistTests(TestCase):
    def test_empty_allowlist_allows_everybody(self) -> None:
        allowlist = AgentAllowlist()
        self.assertFalse(allowlist)
        self.assertTrue(allowlist.allows("anyone"))

    def test_exact_id(self) -> None:
        allowlist = AgentAllowlist.of(["waf-1"])
        self.assertTrue(allowlist.allows("waf-1"))
        self.assertFalse(allowlist.allows("waf-10"))
        self.assertFalse(allowlist.allows("waf-"))

    def test_glob_with_star(self) -> None:
        allowlist = AgentAllowlist.of(["waf-*"])
        self.assertTrue(allowlist.allows("waf-1"))
        self.assertTrue(allowlist.allows("waf-"))
        self.assertTrue(allowlist.allows("waf-eu-west-1"))
        self.assertFalse(allowlist.allows("xwaf-1"))
        self.assertFalse(allowlist.allows("waf"))

    def test_glob_with_question_mark_and_class(self) -> None:
        allowlist = AgentAllowlist.of(["auth-?", "bot-[ab]"])
        self.assertTrue(allowlist.allows("auth-1"))
        self.assertFalse(allowlist.allows("auth-12"))
        self.assertTrue(allowlist.allows("bot-b"))
        self.assertFalse(allowlist.allows("bot-c"))

    def test_exact_ids_are_not_regular_expressions(self) -> None:
        allowlist = AgentAllowlist.of(["waf.1", "a+b"])
        self.assertTrue(allowlist.allows("waf.1"))
        self.assertFalse(allowlist.allows("wafx1"))
        self.assertFalse(allowlist.allows("aab"))

    def test_glob_matches_the_whole_id(self) -> None:
        allowlist = AgentAllowlist.of(["*-prod"])
        self.assertTrue(allowlist.allows("waf-prod"))
        self.assertFalse(allowlist.allows("waf-prod-2"))

    def test_glob_does_not_cross_lines(self) -> None:
        allowlist = AgentAllowlist.of(["waf-*"])
        self.assertTrue(allowlist.allows("waf-a\nb"))  # '*' matches any character
        self.assertFalse(allowlist.allows("evil\nwaf-1"))

    def test_mixed_exact_and_globs(self) -> None:
        allowlist = AgentAllowlist.of(["auth", "waf-*"])
        self.assertTrue(allowlist)
        self.assertTrue(allowlist.allows("auth"))
        self.assertTrue(allowlist.allows("waf-2"))
        self.assertFalse(allowlist.allows("bot"))
