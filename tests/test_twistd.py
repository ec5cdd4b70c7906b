"""
C{twistd sentinel-reverse} as a user runs it: a subprocess in a temporary
directory, talked to over its UNIX socket by the raw agent of
L{tests.rawagent}.  Every wait is bounded; a stuck process is killed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import IO, Any

from twisted.trial.unittest import SkipTest, TestCase

from .rawagent import HANDSHAKE_RESPONSE, BlockingAgent, registration
from .twistd_support import twistd_command

SOCKET = "sentinel-reverse.sock"
#: Where the tests put the gateway and the status site: any free port.
NO_FIXED_PORTS = ("--http", "tcp:0:interface=127.0.0.1", "--status", "tcp:0:interface=127.0.0.1")
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
#: How long one of the programs started together may take to exit (a hang guard).
ALL_AT_ONCE_TIMEOUT = 120.0


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout}s waiting for {what}")
        time.sleep(0.02)


class Twistd:
    """One twistd process; its stdout and stderr go to a file we can poll."""

    def __init__(
        self,
        test: TestCase,
        cwd: str,
        *args: str,
        name: str = "twistd",
        program: str = "sentinel-reverse",
        own_pidfile: bool = False,
        twistd_args: tuple[str, ...] = (),
    ) -> None:
        self.cwd = cwd
        self.output_path = os.path.join(cwd, f"{name}.out")
        self._output: IO[bytes] = open(self.output_path, "wb")
        if program == "sentinel-reverse" and "--http" not in args:
            # The gateway's and status site's default ports are not ours to take.
            args = (*args, *NO_FIXED_PORTS)
        self.process = subprocess.Popen(
            twistd_command("-n", *(() if own_pidfile else ("--pidfile=",)), *twistd_args, program, *args),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=subprocess.STDOUT,
        )
        test.addCleanup(self.kill)

    def output(self) -> str:
        with open(self.output_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait_for_output(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
        def found() -> re.Match[str] | None:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"twistd exited with {self.process.returncode}:\n{self.output()}"
                )
            return re.search(pattern, self.output())

        return wait_for(found, timeout, f"{pattern!r} in the twistd log")  # type: ignore[no-any-return]

    def wait_listening(self) -> str:
        self.wait_for_output(r"sentinel-reverse \S+ \(proxy id [^)]*\) listening on")
        return os.path.join(self.cwd, SOCKET)

    def wait_exit(self, timeout: float = STOP_TIMEOUT) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"twistd did not exit within {timeout}s:\n{self.output()}"
            ) from None

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT)
        self._output.close()


class TwistdTests(TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="st-twistd-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.socket = os.path.join(self.dir, SOCKET)

    def agent(self) -> BlockingAgent:
        agent = BlockingAgent(self.socket, timeout=5.0)
        self.addCleanup(agent.close)
        return agent

    def test_help_lists_sentinel_reverse(self) -> None:
        result = subprocess.run(
            twistd_command("--help"),
            cwd=self.dir,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stdout, r"(?m)^\s+sentinel-reverse\s+Sentinel HTTP gateway")

    def test_defaults_log_lines_and_sigterm(self) -> None:
        """
        With no options: an owner-only socket plus lockfile in the working
        directory; one log line per registration, rejection and disconnect;
        SIGTERM shuts down cleanly and removes the socket.
        """
        twistd = Twistd(self, self.dir, "--log-level", "debug")
        path = twistd.wait_listening()
        mode = os.lstat(path).st_mode
        self.assertTrue(stat.S_ISSOCK(mode))
        self.assertEqual(stat.S_IMODE(mode), 0o600)
        self.assertEqual(os.readlink(path + ".lock"), str(twistd.process.pid))

        good = self.agent()
        response = good.register("waf-1")
        self.assertTrue(response["success"], response)
        self.assertEqual(response["proxy_id"], "sentinel-proxy")
        connection_id = response["connection_id"]

        bad = self.agent()
        bad.send(1, registration("waf-old", version=1))
        [(message_type, refusal)] = bad.wait_closed()
        self.assertEqual(message_type, HANDSHAKE_RESPONSE)
        self.assertEqual(refusal["error"], "Protocol version mismatch: expected 2, got 1")

        good.close()
        twistd.wait_for_output(rf"Agent waf-1 connection {re.escape(connection_id)} disconnected")
        lines = twistd.output().splitlines()
        registered = [line for line in lines if "registered connection" in line]
        rejected = [line for line in lines if "Rejected registration" in line]
        disconnected = [line for line in lines if " disconnected" in line]
        self.assertEqual(len(registered), 1, registered)
        self.assertIn(f"Agent waf-1 registered connection {connection_id}", registered[0])
        self.assertEqual(len(rejected), 1, rejected)
        self.assertIn("waf-old", rejected[0])
        self.assertIn("Protocol version mismatch: expected 2, got 1", rejected[0])
        self.assertEqual(len(disconnected), 1, disconnected)
        self.assertIn(connection_id, disconnected[0])
        # Once running, the start-up heap is out of the collector's way
        # (a debug line: --log-level debug shows it).
        self.assertRegex(twistd.output(), r"Start-up heap frozen: \d+ objects")

        twistd.signal(signal.SIGTERM)
        status = twistd.wait_exit()
        self.assertEqual(status, 0, twistd.output())
        self.assertIn("Server Shut Down", twistd.output())
        self.assertNotIn("Traceback", twistd.output())
        self.assertFalse(os.path.lexists(path))
        self.assertFalse(os.path.lexists(path + ".lock"))

    def test_second_instance_refused_then_stale_socket_replaced(self) -> None:
        first = Twistd(self, self.dir, name="first")
        path = first.wait_listening()
        inode = os.lstat(path).st_ino

        second = Twistd(self, self.dir, name="second")
        self.assertEqual(second.wait_exit(START_TIMEOUT), 1)
        message = second.output()
        self.assertIn(f"{SOCKET} is served by a live process", message)
        self.assertNotIn("Usage:", message)
        self.assertNotIn("Traceback", message)
        # The first instance and its socket are untouched.
        self.assertIsNone(first.process.poll())
        self.assertEqual(os.lstat(path).st_ino, inode)
        self.assertTrue(self.agent().register("waf-1")["success"])

        first.signal(signal.SIGKILL)
        first.wait_exit()
        self.assertTrue(os.path.lexists(path), "SIGKILL leaves the socket behind")

        third = Twistd(self, self.dir, name="third")
        third.wait_listening()
        self.assertIn(f"Removed stale socket {SOCKET}", third.output())
        self.assertEqual(os.readlink(path + ".lock"), str(third.process.pid))
        self.assertTrue(self.agent().register("waf-1")["success"])

    def test_malformed_token_file_is_a_one_line_error(self) -> None:
        tokens = os.path.join(self.dir, "tokens")
        with open(tokens, "w") as f:
            f.write("# id token\nwaf-1 s3cret\nwaf-2\n")
        twistd = Twistd(self, self.dir, "--require-auth", "--token-file", tokens)
        self.assertEqual(twistd.wait_exit(START_TIMEOUT), 1)
        output = twistd.output()
        self.assertIn(f"{tokens}:3: expected 'AGENT_ID TOKEN'", output)
        self.assertNotIn("s3cret", output)
        self.assertNotIn("Usage:", output)
        self.assertNotIn("Traceback", output)
        self.assertFalse(os.path.lexists(self.socket))


    def test_sighup_rereads_the_allowlist_and_tokens(self) -> None:
        tokens = os.path.join(self.dir, "tokens")
        allowed = os.path.join(self.dir, "allowed")

        def write(path: str, text: str) -> None:
            with open(path, "w") as f:
                f.write(text)
            os.chmod(path, 0o600)

        write(tokens, "waf-1 t1\nbot-1 t2\n")
        write(allowed, "waf-*\nbot-1\n")
        twistd = Twistd(self, self.dir, "--require-auth", "--token-file", tokens, "--allow-file", allowed)
        twistd.wait_listening()
        waf, bot = self.agent(), self.agent()
        self.assertTrue(waf.register("waf-1", token="t1")["success"])
        self.assertTrue(bot.register("bot-1", token="t2")["success"])

        # bot-1 leaves the allowlist: its connection is closed and named.
        write(allowed, "waf-*\n")
        twistd.signal(signal.SIGHUP)
        twistd.wait_for_output(r"Closing connection bot-1-\S+ of agent bot-1 .*no longer allowed")
        self.assertEqual(bot.wait_closed(), [])
        self.assertNotIn("of agent waf-1", twistd.output())
        refused = self.agent().register("bot-1", token="t2")
        self.assertFalse(refused["success"])

        # A bad file: one line, the configuration stays.
        write(tokens, "waf-1\n")
        twistd.signal(signal.SIGHUP)
        twistd.wait_for_output(r"Reload failed, the configuration in force is unchanged: --token-file: .*tokens:1")
        self.assertTrue(self.agent().register("waf-1", token="t1")["success"])
        self.assertNotIn("Traceback", twistd.output())
        twistd.signal(signal.SIGTERM)
        self.assertEqual(twistd.wait_exit(), 0, twistd.output())
        del waf

    def test_relative_file_names_are_read_from_where_twistd_starts(self) -> None:
        """
        twistd moves to its run directory (-d) after reading the options;
        a reload still reads the files the command line named, there where
        twistd was started, as it does --pidfile and --logfile.
        """
        rundir = os.path.join(self.dir, "run")
        os.mkdir(rundir)
        with open(os.path.join(self.dir, "allowed"), "w") as f:
            f.write("waf-*\n")
        twistd = Twistd(self, self.dir, "--allow-file", "allowed", twistd_args=("-d", rundir))
        twistd.wait_listening()
        agent = BlockingAgent(os.path.join(rundir, SOCKET), timeout=5.0)
        self.addCleanup(agent.close)
        self.assertTrue(agent.register("waf-1")["success"])
        with open(os.path.join(self.dir, "allowed"), "w") as f:
            f.write("bot-*\n")
        twistd.signal(signal.SIGHUP)
        twistd.wait_for_output(r"Closing connection waf-1-\S+ of agent waf-1 .*no longer allowed")
        self.assertNotIn("Reload failed", twistd.output())
        twistd.signal(signal.SIGTERM)
        self.assertEqual(twistd.wait_exit(), 0, twistd.output())

    def test_a_stale_lock_naming_a_live_pid_is_replaced(self) -> None:
        """
        After a crash the lock's pid may be alive again (in a container the
        listener is pid 1 at every start): a lock whose socket nobody
        serves is stale whatever its pid.
        """
        dead = socket.socket(socket.AF_UNIX)
        dead.bind(self.socket)
        dead.close()
        os.symlink(str(os.getpid()), self.socket + ".lock")
        twistd = Twistd(self, self.dir)
        twistd.wait_listening()
        self.assertIn(f"Removed stale lock {SOCKET}.lock: no process serves its socket", twistd.output())
        self.assertEqual(os.readlink(self.socket + ".lock"), str(twistd.process.pid))
        self.assertTrue(self.agent().register("waf-1")["success"])


COLLECTED: list[dict[str, Any]] = []


def collecting_observer() -> Callable[[dict[str, Any]], None]:
    """A log observer factory for twistd's C{--logger} (used by name)."""
    return COLLECTED.append


