"""
The README's agent section agrees with the code: its Python and TOML
blocks are pieces of files under C{examples/}, its twistd command parses,
its option table lists every option, and the example agent runs.
"""

from __future__ import annotations

import re
import shlex
import textwrap
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from sentinel_twisted.agent.tap import Options

from ._support import REQUEST_HEADERS, Harness, headers_event

ROOT = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("<!-- section: agent -->")
    end = text.index("<!-- end section: agent -->")
    return text[start:end]


def is_excerpt(block: str, source: str) -> bool:
    wanted = textwrap.dedent(block).rstrip("\n").split("\n")
    lines = source.split("\n")
    return any(lines[i : i + len(wanted)] == wanted for i in range(len(lines) - len(wanted) + 1))


class ReadmeAgentSectionTests(SynchronousTestCase):
    def test_code_blocks_are_pieces_of_examples(self) -> None:
        sources = [p.read_text(encoding="utf-8") for p in (ROOT / "examples").iterdir() if p.is_file()]
        blocks = [(lang, body) for lang, body in FENCE.findall(section()) if lang in ("python", "toml")]
        self.assertGreaterEqual(len(blocks), 3)
        for lang, body in blocks:
            self.assertTrue(any(is_excerpt(body, s) for s in sources), f"{lang} block not in examples/:\n{body}")
        self.assertFalse(is_excerpt("return block(404)\n", sources[0]))

    def test_twistd_command_parses(self) -> None:
        commands = [
            shlex.split(line, comments=True)
            for lang, body in FENCE.findall(section())
            if lang == "sh"
            for line in body.splitlines()
            if line.startswith("twistd ")
        ]
        self.assertEqual(len(commands), 1)
        words = commands[0]
        arguments = words[words.index("sentinel-agent") + 1 :]
        arguments = [str(ROOT / a) if a.startswith("examples/") else a for a in arguments]
        options = Options()
        options.parseOptions(arguments)
        self.assertEqual(options["agent-id"], "waf-1")

    def test_a_rule_error_reads_as_the_readme_shows_it(self) -> None:
        from twisted.python import usage

        (shown,) = [body.strip() for lang, body in FENCE.findall(section()) if lang == "" and "--rules" in body]
        prefix = "twistd sentinel-agent: --rules /etc/sentinel/rules.toml: "
        self.assertTrue(shown.startswith(prefix), shown)
        directory = Path(self.mktemp())
        directory.mkdir()
        rules = directory / "rules.toml"
        fine = "".join(f'[[rules]]\nid = "r{i}"\ntags = ["t"]\n' for i in range(3))
        rules.write_text(fine + '[[rules]]\nid = "sqli"\nmatch = { query = "(union" }\nblock = true\n', encoding="utf-8")
        options = Options()
        error = self.assertRaises(
            usage.UsageError, options.parseOptions, ["--connect", "unix:x.sock", "--agent-id", "a", "--rules", str(rules)]
        )
        self.assertEqual(str(error), shown[len("twistd sentinel-agent: ") :].replace("/etc/sentinel/rules.toml", str(rules)))

    def test_every_option_is_in_the_table(self) -> None:
        text = section()
        for name in Options().longOpt:
            name = name.rstrip("=")
            if name in ("help", "version"):
                continue
            self.assertIn(f"`--{name}", text, f"--{name} is not in the README's agent section")

    def test_simple_agent_blocks_admin(self) -> None:
        import importlib.util

        spec = importlib.util.spec_from_file_location("simple_agent", ROOT / "examples" / "simple_agent.py")
        assert spec is not None and spec.loader is not None
        module: Any = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        h = Harness(module.NoAdmin())
        h.register()
        h.sent()
        h.feed(REQUEST_HEADERS, headers_event("a", "/admin/users"))
        h.feed(REQUEST_HEADERS, headers_event("b", "/home"))
        first, second = h.answers()
        self.assertEqual(first["decision"]["block"]["status"], 403)
        self.assertEqual(second["decision"], "allow")
        self.assertEqual(second["response_headers"], [{"set": {"name": "x-checked-by", "value": "no-admin"}}])
