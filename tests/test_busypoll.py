"""
L{sentinel_twisted.busypoll}: the reactor checks its sockets without
blocking for a while before each wait, and the programs' C{--busy-poll}.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface import implementer

from sentinel_twisted.busypoll import MAX_SPIN, BusyPollService, UnsupportedReactor, _Spin

from .test_twistd import ROOT, Twistd
from .twistd_support import twistd_command


class Scripted:
    """A clock, readiness and a reactor iteration under the test's control."""

    def __init__(self, ready_after: int | None, step: float = 1e-6) -> None:
        #: Checks that find nothing before one finds a socket ready (None: never).
        self.ready_after = ready_after
        self.step = step
        self.now = 100.0
        self.checks = 0
        self.pauses = 0
        self.iterations: list[float | None] = []

    def clock(self) -> float:
        return self.now

    def ready(self) -> bool:
        self.checks += 1
        return self.ready_after is not None and self.checks > self.ready_after

    def pause(self) -> None:
        self.pauses += 1
        self.now += self.step

    def iterate(self, timeout: float | None) -> None:
        self.iterations.append(timeout)

    def spin(self, spin: float) -> _Spin:
        return _Spin(self.iterate, self.ready, spin, clock=self.clock, pause=self.pause)


class SpinTests(SynchronousTestCase):
    def test_work_due_now_is_not_delayed_by_a_spin(self) -> None:
        script = Scripted(ready_after=None)
        script.spin(50e-6)(0)
        self.assertEqual((script.iterations, script.checks), ([0], 0))

    def test_a_socket_ready_at_once_goes_straight_to_the_reactor(self) -> None:
        script = Scripted(ready_after=0)
        spinner = script.spin(50e-6)
        spinner(None)
        self.assertEqual((script.iterations, script.pauses, spinner.hits), ([None], 0, 1))

    def test_it_yields_the_cpu_between_checks_until_a_socket_is_ready(self) -> None:
        script = Scripted(ready_after=5)
        spinner = script.spin(50e-6)
        spinner(2.0)
        self.assertEqual(script.pauses, 5)
        # The reactor's wait then returns at once; its timeout is left as it was.
        self.assertEqual(script.iterations, [2.0])
        self.assertEqual((spinner.hits, spinner.misses), (1, 0))

    def test_after_the_spin_it_blocks_as_before(self) -> None:
        script = Scripted(ready_after=None)
        spinner = script.spin(50e-6)
        spinner(None)
        self.assertEqual(script.iterations, [None])
        self.assertLessEqual(abs(script.now - 100.0 - 50e-6), 1.5e-6)
        self.assertEqual((spinner.hits, spinner.misses), (0, 1))

    def test_the_wait_after_a_spin_is_shortened_by_it(self) -> None:
        """A timed call is due no later for the spin before the wait."""
        script = Scripted(ready_after=None, step=10e-6)
        script.spin(50e-6)(1.0)
        [timeout] = script.iterations
        assert timeout is not None
        self.assertLessEqual(abs(timeout - (1.0 - 50e-6)), 1e-9)

    def test_a_spin_ends_when_a_timed_call_is_due(self) -> None:
        script = Scripted(ready_after=None)
        script.spin(50e-6)(20e-6)
        self.assertEqual(script.iterations, [0.0])
        self.assertLessEqual(abs(script.now - 100.0 - 20e-6), 1.5e-6)


class ServiceTests(SynchronousTestCase):
    def epoll_reactor(self) -> Any:
        try:
            from twisted.internet.epollreactor import EPollReactor
        except ImportError:
            raise SkipTest("no epoll here") from None
        made = EPollReactor()
        self.addCleanup(made._poller.close)
        return made

    def test_running_it_spins_the_reactor_and_stopping_it_no_longer(self) -> None:
        made = self.epoll_reactor()
        own = made.doIteration
        busy = BusyPollService(40e-6, made)
        busy.startService()
        self.assertIsInstance(made.doIteration, _Spin)
        self.assertEqual(made.doIteration.spin, 40e-6)
        busy.stopService()
        self.assertEqual(made.doIteration, own)

    def test_the_spin_checks_the_reactors_sockets_without_blocking(self) -> None:
        made = self.epoll_reactor()
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        reader = Reader(ours)
        made.addReader(reader)
        busy = BusyPollService(40e-6, made)
        busy.startService()
        self.addCleanup(busy.stopService)
        # Nothing to read: the spin ends on time, then a short wait.
        made.doIteration(1e-3)
        self.assertEqual((busy.hits, busy.misses, reader.read), (0, 1, b""))
        theirs.send(b"x")
        made.doIteration(None)
        self.assertEqual((busy.hits, busy.misses, reader.read), (1, 1, b"x"))

    def test_a_doiteration_replaced_before_is_wrapped_and_given_back(self) -> None:
        made = self.epoll_reactor()
        calls: list[float | None] = []
        busy = BusyPollService(40e-6, made)
        # Installed by someone else after the service was made, before it started.
        made.doIteration = calls.append
        theirs = made.doIteration
        busy.startService()
        made.doIteration(0)
        self.assertEqual(calls, [0])
        busy.stopService()
        self.assertIs(made.doIteration, theirs)

    def test_stopping_one_of_two_services_leaves_the_other_spinning(self) -> None:
        made = self.epoll_reactor()
        own = made.doIteration
        first = BusyPollService(40e-6, made)
        second = BusyPollService(30e-6, made)
        first.startService()
        second.startService()
        second.stopService()
        self.assertIsInstance(made.doIteration, _Spin)
        self.assertEqual(made.doIteration.spin, 40e-6)
        first.stopService()
        self.assertEqual(made.doIteration, own)

    def test_stopped_under_another_wrapper_it_no_longer_spins(self) -> None:
        made = self.epoll_reactor()
        busy = BusyPollService(40e-6, made)
        busy.startService()
        spinner = made.doIteration
        calls: list[float | None] = []

        def wrapper(timeout: float | None) -> None:
            calls.append(timeout)
            spinner(timeout)

        made.doIteration = wrapper
        busy.stopService()
        self.assertIs(made.doIteration, wrapper)
        # Nothing is ready: a spin would end in a miss before the wait.
        made.doIteration(1e-3)
        self.assertEqual((calls, busy.hits, busy.misses), ([1e-3], 0, 0))

    def test_another_reactor_is_a_clear_error(self) -> None:
        error = self.assertRaises(UnsupportedReactor, BusyPollService, 40e-6, MemoryReactorClock())
        self.assertEqual(
            str(error),
            "busy polling needs the epoll reactor (twistd --reactor=epoll), not MemoryReactorClock",
        )

    def test_a_spin_out_of_range_is_refused(self) -> None:
        made = self.epoll_reactor()
        for spin in (0.0, -1e-6, MAX_SPIN * 2):
            with self.subTest(spin=spin):
                self.assertRaises(ValueError, BusyPollService, spin, made)


