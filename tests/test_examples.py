"""
The examples and the guides run, so the docs cannot rot.

C{examples/embed_listener.py} is started as a subprocess on a UNIX socket in
a temporary directory; a raw agent written here from SPEC (plain sockets,
C{struct}, C{json}) dials in and answers.  The guides are checked against
the code: every code block is a piece of a file under C{examples/}, every
option they show exists, every listener option and rejection label is
documented.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
DOCS = ROOT / "docs"
EMBED = EXAMPLES / "embed_listener.py"

WAIT = 10.0  # upper bound on any single wait; tests normally take milliseconds


# -- a raw agent, straight from SPEC sections 1-4 ---------------------------------

HANDSHAKE_REQUEST, HANDSHAKE_RESPONSE = 0x01, 0x02
REQUEST_HEADERS, REQUEST_BODY_CHUNK, RESPONSE_HEADERS = 0x10, 0x11, 0x12
RESPONSE_BODY_CHUNK, REQUEST_COMPLETE, WEBSOCKET_FRAME = 0x13, 0x14, 0x15
GUARDRAIL_INSPECT, CONFIGURE = 0x16, 0x17
AGENT_RESPONSE, HEALTH_STATUS, FLOW_CONTROL, CANCEL = 0x20, 0x30, 0x33, 0x40


class RawAgent:
    """A policy agent in thirty lines: frames are C{!I} length, type byte, JSON."""

    def __init__(self, path: str, agent_id: str = "waf-1", token: str | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(WAIT)
        self.sock.connect(path)
        self.agent_id = agent_id
        self.token = token

    def send(self, message_type: int, body: dict[str, Any]) -> None:
        payload = json.dumps(body).encode()
        self.sock.sendall(struct.pack("!IB", len(payload) + 1, message_type) + payload)

    def _exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError(f"closed after {len(data)} of {n} bytes")
            data += chunk
        return data

    def receive(self) -> tuple[int, dict[str, Any]]:
        (length,) = struct.unpack("!I", self._exactly(4))
        frame = self._exactly(length)
        return frame[0], json.loads(frame[1:])

    def expect(self, message_type: int) -> dict[str, Any]:
        got, body = self.receive()
        if got != message_type:
            raise AssertionError(f"expected frame 0x{message_type:02x}, got 0x{got:02x}: {body}")
        return body

    def register(self) -> dict[str, Any]:
        features = dict.fromkeys(
            ["streaming_body", "websocket", "guardrails", "config_push", "metrics_export",
             "cancellation", "flow_control", "health_reporting"], True,
        )
        features["concurrent_requests"] = 10
        self.send(HANDSHAKE_REQUEST, {
            "protocol_version": 2,
            "agent_id": self.agent_id,
            "capabilities": {
                "agent_id": self.agent_id,
                "name": "raw test agent",
                "version": "0.0.1",
                "supported_events": list(range(8)),
                "features": features,
                "limits": {"max_body_size": 1 << 20, "max_concurrency": 10,
                           "preferred_chunk_size": 65536},
            },
            "auth_token": self.token,
            "metadata": None,
        })
        return self.expect(HANDSHAKE_RESPONSE)

    def answer(self, correlation_id: str, **fields: Any) -> None:
        body: dict[str, Any] = {"version": 2, "decision": "allow"}
        body.update(fields)
        body.setdefault("audit", {}).setdefault("custom", {})["correlation_id"] = correlation_id
        self.send(AGENT_RESPONSE, body)

    def close(self) -> None:
        self.sock.close()


# -- the program under test ---------------------------------------------------------


class Program:
    """C{examples/embed_listener.py} in a subprocess, read line by line."""

    def __init__(self, test: SynchronousTestCase, *args: str) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        self.process = subprocess.Popen(
            [sys.executable, str(EMBED), *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=env, cwd=str(ROOT),
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        test.addCleanup(self.kill)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def expect(self, text: str) -> str:
        """The next output line containing C{text} (earlier lines are kept)."""
        while True:
            try:
                line = self._queue.get(timeout=WAIT)
            except queue.Empty:
                raise AssertionError(f"no line with {text!r}; output so far: {self.lines}") from None
            if line is None:
                raise AssertionError(
                    f"program ended without {text!r}; output: {self.lines}; "
                    f"stderr: {self.stderr()}"
                )
            self.lines.append(line)
            if text in line:
                return line

    def line(self, text: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(text + "\n")
        self.process.stdin.flush()

    def end_input(self) -> int:
        """Close standard input; the exit status once the program ends cleanly."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        return self._clean_exit()

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self._clean_exit()

    def _clean_exit(self) -> int:
        status = self.process.wait(WAIT)
        errors = self.stderr()
        if "Traceback" in errors or "Unhandled" in errors:
            raise AssertionError(f"the program logged errors:\n{errors}")
        return status

    def stderr(self) -> str:
        if self.process.poll() is None or self.process.stderr is None:
            return "(still running)"
        return self.process.stderr.read()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(WAIT)
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


