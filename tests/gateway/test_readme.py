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
    "status-host",
}


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
        known = {long for long, *_ in Options.optParameters} | {long for long, *_ in Options.optFlags} | {"agent", "status-host"}
        self.assertLessEqual(documented, known)
        defaults = dict(rows)
        self.assertIn(DEFAULT_HTTP, defaults["http"])
        self.assertIn(DEFAULT_STATUS, defaults["status"])

    def test_every_gateway_option_has_a_help_text(self) -> None:
        help_text = str(Options())
        for name in GATEWAY_OPTIONS:
            self.assertIn(f"--{name}", help_text)

    def test_demo_commands_parse(self) -> None:
        commands = re.findall(r"^(twistd -n \S+.*)$", section(), re.M)
        self.assertEqual(len(commands), 2, commands)
        gateway, agent = (shlex.split(c)[2:] for c in commands)
        self.assertEqual(gateway, ["sentinel-reverse"])
        self.assertEqual(agent[0], "sentinel-agent")
        options = AgentOptions()
        options.parseOptions(agent[1:])
        self.assertTrue((ROOT / "examples" / "rules.toml").exists())
