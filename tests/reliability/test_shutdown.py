"""
Graceful shutdown of the listener: stop accepting, let requests in flight
finish within C{--shutdown-grace}, cancel the rest (Cancel reason 4, proxy
shutdown), close every agent connection with nothing half-written, remove
the socket; C{twistd sentinel-reverse} then exits 0 after SIGTERM.  And
C{twistd sentinel-agent} exits 1 when a rejection stops it for good.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Generator
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent as WebAgent
from twisted.web.client import readBody
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from sentinel_twisted.proxy.pool import AgentPool
from sentinel_twisted.tap import Options, make_listener, shut_down_agents

from .._proxy_support import Proxy, answer_frame, captured_log, log_text, take_frames
from ..rawagent import (
    AGENT_RESPONSE,
    CANCEL,
    HANDSHAKE_REQUEST,
    REQUEST_HEADERS,
    RawAgentProtocol,
    answer,
    frame,
    registration,
)
from ..twistd_support import unix_listening
from .invariants import Accounting, settle, wait_until
from .support import Program, headers, listen, temp_dir

PROXY_SHUTDOWN = 4


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions([*args, "--http", "none", "--status", "none"])
    return options


class InProcessShutdownTests(TestCase):
    """The listener service of C{twistd sentinel-reverse}, stopped in-process."""

    timeout = 30

    @inlineCallbacks
    def start(self, *args: str) -> Generator[Any, Any, Any]:
        yield settle()
        self.books = Accounting()
        self.addCleanup(self.books.stop_observing)
        self.dir = temp_dir(self)
        self.path = os.path.join(self.dir, "p.sock")
        top = make_listener(parse("--listen", f"unix:{self.path}:lockfile=1", *args), reactor)
        top.startService()
        self.addCleanup(lambda: top.stopService() if top.running else None)
        yield wait_until(lambda: os.path.exists(self.path), "the socket")
        self.top = top
        self.pool = top.factory.pool
        return top

    @inlineCallbacks
    def agent(self, agent_id: str) -> Generator[Any, Any, RawAgentProtocol]:
        agent = RawAgentProtocol()
        yield connectProtocol(UNIXClientEndpoint(reactor, self.path), agent)
        _, body = yield agent.register(agent_id)
        self.assertTrue(body["success"], body)
        return agent

    @inlineCallbacks
    def test_grace_then_cancel_then_close(self) -> Generator[Any, Any, None]:
        yield self.start("--shutdown-grace", "1")
        # The grace period runs on a clock the test moves: however slow the
        # machine, the answer below arrives within it and the others do not.
        clock = Clock()
        self.top.factory.clock = clock
        first = yield self.agent("one")
        second = yield self.agent("two")
        r1 = self.books.track(self.pool.send_request_headers("one", headers("r1")), "r1")
        r2 = self.books.track(self.pool.send_request_headers("two", headers("r2")), "r2")
        r3 = self.books.track(self.pool.send_request_headers("one", headers("r3")), "r3")
        for agent in (first, second, first):
            message_type, _ = yield agent.next_frame()
            self.assertEqual(message_type, REQUEST_HEADERS)

        stopped = self.top.stopService()
        # Stops accepting at once, and the socket (and its lock) are gone.
        yield wait_until(lambda: not os.path.exists(self.path), "the socket to go")
        self.assertFalse(os.path.exists(self.path + ".lock"))
        probe = socket.socket(socket.AF_UNIX)
        self.assertRaises(OSError, probe.connect, self.path)
        probe.close()

        # Answered within the grace period: the answer gets through.
        yield wait_until(clock.getDelayedCalls, "the shutdown to wait for the requests")
        clock.advance(0.5)
        self.assertFalse(r1.called or r2.called or r3.called)
        first.send(AGENT_RESPONSE, answer("r1"))
        self.assertEqual((yield r1), "answer")
        self.assertFalse(r2.called or r3.called)

        # The rest are cancelled when the grace period ends, then closed.
        clock.advance(0.5)
        outcomes = yield gatherResults([r2, r3])
        self.assertEqual(outcomes, ["cancel", "cancel"])
        yield stopped
        yield gatherResults([first.closed, second.closed])
        for agent, cid in ((first, "r3"), (second, "r2")):
            frames = agent.unread_frames()
            self.assertEqual([(t, b["correlation_id"], b["reason"]) for t, b in frames], [(CANCEL, cid, PROXY_SHUTDOWN)])
            # Closed cleanly after whole frames: nothing half-written.
            self.assertEqual(agent._parser.pending, 0)
        log = self.books.log_text()
        self.assertIn("Shutting down: waiting up to 1.0s for 3 request(s) in flight", log)
        self.assertIn("Shutting down: cancelled 2 request(s) still in flight after 1.0s", log)
        self.assertIn("Shutting down: closing 2 agent connection(s)", log)
        self.assertTrue(self.top.stopped_cleanly)
        yield self.books.verify(self, [self.top.factory])

    @inlineCallbacks
    def test_no_grace_cancels_at_once_and_a_stalled_agent_cannot_hold_up_the_stop(self) -> Generator[Any, Any, None]:
        yield self.start("--shutdown-grace", "0", "--request-timeout", "60")
        reading = yield self.agent("reader")
        stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.addCleanup(stalled.close)
        stalled.connect(self.path)
        stalled.sendall(frame(HANDSHAKE_REQUEST, registration("staller")))
        yield wait_until(lambda: "staller" in self.pool, "the staller to register")
        [connection] = self.pool.connections("staller")
        big = headers("big")
        big.headers["x-padding"] = ["p" * 65536]
        held = []
        for i in range(500):
            if connection.is_write_blocked:
                yield deferLater(reactor, 0.05, lambda: None)  # type: ignore[arg-type]
                if connection.is_write_blocked:
                    break
            held.append(self.books.track(connection.send_request_headers(big, correlation_id=f"s{i}"), f"s{i}"))
            yield deferLater(reactor, 0, lambda: None)  # type: ignore[arg-type]
        self.assertTrue(connection.is_write_blocked)
        r1 = self.books.track(self.pool.send_request_headers("reader", headers("r1")), "r1")
        yield reading.next_frame()

        yield self.top.stopService()
        outcomes = yield gatherResults([r1, *held])
        self.assertEqual(set(outcomes), {"cancel"})
        yield reading.closed
        self.assertEqual([(t, b["reason"]) for t, b in reading.unread_frames()], [(CANCEL, PROXY_SHUTDOWN)])
        stalled.close()
        yield wait_until(lambda: len(self.pool) == 0, "the pool to empty")
        yield self.books.verify(self, [self.top.factory])


@implementer(IAgentEndpointFactory)
class _UnixEndpoints:
    def __init__(self, path: str) -> None:
        self.path = path

    def endpointForURI(self, uri: Any) -> Any:
        return UNIXClientEndpoint(reactor, self.path)


class GatewayAgent(RawAgentProtocol):
    """Answers every event at once, except RequestHeaders for C{/hold}."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[str] = []
        self.all_frames: list[tuple[int, Any]] = []
        self.parser_left = 0

    def dataReceived(self, data: bytes) -> None:
        for message_type, body in self._parser.feed(data):
            self.all_frames.append((message_type, body))
            if 0x10 <= message_type <= 0x17 and isinstance(body, dict):
                cid = body.get("correlation_id") or ""
                if message_type == REQUEST_HEADERS and body.get("uri") == "/hold":
                    self.held.append(cid)
                    continue
                self.send(AGENT_RESPONSE, answer(cid))
            else:
                self._frames.append((message_type, body))
                while self._frames and self._waiting:
                    self._waiting.pop(0).callback(self._frames.pop(0))


class TwistdShutdownTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_sigterm_drains_cancels_removes_the_socket_and_exits_zero(self) -> Generator[Any, Any, None]:
        directory = temp_dir(self)
        agents_socket = os.path.join(directory, "agents.sock")
        http_socket = os.path.join(directory, "http.sock")
        proxy = Program(
            self, directory, "sentinel-reverse", "--listen", f"unix:{agents_socket}:lockfile=1",
            "--http", f"unix:{http_socket}", "--status", "none", "--shutdown-grace", "1",
            name="proxy",
        )  # fmt: skip
        yield wait_until(lambda: unix_listening(http_socket) and unix_listening(agents_socket), "the listener", 20)
        agent = GatewayAgent()
        yield connectProtocol(UNIXClientEndpoint(reactor, agents_socket), agent)
        _, body = yield agent.register("gw")
        self.assertTrue(body["success"], body)

        web = WebAgent.usingEndpointFactory(reactor, _UnixEndpoints(http_socket))
        quick = yield web.request(b"GET", b"http://gateway/fast")
        self.assertEqual(quick.code, 200)
        yield readBody(quick)
        holding: Deferred[Any] = web.request(b"GET", b"http://gateway/hold")
        yield wait_until(lambda: agent.held, "the agent to hold the request")

        proxy.signal(signal.SIGTERM)
        response = yield holding
        # The grace period ended: the request was cancelled and the client
        # got the gateway's answer for an agent that could not decide.
        self.assertEqual(response.code, 503)
        yield readBody(response)
        yield agent.closed
        cancels = [b for t, b in agent.all_frames if t == CANCEL]
        self.assertEqual([(b["correlation_id"], b["reason"]) for b in cancels], [(agent.held[0], PROXY_SHUTDOWN)])
        self.assertEqual(agent._parser.pending, 0, "a frame was cut short")
        yield wait_until(lambda: not proxy.running(), "twistd to exit", 20)
        status = proxy.wait_exit()
        output = proxy.output()
        self.assertEqual(status, 0, output)
        self.assertFalse(os.path.exists(agents_socket))
        self.assertFalse(os.path.exists(agents_socket + ".lock"))
        # The gateway answered its own request at the end of the grace period.
        self.assertIn(
            "Shutting down the gateway: 1 request(s) not answered after 1.0s; "
            "answering 503 (or closing those mid-response)",
            output,
        )
        self.assertNotIn("Traceback", output)

    @inlineCallbacks
    def test_sigterm_with_nothing_in_flight_exits_zero_at_once(self) -> Generator[Any, Any, None]:
        directory = temp_dir(self)
        agents_socket = os.path.join(directory, "agents.sock")
        proxy = Program(
            self, directory, "sentinel-reverse", "--listen", f"unix:{agents_socket}",
            "--http", "none", "--status", "none", name="proxy",
        )  # fmt: skip
        yield wait_until(lambda: "listening on" in proxy.output(), "the listener", 20)
        agent = RawAgentProtocol()
        yield connectProtocol(UNIXClientEndpoint(reactor, agents_socket), agent)
        yield agent.register("idle")
        proxy.signal(signal.SIGTERM)
        yield agent.closed
        yield wait_until(lambda: not proxy.running(), "twistd to exit", 20)
        self.assertEqual(proxy.wait_exit(), 0, proxy.output())
        self.assertFalse(os.path.exists(agents_socket))
        self.assertNotIn("Shutting down: waiting", proxy.output())

    @inlineCallbacks
    def test_sigint_still_reports_the_signal(self) -> Generator[Any, Any, None]:
        # Only SIGTERM is a request to stop; an interrupt stays visible.
        directory = temp_dir(self)
        socket_path = os.path.join(directory, "a.sock")
        proxy = Program(
            self, directory, "sentinel-reverse", "--listen", f"unix:{socket_path}",
            "--http", "none", "--status", "none", name="proxy",
        )  # fmt: skip
        yield wait_until(lambda: "listening on" in proxy.output(), "the listener", 20)
        # "listening on" is logged as the services start, before the reactor
        # runs and installs its signal handlers; an interrupt in between is
        # swallowed and twistd runs on.  An answered registration shows the
        # reactor is running, so its SIGINT handler is in place.
        agent = RawAgentProtocol()
        yield connectProtocol(UNIXClientEndpoint(reactor, socket_path), agent)
        _, body = yield agent.register("witness")
        self.assertTrue(body["success"], body)
        proxy.signal(signal.SIGINT)
        yield wait_until(lambda: not proxy.running(), "twistd to exit", 20)
        self.assertEqual(proxy.wait_exit(), -signal.SIGINT, proxy.output())