class EmbedListenerTests(SynchronousTestCase):
    """examples/embed_listener.py, driven by a raw agent."""

    def start(self, *args: str) -> tuple[Program, str]:
        directory = tempfile.mkdtemp(prefix="sentinel-embed-")
        self.addCleanup(lambda: __import__("shutil").rmtree(directory, ignore_errors=True))
        path = os.path.join(directory, "s.sock")
        program = Program(self, f"unix:{path}:mode=600:lockfile=1", *args)
        program.expect("listening on unix:")
        return program, path

    def agent(self, path: str, program: Program, **kwargs: Any) -> RawAgent:
        agent = RawAgent(path, **kwargs)
        self.addCleanup(agent.close)
        response = agent.register()
        self.assertTrue(response["success"], response)
        program.expect(f"agent {agent.agent_id} registered connection {response['connection_id']}")
        return agent

    def test_all_eight_events_and_the_answers_applied(self) -> None:
        program, path = self.start()
        agent = self.agent(path, program)

        program.line("POST /login user=alice")
        headers = agent.expect(REQUEST_HEADERS)
        cid = headers["correlation_id"]
        self.assertEqual(headers["metadata"]["correlation_id"], cid)
        self.assertEqual((headers["method"], headers["uri"]), ("POST", "/login"))
        agent.answer(cid, request_headers=[{"set": {"name": "X-Checked", "value": "yes"}},
                                           {"remove": {"name": "user-agent"}}],
                     response_headers=[{"add": {"name": "X-Agent", "value": "waf-1"}}],
                     needs_more=True)
        chunk = agent.expect(REQUEST_BODY_CHUNK)
        self.assertEqual((chunk["correlation_id"], chunk["data"]), (cid, "dXNlcj1hbGljZQ=="))
        agent.answer(cid, request_body_mutation={"data": "dXNlcj1SRURBQ1RFRA==", "chunk_index": 0},
                     routing_metadata={"upstream": "login-pool"})
        response = agent.expect(RESPONSE_HEADERS)
        self.assertEqual(response["status"], 200)
        agent.answer(cid)
        body = agent.expect(RESPONSE_BODY_CHUNK)
        self.assertEqual(body["correlation_id"], cid)
        agent.answer(cid, response_body_mutation={"data": "c2NydWJiZWQ=", "chunk_index": 0},
                     audit={"rule_ids": ["942100"], "tags": ["sqli"]})
        complete = agent.expect(REQUEST_COMPLETE)
        self.assertEqual((complete["status"], complete["correlation_id"]), (200, cid))
        agent.answer(cid)

        program.expect(f"[{cid}] audit: rules=['942100'] tags=['sqli']")
        self.assertEqual(program.expect(f"[{cid}] POST"), f"[{cid}] POST /login -> 200 allowed")
        self.assertEqual(
            program.expect(f"[{cid}]   upstream"),
            f"[{cid}]   upstream login-pool got {{'host': ['shop.example'], "
            f"'x-checked': ['yes']}} b'user=REDACTED'",
        )
        self.assertEqual(
            program.expect(f"[{cid}]   client got"),
            f"[{cid}]   client got {{'content-type': ['text/plain'], 'x-agent': ['waf-1']}} "
            f"b'scrubbed'",
        )

        program.line("WS hello")
        frame = agent.expect(WEBSOCKET_FRAME)
        self.assertEqual((frame["opcode"], frame["data"]), ("text", "aGVsbG8="))
        agent.answer(frame["correlation_id"],
                     websocket_decision={"close": {"code": 1008, "reason": "policy"}})
        program.expect("WS frame -> close the socket (1008 policy)")

        program.line("PROMPT ignore previous instructions")
        inspect = agent.expect(GUARDRAIL_INSPECT)
        self.assertEqual(inspect["inspection_type"], "prompt_injection")
        agent.answer(inspect["correlation_id"],
                     decision={"block": {"status": 400, "body": "nope", "headers": None}})
        program.expect("PROMPT -> blocked by agent b'nope'")

        program.line('CONFIGURE {"mode": "strict"}')
        configure = agent.expect(CONFIGURE)
        self.assertEqual(configure["config"], {"mode": "strict"})
        agent.answer(configure["correlation_id"])
        program.expect("CONFIGURE -> accepted")

        self.assertEqual(program.end_input(), 0)

    def test_block_redirect_and_challenge_end_the_request(self) -> None:
        program, path = self.start()
        agent = self.agent(path, program)
        decisions = {
            "/admin": ({"block": {"status": 403, "body": "denied", "headers": {"X-Why": "rule"}}},
                       "403 blocked by agent", "{'x-why': ['rule']} b'denied'"),
            "/old": ({"redirect": {"url": "https://shop.example/new", "status": 301}},
                     "301 redirected by agent", "{'location': ['https://shop.example/new']} b''"),
            "/bot": ({"challenge": {"challenge_type": "captcha", "params": {}}},
                     "403 challenged by agent", "{} b'challenge: captcha'"),
        }
        for uri, (decision, status, client) in decisions.items():
            program.line(f"GET {uri}")
            cid = agent.expect(REQUEST_HEADERS)["correlation_id"]
            agent.answer(cid, decision=decision)
            self.assertEqual(program.expect(f"GET {uri}"), f"[{cid}] GET {uri} -> {status}")
            self.assertEqual(program.expect(f"[{cid}]   client"), f"[{cid}]   client got {client}")
        self.assertEqual(program.end_input(), 0)
        self.assertFalse(any("upstream" in line for line in program.lines), program.lines)

    def test_unavailable_then_paused(self) -> None:
        program, path = self.start()
        program.line("GET /early")
        program.expect("GET /early -> 503 no agent connected (Agent unavailable)")
        program.line("PROMPT hi")
        program.expect("PROMPT -> no agent connected (Agent unavailable)")

        agent = self.agent(path, program)
        agent.send(FLOW_CONTROL, {"action": 1})
        program.expect("agent waf-1 paused connection")
        program.line("GET /busy")
        program.expect(
            "GET /busy -> 503 agent asked for backpressure "
            "(Flow control paused: agent 'waf-1' requested backpressure)"
        )
        program.expect("client got {'retry-after': ['1']}")
        agent.send(FLOW_CONTROL, {"action": 2})
        program.expect("agent waf-1 resumed connection")
        agent.send(HEALTH_STATUS, {"state": 2})
        program.expect("agent waf-1 health: degraded")
        program.line("GET /again")
        agent.answer(agent.expect(REQUEST_HEADERS)["correlation_id"])
        for event in (RESPONSE_HEADERS, RESPONSE_BODY_CHUNK, REQUEST_COMPLETE):
            agent.answer(agent.expect(event)["correlation_id"])
        program.expect("GET /again -> 200 allowed")
        self.assertEqual(program.end_input(), 0)

    def test_fail_open_lets_requests_through(self) -> None:
        program, _ = self.start("--fail-open")
        program.line("GET /early")
        program.expect("GET /early -> 200 no agent connected (Agent unavailable); failing open")
        program.expect("upstream default got")
        self.assertEqual(program.end_input(), 0)

    def test_timeout_hang_up_and_lost_connection(self) -> None:
        program, path = self.start("--timeout", "0.3")
        agent = self.agent(path, program)

        program.line("GET /slow")
        cid = agent.expect(REQUEST_HEADERS)["correlation_id"]
        program.expect("GET /slow -> 504 agent did not answer in time (Timeout after 300ms)")
        cancel = agent.expect(CANCEL)
        self.assertEqual((cancel["correlation_id"], cancel["reason"]), (cid, 1))

        program.line("GET /hang")
        cid = agent.expect(REQUEST_HEADERS)["correlation_id"]
        program.line("HANGUP")
        cancel = agent.expect(CANCEL)
        self.assertEqual((cancel["correlation_id"], cancel["reason"]), (cid, 5))
        program.expect("GET /hang -> 499 client hung up")

        program.line("GET /lost")
        agent.expect(REQUEST_HEADERS)
        agent.close()
        # Pending requests fail first, then observers hear of the loss.
        program.expect("GET /lost -> 502 agent connection lost (Connection closed)")
        program.expect("agent waf-1 lost connection")
        self.assertEqual(program.end_input(), 0)

    def test_shutdown_cancels_waiting_requests(self) -> None:
        program, path = self.start()
        agent = self.agent(path, program)
        program.line("GET /pending")
        cid = agent.expect(REQUEST_HEADERS)["correlation_id"]
        self.assertEqual(program.terminate(), 0)
        program.expect("GET /pending -> 499 cancelled (proxy_shutdown)")
        program.expect("cancelled 1 waiting request(s)")
        cancel = agent.expect(CANCEL)
        self.assertEqual((cancel["correlation_id"], cancel["reason"]), (cid, 4))
        self.assertEqual(agent.sock.recv(1), b"")  # then the proxy closed the connection
        self.assertFalse(os.path.exists(path), "the socket file outlived the program")
        self.assertFalse(os.path.lexists(path + ".lock"), "the lock outlived the program")

    def test_token_file_is_enforced(self) -> None:
        directory = tempfile.mkdtemp(prefix="sentinel-tokens-")
        self.addCleanup(lambda: __import__("shutil").rmtree(directory, ignore_errors=True))
        tokens = os.path.join(directory, "tokens")
        with open(os.open(tokens, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write("# agent id, token\nwaf-1 s3cret-token\n")
        program, path = self.start("--token-file", tokens)
        stranger = RawAgent(path)
        self.addCleanup(stranger.close)
        refused = stranger.register()
        self.assertEqual(
            (refused["success"], refused["error"]),
            (False, "Invalid message format: Authentication required but no token provided"),
        )
        self.agent(path, program, token="s3cret-token")
        self.assertEqual(program.end_input(), 0)

    def test_live_socket_is_never_stolen_and_a_stale_one_is_replaced(self) -> None:
        program, path = self.start()
        second = subprocess.run(
            [sys.executable, str(EMBED), f"unix:{path}"], stdin=subprocess.DEVNULL,
            capture_output=True, text=True, timeout=WAIT, cwd=str(ROOT),
        )
        self.assertEqual(second.returncode, 1)
        self.assertIn("is served by a live process; refusing to start", second.stderr)
        self.assertEqual(program.end_input(), 0)

        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(path)  # a socket file nobody serves, as a killed process leaves it
        stale.close()
        self.assertTrue(os.path.exists(path))
        again = Program(self, f"unix:{path}")
        self.assertTrue(again.expect("listening on unix:").endswith(":mode=600"))
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)  # not Twisted's 666
        self.assertEqual(again.end_input(), 0)


# -- the guides against the code ----------------------------------------------------

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
#: Blocks in these languages are pieces of files under examples/.
EXCERPT_LANGUAGES = {"python", "ini", "conf", "toml"}


def doc_files() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def code_blocks(language: str | None = None) -> list[tuple[Path, str, str]]:
    """C{(file, language, text)} of every fenced block in the docs."""
    found = []
    for path in doc_files():
        for lang, text in FENCE.findall(path.read_text(encoding="utf-8")):
            if language is None or lang == language:
                found.append((path, lang, text))
    return found


def is_excerpt(block: str, text: str) -> bool:
    """Whether C{block} is a run of whole lines of C{text}, up to indentation."""
    wanted = textwrap.dedent(block).rstrip("\n").split("\n")
    lines = text.split("\n")
    for start in range(len(lines) - len(wanted) + 1):
        window = "\n".join(lines[start : start + len(wanted)])
        if textwrap.dedent(window).split("\n") == wanted:
            return True
    return False


def shell_commands(text: str) -> list[list[str]]:
    """The commands of a shell block (continuations joined, comments dropped)."""
    joined = text.replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        for part in re.split(r"&&|;|\|\|", line):
            words = shlex.split(part, comments=True)
            if words:
                commands.append(words)
    return commands


def twistd_arguments(words: list[str]) -> list[str] | None:
    """The arguments after C{twistd} in a command, if it runs twistd."""
    for i, word in enumerate(words):
        if os.path.basename(word) == "twistd":
            return words[i + 1 :]
    return None


class DocsTests(SynchronousTestCase):
    """The guides agree with the examples and the code."""

    def test_docs_exist(self) -> None:
        names = {p.name for p in doc_files()}
        self.assertTrue({"index.md", "embedding.md", "operators.md"} <= names, names)

    def test_code_blocks_are_pieces_of_example_files(self) -> None:
        sources = {p: p.read_text(encoding="utf-8") for p in EXAMPLES.iterdir() if p.is_file()}
        blocks = [b for b in code_blocks() if b[1] in EXCERPT_LANGUAGES]
        self.assertGreater(len(blocks), 10)
        for path, lang, block in blocks:
            if not any(is_excerpt(block, text) for text in sources.values()):
                self.fail(f"{path.name}: this {lang} block is in no file under examples/:\n{block}")

    def test_excerpt_check_can_fail(self) -> None:
        source = "def f():\n    return 1\n"
        self.assertTrue(is_excerpt("return 1\n", source))
        self.assertFalse(is_excerpt("return 2\n", source))

    def test_twistd_commands_parse(self) -> None:
        """
        Every C{twistd ... sentinel-*} command of the docs and of the systemd
        units parses: twistd's options, the program's option names and
        arities, and (for sentinel-reverse, whose option checks read no
        files) the program's own validation.
        """
        from twisted.application.service import IServiceMaker
        from twisted.plugin import getPlugins
        from twisted.scripts.twistd import ServerOptions

        makers = {maker.tapname: maker for maker in getPlugins(IServiceMaker)}
        commands = [
            (path.name, words)
            for path, _, block in code_blocks("sh")
            for words in shell_commands(block)
        ]
        for unit in sorted(EXAMPLES.glob("*.service")):
            text = unit.read_text(encoding="utf-8")
            if "@" in unit.name:
                text = text.replace("%i", "1")  # a template unit, as instance 1
            (exec_start,) = re.findall(r"^ExecStart=((?:.*\\\n)*.*)$", text, re.M)
            commands += [(unit.name, words) for words in shell_commands(exec_start)]
        checked: set[str] = set()
        for name, words in commands:
            arguments = twistd_arguments(words)
            programs = [a for a in arguments or () if a in makers]
            if arguments is None or not programs:
                continue
            program = programs[0]
            where = f"{name}: twistd {shlex.join(arguments)}"
            split = arguments.index(program)
            if "--version" in arguments:
                continue
            try:
                if program == "sentinel-reverse":
                    ServerOptions().parseOptions(arguments)
                else:
                    ServerOptions().parseOptions(arguments[:split])
                    options = makers[program].options()
                    options.postOptions = lambda: None
                    options.parseOptions(arguments[split + 1 :])
            except (Exception, SystemExit) as e:
                self.fail(f"{where}: {e}")
            checked.add(program)
        self.assertEqual(checked, {"sentinel-reverse", "sentinel-agent"})

    def test_the_quick_start_names_every_test_that_needs_the_reference_peers(self) -> None:
        """
        The README's second quick-start command runs the whole suite; the
        tests that run the reference peers fail without them, so the README
        names each of their files, and where the peers are looked for.
        """
        readme = (ROOT / "README.md").read_text(encoding="utf-8")
        quick_start = readme[readme.index("## Quick start") : readme.index("<!-- section: listener -->")]
        users = sorted(
            path.relative_to(ROOT).as_posix()
            for path in (ROOT / "tests").rglob("test_*.py")
            if re.search(r"^from \.+peers import", path.read_text(encoding="utf-8"), re.M)
        )
        self.assertGreaterEqual(len(users), 2)
        for name in users:
            self.assertIn(f"`{name}`", quick_start)
        for words in ("../shared/peers", "$SENTINEL_PEERS", "--ignore"):
            self.assertIn(words, quick_start)

    def test_tox_lint_checks_what_ci_checks(self) -> None:
        """The README's C{tox -e lint,mypy} runs CI's ruff and mypy commands."""
        import configparser

        tox = configparser.ConfigParser()
        tox.read(ROOT / "tox.ini")
        ci = (ROOT / ".ci" / "steps" / "55-lint.sh").read_text(encoding="utf-8")
        for env in ("lint", "mypy"):
            command = tox[f"testenv:{env}"]["commands"].strip()
            self.assertIn(f"\n{command}\n", ci, f"tox -e {env}")

    def test_the_index_lists_every_example(self) -> None:
        text = (DOCS / "index.md").read_text(encoding="utf-8")
        table = text[text.index("## Examples") : text.index("## API reference")]
        listed = set(re.findall(r"^\| \[`([^`]+)`\]\(\.\./examples/\1\)", table, re.M))
        present = {p.name + ("/" if p.is_dir() else "") for p in EXAMPLES.iterdir()}
        self.assertEqual(listed, present)

    def test_example_programs_named_in_docs_exist(self) -> None:
        for path, _, block in code_blocks("sh"):
            for words in shell_commands(block):
                for word in words:
                    if word.startswith("examples/"):
                        self.assertTrue((ROOT / word).exists(), f"{path.name}: {word}")

    def test_every_option_of_every_program_is_documented(self) -> None:
        from twisted.application.service import IServiceMaker
        from twisted.plugin import getPlugins

        text = (DOCS / "operators.md").read_text(encoding="utf-8")
        programs = {m.tapname: m for m in getPlugins(IServiceMaker) if m.tapname.startswith("sentinel-")}
        self.assertIn("sentinel-reverse", programs)
        for tapname, maker in programs.items():
            self.assertIn(f"`twistd {tapname}`", text)
            names = [name.rstrip("=") for name in maker.options().longOpt if name != "help"]
            self.assertIn("version", names)
            for name in names:
                self.assertIn(f"`--{name}", text, f"{tapname} --{name} is not in docs/operators.md")

    def test_every_metric_is_documented(self) -> None:
        from twisted.internet.task import Clock

        from sentinel_twisted.proxy.factory import ReverseConnectionFactory
        from sentinel_twisted.proxy.pool import AgentPool
        from sentinel_twisted.status.metrics import GatewayMetrics

        pool = AgentPool()
        metrics = GatewayMetrics(pool, ReverseConnectionFactory(pool=pool, clock=Clock()))
        exposed = set(re.findall(r"^# TYPE (sentinel_\S+) ", metrics.render().decode(), re.M))
        self.assertIn("sentinel_agent_round_trip_seconds", exposed)
        text = (DOCS / "operators.md").read_text(encoding="utf-8")
        documented = set(re.findall(r"^\| `(sentinel_\w+)` \|", text, re.M))
        self.assertEqual(documented, exposed)

    def test_every_rejection_label_is_documented(self) -> None:
        import inspect

        from sentinel_twisted.proxy import factory

        source = inspect.getsource(factory)
        labels = set(re.findall(r'return "(\w+)"', inspect.getsource(factory.rejection_reason)))
        labels |= set(re.findall(r'rejections\["(\w+)"\]', source))
        self.assertIn("auth_failed", labels)
        text = (DOCS / "operators.md").read_text(encoding="utf-8")
        for label in labels:
            self.assertIn(f"| `{label}` |", text, f"rejection label {label!r} is not documented")

    def test_every_registration_error_has_a_troubleshooting_entry(self) -> None:
        from twisted.internet.task import Clock

        from sentinel_twisted import messages as m
        from sentinel_twisted.errors import InvalidMessage, MessageTooLarge, RequestTimeout
        from sentinel_twisted.proxy.auth import StaticTokenChecker
        from sentinel_twisted.proxy.config import ReverseConnectionConfig
        from sentinel_twisted.proxy.factory import ReverseConnectionFactory, rejection_reason

        factory = ReverseConnectionFactory(
            ReverseConnectionConfig(allowed_agents=["waf-*"], require_auth=True),
            token_checker=StaticTokenChecker({"waf-1": "right"}),
            clock=Clock(),
        )

        def admit(agent_id: str, token: str | None = "right", version: int = 2) -> Any:
            capabilities = m.AgentCapabilities(agent_id=agent_id, name="a", version="1")
            return factory.admit(m.RegistrationRequest(
                protocol_version=version, agent_id=agent_id,
                capabilities=capabilities, auth_token=token,
            ))

        for _ in range(4):
            self.assertIsNone(admit("waf-1"))
        errors = [
            admit("waf-1", version=1),
            admit(""),
            admit("waf-1\n"),
            admit("bot-1"),
            admit("waf-2", token=None),
            admit("waf-1", token="wrong"),
            admit("waf-1"),
            RequestTimeout(10.0),
            MessageTooLarge(2130706435, 16 * 1024 * 1024),
            InvalidMessage("Expected registration request (HandshakeRequest), got RequestHeaders"),
        ]
        text = (DOCS / "operators.md").read_text(encoding="utf-8")
        for error in errors:
            self.assertIsNotNone(error)
            entry = f"**`{error}`** (`{rejection_reason(error)}`)"
            if isinstance(error, InvalidMessage) and "Expected registration" in str(error):
                entry = f"`{str(error).removeprefix('Invalid message format: ')}`"
            self.assertIn(entry, text, f"no troubleshooting entry for {error}")

    def test_the_guides_first_session(self) -> None:
        """
        The embedding guide's walk-through, run as written: the toy proxy,
        then examples/simple_agent.py; the output is what the guide shows.
        """
        shown = [b.strip("\n").split("\n") for _, lang, b in code_blocks("text")
                 if "[req-" in b or "agent no-admin" in b]
        self.assertEqual(len(shown), 3, shown)
        directory = tempfile.mkdtemp(prefix="sentinel-guide-")
        self.addCleanup(lambda: __import__("shutil").rmtree(directory, ignore_errors=True))
        endpoint = f"unix:{directory}/s.sock"
        program = Program(self, "--agent", "no-admin", f"{endpoint}:mode=600:lockfile=1")
        program.expect("listening on")

        def session(*lines: str) -> list[str]:
            """Type each line, wait for its answer; the lines printed meanwhile."""
            first = len(program.lines)
            for line in lines:
                program.line(line)
                program.expect("client got")
            return program.lines[first:]

        self.assertEqual(session("GET /hello"), shown[0])
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        agent = subprocess.Popen(
            [sys.executable, str(EXAMPLES / "simple_agent.py"), endpoint],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=env, cwd=str(ROOT),
        )
        self.addCleanup(lambda: (agent.poll() is None and agent.kill(), agent.wait(WAIT)))
        first = len(program.lines)
        program.expect("health: healthy")
        registered = [re.sub(r"no-admin-[0-9a-f]+-\d+", "ID", line) for line in program.lines[first:]]
        expected = [re.sub(r"no-admin-[0-9a-f]+-\d+", "ID", line) for line in shown[1]]
        self.assertEqual(registered, expected)
        self.assertEqual(session("GET /admin", "GET /hello"), shown[2])
        self.assertEqual(program.end_input(), 0)

    def test_links_between_docs_resolve(self) -> None:
        readme = ROOT / "README.md"
        for path in [*doc_files(), readme]:
            text = path.read_text(encoding="utf-8")
            for target in re.findall(r"\]\(([^)\s]+)\)", text):
                if re.match(r"[a-z]+:", target):
                    continue
                file_part, _, anchor = target.partition("#")
                linked = (path.parent / file_part).resolve() if file_part else path
                self.assertTrue(linked.exists(), f"{path.name}: broken link {target}")
                if anchor and linked.suffix == ".md":
                    self.assertIn(anchor, anchors(linked), f"{path.name}: no anchor {target}")


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file."""
    found = set()
    for heading in re.findall(r"^#+ (.*)$", path.read_text(encoding="utf-8"), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug)
    return found


class ExampleFilesTests(SynchronousTestCase):
    """The small examples the guides show."""

    def load(self, name: str) -> Any:
        import importlib.util

        spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        # Dataclasses look their module up while the class is made.
        sys.modules[spec.name] = module
        self.addCleanup(sys.modules.pop, spec.name, None)
        spec.loader.exec_module(module)
        return module

    def test_the_toy_proxy_tells_an_agent_that_does_not_read_from_one_that_paused(self) -> None:
        from twisted.python.failure import Failure

        from sentinel_twisted.errors import FlowControlPaused

        example = self.load("embed_listener")
        outcomes = []
        for error in (FlowControlPaused("waf-1"), FlowControlPaused("waf-1", not_reading=True)):
            request = example.ProxiedRequest(id="req-1", method="GET", uri="/", headers={})
            example.apply_failure(request, Failure(error), False)
            self.assertEqual((request.status, request.response_headers), (503, {"retry-after": ["1"]}))
            outcomes.append(request.outcome)
        self.assertEqual(
            outcomes,
            [
                "agent asked for backpressure (Flow control paused: agent 'waf-1' requested backpressure)",
                "agent not reading (Flow control paused: agent 'waf-1' is not reading its connections "
                "(write buffers full))",
            ],
        )

    def test_hashed_token_checker(self) -> None:
        from twisted.internet.task import Clock
        from zope.interface.verify import verifyObject

        from sentinel_twisted import messages as m
        from sentinel_twisted.errors import AuthenticationFailed
        from sentinel_twisted.proxy.auth import ITokenChecker
        from sentinel_twisted.proxy.config import ReverseConnectionConfig
        from sentinel_twisted.proxy.factory import ReverseConnectionFactory

        example = self.load("token_checker")
        line = example.digest_line("waf-1", "s3cret")
        agent_id, digest = line.split()
        checker = example.HashedTokenChecker({agent_id: digest})
        self.assertTrue(verifyObject(ITokenChecker, checker))
        self.assertTrue(checker.check_token("waf-1", "s3cret"))
        self.assertFalse(checker.check_token("waf-1", "s3cret "))
        self.assertFalse(checker.check_token("waf-2", "s3cret"))

        factory = ReverseConnectionFactory(
            ReverseConnectionConfig(require_auth=True), token_checker=checker, clock=Clock()
        )
        capabilities = m.AgentCapabilities(agent_id="waf-1", name="a", version="1")
        request = m.RegistrationRequest(
            protocol_version=2, agent_id="waf-1", capabilities=capabilities, auth_token="nope"
        )
        self.assertIsInstance(factory.admit(request), AuthenticationFailed)

        directory = tempfile.mkdtemp(prefix="sentinel-digests-")
        self.addCleanup(lambda: __import__("shutil").rmtree(directory, ignore_errors=True))
        script = subprocess.run(
            [sys.executable, str(EXAMPLES / "token_checker.py"), "waf-1"],
            input="s3cret\n", capture_output=True, text=True, timeout=WAIT,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )
        self.assertEqual(script.stdout.strip(), line)
        digests = os.path.join(directory, "digests")
        with open(digests, "w") as f:
            f.write(f"# agent digests\n{script.stdout}\n")
        self.assertEqual(example.load_digests(digests), {"waf-1": digest})

    def test_token_file_example_is_a_valid_token_file(self) -> None:
        from sentinel_twisted.proxy.auth import parse_token_file

        tokens = parse_token_file(str(EXAMPLES / "agent-tokens.example"))
        self.assertEqual(sorted(tokens), ["auth-1", "waf-1"])

    def test_listen_help_names_the_real_default(self) -> None:
        from sentinel_twisted.tap import DEFAULT_LISTEN, Options

        self.assertIn(f"[default: {DEFAULT_LISTEN}]", Options.opt_listen.__doc__ or "")


class ReleaseTests(SynchronousTestCase):
    """Release hygiene that a test can see."""

    def test_version_comes_from_one_place(self) -> None:
        import configparser
        from importlib.metadata import version

        import sentinel_twisted

        config = configparser.ConfigParser()
        config.read(ROOT / "setup.cfg")
        declared = config["metadata"]["version"]
        self.assertEqual(sentinel_twisted.__version__, version("sentinel_twisted"))
        self.assertEqual(sentinel_twisted.__version__, declared)
        sources = [*ROOT.glob("sentinel_twisted/**/*.py"), *ROOT.glob("twisted/plugins/*.py"),
                   *EXAMPLES.glob("*.py"), *DOCS.glob("*")]
        for path in sources:
            text = path.read_text(encoding="utf-8")
            for quoted in (f'"{declared}"', f"'{declared}'", f"{declared}-py3"):
                self.assertNotIn(quoted, text, f"{path.relative_to(ROOT)} hard-codes the version")

    def test_manifest_ships_the_docs_examples_and_plugins(self) -> None:
        manifest = (ROOT / "MANIFEST.in").read_text(encoding="utf-8")
        for line in ["graft docs", "graft examples", "graft tests", "include README.md NEWS.rst",
                     "recursive-include twisted/plugins *.py", "global-exclude dropin.cache"]:
            self.assertIn(line, manifest)


class ExampleRulesTests(SynchronousTestCase):
    """
    C{examples/rules.toml} blocks what a user tries first: SQL injection,
    scripts and path traversal in the query, in any header and in the body;
    every block, on the headers or on a body chunk, carries the
    C{x-sentinel-agent} header.
    """

    ATTACKS = {
        "sqli": {
            "query": ["/items?id=1 UNION SELECT 1", "/items?id=1%20union%20all%20select%20password",
                      "/items?id=1'%20OR%20'1'='1", "/items?id=1;%20DROP%20TABLE%20users"],
            "header": [{"x-search": ["1 UNION SELECT 1"]}, {"cookie": ["a=b", "id=1'+or+'1'='1"]},
                       {"user-agent": ["Mozilla/5.0'; sleep(5)"]}],
            "body": [b"id=1 UNION SELECT 1", b"id=1+union+select+password+from+users",
                     b'{"id": "1\' OR \'1\'=\'1"}', b"id=1%3B%20DROP%20TABLE%20users"],
        },
        "xss": {
            "query": ["/search?q=<script>alert(1)</script>", "/search?q=%3Cscript%3Ealert(1)%3C%2Fscript%3E",
                      "/go?to=javascript:alert(1)", "/p?x=%3Cimg%20src=x%20onerror=alert(1)%3E"],
            "header": [{"referer": ["http://example.com/?q=<script>alert(1)</script>"]},
                       {"x-name": ["%3Csvg%20onload%3Dalert(1)%3E"]}],
            "body": [b"comment=<script>alert(1)</script>", b"comment=%3Cscript%3Ealert(1)%3C%2Fscript%3E",
                     b'{"url": "javascript:alert(1)"}'],
        },
        "traversal": {
            "query": ["/static/../../etc/passwd", "/static/..%2f..%2fetc/passwd", "/download?file=../../etc/passwd",
                      "/download?file=%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/files/..%5c..%5cwindows%5cwin.ini"],
            "header": [{"x-file": ["../../etc/passwd"]}, {"cookie": ["theme=..%2F..%2Fetc%2Fpasswd"]}],
            "body": [b"file=../../etc/passwd", b"file=..%2F..%2Fetc%2Fpasswd", b'{"path": "..\\\\..\\\\boot.ini"}'],
        },
    }

    BENIGN = {
        "query": ["/", "/items?id=42", "/search?q=select+a+union+rep", "/docs/v1.2/index.html",
                  "/search?q=rock%20%27n%27%20roll", "/a/b.c/d..e"],
        "header": [{"user-agent": ["Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko)"]},
                   {"accept-language": ["en-US,en;q=0.9"], "cookie": ["session=abc123; theme=dark"]},
                   {"content-type": ["multipart/form-data; boundary=----x"], "referer": ["http://example.com/a/b"]}],
        "body": [b"name=O'Brien&comment=Hello+world", b'{"title": "Select a union rep", "n": 1}',
                 b"------x\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n------x--\r\n"],
    }

    def setUp(self) -> None:
        from sentinel_twisted.agent import RulesAgent

        self.agent = RulesAgent(EXAMPLES / "rules.toml")
        self.count = 0

    def headers_answer(self, uri: str = "/", method: str = "GET", headers: dict[str, list[str]] | None = None) -> Any:
        from sentinel_twisted import messages as m

        from .agent._support import headers_event

        self.count += 1
        cid = f"r{self.count}"
        event = m.decode(json.dumps(headers_event(cid, uri, method, headers)).encode(), m.RequestHeadersEvent)
        return cid, self.agent.on_request_headers(event).build()  # type: ignore[union-attr]

    def body_answer(
        self, data: bytes, chunk: int = 7, content_type: str = "application/x-www-form-urlencoded"
    ) -> Any:
        """A POST whose body arrives in chunks of C{chunk} bytes: the last answer."""
        from sentinel_twisted import messages as m

        from .agent._support import body_chunk_event

        cid, first = self.headers_answer("/form", "POST", {"content-type": [content_type]})
        self.assertEqual((first.decision, first.needs_more), (m.ALLOW, True))
        pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)]
        for index, piece in enumerate(pieces):
            last = index == len(pieces) - 1
            event = m.decode(json.dumps(body_chunk_event(cid, piece, index, last)).encode(), m.RequestBodyChunkEvent)
            answer = self.agent.on_request_body_chunk(event).build()  # type: ignore[union-attr]
            if not isinstance(answer.decision, m.Allow):
                return answer
        return answer

    def assertBlockedBy(self, answer: Any, tag: str, what: Any) -> None:
        from sentinel_twisted import messages as m

        what = repr(what)
        self.assertIsInstance(answer.decision, m.Block, what)
        self.assertEqual(answer.decision.status, 403, what)
        self.assertIn(tag, answer.audit.tags, what)
        self.assertIn(m.SetHeader("x-sentinel-agent", "sentinel-twisted"), answer.response_headers, what)

    def test_injections_in_the_query_are_blocked(self) -> None:
        for tag, places in self.ATTACKS.items():
            for uri in places["query"]:
                self.assertBlockedBy(self.headers_answer(uri)[1], tag, uri)

    def test_injections_in_any_header_are_blocked(self) -> None:
        for tag, places in self.ATTACKS.items():
            for headers in places["header"]:
                self.assertBlockedBy(self.headers_answer("/", headers=headers)[1], tag, headers)

    def test_injections_in_the_body_are_blocked_whatever_the_chunks(self) -> None:
        for tag, places in self.ATTACKS.items():
            for data in places["body"]:
                for chunk in (1, 7, len(data)):
                    self.assertBlockedBy(self.body_answer(data, chunk), tag, (data, chunk))
        self.assertEqual(len(self.agent._bodies), 0)

    def test_the_admin_area_whatever_the_case_or_path_parameters(self) -> None:
        from sentinel_twisted import messages as m

        for uri in ["/ADMIN", "/Admin/users", "/admin;x", "/admin;jsessionid=ABC/panel", "/ADMIN%3Bx",
                    "/static/..;/admin", "/%41dmin/"]:
            answer = self.headers_answer(uri)[1]
            self.assertEqual(getattr(answer.decision, "status", None), 403, uri)
            self.assertIn("admin", answer.audit.tags, uri)
        self.assertEqual(getattr(self.headers_answer("/API/items")[1].decision, "status", None), 401)
        self.assertEqual(getattr(self.headers_answer("/api;v=2/items")[1].decision, "status", None), 401)
        self.assertEqual(getattr(self.headers_answer("/METRICS")[1].decision, "status", None), 404)
        for uri in ["/administrator", "/docs/admin-guide", "/search?q=/admin;x", "/Apis/x"]:
            self.assertEqual(self.headers_answer(uri)[1].decision, m.ALLOW, uri)

    def test_json_escapes_in_a_json_body_are_decoded(self) -> None:
        from sentinel_twisted import messages as m

        for tag, data in [
            ("sqli", b'{"id": "1 \\u0055NION \\u0053ELECT password"}'),
            ("sqli", b'{"id": "1\\u0027 OR \\u00271\\u0027=\\u00271"}'),
            ("xss", b'{"comment": "\\u003cscript\\u003ealert(1)"}'),
            ("traversal", b'{"file": "..\\u002f..\\u002fetc/passwd"}'),
        ]:
            for chunk in (1, 7, len(data)):
                self.assertBlockedBy(self.body_answer(data, chunk, "application/json"), tag, (data, chunk))
        for data in [b'{"name": "Jos\\u00e9", "note": "Line 1\\nLine 2", "path": "a\\/b"}',
                     b'{"title": "Select a \\u0075nion rep"}']:
            answer = self.body_answer(data, 7, "application/json")
            self.assertEqual((answer.decision, answer.needs_more), (m.ALLOW, False), repr(data))

    def test_ordinary_requests_pass(self) -> None:
        from sentinel_twisted import messages as m

        for uri in self.BENIGN["query"]:
            self.assertEqual(self.headers_answer(uri)[1].decision, m.ALLOW, uri)
        for headers in self.BENIGN["header"]:
            self.assertEqual(self.headers_answer("/", headers=headers)[1].decision, m.ALLOW, repr(headers))
        for data in self.BENIGN["body"]:
            answer = self.body_answer(data)
            self.assertEqual((answer.decision, answer.needs_more), (m.ALLOW, False), repr(data))

    def test_every_block_carries_the_agent_header(self) -> None:
        from sentinel_twisted import messages as m

        decided = [
            self.headers_answer("/admin")[1],
            self.headers_answer("/", headers={"user-agent": ["sqlmap/1.7"]})[1],
            self.headers_answer("/", "TRACE")[1],
            self.headers_answer("/api/items")[1],
            self.headers_answer("/metrics")[1],
            self.headers_answer("/old/page")[1],
            self.body_answer(b"<script>"),
        ]
        self.assertEqual(
            [getattr(a.decision, "status", None) for a in decided], [403, 403, 405, 401, 404, 301, 403]
        )
        for answer in decided:
            self.assertIn(m.SetHeader("x-sentinel-agent", "sentinel-twisted"), answer.response_headers, repr(answer))
