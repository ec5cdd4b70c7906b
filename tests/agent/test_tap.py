"""
C{twistd sentinel-agent}: its options, its service (SIGHUP reload, fatal
rejections stop the program), and the real program as a subprocess dialing
this project's proxy side in the test process.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Generator
from pathlib import Path
from typing import IO, Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.task import Clock, deferLater
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sentinel_twisted import messages as m
from sentinel_twisted.agent import Agent, AgentConnector, RulesAgent
from sentinel_twisted.agent.tap import AgentService, Options, make_agent_service, read_token_file
from sentinel_twisted.proxy.config import ReverseConnectionConfig
from sentinel_twisted.proxy.factory import ReverseConnectionFactory

from ..twistd_support import twistd_command
from ._support import temp_path
from .test_connector import NOT_ALLOWED, ScriptedEndpoint
from .test_with_proxy import headers

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_RULES = ROOT / "examples" / "rules.toml"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


class Greeter(Agent):
    """Loaded by C{--agent tests.agent.test_tap:Greeter}."""

    name = "greeter"


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


class OptionsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(temp_path(self, "options"))
        self.dir.mkdir()
        self.rules = str(self.dir / "rules.toml")
        shutil.copy(EXAMPLE_RULES, self.rules)

    def base(self, *extra: str) -> Options:
        return parse("--connect", "unix:/tmp/x.sock", "--agent-id", "waf-1", *extra)

    def test_minimal(self) -> None:
        options = self.base("--rules", self.rules)
        self.assertIsInstance(options["agent-object"], RulesAgent)
        self.assertEqual(options["connections"], 1)
        self.assertIsNone(options["auth-token"])
        service = make_agent_service(options, reactor=Clock())
        settings = service.connector.settings
        self.assertEqual(settings.agent_id, "waf-1")
        self.assertEqual(settings.max_concurrency, 100)
        self.assertEqual((settings.frame_timeout, settings.write_stall_timeout), (30.0, 30.0))
        self.assertFalse(settings.fail_open)
        self.assertEqual(len(service.connector.slots), 1)

    def test_every_option(self) -> None:
        token = self.dir / "token"
        token.write_text("# the token\n  s3cret  \n")
        token.chmod(0o600)
        options = self.base(
            "--rules", self.rules, "--auth-token-file", str(token), "--connections", "3",
            "--max-concurrency", "7", "--name", "edge-waf", "--health-interval", "2",
            "--registration-timeout", "4", "--drain-grace", "1", "--max-retry-delay", "9", "--fail-open",
            "--max-held-event-bytes", "1000000", "--frame-timeout", "5.5", "--write-stall-timeout", "12",
            "--max-event-values", "5000",
        )  # fmt: skip
        service = make_agent_service(options, reactor=Clock())
        settings = service.connector.settings
        self.assertEqual(settings.auth_token, "s3cret")
        self.assertEqual(settings.max_concurrency, 7)
        self.assertEqual(settings.max_held_event_bytes, 1_000_000)
        self.assertEqual(settings.max_event_values, 5000)
        self.assertEqual((settings.frame_timeout, settings.write_stall_timeout), (5.5, 12.0))
        self.assertEqual(settings.health_interval, 2)
        self.assertEqual(settings.registration_timeout, 4)
        self.assertTrue(settings.fail_open)
        self.assertEqual(len(service.connector.slots), 3)
        self.assertEqual(service.connector.drain_grace, 1)
        self.assertIsNone(options["token-warning"])
        self.assertEqual(settings.agent.capabilities("waf-1").name, "edge-waf")

    def test_required_and_exclusive_options(self) -> None:
        self.assertRaises(usage.UsageError, parse, "--agent-id", "a", "--rules", self.rules)
        self.assertRaises(usage.UsageError, parse, "--connect", "unix:/x", "--rules", self.rules)
        error = self.assertRaises(usage.UsageError, self.base)
        self.assertIn("exactly one of --rules", str(error))
        self.assertRaises(usage.UsageError, self.base, "--rules", self.rules, "--agent", "x:y")
        self.assertRaises(usage.UsageError, self.base, "--rules", self.rules, "--connections", "0")

    def test_bad_endpoint(self) -> None:
        error = self.assertRaises(
            usage.UsageError, parse, "--connect", "nonsense:1", "--agent-id", "a", "--rules", self.rules
        )
        self.assertIn("--connect nonsense:1", str(error))
        error = self.assertRaises(
            usage.UsageError, parse, "--connect", "tcp:localhost", "--agent-id", "a", "--rules", self.rules
        )
        self.assertIn("--connect tcp:localhost: wrong arguments for this endpoint type", str(error))
        self.assertNotIn("positional argument", str(error))

    def test_bad_values_name_the_option(self) -> None:
        for option, value, text in [
            ("--connections", "0", "expected a positive integer, got '0'"),
            ("--max-concurrency", "many", "expected a positive integer, got 'many'"),
            ("--max-held-event-bytes", "0", "expected a positive integer, got '0'"),
            ("--max-event-values", "-1", "expected a positive integer, got '-1'"),
            ("--health-interval", "-1", "expected a number of seconds (0 or more), got '-1'"),
            ("--registration-timeout", "0", "expected a positive number of seconds, got '0'"),
            ("--frame-timeout", "0", "expected a positive number of seconds, got '0'"),
            ("--write-stall-timeout", "inf", "expected a number of seconds, got 'inf'"),
            ("--drain-grace", "nan", "expected a number of seconds, got 'nan'"),
            ("--max-retry-delay", "soon", "expected a number of seconds, got 'soon'"),
            ("--log-level", "chatty", "expected one of debug, info, warn, error, critical, got 'chatty'"),
        ]:
            with self.subTest(option=option):
                error = self.assertRaises(usage.UsageError, self.base, "--rules", self.rules, option, value)
                self.assertEqual(str(error), f"{option}: {text}")

    def test_bad_rules_are_one_line(self) -> None:
        Path(self.rules).write_text(
            '[[rules]]\nid = "x"\nmatch = { path = "[" }\nblock = true\n'
            '[[rules]]\nid = "y"\nblock = { status = 99 }\n'
        )
        error = self.assertRaises(usage.UsageError, self.base, "--rules", self.rules)
        self.assertNotIn("\n", str(error))
        self.assertTrue(str(error).startswith(f"--rules {self.rules}: rule 'x' (#1)"), str(error))
        self.assertIn("; rule 'y' (#2)", str(error))

    def test_bad_rules_name_file_rule_and_reason(self) -> None:
        Path(self.rules).write_text('[[rules]]\nid = "x"\nmatch = { path = "[" }\nblock = true\n')
        error = self.assertRaises(usage.UsageError, self.base, "--rules", self.rules)
        self.assertIn(f"--rules {self.rules}: rule 'x' (#1): match.path: invalid regular expression", str(error))

    def test_token_file_problems(self) -> None:
        token = self.dir / "token"
        token.write_text("\n# nothing\n")
        self.assertIn("holds no token", str(self.assertRaises(usage.UsageError, self.base, "--rules", self.rules, "--auth-token-file", str(token))))
        token.write_text("a b\n")
        self.assertRaises(usage.UsageError, self.base, "--rules", self.rules, "--auth-token-file", str(token))
        self.assertRaises(usage.UsageError, self.base, "--rules", self.rules, "--auth-token-file", str(self.dir / "missing"))
        token.write_text("tok\n")
        token.chmod(0o644)
        self.assertEqual(read_token_file(str(token))[0], "tok")
        self.assertIn("accessible by group or others", read_token_file(str(token))[1] or "")
        # A byte order mark (as Windows Notepad saves) is not part of the token.
        token.write_bytes(b"\xef\xbb\xbftok\r\n")
        self.assertEqual(read_token_file(str(token))[0], "tok")

    def test_agent_class_instead_of_rules(self) -> None:
        options = self.base("--agent", "tests.agent.test_tap:Greeter", "--max-concurrency", "3")
        agent = options["agent-object"]
        self.assertIsInstance(agent, Greeter)
        self.assertEqual(agent.capabilities("a").limits.max_concurrency, 3)
        error = self.assertRaises(usage.UsageError, self.base, "--agent", "tests.agent.test_tap:ROOT")
        self.assertIn("does not provide IAgent", str(error))
        self.assertRaises(usage.UsageError, self.base, "--agent", "no.such.module:X")


class FakeReactor(Clock):
    running = True

    def __init__(self) -> None:
        super().__init__()
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True

    def callFromThread(self, f: Any, *args: Any) -> None:
        f(*args)


class ServiceTests(SynchronousTestCase):
    def service(self, script: list[str], rules: str) -> tuple[AgentService, FakeReactor]:
        fake = FakeReactor()
        connector = AgentConnector(
            RulesAgent(rules), ScriptedEndpoint(fake, script), "waf-1", reactor=fake, jitter=lambda: 0.0
        )
        options = {"token-warning": None, "max-concurrency": 100}
        return AgentService(connector, options, fake), fake

    def test_sighup_reloads_and_a_bad_file_keeps_the_rules(self) -> None:
        rules = temp_path(self, "rules.toml")
        Path(rules).write_text('[[rules]]\nid = "a"\nblock = true\n')
        service, fake = self.service(["accept"], rules)
        service.startService()
        self.addCleanup(service.stopService)
        agent = service.connector.settings.agent
        Path(rules).write_text('[[rules]]\nid = "b"\nredirect = "/x"\n')
        os.kill(os.getpid(), signal.SIGHUP)
        self.assertEqual([r.id for r in agent.ruleset.rules], ["b"])  # type: ignore[attr-defined]
        Path(rules).write_text("broken = [")
        os.kill(os.getpid(), signal.SIGHUP)
        self.assertEqual([r.id for r in agent.ruleset.rules], ["b"])  # type: ignore[attr-defined]

    def test_stop_restores_the_previous_sighup_handler(self) -> None:
        rules = temp_path(self, "rules.toml")
        Path(rules).write_text('[[rules]]\nid = "a"\nblock = true\n')
        before = signal.getsignal(signal.SIGHUP)
        service, fake = self.service(["accept"], rules)
        service.startService()
        self.assertNotEqual(signal.getsignal(signal.SIGHUP), before)
        service.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), before)

    def test_fatal_rejection_stops_the_reactor(self) -> None:
        rules = temp_path(self, "rules.toml")
        Path(rules).write_text('[[rules]]\nid = "a"\nblock = true\n')
        service, fake = self.service([NOT_ALLOWED], rules)
        service.startService()
        self.addCleanup(service.stopService)
        fake.advance(0)
        self.assertTrue(fake.stopped)


class Process:
    """C{twistd -n sentinel-agent ...} in a directory; output to a file."""

    def __init__(self, test: TestCase, cwd: str, *args: str) -> None:
        self.path = os.path.join(cwd, "agent.out")
        self.out: IO[bytes] = open(self.path, "wb")
        self.process = subprocess.Popen(
            twistd_command("-n", "--pidfile=", "sentinel-agent", *args),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=self.out,
            stderr=subprocess.STDOUT,
        )
        test.addCleanup(self.kill)

    def output(self) -> str:
        with open(self.path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT)
        self.out.close()


@inlineCallbacks
def eventually(condition: Any, what: str, timeout: float = START_TIMEOUT) -> Generator[Any, Any, None]:
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        yield deferLater(reactor, 0.02, lambda: None)  # type: ignore[arg-type]
    raise AssertionError(f"timed out waiting for {what}")


class TwistdAgentTests(TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="sentinel-agent-twistd-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.socket = os.path.join(self.dir, "proxy.sock")
        self.rules = os.path.join(self.dir, "rules.toml")
        shutil.copy(EXAMPLE_RULES, self.rules)

    @inlineCallbacks
    def proxy(self, **config: Any) -> Generator[Any, Any, ReverseConnectionFactory]:
        factory = ReverseConnectionFactory(ReverseConnectionConfig(**config), clock=reactor)
        port = yield UNIXServerEndpoint(reactor, self.socket).listen(factory)
        self.addCleanup(port.stopListening)
        self.addCleanup(factory.pool.close_all)
        return factory

    def start(self, *extra: str) -> Process:
        return Process(self, self.dir, "--connect", f"unix:{self.socket}", "--agent-id", "waf-1", *extra)

    @inlineCallbacks
    def test_rules_reload_and_drain(self) -> Generator[Any, Any, None]:
        factory = yield self.proxy()
        agent = self.start("--rules", self.rules)
        yield eventually(lambda: "waf-1" in factory.pool, "the agent to register")
        blocked = yield factory.pool.send_request_headers("waf-1", headers("t1", "/admin"))
        self.assertEqual(blocked.decision, m.Block(403, "Forbidden", None))
        allowed = yield factory.pool.send_request_headers("waf-1", headers("t2", "/items?id=42"))
        self.assertEqual(allowed.decision, m.ALLOW)
        self.assertIn(m.SetHeader("x-sentinel-agent", "sentinel-twisted"), allowed.response_headers)

        Path(self.rules).write_text('[[rules]]\nid = "all"\nblock = { status = 418 }\n')
        agent.process.send_signal(signal.SIGHUP)
        yield eventually(lambda: "Reloaded 1 rule(s)" in agent.output(), "the reload")
        now = yield factory.pool.send_request_headers("waf-1", headers("t3", "/items"))
        self.assertEqual(now.decision.status, 418)  # type: ignore[attr-defined]

        Path(self.rules).write_text('[[rules]]\nid = "x"\nmatch = { path = "(" }\nblock = true\n')
        agent.process.send_signal(signal.SIGHUP)
        yield eventually(lambda: "keeping the 1 rule(s) in force" in agent.output(), "the failed reload")
        self.assertIn("rule 'x' (#1): match.path: invalid regular expression", agent.output())
        still = yield factory.pool.send_request_headers("waf-1", headers("t4", "/items"))
        self.assertEqual(still.decision.status, 418)  # type: ignore[attr-defined]

        agent.process.send_signal(signal.SIGTERM)
        yield eventually(lambda: agent.process.poll() is not None, "the agent to exit", STOP_TIMEOUT)
        output = agent.output()
        # A clean SIGTERM stop exits 0 (twistd alone would re-raise it).
        self.assertEqual(agent.process.returncode, 0, output)
        self.assertIn("draining connection", output)
        self.assertNotIn("Traceback", output)
        yield eventually(lambda: "waf-1" not in factory.pool, "the connection to close")

    @inlineCallbacks
    def test_bad_rules_at_start_up(self) -> Generator[Any, Any, None]:
        Path(self.rules).write_text('[[rules]]\nid = "x"\nblock = { status = 99 }\n')
        agent = self.start("--rules", self.rules)
        yield eventually(lambda: agent.process.poll() is not None, "twistd to exit")
        self.assertEqual(agent.process.returncode, 1)
        output = agent.output()
        self.assertIn(f"{self.rules}: rule 'x' (#1): block.status", output)
        self.assertNotIn("Traceback", output)

    @inlineCallbacks
    def test_fatal_rejection_stops_the_program(self) -> Generator[Any, Any, None]:
        factory = yield self.proxy(allowed_agents=["someone-else"])
        agent = self.start("--rules", self.rules)
        yield eventually(lambda: agent.process.poll() is not None, "twistd to stop by itself")
        output = agent.output()
        self.assertIn("Agent 'waf-1' is not in the allowed list", output)
        self.assertIn("Retrying cannot fix this", output)
        self.assertEqual(factory.rejections["not_allowed"], 1)
        self.assertNotIn("Traceback", output)

    def test_help_lists_sentinel_agent(self) -> None:
        result = subprocess.run(
            twistd_command("--help"), cwd=self.dir, capture_output=True, text=True,
            timeout=START_TIMEOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        self.assertRegex(result.stdout, r"(?m)^\s+sentinel-agent\s+A rule-based Sentinel policy agent")
        # Forward mode (--listen) is the agent's as much as dialling.
        self.assertRegex(result.stdout, r"dials the\s+proxy, or listens for it")