class ProgramOptionsTests(TestCase):
    """
    The programs' options as twistd parses them (its L{ServerOptions} as
    the parent), without starting anything.
    """

    def twistd_options(self, *argv: str) -> Any:
        from twisted.scripts.twistd import ServerOptions

        config = ServerOptions()
        config.parseOptions(list(argv))
        return config

    def test_an_option_error_is_one_line_without_the_usage(self) -> None:
        for argv, line in [
            (("sentinel-reverse", "--request-timeout", "x"), "twistd sentinel-reverse: --request-timeout: expected a positive number of seconds, got 'x'"),
            (("sentinel-reverse", "--nope"), "twistd sentinel-reverse: option --nope not recognized"),
            (("sentinel-agent", "--connections", "2"), "twistd sentinel-agent: --agent-id is required"),
            (("sentinel-agent", "--agent-id", "a"), "twistd sentinel-agent: give --connect ENDPOINT, --listen ENDPOINT, or both"),
        ]:  # fmt: skip
            with self.subTest(argv=argv):
                error = self.assertRaises(SystemExit, self.twistd_options, "-n", *argv)
                self.assertEqual(error.code, line)

    def test_each_program_has_its_own_pid_file_unless_told(self) -> None:
        for program in ("sentinel-reverse", "sentinel-agent"):
            args = ["--connect", "unix:x", "--agent-id", "a", "--agent", "sentinel_twisted.agent:Agent"]
            extra = args if program == "sentinel-agent" else []
            with self.subTest(program=program):
                config = self.twistd_options("-n", program, *extra)
                self.assertEqual(config["pidfile"], os.path.abspath(f"{program}.pid"))
                config = self.twistd_options("-n", "--pidfile=", program, *extra)
                self.assertEqual(config["pidfile"], "")
                config = self.twistd_options("-n", "--pidfile=mine.pid", program, *extra)
                self.assertEqual(config["pidfile"], os.path.abspath("mine.pid"))

    def test_relative_file_names_are_made_absolute(self) -> None:
        # Nothing is read here but the agent's rules: the reverse proxy's
        # files are read when its service is made.
        argv = [
            "--token-file", "t", "--upstream", "https://localhost", "--upstream-ca", "ca.pem", "--access-log", "logs/access.log",
            "--client-ca", "c.pem", "--require-client-cert", "--listen", "ssl:0:privateKey=k.pem",
            "--allow-file", "/etc/sentinel/allowed",
        ]  # fmt: skip
        reverse = self.twistd_options("-n", "sentinel-reverse", *argv).subOptions
        for name in ("token-file", "upstream-ca", "access-log", "client-ca", "allow-file"):
            with self.subTest(name=name):
                self.assertEqual(reverse[name], os.path.abspath(argv[argv.index(f"--{name}") + 1]))
        rules = os.path.relpath(self.mktemp())
        shutil.copy(os.path.join(os.path.dirname(__file__), os.pardir, "examples", "rules.toml"), rules)
        agent = self.twistd_options("-n", "sentinel-agent", "--connect", "unix:x", "--agent-id", "a", "--rules", rules)
        self.assertEqual(agent.subOptions["rules"], os.path.abspath(rules))
        self.assertIsNone(agent.subOptions["auth-token-file"])

    def test_log_level_filters_the_observer_twistd_uses(self) -> None:
        from twisted.logger import LogLevel

        config = self.twistd_options(
            "--logger", f"{__name__}.collecting_observer", "sentinel-reverse", "--log-level", "warn"
        )
        observer = config["logger"]()
        del COLLECTED[:]
        for level in (LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error):
            observer({"log_level": level, "log_namespace": "x", "log_format": level.name})
        self.assertEqual([e["log_level"] for e in COLLECTED], [LogLevel.warn, LogLevel.error])

    def test_help_wraps_at_spaces_and_describes_every_option(self) -> None:
        from sentinel_twisted.agent.tap import Options as AgentOptions
        from sentinel_twisted.tap import DEFAULT_LISTEN
        from sentinel_twisted.tap import Options as ReverseOptions

        for options in (ReverseOptions(), AgentOptions()):
            text = options.getUsage(width=80)
            with self.subTest(program=options.program):
                options_part = text.split("\n\n")[0]
                for line in options_part.splitlines()[1:]:
                    label, _, doc = line.strip().partition(" ")
                    if line.startswith("      --"):
                        self.assertTrue(doc.strip(), f"{label} has no description")
                    self.assertNotIn("  ", line.strip().partition("  ")[2].strip(), line)
                    self.assertFalse(line.endswith("-"), line)
                for name in options.longOpt:
                    self.assertIn(f"--{name}", text)
        reverse = ReverseOptions().getUsage(width=80)
        self.assertIn(DEFAULT_LISTEN, reverse)
        self.assertIn("gateway", reverse.split("\n\n")[1])
        self.assertIn("status site", reverse.split("\n\n")[1])


