"""
The options of C{twistd sentinel-reverse} and the service they build.
"""

from __future__ import annotations

import errno
import gc
import os
import shutil
import socket
import tempfile

from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import TestCase

from sentinel_twisted.endpoints import system_max_backlog
from sentinel_twisted.proxy.auth import TokenFileChecker
from sentinel_twisted.proxy.config import ReverseConnectionConfig
from sentinel_twisted.services import YOUNG_THRESHOLD, raise_young_threshold
from sentinel_twisted.tap import (
    DEFAULT_LISTEN,
    ListenerEndpointService,
    Options,
    ReverseListenerService,
    StartupError,
    freeze_startup_heap,
    make_listener,
    makeService,
)


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


class OptionsTests(TestCase):
    def test_defaults(self) -> None:
        options = parse()
        self.assertEqual(options["listen"], [DEFAULT_LISTEN + f":backlog={system_max_backlog()}"])
        self.assertEqual(options["config"], ReverseConnectionConfig())
        self.assertEqual(options["config"].proxy_id, "sentinel-proxy")
        self.assertIsNone(options["token-file"])

    def test_every_option(self) -> None:
        options = parse(
            "--listen", "tcp:7000:interface=127.0.0.1",
            "--listen", "unix:/tmp/a.sock:mode=660:backlog=5",
            "--allow", "waf-*",
            "--allow", "auth-1",
            "--require-auth",
            "--token-file", "/nonexistent/is/read/at/start",
            "--max-connections-per-agent", "7",
            "--handshake-timeout", "2.5",
            "--request-timeout", "0.25",
            "--proxy-id", "edge-1",
            "--backlog", "64",
            "--max-pending-registrations", "9",
            "--max-pending-registrations-per-peer", "3",
        )  # fmt: skip
        self.assertEqual(
            options["listen"],
            ["tcp:7000:interface=127.0.0.1:backlog=64", "unix:/tmp/a.sock:mode=660:backlog=5"],
        )
        config = options["config"]
        self.assertEqual(config.allowed_agents.patterns, ("waf-*", "auth-1"))
        self.assertTrue(config.allowed_agents.allows("waf-9"))
        self.assertFalse(config.allowed_agents.allows("bot-1"))
        self.assertTrue(config.require_auth)
        self.assertEqual(options["token-file"], "/nonexistent/is/read/at/start")
        self.assertEqual(config.max_connections_per_agent, 7)
        self.assertEqual(config.handshake_timeout, 2.5)
        self.assertIsInstance(config.handshake_timeout, float)
        self.assertEqual(config.request_timeout, 0.25)
        self.assertEqual(config.proxy_id, "edge-1")
        self.assertEqual(config.backlog, 64)
        self.assertEqual(config.max_pending_registrations, 9)
        self.assertEqual(config.max_pending_registrations_per_peer, 3)

    def test_whole_seconds_are_floats(self) -> None:
        config = parse("--handshake-timeout", "3", "--request-timeout", "1e1")["config"]
        self.assertEqual((config.handshake_timeout, config.request_timeout), (3.0, 10.0))
        self.assertIsInstance(config.handshake_timeout, float)

    def test_bad_values_are_usage_errors(self) -> None:
        for argv in [
            ["--handshake-timeout", "soon"],
            ["--handshake-timeout", "0"],
            ["--handshake-timeout", "-1"],
            ["--handshake-timeout", "nan"],
            ["--request-timeout", "inf"],
            ["--request-timeout", ""],
            ["--max-connections-per-agent", "0"],
            ["--max-connections-per-agent", "1.5"],
            ["--max-connections-per-agent", "many"],
            ["--backlog", "-3"],
            # listen() takes a C int: larger fails after the socket file
            # and its lock exist, and would leave them behind.
            ["--backlog", "2147483648"],
            ["--max-pending-registrations", "0"],
            ["--max-pending-registrations-per-peer", "0"],
            ["--no-such-option"],
            ["--handshake-timeout"],
            ["stray-argument"],
        ]:
            with self.subTest(argv=argv):
                self.assertRaises(usage.UsageError, parse, *argv)

    def test_values_that_would_weaken_the_policy_are_refused(self) -> None:
        for argv, text in [
            (("--allow", ""), "--allow: an empty pattern"),
            (("--allow", "waf-*", "--allow", " "), "--allow: an empty pattern"),
            (("--challenge-status", "200"), "--challenge-status: expected a 4xx"),
            (("--challenge-status", "503"), "--challenge-status: expected a 4xx"),
            (("--require-auth",), "--require-auth needs --token-file"),
            (("--log-level", "loud"), "--log-level: expected one of debug, info, warn"),
        ]:
            with self.subTest(argv=argv):
                error = self.assertRaises(usage.UsageError, parse, *argv)
                self.assertIn(text, str(error))
        self.assertEqual(parse("--challenge-status", "429")["challenge-status"], 429)

    def test_a_backlog_in_an_endpoint_string_is_checked_at_option_time(self) -> None:
        """
        listen() takes a C int: a larger backlog= fails only after the UNIX
        socket's lock and file exist, so it is an option error naming the option.
        """
        for option in ("--listen", "--http", "--status"):
            for backlog in ("2147483648", "0", "-1", "12x"):
                with self.subTest(option=option, backlog=backlog):
                    given = f"unix:/tmp/st-no-such-dir/x.sock:backlog={backlog}"
                    error = self.assertRaises(usage.UsageError, parse, option, given)
                    self.assertEqual(
                        str(error),
                        f"{option} {given}: backlog= must be a positive integer up to 2147483647, "
                        f"got {backlog!r}",
                    )
        options = parse("--listen", "tcp:0:backlog=2147483647", "--http", "tcp:0:backlog=1")
        self.assertEqual(options["listen"], ["tcp:0:backlog=2147483647"])

    def test_log_level(self) -> None:
        from twisted.logger import LogLevel

        self.assertEqual(parse()["log-level"], LogLevel.info)
        self.assertEqual(parse("--log-level", "WARNING")["log-level"], LogLevel.warn)
        self.assertEqual(parse("--log-level", "debug")["log-level"], LogLevel.debug)

    def test_usage_error_names_the_option(self) -> None:
        error = self.assertRaises(usage.UsageError, parse, "--request-timeout", "-2")
        self.assertIn("request-timeout", str(error))

    def test_incomplete_frame_budget(self) -> None:
        self.assertEqual(parse()["config"].max_incomplete_frame_bytes, 64 * 1024 * 1024)
        options = parse("--max-incomplete-frame-bytes", "1000")
        self.assertEqual(options["config"].max_incomplete_frame_bytes, 1000)
        error = self.assertRaises(usage.UsageError, parse, "--max-incomplete-frame-bytes", "0")
        self.assertIn("max-incomplete-frame-bytes", str(error))

    def test_close_grace(self) -> None:
        self.assertEqual(parse()["config"].close_grace, 5.0)
        config = parse("--close-grace", "2.5")["config"]
        self.assertEqual(config.close_grace, 2.5)
        config = parse("--close-grace", "1")["config"]
        self.assertIsInstance(config.close_grace, float)
        for value in ("0", "-1", "soon", "nan", "inf", ""):
            with self.subTest(value=value):
                error = self.assertRaises(usage.UsageError, parse, "--close-grace", value)
                self.assertEqual(
                    str(error), f"--close-grace: expected a positive number of seconds, got {value!r}"
                )

    def test_max_known_agents(self) -> None:
        from sentinel_twisted.gateway.known import MAX_KNOWN_AGENTS

        self.assertEqual(parse()["gateway"].max_known_agents, MAX_KNOWN_AGENTS)
        self.assertIn(f"[default: {MAX_KNOWN_AGENTS}]", " ".join(str(Options()).split()))
        self.assertEqual(parse("--max-known-agents", "7")["gateway"].max_known_agents, 7)
        for value in ("0", "-3", "1.5", "many", ""):
            with self.subTest(value=value):
                error = self.assertRaises(usage.UsageError, parse, "--max-known-agents", value)
                self.assertEqual(str(error), f"--max-known-agents: expected a positive integer, got {value!r}")

    def test_agent_id_and_metadata_limits(self) -> None:
        config = parse()["config"]
        self.assertEqual((config.max_agent_id_length, config.max_metadata_size), (256, 64 * 1024))
        config = parse("--max-agent-id-length", "32", "--max-metadata-size", "1000")["config"]
        self.assertEqual((config.max_agent_id_length, config.max_metadata_size), (32, 1000))
        for option in ("--max-agent-id-length", "--max-metadata-size"):
            error = self.assertRaises(usage.UsageError, parse, option, "0")
            self.assertIn(option[2:], str(error))

    def test_backlog_added_only_where_missing(self) -> None:
        options = parse(
            "--backlog", "32",
            "--listen", "tcp:7000",
            "--listen", "tcp6:7001:backlog=3",
            "--listen", "ssl:7002:privateKey=k.pem",
            "--listen", "unix:/tmp/x.sock:mode=600",
            "--listen", "systemd:domain=UNIX:index=0",
        )  # fmt: skip
        self.assertEqual(
            options["listen"],
            [
                "tcp:7000:backlog=32",
                "tcp6:7001:backlog=3",
                "ssl:7002:privateKey=k.pem:backlog=32",
                "unix:/tmp/x.sock:mode=600:backlog=32",
                "systemd:domain=UNIX:index=0",
            ],
        )

    def test_unix_sockets_are_owner_only_unless_told(self) -> None:
        options = parse(
            "--backlog", "7", "--listen", "unix:/tmp/x.sock", "--listen", "unix:/tmp/y.sock:mode=660"
        )
        self.assertEqual(
            options["listen"],
            ["unix:/tmp/x.sock:mode=600:backlog=7", "unix:/tmp/y.sock:mode=660:backlog=7"],
        )

    def test_help_lists_every_option(self) -> None:
        text = str(Options())
        for name in [
            "--listen", "--allow", "--require-auth", "--token-file", "--max-connections-per-agent",
            "--handshake-timeout", "--request-timeout", "--proxy-id", "--backlog",
            "--max-pending-registrations", "--close-grace", "--max-known-agents", "--version",
        ]:  # fmt: skip
            self.assertIn(name, text)
        self.assertIn(DEFAULT_LISTEN, text.replace("\n", "").replace(" ", ""))