class TwistdAgentExitStatusTests(TestCase):
    timeout = 40

    @inlineCallbacks
    def test_a_fatal_rejection_exits_one(self) -> Generator[Any, Any, None]:
        directory = temp_dir(self)
        path = os.path.join(directory, "p.sock")
        listener = yield listen(self, f"unix:{path}:mode=600", allowed_agents=["someone-else"])
        agent = Program(
            self, directory, "sentinel-agent", "--connect", f"unix:{path}", "--agent-id", "waf-1",
            "--agent", "tests.reliability.agents:Holding", name="agent",
        )  # fmt: skip
        yield wait_until(lambda: not agent.running(), "the agent to stop by itself", 20)
        output = agent.output()
        self.assertEqual(agent.wait_exit(), 1, output)
        self.assertIn("Agent 'waf-1' is not in the allowed list", output)
        self.assertIn("Retrying cannot fix this", output)
        # The log is complete: the last lines were flushed before exiting.
        self.assertIn("sentinel-agent stopping: Registration rejected", output)
        self.assertNotIn("Traceback", output)
        self.assertEqual(listener.factory.rejections["not_allowed"], 1)

    @inlineCallbacks
    def test_sigterm_is_not_a_failure(self) -> Generator[Any, Any, None]:
        directory = temp_dir(self)
        path = os.path.join(directory, "p.sock")
        listener = yield listen(self, f"unix:{path}:mode=600")
        agent = Program(
            self, directory, "sentinel-agent", "--connect", f"unix:{path}", "--agent-id", "waf-1",
            "--agent", "tests.reliability.agents:Holding", name="agent",
        )  # fmt: skip
        yield wait_until(lambda: "waf-1" in listener.pool, "the agent to register", 20)
        agent.signal(signal.SIGTERM)
        yield wait_until(lambda: not agent.running(), "the agent to exit", 20)
        self.assertEqual(agent.wait_exit(), 0, agent.output())


