"""
SIGHUP on C{twistd sentinel-reverse} (L{ConfigurationReloader}): the token
file, the allowlist file and the client CA are read again; connections no
longer allowed are drained and closed; a bad file changes nothing.  On a
memory clock here; C{tests.test_twistd} sends a real twistd the signal.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import attrs
from twisted.trial.unittest import SynchronousTestCase

from sentinel_twisted.proxy._reload import ConfigurationReloader
from sentinel_twisted.proxy.auth import TokenFileChecker
from sentinel_twisted.proxy.config import AllowFileError, read_allow_file

from ._proxy_support import Proxy, answer_frame, captured_log, lose, request_headers


class ReloadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="st-reload-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.tokens = self.write("tokens", "waf-1 t1\nwaf-2 Sekr3t-of-waf-2\nbot-1 t3\n")
        self.allowed = self.write("allowed", "waf-*\nbot-1\n")
        self.proxy = Proxy(
            TokenFileChecker(self.tokens), allowed_agents=read_allow_file(self.allowed), request_timeout=30
        )
        self.reloader = ConfigurationReloader(
            self.proxy.factory, token_file=self.tokens, allow_file=self.allowed
        )

    def write(self, name: str, text: str) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o600)
        return path

    def register(self, agent_id: str, token: str | None) -> Any:
        protocol, transport, connection = self.proxy.register(agent_id, token=token)
        # The reactor would report the close the protocol asks for.
        transport.lose = lambda: lose(protocol)  # type: ignore[attr-defined]
        return protocol, transport, connection

    def reload(self) -> tuple[bool, str]:
        with captured_log() as events:
            ok = self.reloader.reload()
        from twisted.logger import formatEvent

        return ok, "\n".join(formatEvent(e) or "" for e in events)

    def test_an_agent_no_longer_allowed_is_closed_and_named(self) -> None:
        _, waf_transport, waf = self.register("waf-1", "t1")
        bot_protocol, bot_transport, bot = self.register("bot-1", "t3")
        self.write("allowed", "waf-*\n")
        ok, text = self.reload()
        self.assertTrue(ok)
        self.assertIn(f"Closing connection {bot.connection_id} of agent bot-1", text)
        self.assertIn("no longer allowed (allowlist)", text)
        self.assertTrue(bot_transport.disconnecting)
        self.assertFalse(waf_transport.disconnecting)
        self.assertFalse(waf.is_closed)
        # New registrations follow the new list.
        self.assertFalse(self.proxy.factory.config.allowed_agents.allows("bot-1"))
        self.assertTrue(self.proxy.factory.config.allowed_agents.allows("waf-9"))
        lose(bot_protocol)
        self.assertEqual(self.proxy.pool.agent_ids(), ["waf-1"])

    def _reload_closes_waf2(self, tokens: str, why: str) -> Any:
        """
        With waf-1 and waf-2 registered, reload C{tokens}: waf-2's connection
        is closed for C{why}, waf-1's stays, and waf-2's token is never
        logged; waf-2's connection is returned.
        """
        _, _, waf1 = self.register("waf-1", "t1")
        _, transport, waf2 = self.register("waf-2", "Sekr3t-of-waf-2")
        self.write("tokens", tokens)
        ok, text = self.reload()
        self.assertTrue(ok)
        self.assertIn(f"Closing connection {waf2.connection_id} of agent waf-2", text)
        self.assertIn(why, text)
        self.assertTrue(transport.disconnecting)
        self.assertFalse(waf1.is_closed)
        self.assertNotIn("Sekr3t", text)
        return waf2

    def test_an_agent_whose_token_is_gone_is_closed(self) -> None:
        self._reload_closes_waf2("waf-1 t1\nbot-1 t3\n", "token is gone from the token file")

    def test_an_agent_whose_token_was_changed_is_closed(self) -> None:
        # A token rotated after a leak: whoever registered with the old one
        # must not keep its connection.
        waf2 = self._reload_closes_waf2(
            "waf-1 t1\nwaf-2 N3w-Sekr3t-of-waf-2\nbot-1 t3\n",
            "the token it registered with is no longer in the token file",
        )
        # The connection keeps a digest, never the token.
        self.assertNotIn(b"Sekr3t", repr(vars(waf2)).encode())
        # The agent is not retired: it registers again with its new token.
        self.assertFalse(self.reloader.retired("waf-2"))

    def test_a_reload_that_keeps_the_token_keeps_the_connection(self) -> None:
        _, transport, waf2 = self.register("waf-2", "Sekr3t-of-waf-2")
        self.write("tokens", "waf-2 Sekr3t-of-waf-2\nwaf-1 other\n")
        ok, text = self.reload()
        self.assertTrue(ok)
        self.assertIn("0 connection(s) no longer allowed", text)
        self.assertFalse(transport.disconnecting)

    def test_retired_names_the_agents_that_can_no_longer_register(self) -> None:
        # What the gateway forgets at a reload: an agent off the allowlist,
        # or off the token file when tokens are required; never one merely away.
        seen: list[Any] = []
        self.reloader.reloaded.append(seen.append)
        self.write("allowed", "waf-*\n")
        self.write("tokens", "waf-1 t1\nbot-1 t3\n")
        self.assertTrue(self.reload()[0])
        [retired] = seen
        self.assertEqual(retired, self.reloader.retired)
        self.assertTrue(retired("bot-1"))  # off the allowlist
        self.assertFalse(retired("waf-1"))
        # waf-2's token is gone, but tokens are optional here: it may still register.
        self.assertFalse(retired("waf-2"))
        self.proxy.factory.config = attrs.evolve(self.proxy.factory.config, require_auth=True)
        self.assertTrue(retired("waf-2"))
        self.assertFalse(retired("waf-1"))

    def test_requests_in_flight_are_answered_before_the_close(self) -> None:
        protocol, transport, bot = self.register("bot-1", "t3")
        answered = bot.send_event(request_headers("r1"))
        self.write("allowed", "waf-*\n")
        self.reload()
        self.assertTrue(bot.is_closed)
        self.assertFalse(transport.disconnecting)
        # Nothing new goes to it, but the answer in flight is taken.
        self.assertEqual(self.proxy.pool.connections("bot-1"), [bot])
        self.assertFalse(bot.can_accept_requests)
        protocol.dataReceived(answer_frame("r1"))
        self.assertTrue(self.successResultOf(answered).is_allow)
        self.proxy.clock.advance(0.05)
        self.assertTrue(transport.disconnecting)

    def test_an_agent_that_does_not_answer_is_closed_after_the_request_timeout(self) -> None:
        _, transport, bot = self.register("bot-1", "t3")
        bot.send_event(request_headers("r1"), timeout=3600).addErrback(lambda _: None)
        self.write("allowed", "waf-*\n")
        self.reload()
        self.proxy.clock.pump([1.0] * 29)
        self.assertFalse(transport.disconnecting)
        self.proxy.clock.pump([1.0] * 2)
        self.assertTrue(transport.disconnecting)

    def test_a_bad_file_keeps_the_configuration_in_force(self) -> None:
        _, transport, bot = self.register("bot-1", "t3")
        checker = self.proxy.factory.token_checker
        config = self.proxy.factory.config
        for name, text, problem in [
            ("allowed", "", "no agent id or pattern"),
            ("allowed", "waf-* bot-1\n", ":1: expected one agent id or pattern"),
            ("tokens", "waf-1\n", ":1: expected 'AGENT_ID TOKEN'"),
        ]:
            with self.subTest(name=name, text=text):
                self.write(name, text)
                ok, logged = self.reload()
                self.assertFalse(ok)
                self.assertEqual(len(logged.splitlines()), 1, logged)
                self.assertIn("Reload failed, the configuration in force is unchanged", logged)
                self.assertIn(problem, logged)
                self.assertIs(self.proxy.factory.token_checker, checker)
                self.assertIs(self.proxy.factory.config, config)
                self.assertFalse(bot.is_closed)
                self.assertFalse(transport.disconnecting)
                self.write("allowed", "waf-*\nbot-1\n")
                self.write("tokens", "waf-1 t1\nwaf-2 Sekr3t-of-waf-2\nbot-1 t3\n")

    def test_a_missing_file_keeps_the_configuration_in_force(self) -> None:
        os.unlink(self.allowed)
        ok, logged = self.reload()
        self.assertFalse(ok)
        self.assertIn(f"--allow-file: cannot read allowlist {self.allowed}", logged)

    def test_command_line_patterns_stay(self) -> None:
        self.reloader.allow = ("ops-1",)
        self.write("allowed", "waf-*\n")
        self.assertTrue(self.reload()[0])
        self.assertEqual(self.proxy.factory.config.allowed_agents.patterns, ("ops-1", "waf-*"))


class AllowFileTests(SynchronousTestCase):
    def test_comments_and_blank_lines_are_skipped(self) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".allow", delete=False) as f:
            f.write("# agents\n\nwaf-1   # the WAF\n  bot-*\n")
        self.addCleanup(os.unlink, f.name)
        self.assertEqual(read_allow_file(f.name), ("waf-1", "bot-*"))

    def test_byte_order_mark_is_not_part_of_the_first_pattern(self) -> None:
        # Windows editors start UTF-8 files with one.
        for text, patterns in [
            (b"\xef\xbb\xbfwaf-1\r\nbot-*\r\n", ("waf-1", "bot-*")),
            (b"\xef\xbb\xbf# allowed\r\nwaf-1\r\n", ("waf-1",)),
        ]:
            with tempfile.NamedTemporaryFile("wb", delete=False) as f:
                f.write(text)
            self.addCleanup(os.unlink, f.name)
            self.assertEqual(read_allow_file(f.name), patterns)

    def test_file_that_is_not_utf8_names_the_line(self) -> None:
        with tempfile.NamedTemporaryFile("wb", delete=False) as f:
            f.write(b"waf-1\nbot-\xff\n")
        self.addCleanup(os.unlink, f.name)
        with self.assertRaises(AllowFileError) as caught:
            read_allow_file(f.name)
        self.assertIn(f"{f.name}:2: not UTF-8", str(caught.exception))

    def test_an_empty_file_is_an_error_not_everybody(self) -> None:
        with tempfile.NamedTemporaryFile("w", delete=False) as f:
            f.write("# nobody\n")
        self.addCleanup(os.unlink, f.name)
        with self.assertRaises(AllowFileError) as caught:
            read_allow_file(f.name)
        self.assertIn("an empty allowlist would admit every agent", str(caught.exception))
