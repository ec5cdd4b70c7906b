"""
C{twistd sentinel-agent --listen}: forward mode's options and service.
(The running program against the reference proxy is in
C{test_forward_interop}.)
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from twisted.internet.task import Clock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from sentinel_twisted.agent import AgentListener
from sentinel_twisted.agent.tap import Options, make_agent_service, makeService

from ._support import temp_path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_RULES = str(ROOT / "examples" / "rules.toml")


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(["--agent-id", "waf-1", "--rules", EXAMPLE_RULES, *args])
    return options


class ListenOptionsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.socket = temp_path(self, "agent.sock")

    def test_listen_only(self) -> None:
        options = parse(
            "--listen", f"unix:{self.socket}", "--handshake-timeout", "3", "--frame-timeout", "7",
            "--write-stall-timeout", "8", "--max-event-values", "2000",
        )  # fmt: skip
        self.assertEqual(options["listen"], f"unix:{self.socket}:lockfile=1:mode=600")
        self.assertEqual(options["connect"], [])
        service = make_agent_service(options, reactor=Clock())
        self.assertIsNone(service.connector)
        listener = service.listener
        assert listener is not None
        self.assertIsInstance(listener, AgentListener)
        self.assertEqual(listener.settings.agent_id, "waf-1")
        self.assertEqual(listener.settings.max_concurrency, 100)
        self.assertEqual(listener.settings.max_held_event_bytes, 64 * 1024 * 1024)
        self.assertEqual(listener.settings.max_event_values, 2000)
        self.assertEqual(listener.factory.handshake_timeout, 3)
        self.assertEqual((listener.settings.frame_timeout, listener.settings.write_stall_timeout), (7.0, 8.0))
        self.assertIs(service.agent, options["agent-object"])

    def test_connect_and_listen_together(self) -> None:
        options = parse("--connect", "unix:/tmp/proxy.sock", "--listen", f"unix:{self.socket}", "--fail-open")
        service = make_agent_service(options, reactor=Clock())
        assert service.connector is not None and service.listener is not None
        self.assertIs(service.connector.settings.agent, service.listener.settings.agent)
        self.assertTrue(service.listener.settings.fail_open)

    def test_one_of_connect_and_listen_is_required(self) -> None:
        error = self.assertRaises(usage.UsageError, parse)
        self.assertIn("give --connect ENDPOINT, --listen ENDPOINT, or both", str(error))

    def test_explicit_mode_and_lockfile_are_kept(self) -> None:
        options = parse("--listen", f"unix:{self.socket}:mode=660:lockfile=0")
        self.assertEqual(options["listen"], f"unix:{self.socket}:mode=660:lockfile=0")

    def test_tcp_is_left_alone(self) -> None:
        self.assertEqual(parse("--listen", "tcp:0:interface=127.0.0.1")["listen"], "tcp:0:interface=127.0.0.1")

    def test_bad_listen_endpoint(self) -> None:
        error = self.assertRaises(usage.UsageError, parse, "--listen", "nonsense:1")
        self.assertIn("--listen nonsense:1", str(error))

    def test_a_backlog_out_of_range_is_an_option_error(self) -> None:
        """
        Twisted's listen() takes the lock and binds the file before a
        backlog over a C int fails: refused at option time instead.
        """
        for backlog in ("2147483648", "0", "-5", "many"):
            with self.subTest(backlog=backlog):
                error = self.assertRaises(
                    usage.UsageError, parse, "--listen", f"unix:{self.socket}:backlog={backlog}"
                )
                self.assertIn(f"--listen unix:{self.socket}:backlog={backlog}: ", str(error))
                self.assertIn("backlog= must be a positive integer up to 2147483647", str(error))
        self.assertFalse(os.path.lexists(self.socket))
        self.assertIn("backlog=2147483647", parse("--listen", f"unix:{self.socket}:backlog=2147483647")["listen"])

    def test_a_failure_to_listen_after_the_lock_leaves_nothing_behind(self) -> None:
        from twisted.internet import reactor

        listener = AgentListener(
            parse("--listen", f"unix:{self.socket}")["agent-object"],
            f"unix:{self.socket}:lockfile=1:backlog=2147483648",
            "waf-1",
            reactor=reactor,
        )
        self.assertRaises(OverflowError, listener.startService)
        self.assertFalse(os.path.lexists(self.socket))
        self.assertFalse(os.path.lexists(self.socket + ".lock"))

    def test_a_stale_socket_is_replaced(self) -> None:
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(self.socket)
        stale.close()
        make_agent_service(parse("--listen", f"unix:{self.socket}"), reactor=Clock())
        self.assertFalse(os.path.lexists(self.socket))

    def test_a_live_socket_is_never_stolen(self) -> None:
        live = socket.socket(socket.AF_UNIX)
        self.addCleanup(live.close)
        live.bind(self.socket)
        live.listen(1)
        error = self.assertRaises(SystemExit, makeService, parse("--listen", f"unix:{self.socket}"))
        self.assertIn("served by a live process", str(error))
        self.assertTrue(os.path.exists(self.socket))


    def test_a_stale_socket_that_cannot_be_removed_is_one_clear_line(self) -> None:
        # Another user's stale socket in a sticky directory (/tmp): EPERM.
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(self.socket)
        stale.close()

        def denied(path: str) -> None:
            raise PermissionError(errno.EPERM, "Operation not permitted", path)

        self.patch(os, "unlink", denied)
        error = self.assertRaises(SystemExit, makeService, parse("--listen", f"unix:{self.socket}"))
        self.assertEqual(
            str(error),
            f"twistd sentinel-agent: --listen unix:{self.socket}: "
            f"cannot remove the stale socket {self.socket}: operation not permitted",
        )

class ListenFailureTests(SynchronousTestCase):
    """
    A failure to listen, found when twistd starts the service, is one line
    that names the option, as C{twistd sentinel-reverse} says it, and
    leaves no socket file or lock behind.
    """

    def test_a_path_too_long_for_a_unix_socket(self) -> None:
        from twisted.internet import reactor

        from sentinel_twisted._twistd import StartupError

        path = os.path.join(os.path.dirname(temp_path(self, "x")), "s" * 120 + ".sock")
        service = make_agent_service(parse("--listen", f"unix:{path}"), reactor=reactor)
        error = self.assertRaises(StartupError, service.startService)
        self.assertEqual(
            str(error), f"--listen unix:{path}: cannot listen on {path}: af_unix path too long"
        )
        self.assertFalse(os.path.lexists(path))
        self.assertFalse(os.path.lexists(path + ".lock"))
        self.assertFalse(service.listener is not None and service.listener.running)
