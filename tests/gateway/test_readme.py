"""
The README's gateway section agrees with the code: its option table lists
every gateway option of C{twistd sentinel-reverse} with its default, and
its commands parse.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from sentinel_twisted.agent.tap import Options as AgentOptions
from sentinel_twisted.tap import DEFAULT_HTTP, DEFAULT_STATUS, Options

ROOT = Path(__file__).resolve().parents[2]

GATEWAY_OPTIONS = {
    "http",
    "upstream",
    "upstream-timeout",
    "agent",
    "fail-open",
    "challenge-status",
    "status",
    "access-log",
    "header-timeout",
    "max-client-connections",
    "min-body-rate",
    "send-timeout",
    "status-host",
    "max-replaced-body-size",
    "allow-underscore-headers",
}


def help_texts(options: Options) -> dict[str, str]:
    """Each long option of C{--help} and its text, continuation lines joined."""
    texts: dict[str, str] = {}
    current = None
    for line in str(options).splitlines():
        # An option starts its line ("  -x, --name=" or "      --name="); a
        # continuation line may begin with an option's name too.
        option = re.match(r"^  (?:-\w, |    )--([a-z0-9-]+)=?(?:\s+(.*))?$", line)
        if option:
            current = option.group(1)
            texts[current] = (option.group(2) or "").strip()
        elif current is not None and line.startswith(" " * 8) and line.strip():
            texts[current] += " " + line.strip()
        else:
            current = None
    return texts


def section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("<!-- section: gateway -->")
    end = text.index("<!-- end section: gateway -->")
    return text[start:end]


class ReadmeGatewaySectionTests(SynchronousTestCase):
    def test_option_table_lists_every_gateway_option(self) -> None:
        rows = re.findall(r"^\| `--([a-z-]+)[^`]*` \| ([^|]*) \|", section(), re.M)
        documented = {name for name, _ in rows}
        self.assertLessEqual(GATEWAY_OPTIONS, documented)
        known = {name.rstrip("=") for name in Options().longOpt}
        self.assertLessEqual(documented, known)
        defaults = dict(rows)
        self.assertIn(DEFAULT_HTTP, defaults["http"])
        self.assertIn(DEFAULT_STATUS, defaults["status"])

    def test_every_gateway_option_has_a_help_text(self) -> None:
        texts = help_texts(Options())
        for name in GATEWAY_OPTIONS:
            self.assertIn(name, texts)
            # Twisted prints "--name=" alone for an option without a doc.
            self.assertGreaterEqual(len(texts[name].split()), 3, f"--{name} has no help text: {texts[name]!r}")

    def test_the_agent_help_says_which_reloads_forget_an_agent(self) -> None:
        # As the README's table says: only a reload that retires an agent
        # (allowlist, token file) forgets it, once it is away.
        text = help_texts(Options())["agent"]
        self.assertIn("a reload (SIGHUP) that retires one (allowlist, token file) forgets it once it is away", text)
        self.assertIn("a reload that takes one off the allowlist forgets it once away", section())

    def test_help_text_check_can_fail(self) -> None:
        class Undocumented(Options):
            optParameters = [*Options.optParameters, ["no-doc", None, None]]

        texts = help_texts(Undocumented())
        self.assertEqual(texts["no-doc"], "")
        self.assertIn("Server endpoint the HTTP gateway takes clients on", texts["http"])

    def test_demo_commands_parse(self) -> None:
        commands = re.findall(r"^(twistd -n \S+.*)$", section(), re.M)
        self.assertEqual(len(commands), 2, commands)
        gateway, agent = (shlex.split(c)[2:] for c in commands)
        self.assertEqual(gateway, ["sentinel-reverse"])
        self.assertEqual(agent[0], "sentinel-agent")
        options = AgentOptions()
        options.parseOptions(agent[1:])
        self.assertTrue((ROOT / "examples" / "rules.toml").exists())
