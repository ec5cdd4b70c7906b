"""
The README's two-terminal demo, run as written, with the agent section's curl requests.

The commands are read from README.md (the section "The HTTP gateway: try
an agent end to end") and started exactly as printed, in one directory that
holds what the demo needs from a clone (C{examples/rules.toml}): both
programs side by side, with their default pid files, sockets and lockfiles.
The only change is the HTTP and status ports: the demo's defaults (8080,
9901) may be taken by a gateway the user runs, so the test adds C{--http}
and C{--status} options naming free ports and sends the README's requests
there.  Then each C{curl -i} request of the demo's console block must get
the status line, the headers and the body the README shows for it.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Any

from twisted.trial.unittest import TestCase

from .twistd_support import stop_process, twistd_command, unix_listening

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SECTION = "## The HTTP gateway: try an agent end to end"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


WORKERS_SECTION = "## Every core: `--workers`"


def demo_section(title: str = SECTION) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(title)
    end = text.index("\n#", start + len(title))
    return text[start:end]


def demo_commands(title: str = SECTION) -> list[list[str]]:
    """The commands of the section's C{sh} blocks, in order."""
    return [shlex.split(body, comments=True) for lang, body in FENCE.findall(demo_section(title)) if lang == "sh"]


def demo_exchanges() -> list[dict[str, Any]]:
    """
    Each C{$ curl -i URL} of the console block with the answer printed
    under it: status code, headers and body.
    """
    (console,) = [body for lang, body in FENCE.findall(demo_section()) if lang == "console"]
    exchanges: list[dict[str, Any]] = []
    for chunk in console.split("$ ")[1:]:
        command, _, answer = chunk.partition("\n")
        words = shlex.split(command)
        head, _, body = answer.strip("\n").partition("\n\n")
        status_line, *header_lines = head.splitlines()
        exchanges.append(
            {
                "command": words,
                "url": words[-1],
                "status": int(status_line.split()[1]),
                "headers": dict(line.split(": ", 1) for line in header_lines),
                "body": body.strip("\n"),
            }
        )
    return exchanges


def agent_section_curls() -> list[dict[str, Any]]:
    """
    Each C{curl -i} of the agent section's C{sh} block, with the status
    and the rule its comment promises (C{# 403 (rule sqli-query)}).
    """
    text = README.read_text(encoding="utf-8")
    section = text[text.index("<!-- section: agent -->") : text.index("<!-- end section: agent -->")]
    curls = []
    for lang, body in FENCE.findall(section):
        for line in body.splitlines() if lang == "sh" else ():
            if not line.startswith("curl "):
                continue
            command, _, comment = line.partition("#")
            words = shlex.split(command)
            agent = words[words.index("-A") + 1] if "-A" in words else None
            rule = re.search(r"\(rule ([a-z-]+)\)", comment)
            curls.append(
                {
                    "command": command.strip(),
                    "url": words[-1],
                    "user_agent": agent,
                    "status": int(re.search(r"\d{3}", comment).group()),  # type: ignore[union-attr]
                    "rule": rule.group(1) if rule else None,
                }
            )
    return curls


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(condition: Any, timeout: float, what: str, *processes: Process) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        for process in processes:
            if process.process.poll() is not None:
                raise AssertionError(f"{process.name} exited while waiting for {what}:\n{process.output()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout}s waiting for {what}")
        time.sleep(0.05)


class Process:
    def __init__(self, test: TestCase, cwd: Path, name: str, arguments: list[str]) -> None:
        self.name = name
        self.path = cwd / f"{name}.out"
        self._out: IO[bytes] = self.path.open("wb")
        self.process = subprocess.Popen(
            twistd_command(*arguments), cwd=cwd, stdin=subprocess.DEVNULL, stdout=self._out, stderr=subprocess.STDOUT
        )
        test.addCleanup(self.stop)

    def output(self) -> str:
        return self.path.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        stop_process(self.process, STOP_TIMEOUT)
        self._out.close()


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any) -> None:
        return None


def fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.build_opener(_NoRedirects).open(request, timeout=10) as response:
            return response.status, dict(response.headers.items()), response.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, dict(e.headers.items()), e.read()


