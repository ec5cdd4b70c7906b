"""
Endpoint-string helpers and the handling of UNIX socket files: a socket a
live process serves is never touched, a stale one is replaced, anything
that is not a socket is refused.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import tempfile
from typing import Any

from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import TestCase

from sentinel_twisted.endpoints import (
    FALLBACK_BACKLOG,
    SocketInUse,
    check_endpoint_arguments,
    clear_stale_lock,
    clear_stale_unix_socket,
    describe_endpoint_error,
    describe_listen_failure,
    parse_description,
    remove_abandoned_unix_socket,
    system_max_backlog,
    takes_lock,
    unix_socket_path,
    with_backlog,
    with_lockfile,
    with_owner_only_mode,
)

UNIX_DESCRIPTIONS = [
    "unix:/tmp/a.sock",
    "unix:/tmp/a.sock:mode=600:lockfile=1",
    "unix:address=/tmp/b.sock:mode=600",
    "unix:mode=600:/tmp/c.sock",
    "unix:/tmp/with\\:colon.sock",
    "unix:address=/tmp/x\\:y.sock",
    "unix:/tmp/with\\=equals.sock",
    "unix:relative.sock:backlog=5",
    "unix:./dir/d.sock",
]


class DescriptionTests(TestCase):
    def test_unix_socket_path_agrees_with_twisted(self) -> None:
        """Whatever path Twisted would bind, we check and clean."""
        reactor = MemoryReactor()
        for description in UNIX_DESCRIPTIONS:
            with self.subTest(description=description):
                endpoint = serverFromString(reactor, description)
                self.assertEqual(unix_socket_path(description), endpoint._address)

    def test_unix_socket_paths(self) -> None:
        self.assertEqual(unix_socket_path("unix:/tmp/a.sock:mode=600"), "/tmp/a.sock")
        self.assertEqual(unix_socket_path("unix:address=/tmp/b.sock"), "/tmp/b.sock")
        self.assertEqual(unix_socket_path("unix:mode=600:/tmp/c.sock"), "/tmp/c.sock")
        self.assertEqual(unix_socket_path("unix:/tmp/a\\:b.sock"), "/tmp/a:b.sock")

    def test_no_path_for_other_endpoints(self) -> None:
        for description in [
            "tcp:7000",
            "tcp:7000:interface=/tmp/x",
            "ssl:443",
            "unix",
            "unix:\0abstract",
        ]:
            with self.subTest(description=description):
                self.assertIsNone(unix_socket_path(description))

    def test_parse_description(self) -> None:
        self.assertEqual(
            parse_description("tcp:7000:interface=127.0.0.1:a\\:b:k=v=w"),
            (["tcp", "7000", "a:b"], {"interface": "127.0.0.1", "k": "v=w"}),
        )

    def test_with_backlog(self) -> None:
        self.assertEqual(with_backlog("tcp:7000", 9), "tcp:7000:backlog=9")
        self.assertEqual(with_backlog("tcp:7000:backlog=3", 9), "tcp:7000:backlog=3")
        self.assertEqual(
            with_backlog("unix:/tmp/a\\:backlog=1.sock", 9),
            "unix:/tmp/a\\:backlog=1.sock:backlog=9",
        )
        self.assertEqual(
            with_backlog("systemd:domain=INET:index=0", 9), "systemd:domain=INET:index=0"
        )

    def test_with_backlog_reaches_twisted(self) -> None:
        reactor = MemoryReactor()
        for description in ["tcp:7000", "tcp6:7000", "unix:/tmp/a.sock", "unix:/tmp/a\\:b.sock"]:
            with self.subTest(description=description):
                endpoint = serverFromString(reactor, with_backlog(description, 77))
                self.assertEqual(endpoint._backlog, 77)

    def test_owner_only_mode_reaches_twisted(self) -> None:
        reactor = MemoryReactor()
        endpoint = serverFromString(reactor, with_owner_only_mode("unix:/tmp/a.sock"))
        self.assertEqual(endpoint._mode, 0o600)
        endpoint = serverFromString(reactor, with_owner_only_mode("unix:/tmp/a.sock:mode=660"))
        self.assertEqual(endpoint._mode, 0o660)
        self.assertEqual(with_owner_only_mode("tcp:7000"), "tcp:7000")

    def test_lockfile_reaches_twisted(self) -> None:
        reactor = MemoryReactor()
        endpoint = serverFromString(reactor, with_lockfile("unix:/tmp/a.sock"))
        self.assertTrue(endpoint._wantPID)
        endpoint = serverFromString(reactor, with_lockfile("unix:/tmp/a.sock:lockfile=0"))
        self.assertFalse(endpoint._wantPID)
        self.assertEqual(with_lockfile("tcp:7000"), "tcp:7000")


class ClearStaleSocketTests(TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="st-ep-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "s.sock")

    def bind(self, listen: bool) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.bind(self.path)
        if listen:
            sock.listen(4)
        return sock

    def test_missing_path_is_free(self) -> None:
        self.assertFalse(clear_stale_unix_socket(self.path))

    def test_live_socket_is_refused_and_untouched(self) -> None:
        server = self.bind(listen=True)
        before = os.lstat(self.path)
        error = self.assertRaises(SocketInUse, clear_stale_unix_socket, self.path)
        self.assertIn(self.path, str(error))
        self.assertIn("live process", str(error))
        after = os.lstat(self.path)
        self.assertEqual((before.st_ino, before.st_mode), (after.st_ino, after.st_mode))
        # ... and it still serves.
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(client.close)
        client.settimeout(2)
        client.connect(self.path)
        server.settimeout(2)
        server.accept()[0].close()  # the probe's connection
        server.accept()[0].close()  # ours

    def test_stale_socket_is_removed(self) -> None:
        self.bind(listen=False).close()
        self.assertTrue(os.path.exists(self.path))
        self.assertTrue(clear_stale_unix_socket(self.path))
        self.assertFalse(os.path.lexists(self.path))

    def test_bound_but_not_listening_socket_counts_as_stale(self) -> None:
        self.bind(listen=False)
        self.assertTrue(clear_stale_unix_socket(self.path))

    def test_regular_file_is_refused(self) -> None:
        with open(self.path, "w") as f:
            f.write("precious")
        error = self.assertRaises(SocketInUse, clear_stale_unix_socket, self.path)
        self.assertIn("not a socket", str(error))
        with open(self.path) as f:
            self.assertEqual(f.read(), "precious")

    def test_a_path_that_cannot_be_looked_at_is_refused_not_raised(self) -> None:
        # A directory the user may not search: lstat() fails with EACCES.
        def denied(path: str) -> os.stat_result:
            raise PermissionError(errno.EACCES, "Permission denied", path)

        self.patch(os, "lstat", denied)
        error = self.assertRaises(SocketInUse, clear_stale_unix_socket, self.path)
        self.assertEqual(str(error), f"cannot use {self.path}: permission denied")

    def test_a_stale_socket_that_cannot_be_removed_is_refused_not_raised(self) -> None:
        # Another user's stale socket in a sticky directory (/tmp): EPERM.
        self.bind(listen=False)

        def denied(path: str) -> None:
            raise PermissionError(errno.EPERM, "Operation not permitted", path)

        self.patch(os, "unlink", denied)
        error = self.assertRaises(SocketInUse, clear_stale_unix_socket, self.path)
        self.assertEqual(
            str(error), f"cannot remove the stale socket {self.path}: operation not permitted"
        )

    def test_directory_and_symlink_are_refused(self) -> None:
        os.mkdir(self.path)
        self.assertRaises(SocketInUse, clear_stale_unix_socket, self.path)
        self.assertTrue(os.path.isdir(self.path))
        link = os.path.join(self.dir, "link.sock")
        os.symlink(self.path, link)
        self.assertRaises(SocketInUse, clear_stale_unix_socket, link)
        self.assertTrue(os.path.islink(link))


class BacklogTests(TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="st-ep-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def test_the_systems_maximum(self) -> None:
        path = os.path.join(self.dir, "somaxconn")
        with open(path, "w") as f:
            f.write("65535\n")
        self.assertEqual(system_max_backlog(path), 65535)

    def test_a_sane_default_when_unreadable(self) -> None:
        self.assertEqual(system_max_backlog(os.path.join(self.dir, "missing")), FALLBACK_BACKLOG)
        path = os.path.join(self.dir, "garbage")
        with open(path, "w") as f:
            f.write("lots\n")
        self.assertEqual(system_max_backlog(path), FALLBACK_BACKLOG)
        self.assertGreater(FALLBACK_BACKLOG, 128)

    def test_every_default_listener_gets_it(self) -> None:
        from sentinel_twisted.proxy.config import ReverseConnectionConfig
        from sentinel_twisted.tap import Options

        options = Options()
        options.parseOptions([])
        expected = f"backlog={system_max_backlog()}"
        self.assertEqual(ReverseConnectionConfig().backlog, system_max_backlog())
        for description in [*options["listen"], options["http"], options["status"]]:
            self.assertIn(expected, description)


class ListenFailureTests(TestCase):
    def test_port_in_use(self) -> None:
        from twisted.internet.error import CannotListenError

        error = CannotListenError("127.0.0.1", 8080, OSError(98, "Address already in use"))
        self.assertEqual(describe_listen_failure(error), "cannot listen on 127.0.0.1:8080: address already in use")

    def test_unix_lock_held(self) -> None:
        from twisted.internet.error import CannotListenError

        error = CannotListenError(None, b"/run/a.sock", "Cannot acquire lock")
        self.assertEqual(
            describe_listen_failure(error),
            "cannot listen on /run/a.sock: its lock /run/a.sock.lock is held by another process",
        )

    def test_lock_symlink_names_its_path(self) -> None:
        error = OSError(2, "No such file or directory", "1234", None, "/proc/a.sock.lock")
        self.assertEqual(describe_listen_failure(error), "cannot use /proc/a.sock.lock: no such file or directory")


class ClearStaleLockTests(TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="st-lock-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "s.sock")
        self.lock = self.path + ".lock"

    def test_no_lock(self) -> None:
        self.assertIsNone(clear_stale_lock(self.path))

    def test_lock_naming_a_live_pid_is_removed(self) -> None:
        os.symlink(str(os.getpid()), self.lock)
        self.assertEqual(clear_stale_lock(self.path), os.getpid())
        self.assertFalse(os.path.lexists(self.lock))

    def test_anything_but_a_pid_symlink_is_refused_and_kept(self) -> None:
        os.symlink("/etc/passwd", self.lock)
        error = self.assertRaises(SocketInUse, clear_stale_lock, self.path)
        self.assertIn("is not a lock", str(error))
        self.assertTrue(os.path.islink(self.lock))
        os.unlink(self.lock)
        with open(self.lock, "w") as f:
            f.write("123")
        self.assertRaises(SocketInUse, clear_stale_lock, self.path)
        self.assertTrue(os.path.isfile(self.lock))

    def test_a_lock_that_cannot_be_looked_at_is_refused_not_raised(self) -> None:
        # A socket name of 252 bytes is a valid name; its lock's, 5 bytes
        # longer, is not (ENAMETOOLONG): one clear line, not a traceback.
        path = os.path.join(self.dir, "s" * 252)
        self.assertFalse(clear_stale_unix_socket(path))
        error = self.assertRaises(SocketInUse, clear_stale_lock, path)
        self.assertEqual(str(error), f"cannot use {path}.lock: file name too long")

    def test_takes_lock(self) -> None:
        self.assertTrue(takes_lock("unix:/tmp/a.sock"))
        self.assertTrue(takes_lock("unix:/tmp/a.sock:lockfile=1"))
        self.assertFalse(takes_lock("unix:/tmp/a.sock:lockfile=0"))


class AbandonedSocketTests(TestCase):
    """What a failed listen() left behind is removed only when it is ours."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="st-abandoned-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "a.sock")
        bound = socket.socket(socket.AF_UNIX)
        bound.bind(self.path)
        bound.close()

    def lock(self, pid: int) -> None:
        os.symlink(str(pid), self.path + ".lock")

    def test_our_lock_and_socket_are_removed(self) -> None:
        self.lock(os.getpid())
        removed = remove_abandoned_unix_socket(f"unix:{self.path}", OverflowError("too big"))
        self.assertEqual(removed, [self.path, self.path + ".lock"])
        self.assertFalse(os.path.lexists(self.path))
        self.assertFalse(os.path.lexists(self.path + ".lock"))

    def test_nothing_is_removed_when_twisted_refused_the_lock(self) -> None:
        from twisted.internet.error import CannotListenError

        self.lock(os.getpid())
        error = CannotListenError(None, self.path, "Cannot acquire lock")
        self.assertEqual(remove_abandoned_unix_socket(f"unix:{self.path}", error), [])
        self.assertTrue(os.path.lexists(self.path))
        self.assertTrue(os.path.lexists(self.path + ".lock"))

    def test_only_our_lock_is_removed_when_the_bind_failed(self) -> None:
        """
        Twisted takes the lock before it binds; a bind that fails (the path
        in use, or too long for a UNIX socket) leaves the lock, naming this
        process, and no socket of ours.
        """
        from twisted.internet.error import CannotListenError

        self.lock(os.getpid())
        error = CannotListenError(None, self.path, OSError(errno.EADDRINUSE, "Address already in use"))
        removed = remove_abandoned_unix_socket(f"unix:{self.path}", error)
        self.assertEqual(removed, [self.path + ".lock"])
        self.assertTrue(os.path.lexists(self.path))
        self.assertFalse(os.path.lexists(self.path + ".lock"))

    def test_a_real_listen_on_a_path_too_long_leaves_nothing(self) -> None:
        from twisted.internet import reactor
        from twisted.internet.protocol import Factory

        path = os.path.join(self.dir, "s" * 120 + ".sock")
        description = f"unix:{path}:lockfile=1"
        failures: list[Any] = []
        serverFromString(reactor, description).listen(Factory()).addErrback(failures.append)
        [failure] = failures
        self.assertTrue(os.path.lexists(path + ".lock"))
        removed = remove_abandoned_unix_socket(description, failure.value)
        self.assertEqual(removed, [path + ".lock"])
        self.assertFalse(os.path.lexists(path + ".lock"))

    def test_a_lock_of_another_process_or_none_is_left_alone(self) -> None:
        self.lock(os.getpid() + 1)
        self.assertEqual(remove_abandoned_unix_socket(f"unix:{self.path}", OverflowError()), [])
        self.assertEqual(
            remove_abandoned_unix_socket(f"unix:{self.path}:lockfile=0", OverflowError()), []
        )
        self.assertTrue(os.path.lexists(self.path))