class ReadmeDemoTests(TestCase):
    """The README's two-terminal demo: both programs in one directory."""

    def test_both_programs_run_side_by_side_with_their_own_pid_files(self) -> None:
        directory = tempfile.mkdtemp(prefix="st-demo-")
        self.addCleanup(shutil.rmtree, directory, True)
        shutil.copy(os.path.join(ROOT, "examples", "rules.toml"), directory)
        # As printed, except for the gateway's and status site's ports.
        reverse = Twistd(self, directory, name="reverse", own_pidfile=True)
        reverse.wait_listening()
        agent = Twistd(
            self, directory, "--connect", "unix:sentinel-reverse.sock", "--agent-id", "waf-1",
            "--rules", "rules.toml", name="agent", program="sentinel-agent", own_pidfile=True,
        )  # fmt: skip
        reverse.wait_for_output(r"Agent waf-1 registered connection")
        for program, twistd in (("sentinel-reverse", reverse), ("sentinel-agent", agent)):
            with open(os.path.join(directory, f"{program}.pid")) as f:
                self.assertEqual(f.read().strip(), str(twistd.process.pid))
        self.assertFalse(os.path.exists(os.path.join(directory, "twistd.pid")))
        # The default --log-level (info) leaves debug lines out.
        self.assertNotIn("Start-up heap frozen", reverse.output())

        # A clean SIGTERM stop exits 0, for both programs.
        agent.signal(signal.SIGTERM)
        self.assertEqual(agent.wait_exit(), 0, agent.output())
        reverse.signal(signal.SIGTERM)
        self.assertEqual(reverse.wait_exit(), 0, reverse.output())
        self.assertEqual(sorted(os.listdir(directory)), ["agent.out", "reverse.out", "rules.toml"])