class MakeListenerTests(TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="st-tap-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.reactor = MemoryReactorClock()

    def write(self, name: str, text: str, mode: int = 0o600) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)
        return path

    def test_builds_one_endpoint_service_per_listen(self) -> None:
        sock = os.path.join(self.dir, "a.sock")
        options = parse("--listen", f"unix:{sock}", "--listen", "tcp:0:interface=127.0.0.1")
        top = make_listener(options, self.reactor)
        self.assertIsInstance(top, ReverseListenerService)
        children = list(top)
        self.assertEqual(len(children), 2)
        for child in children:
            self.assertIsInstance(child, ListenerEndpointService)
            self.assertIs(child.factory, top.factory)
        self.assertIs(top.factory.config, options["config"])
        self.assertIsNone(top.factory.token_checker)

    def test_the_close_grace_and_the_known_agents_limit_reach_what_they_configure(self) -> None:
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport

        from sentinel_twisted.tap import add_gateway

        options = parse(
            "--listen", "tcp:0:interface=127.0.0.1", "--http", "tcp:0:interface=127.0.0.1",
            "--status", "none", "--handshake-timeout", "1", "--close-grace", "2.5",
            "--max-known-agents", "2",
        )  # fmt: skip
        top = make_listener(options, self.reactor)
        self.assertEqual(top.factory.config.close_grace, 2.5)
        gateway = add_gateway(top, options, self.reactor)
        self.assertEqual(gateway.gateway.known.limit, 2)
        # A connection that never registers is closed after the handshake
        # timeout, and aborted --close-grace later if it is still there.
        protocol = top.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.reactor.advance(1)
        self.assertTrue(transport.disconnecting)
        self.reactor.advance(2.4)
        self.assertFalse(transport.disconnected)
        self.reactor.advance(0.1)
        self.assertTrue(transport.disconnected)

    def test_token_file_loaded(self) -> None:
        path = self.write("tokens", "# agents\nwaf-1 s3cret\n\nwaf-2 other\n")
        # A socket of its own: the default one, in the working directory,
        # is the README's gateway's (running while the suite does).
        sock = os.path.join(self.dir, "a.sock")
        options = parse("--listen", f"unix:{sock}", "--require-auth", "--token-file", path)
        top = make_listener(options, self.reactor)
        checker = top.factory.token_checker
        self.assertIsInstance(checker, TokenFileChecker)
        assert checker is not None
        self.assertTrue(checker.check_token("waf-1", "s3cret"))
        self.assertFalse(checker.check_token("waf-1", "other"))

    def test_malformed_token_file_names_file_and_line(self) -> None:
        path = self.write("tokens", "# agents\nwaf-1 s3cret\nwaf-2 two words\n")
        options = parse("--token-file", path)
        error = self.assertRaises(StartupError, make_listener, options, self.reactor)
        self.assertIn(f"{path}:3:", str(error))
        self.assertNotIn("s3cret", str(error))
        self.assertNotIn("words", str(error))

    def test_makeService_turns_startup_errors_into_a_plain_exit(self) -> None:
        options = parse("--token-file", os.path.join(self.dir, "missing"))
        error = self.assertRaises(SystemExit, makeService, options)
        self.assertIsInstance(error.code, str)
        self.assertIn("twistd sentinel-reverse: --token-file: cannot read token file", str(error.code))
        self.assertIn("missing", str(error.code))

    def test_bad_endpoint_string(self) -> None:
        error = self.assertRaises(
            StartupError, make_listener, parse("--listen", "carrier-pigeon:1"), self.reactor
        )
        self.assertIn("carrier-pigeon:1", str(error))

    def test_missing_socket_directory(self) -> None:
        sock = os.path.join(self.dir, "no", "such", "dir", "a.sock")
        error = self.assertRaises(
            StartupError, make_listener, parse("--listen", f"unix:{sock}"), self.reactor
        )
        self.assertIn("does not exist", str(error))

    def test_socket_directory_that_is_no_directory(self) -> None:
        # A file where the directory should be, and a directory that cannot
        # be looked at (a symlink loop: EACCES would not stop root): each
        # says what is wrong with it, not that it "does not exist".
        a_file = os.path.join(self.dir, "a-file")
        with open(a_file, "w"):
            pass
        loop = os.path.join(self.dir, "loop")
        os.symlink(loop, loop)
        for directory, problem in [
            (a_file, f"{a_file} is not a directory"),
            (loop, f"cannot use directory {loop}: too many levels of symbolic links"),
        ]:
            with self.subTest(directory=directory):
                sock = os.path.join(directory, "a.sock")
                error = self.assertRaises(
                    StartupError, make_listener, parse("--listen", f"unix:{sock}"), self.reactor
                )
                self.assertEqual(str(error), f"--listen unix:{sock}: cannot listen on {sock}: {problem}")

    def test_live_socket_refused(self) -> None:
        sock = os.path.join(self.dir, "live.sock")
        server = socket.socket(socket.AF_UNIX)
        self.addCleanup(server.close)
        server.bind(sock)
        server.listen(1)
        error = self.assertRaises(
            StartupError, make_listener, parse("--listen", f"unix:{sock}"), self.reactor
        )
        self.assertIn("served by a live process", str(error))
        self.assertTrue(os.path.exists(sock))

    def test_unreadable_socket_path_is_one_clear_error(self) -> None:
        sock = os.path.join(self.dir, "hidden.sock")

        def denied(path: str) -> os.stat_result:
            raise PermissionError(errno.EACCES, "Permission denied", path)

        self.patch(os, "lstat", denied)
        error = self.assertRaises(
            StartupError, make_listener, parse("--listen", f"unix:{sock}"), self.reactor
        )
        self.assertEqual(str(error), f"--listen unix:{sock}: cannot use {sock}: permission denied")

    def test_stale_lock_with_a_live_pid_removed_when_nobody_serves_the_socket(self) -> None:
        sock = os.path.join(self.dir, "stale.sock")
        os.symlink(str(os.getpid()), sock + ".lock")
        top = make_listener(parse("--listen", f"unix:{sock}:lockfile=1"), self.reactor)
        self.assertFalse(os.path.lexists(sock + ".lock"))
        self.assertEqual(top.stale_removed, [sock + ".lock"])

    def test_lock_of_a_socket_without_lockfile_is_left_alone(self) -> None:
        sock = os.path.join(self.dir, "nolock.sock")
        os.symlink("12345", sock + ".lock")
        make_listener(parse("--listen", f"unix:{sock}:lockfile=0"), self.reactor)
        self.assertEqual(os.readlink(sock + ".lock"), "12345")

    def test_live_socket_keeps_its_lock(self) -> None:
        sock = os.path.join(self.dir, "live.sock")
        server = socket.socket(socket.AF_UNIX)
        self.addCleanup(server.close)
        server.bind(sock)
        server.listen(1)
        os.symlink(str(os.getpid()), sock + ".lock")
        error = self.assertRaises(
            StartupError, make_listener, parse("--listen", f"unix:{sock}:lockfile=1"), self.reactor
        )
        self.assertIn("served by a live process", str(error))
        self.assertEqual(os.readlink(sock + ".lock"), str(os.getpid()))

    def test_planted_lock_is_one_clear_error(self) -> None:
        sock = os.path.join(self.dir, "shared.sock")
        os.symlink("/etc/passwd", sock + ".lock")
        error = self.assertRaises(
            StartupError, make_listener, parse("--listen", f"unix:{sock}"), self.reactor
        )
        self.assertIn(f"--listen unix:{sock}: {sock}.lock is not a lock", str(error))
        self.assertEqual(os.readlink(sock + ".lock"), "/etc/passwd")

    def test_failure_to_listen_closes_what_listens_and_names_the_option(self) -> None:
        """
        When one endpoint cannot listen, those already listening are closed
        and their socket files and locks removed before the error is raised.
        """
        from twisted.internet import reactor

        sock = os.path.join(self.dir, "a.sock")
        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        in_use = f"tcp:{busy.getsockname()[1]}:interface=127.0.0.1"
        options = parse("--listen", f"unix:{sock}", "--listen", in_use)
        top = make_listener(options, reactor)
        error = self.assertRaises(StartupError, top.privilegedStartService)
        self.assertEqual(
            str(error),
            f"--listen {in_use}: cannot listen on 127.0.0.1:{busy.getsockname()[1]}: address already in use",
        )
        self.assertFalse(os.path.lexists(sock))
        self.assertFalse(os.path.lexists(sock + ".lock"))
        self.assertFalse(any(child.port for child in top))  # type: ignore[attr-defined]

    def test_failure_after_the_lock_was_taken_removes_socket_and_lock(self) -> None:
        """
        Twisted takes the lock and binds the file before listen() and
        chmod(); when those fail, no port comes back to be closed.
        """
        from twisted.internet import reactor

        sock = os.path.join(self.dir, "a.sock")
        options = parse("--listen", f"unix:{sock}")
        # Past the option check, as an embedding program could build it.
        options["listen"] = [f"unix:{sock}:mode=600:lockfile=1:backlog=2147483648"]
        top = make_listener(options, reactor)
        error = self.assertRaises(StartupError, top.privilegedStartService)
        self.assertIn(f"--listen unix:{sock}:mode=600:lockfile=1:backlog=2147483648: ", str(error))
        self.assertFalse(os.path.lexists(sock))
        self.assertFalse(os.path.lexists(sock + ".lock"))

    def test_a_gateway_listener_failing_after_its_lock_removes_socket_and_lock(self) -> None:
        from twisted.internet import reactor

        from sentinel_twisted.tap import add_gateway

        sock, http = os.path.join(self.dir, "a.sock"), os.path.join(self.dir, "http.sock")
        options = parse("--listen", f"unix:{sock}", "--http", f"unix:{http}", "--status", "none")
        options["http"] = f"unix:{http}:backlog=2147483648"
        top = make_listener(options, reactor)
        add_gateway(top, options, reactor)
        # The agent listener binds in the privileged step, the gateway on start.
        top.privilegedStartService()
        error = self.assertRaises(StartupError, top.startService)
        self.assertIn(f"--http unix:{http}:backlog=2147483648: ", str(error))
        # Twisted started the site's factory before binding and never stops
        # it when listen() fails; stop its date timer here.
        (gateway,) = [c for c in top if hasattr(c, "site")]
        gateway.site.doStop()  # type: ignore[attr-defined]
        for path in (sock, http):
            self.assertFalse(os.path.lexists(path), path)
            self.assertFalse(os.path.lexists(path + ".lock"), path)

    def test_stale_socket_removed_and_reported(self) -> None:
        sock = os.path.join(self.dir, "stale.sock")
        dead = socket.socket(socket.AF_UNIX)
        dead.bind(sock)
        dead.close()
        top = make_listener(parse("--listen", f"unix:{sock}"), self.reactor)
        self.assertFalse(os.path.exists(sock))
        self.assertEqual(top.stale_removed, [sock])