class ShutDownAgentsTests(TestCase):
    """L{shut_down_agents} on a memory clock: each step, and its bounds."""

    def test_steps_and_a_connection_that_never_closes(self) -> None:
        proxy = Proxy()
        protocol, transport, connection = proxy.register("slow")
        answered = connection.send_request_headers(headers("a"))
        waiting = connection.send_request_headers(headers("w"))
        take_frames(transport)
        with captured_log() as events:
            done = shut_down_agents(proxy.pool, proxy.clock, grace=2.0, close_timeout=5.0)
            proxy.clock.advance(1.0)
            protocol.dataReceived(answer_frame("a"))
            self.assertEqual(self.successResultOf(answered).audit.custom["correlation_id"], "a")
            self.assertNoResult(waiting)
            proxy.clock.advance(1.0)
            self.failureResultOf(waiting).trap(Exception)
            # The Cancel went out before the close began.
            [(kind, _)] = take_frames(transport)
            self.assertEqual(kind, CANCEL)
            self.assertTrue(transport.disconnecting)
            self.assertNoResult(done)
            # The transport never reports itself gone: the stop goes on anyway.
            proxy.clock.advance(5.0)
            self.successResultOf(done)
        text = log_text(events)
        self.assertIn("cancelled 1 request(s) still in flight after 2.0s", text)
        self.assertIn("1 agent connection(s) still closing after 5.0s; leaving them", text)
        self.assertEqual(proxy.clock.getDelayedCalls(), [])

    def test_an_empty_pool_is_done_at_once(self) -> None:
        clock = Clock()
        self.successResultOf(shut_down_agents(AgentPool(), clock, grace=5.0))
        self.assertEqual(clock.getDelayedCalls(), [])