class StartupErrorTests(TestCase):
    """
    Every kind of start-up failure of both programs ends with one line on
    standard error that names the option and the problem, exit status 1, no
    traceback, and nothing left behind (no socket, lock or pid file).  The
    cases run at once, each a real C{twistd} in a directory of its own.
    """

    def test_every_start_up_failure_is_one_line_and_leaves_nothing(self) -> None:
        root = tempfile.mkdtemp(prefix="st-startup-")
        self.addCleanup(shutil.rmtree, root, True)
        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        in_use = f"tcp:{port}:interface=127.0.0.1"
        live_path = os.path.join(root, "live.sock")
        live = socket.socket(socket.AF_UNIX)
        self.addCleanup(live.close)
        live.bind(live_path)
        live.listen(8)
        any_port = "tcp:0:interface=127.0.0.1"
        off = ("--http", "none", "--status", "none")
        rules = "rules.toml"

        def tokens(d: str) -> None:
            with open(os.path.join(d, "tokens"), "w") as f:
                f.write("waf-1 s3cret extra\n")

        def broken_rules(d: str) -> None:
            with open(os.path.join(d, rules), "w") as f:
                f.write("broken = [")

        def planted_lock(d: str) -> None:
            os.symlink("/etc/passwd", os.path.join(d, SOCKET + ".lock"))

        agent = ("--agent-id", "waf-1")
        # Longer than a UNIX socket's path may be (sun_path: 108 bytes).
        too_long = "s" * 120 + ".sock"
        cases: list[tuple[str, str, tuple[str, ...], tuple[str, ...], Any]] = [
            ("bad value", "sentinel-reverse", ("--request-timeout", "soon"), ("--request-timeout", "'soon'"), None),
            ("bad endpoint", "sentinel-reverse", ("--listen", "tcp:notaport", *off), ("--listen tcp:notaport", "number"), None),
            ("bad gateway endpoint", "sentinel-reverse", ("--http", "carrier-pigeon:1"), ("--http carrier-pigeon:1",), None),
            ("missing file", "sentinel-reverse", ("--require-auth", "--token-file", "absent", *off), ("--token-file", "absent"), None),
            ("malformed file", "sentinel-reverse", ("--token-file", "tokens", *off), ("--token-file", "tokens:1"), tokens),
            ("http port in use", "sentinel-reverse", ("--http", in_use, "--status", "none"), (f"--http {in_use}", "in use"), None),
            ("status port in use", "sentinel-reverse", ("--http", any_port, "--status", in_use), (f"--status {in_use}", "in use"), None),
            ("listen port in use", "sentinel-reverse", ("--listen", "unix:a.sock", "--listen", in_use, *off), (f"--listen {in_use}", "in use"), None),
            ("socket served", "sentinel-reverse", ("--listen", f"unix:{live_path}", *off), ("--listen", "served by a live process"), None),
            ("unwritable directory", "sentinel-reverse", ("--listen", "unix:/proc/st-test.sock", *off), ("--listen unix:/proc/st-test.sock", "cannot use"), None),
            ("unwritable log", "sentinel-reverse", ("--access-log", "/proc/st/access.log", "--http", any_port), ("--access-log /proc/st/access.log",), None),
            ("missing CA", "sentinel-reverse", ("--require-client-cert", "--client-ca", "ca.pem", "--listen", "ssl:0:privateKey=k.pem", *off), ("--client-ca", "ca.pem"), None),
            ("planted lock", "sentinel-reverse", off, ("--listen", f"{SOCKET}.lock is not a lock"), planted_lock),
            ("bad client endpoint", "sentinel-agent", ("--connect", "tcp:localhost", *agent, "--rules", rules), ("--connect tcp:localhost",), broken_rules),
            ("malformed rules", "sentinel-agent", ("--connect", "unix:p.sock", *agent, "--rules", rules), ("--rules /", "/malformed-rules/rules.toml: "), broken_rules),
            ("listen path too long", "sentinel-reverse", ("--listen", f"unix:{too_long}", *off), (f"--listen unix:{too_long}", "path too long"), None),
            ("agent listen path too long", "sentinel-agent", ("--listen", f"unix:{too_long}", *agent, "--agent", "sentinel_twisted.agent:Agent"), (f"--listen unix:{too_long}", "path too long"), None),
            ("agent listen port in use", "sentinel-agent", ("--listen", in_use, *agent, "--agent", "sentinel_twisted.agent:Agent"), (f"--listen {in_use}", "in use"), None),
            ("pid file directory missing", "sentinel-agent", ("--connect", "unix:p.sock", *agent, "--agent", "sentinel_twisted.agent:Agent"), ("--pidfile missing/x.pid", "does not exist"), None),
        ]  # fmt: skip
        running = []
        for what, program, args, expected, setup in cases:
            directory = os.path.join(root, what.replace(" ", "-"))
            os.mkdir(directory)
            if setup is not None:
                setup(directory)
            before = sorted(os.listdir(directory))
            before_program = ("--pidfile", "missing/x.pid") if what.startswith("pid file") else ()
            process = subprocess.Popen(
                twistd_command("-n", *before_program, program, *args),
                cwd=directory,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            self.addCleanup(lambda p=process: p.poll() is None and p.kill())
            running.append((what, program, expected, directory, before, process))
        for what, program, expected, directory, before, process in running:
            with self.subTest(what):
                try:
                    # All start at once: on a loaded machine of two cores,
                    # the first may wait for the others' start-up too.
                    out, err = process.communicate(timeout=ALL_AT_ONCE_TIMEOUT)
                except subprocess.TimeoutExpired:
                    process.kill()
                    raise AssertionError(f"{what}: twistd did not exit") from None
                self.assertEqual(process.returncode, 1, f"{what}:\n{out}{err}")
                lines = err.splitlines()
                self.assertEqual(len(lines), 1, f"{what}:\n{err}")
                self.assertTrue(lines[0].startswith(f"twistd {program}: "), lines[0])
                for text in expected:
                    self.assertIn(text, lines[0], what)
                for text in ("Traceback", "Usage:", "Error:"):
                    self.assertNotIn(text, out + err, what)
                self.assertEqual(sorted(os.listdir(directory)), before, what)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_READ_SETUP_CFG = """
import json
from setuptools.config.setupcfg import read_configuration
options = read_configuration("setup.cfg")["options"]
print(json.dumps({"packages": options["packages"], "package_dir": options.get("package_dir")}))
"""


class PackagingTests(TestCase):
    """
    The cheap half of the packaging check (the wheel and fresh-venv
    installs are checked by hand, see the README): the plugin lives in a
    C{twisted.plugins} namespace portion, never a package that would shadow
    Twisted's own.
    """

    def setUp(self) -> None:
        if not os.path.exists(os.path.join(ROOT, "setup.cfg")):
            raise SkipTest("not running from a source tree")

    def test_no_init_files_in_twisted_or_plugins(self) -> None:
        self.assertTrue(
            os.path.isfile(os.path.join(ROOT, "twisted", "plugins", "sentinel_reverse.py"))
        )
        self.assertFalse(os.path.exists(os.path.join(ROOT, "twisted", "__init__.py")))
        self.assertFalse(os.path.exists(os.path.join(ROOT, "twisted", "plugins", "__init__.py")))

    def test_setup_cfg_ships_plugins_but_not_twisted(self) -> None:
        result = subprocess.run(
            [sys.executable, "-c", _READ_SETUP_CFG],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
        if result.returncode and "No module named 'setuptools" in result.stderr:
            raise SkipTest("setuptools is not installed")
        self.assertEqual(result.returncode, 0, result.stderr)
        found = json.loads(result.stdout)
        packages = found["packages"]
        self.assertIn("sentinel_twisted", packages)
        self.assertIn("twisted.plugins", packages)
        self.assertNotIn("twisted", packages)
        self.assertEqual(
            [p for p in packages if p.split(".")[0] not in ("sentinel_twisted", "twisted")], []
        )
        # A plain .pth for editable installs, so the plugin scan sees twisted/plugins.
        self.assertEqual(found["package_dir"], {"": "."})

    def test_plugin_points_at_the_tap(self) -> None:
        from twisted.application.service import IServiceMaker
        from twisted.plugin import getPlugins

        import twisted.plugins

        makers = [
            p for p in getPlugins(IServiceMaker, twisted.plugins) if p.tapname == "sentinel-reverse"
        ]
        self.assertEqual(len(makers), 1)
        [maker] = makers
        from sentinel_twisted import tap

        self.assertIsInstance(maker.options(), tap.Options)


class JsonLogTests(TestCase):
    """C{--log-format json}: one JSON object per line, with the event's fields."""

    def test_an_event_is_one_line_of_json_with_its_fields(self) -> None:
        from twisted.logger import LogLevel

        from sentinel_twisted._twistd import json_log_line

        line = json_log_line(
            {
                "log_format": "Agent {agent_id} connection {connection_id} disconnected: {detail}",
                "log_level": LogLevel.info,
                "log_namespace": "sentinel_twisted.factory",
                "log_time": 1767225600.25,
                "log_logger": object(),
                "agent_id": "waf-1",
                "connection_id": "waf-1-1a-2",
                "detail": "gone\nforged line",
                "failed": 2,
            }
        )
        assert line is not None
        self.assertEqual(line.count("\n"), 1)
        self.assertTrue(line.endswith("\n"))
        fields = json.loads(line)
        self.assertEqual(
            fields,
            {
                "agent_id": "waf-1",
                "connection_id": "waf-1-1a-2",
                "detail": "gone\nforged line",
                "failed": 2,
                "time": "2026-01-01T00:00:00.250Z",
                "level": "info",
                "namespace": "sentinel_twisted.factory",
                "message": "Agent waf-1 connection waf-1-1a-2 disconnected: gone\nforged line",
            },
        )

    def test_a_field_cannot_forge_the_level_or_message(self) -> None:
        from twisted.logger import LogLevel

        from sentinel_twisted._twistd import json_log_line

        line = json_log_line({"log_format": "x", "log_level": LogLevel.warn, "level": "debug", "message": "y"})
        fields = json.loads(line or "")
        self.assertEqual((fields["level"], fields["message"]), ("warn", "x"))

    def test_a_failure_carries_its_traceback(self) -> None:
        from twisted.logger import LogLevel
        from twisted.python.failure import Failure

        from sentinel_twisted._twistd import json_log_line

        failure = Failure(ZeroDivisionError("division by zero"))
        fields = json.loads(
            json_log_line({"log_format": "boom", "log_level": LogLevel.critical, "log_failure": failure}) or ""
        )
        self.assertIn("ZeroDivisionError", fields["traceback"])

    def test_an_unknown_format_is_a_one_line_error(self) -> None:
        from twisted.scripts.twistd import ServerOptions

        config = ServerOptions()
        error = self.assertRaises(
            SystemExit, config.parseOptions, ["-n", "sentinel-reverse", "--log-format", "yaml"]
        )
        self.assertEqual(error.code, "twistd sentinel-reverse: --log-format: expected one of text, json, got 'yaml'")

    def test_both_programs_log_json_lines(self) -> None:
        directory = tempfile.mkdtemp(prefix="st-json-")
        self.addCleanup(shutil.rmtree, directory, True)
        shutil.copy(os.path.join(ROOT, "examples", "rules.toml"), directory)
        reverse = Twistd(self, directory, "--log-format", "json", name="reverse")
        reverse.wait_for_output(r'"message": "sentinel-reverse \S+ \(proxy id')
        agent = Twistd(
            self, directory, "--connect", "unix:sentinel-reverse.sock", "--agent-id", "waf-1",
            "--rules", "rules.toml", "--log-format", "json", name="agent", program="sentinel-agent",
        )  # fmt: skip
        reverse.wait_for_output(r"Agent waf-1 registered connection")
        agent.signal(signal.SIGTERM)
        self.assertEqual(agent.wait_exit(), 0, agent.output())
        reverse.signal(signal.SIGTERM)
        self.assertEqual(reverse.wait_exit(), 0, reverse.output())
        for twistd in (reverse, agent):
            lines = twistd.output().splitlines()
            self.assertGreater(len(lines), 2)
            events = [json.loads(line) for line in lines]
            for event in events:
                self.assertEqual(set(event) >= {"time", "level", "namespace", "message"}, True, event)
        registered = [e for e in map(json.loads, reverse.output().splitlines()) if "registered connection" in e["message"]]
        self.assertEqual(registered[0]["agent_id"], "waf-1")
        self.assertTrue(registered[0]["connection_id"].startswith("waf-1-"))