class ReadmeDemoTests(TestCase):
    def test_the_demo_section_is_what_this_test_expects(self) -> None:
        commands = demo_commands()
        self.assertEqual([words[:3] for words in commands][0], ["twistd", "-n", "sentinel-reverse"])
        self.assertEqual(commands[1][:3], ["twistd", "-n", "sentinel-agent"])
        self.assertEqual([e["status"] for e in demo_exchanges()], [200, 403])
        self.assertIn("`bin` on your `PATH`", demo_section())

    def test_the_demo_runs_as_written(self) -> None:
        self.run_demo(demo_commands(), curls=agent_section_curls())

    def test_the_agent_sections_requests_are_read_as_printed(self) -> None:
        curls = agent_section_curls()
        self.assertEqual([c["status"] for c in curls], [200, 403, 403, 403, 301])
        self.assertEqual([c["rule"] for c in curls], [None, "no-admin", "sqli-query", "bad-bots", "old-to-new"])
        self.assertEqual(curls[3]["user_agent"], "sqlmap/1.7")

    def test_the_demo_runs_with_two_workers_as_written(self) -> None:
        commands = demo_commands(WORKERS_SECTION)
        self.assertIn("--workers", commands[0])
        self.run_demo(commands, registrations=2)

    def run_demo(
        self, commands: list[list[str]], registrations: int = 1, curls: list[dict[str, Any]] | None = None
    ) -> None:
        work = Path(self.mktemp())
        (work / "examples").mkdir(parents=True)
        shutil.copy(ROOT / "examples" / "rules.toml", work / "examples" / "rules.toml")
        http, status = free_port(), free_port()
        gateway_words, agent_words = commands
        ports = ["--http", f"tcp:{http}:interface=127.0.0.1", "--status", f"tcp:{status}:interface=127.0.0.1"]

        gateway = Process(self, work, "gateway", gateway_words[1:] + ports)
        wait_for(lambda: "Site starting on" in gateway.output() and unix_listening(str(work / "sentinel-reverse.sock")),
                 START_TIMEOUT, "the gateway to listen", gateway)
        if "--workers" in gateway_words:
            wait_for(lambda: gateway.output().count("is ready") >= 2, START_TIMEOUT, "the workers", gateway)
        agent = Process(self, work, "agent", agent_words[1:])
        wait_for(lambda: gateway.output().count("Agent waf-1 registered connection") >= registrations,
                 START_TIMEOUT, "the agent to register", gateway, agent)

        for exchange in demo_exchanges():
            url = exchange["url"].replace("127.0.0.1:8080", f"127.0.0.1:{http}")
            code, headers, body = fetch(url)
            where = f"{shlex.join(exchange['command'])}: got {code} {headers} {body!r}"
            self.assertEqual(code, exchange["status"], where)
            for name, value in exchange["headers"].items():
                if name in ("Date", "Content-Length"):
                    self.assertIn(name, headers, where)
                elif name == "Content-Type" or name.startswith("X-"):
                    self.assertEqual(headers.get(name), value, where)
            if exchange["body"].startswith("{"):
                promised, got = json.loads(exchange["body"]), json.loads(body)
                for key in ("method", "path", "query", "body_bytes", "decisions"):
                    self.assertEqual(got[key], promised[key], f"{key}: {where}")
            else:
                self.assertEqual(body.decode(), exchange["body"], where)

        # The agent section's curl lines: the status their comment says, by
        # the rule it names (the agent logs each rule that decides).
        for curl in curls or ():
            url = curl["url"].replace("127.0.0.1:8080", f"127.0.0.1:{http}")
            headers = {"User-Agent": curl["user_agent"]} if curl["user_agent"] else {}
            code, _, body = fetch(url, headers)
            self.assertEqual(code, curl["status"], f"{curl['command']}: got {code} {body!r}")
            if curl["rule"]:
                wait_for(lambda: f"Rule {curl['rule']} " in agent.output(), START_TIMEOUT,  # noqa: B023
                         f"the agent to log rule {curl['rule']}", agent)

        self.assertNotIn("Traceback", gateway.output())
        self.assertNotIn("Traceback", agent.output())
        for process in (agent, gateway):
            process.process.terminate()
            self.assertEqual(process.process.wait(STOP_TIMEOUT), 0, process.output())
        self.assertFalse((work / "sentinel-reverse.sock").exists())
        self.assertEqual(sorted(p.name for p in work.glob("*.pid")), [])