class CheckEndpointArgumentsTests(TestCase):
    def test_backlog_must_be_a_positive_c_int(self) -> None:
        for description in ["tcp:0:backlog=2147483648", "unix:/x:backlog=0", "ssl:0:backlog=-1",
                            "tcp6:0:backlog=1e3", "unix:/x:backlog="]:
            with self.subTest(description=description):
                error = self.assertRaises(ValueError, check_endpoint_arguments, description)
                self.assertIn("backlog= must be a positive integer up to 2147483647", str(error))

    def test_good_and_absent_backlogs_pass(self) -> None:
        for description in ["tcp:0:backlog=2147483647", "unix:/x:backlog=1", "unix:/x",
                            "unix:/tmp/a\\:backlog=99999999999.sock", "systemd:domain=INET:index=0"]:
            with self.subTest(description=description):
                check_endpoint_arguments(description)


class DescribeEndpointErrorTests(TestCase):
    """What is wrong with an endpoint string, as the start-up line says it."""

    def describe(self, description: str, client: bool = False) -> str:
        from twisted.internet.endpoints import clientFromString

        parse = clientFromString if client else serverFromString
        try:
            parse(MemoryReactor(), description)
        except Exception as e:
            return describe_endpoint_error(e)
        self.fail(f"{description} parsed")

    def test_table(self) -> None:
        directory = tempfile.mkdtemp(prefix="st-describe-")
        self.addCleanup(shutil.rmtree, directory, True)
        a_file = os.path.join(directory, "ca.pem")
        with open(a_file, "w"):
            pass
        missing = os.path.join(directory, "missing")
        for description, client, expected in [
            ("tcp:abc", False, "the port must be a number"),
            ("unix", False, "wrong arguments for this endpoint type (a missing port or path?)"),
            ("unix:/tmp/x:mode=999", False, "mode= must be octal digits, such as 600 or 660, got '999'"),
            ("unix:/tmp/x:mode=rw", False, "mode= must be octal digits, such as 600 or 660, got 'rw'"),
            (f"tls:localhost:443:trustRoots={missing}", True, f"trustRoots: {missing} does not exist"),
            (
                f"tls:localhost:443:trustRoots={a_file}",
                True,
                f"trustRoots: {a_file} is not a directory of CA certificates",
            ),
            (f"ssl:0:privateKey={missing}", False, f"{missing} does not exist"),
        ]:
            with self.subTest(description=description):
                self.assertEqual(self.describe(description, client), expected)

    def test_an_unreadable_directory_says_why(self) -> None:
        from twisted.python.filepath import UnlistableError

        error = UnlistableError(PermissionError(13, "Permission denied", "/etc/cas"))
        self.assertEqual(
            describe_endpoint_error(error), "trustRoots: cannot read the directory /etc/cas: permission denied"
        )
        self.assertEqual(
            describe_endpoint_error(UnlistableError(RuntimeError())),
            "trustRoots: the directory of CA certificates cannot be read",
        )