class FreezeStartupHeapTests(TestCase):
    def test_everything_alive_is_frozen(self) -> None:
        self.addCleanup(gc.unfreeze)
        alive = [object() for _ in range(10)], {"a": []}
        count = freeze_startup_heap()
        self.assertEqual(count, gc.get_freeze_count())
        self.assertGreater(count, 1000)
        # A frozen container is out of every collection's reach.
        self.assertFalse(any(o is alive for o in gc.get_objects()))

    def test_the_frozen_count_is_logged_at_debug(self) -> None:
        from twisted.logger import LogLevel

        from sentinel_twisted.tap import _freeze_when_running

        from ._proxy_support import captured_log

        self.addCleanup(gc.unfreeze)
        with captured_log() as events:
            _freeze_when_running()
        [event] = [e for e in events if "Start-up heap" in e.get("log_format", "")]
        self.assertIs(event["log_level"], LogLevel.debug)


class YoungThresholdTests(TestCase):
    def setUp(self) -> None:
        thresholds = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *thresholds)
        if not gc.isenabled():
            self.addCleanup(gc.disable)
            gc.enable()
        gc.set_threshold(700, 10, 10)

    def test_raised_the_older_generations_kept(self) -> None:
        self.assertEqual(raise_young_threshold(), (700, 10, 10))
        self.assertEqual(gc.get_threshold(), (YOUNG_THRESHOLD, 10, 10))

    def test_never_lowered(self) -> None:
        gc.set_threshold(50_000, 5, 5)
        self.assertIsNone(raise_young_threshold())
        self.assertEqual(gc.get_threshold(), (50_000, 5, 5))

    def test_left_alone_with_the_collector_off(self) -> None:
        self.addCleanup(gc.enable)
        gc.disable()
        self.assertIsNone(raise_young_threshold())
        self.assertEqual(gc.get_threshold(), (700, 10, 10))

    def test_the_program_raises_it_once_running(self) -> None:
        from twisted.logger import LogLevel

        from sentinel_twisted.tap import _freeze_when_running

        from ._proxy_support import captured_log

        self.addCleanup(gc.unfreeze)
        with captured_log() as events:
            _freeze_when_running()
        self.assertEqual(gc.get_threshold()[0], YOUNG_THRESHOLD)
        [event] = [e for e in events if "Young collections" in e.get("log_format", "")]
        self.assertIs(event["log_level"], LogLevel.debug)
        self.assertEqual(event["old"], 700)
