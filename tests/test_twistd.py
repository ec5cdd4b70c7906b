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
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


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

    def __init__(self, test: TestCase, cwd: str, *args: str, name: str = "twistd") -> None:
        self.cwd = cwd
        self.output_path = os.path.join(cwd, f"{name}.out")
        self._output: IO[bytes] = open(self.output_path, "wb")
        self.process = subprocess.Popen(
            twistd_command("-n", "--pidfile=", "sentinel-reverse", *args),
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
        self.assertRegex(result.stdout, r"(?m)^\s+sentinel-reverse\s+Accept reverse connections")

    def test_defaults_log_lines_and_sigterm(self) -> None:
        """
        With no options: an owner-only socket plus lockfile in the working
        directory; one log line per registration, rejection and disconnect;
        SIGTERM shuts down cleanly and removes the socket.
        """
        twistd = Twistd(self, self.dir)
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
        # Once running, the start-up heap is out of the collector's way.
        self.assertRegex(twistd.output(), r"Start-up heap frozen: \d+ objects")

        twistd.signal(signal.SIGTERM)
        status = twistd.wait_exit()
        # twistd re-raises the signal it stopped for, so a clean SIGTERM
        # shutdown shows as -SIGTERM (older Twisted: 0).
        self.assertIn(status, (0, -signal.SIGTERM), twistd.output())
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