@implementer(IReadDescriptor)
class Reader:
    """Reads what arrives on a socket, for a reactor of the test's own."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.read = b""

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self) -> None:
        self.read += self.sock.recv(100)

    def connectionLost(self, reason: object) -> None:
        pass

    def logPrefix(self) -> str:
        return "Reader"


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]


class Ping(Protocol):
    """Sends C{rounds} pings one at a time, each after the last one's echo."""

    def __init__(self, rounds: int) -> None:
        self.rounds = rounds
        self.received = b""
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"ping")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if len(self.received) % 4:
            return
        if len(self.received) == 4 * self.rounds:
            self.transport.loseConnection()  # type: ignore[union-attr]
            self.done.callback(self.received)
        else:
            self.transport.write(b"ping")  # type: ignore[union-attr]


class RunningReactorTests(TestCase):
    """The spin on the reactor the tests run on, over a loopback socket."""

    async def test_round_trips_over_a_socket_are_answered_while_it_spins(self) -> None:
        try:
            busy = BusyPollService(200e-6)
        except UnsupportedReactor:
            raise SkipTest("the tests do not run on the epoll reactor") from None
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Echo))
        self.addCleanup(port.stopListening)
        busy.startService()
        self.addCleanup(busy.stopService)
        ping = Ping(rounds=50)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), ping)
        self.assertEqual(await ping.done, b"ping" * 50)
        # Each echo comes back within the spin or after a blocking wait.
        self.assertGreater(busy.hits + busy.misses, 0)


class ProgramTests(TestCase):
    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="st-busy-")
        self.addCleanup(shutil.rmtree, self.directory, True)

    def test_both_programs_busy_poll_and_the_agent_registers(self) -> None:
        shutil.copy(os.path.join(ROOT, "examples", "rules.toml"), self.directory)
        reverse = Twistd(self, self.directory, "--busy-poll", "50", name="reverse")
        reverse.wait_listening()
        agent = Twistd(
            self, self.directory, "--connect", "unix:sentinel-reverse.sock", "--agent-id", "waf-1",
            "--rules", "rules.toml", "--busy-poll", "50", name="agent", program="sentinel-agent",
        )  # fmt: skip
        reverse.wait_for_output(r"Agent waf-1 registered connection")
        for twistd in (reverse, agent):
            self.assertIn("Busy polling: up to 50 µs before each wait", twistd.output())
        agent.signal(15)
        self.assertEqual(agent.wait_exit(), 0, agent.output())
        reverse.signal(15)
        self.assertEqual(reverse.wait_exit(), 0, reverse.output())

    def test_a_worker_group_spins_in_its_workers_not_in_its_parent(self) -> None:
        group = Twistd(self, self.directory, "--workers", "2", "--busy-poll", "50", name="group")
        group.wait_for_output(r"\[worker 1\] Busy polling: up to 50 µs")
        group.wait_for_output(r"\[worker 2\] Busy polling: up to 50 µs")
        lines = [line for line in group.output().splitlines() if "Busy polling" in line]
        self.assertEqual(len(lines), 2, lines)
        group.signal(15)
        self.assertEqual(group.wait_exit(), 0, group.output())

    def run_twistd(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            twistd_command("-n", "--pidfile=", *args),
            cwd=self.directory,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def test_too_long_a_spin_is_a_one_line_error(self) -> None:
        done = self.run_twistd("sentinel-reverse", "--busy-poll", "20000")
        self.assertEqual(done.returncode, 1)
        self.assertEqual(
            done.stderr.strip().splitlines()[-1],
            "twistd sentinel-reverse: --busy-poll: expected microseconds from 0 (off) to 10000, got '20000'",
        )

    def test_another_reactor_is_a_one_line_error(self) -> None:
        done = self.run_twistd(
            "--reactor=poll", "sentinel-reverse", "--busy-poll", "50", "--http", "none", "--status", "none"
        )
        self.assertEqual(done.returncode, 1, done.stderr)
        self.assertEqual(
            done.stderr.strip().splitlines()[-1],
            "twistd sentinel-reverse: --busy-poll 50: busy polling needs the epoll reactor "
            "(twistd --reactor=epoll), not PollReactor",
        )
