"""
Scaffolding of the reliability tests: listeners on UNIX sockets in temporary
directories (or TCP on 127.0.0.1), C{twistd} subprocesses with their output
in a file, and request events.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Generator
from pathlib import Path
from typing import IO, Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    UNIXClientEndpoint,
    connectProtocol,
    serverFromString,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

from sentinel_twisted import messages as m
from sentinel_twisted.proxy.config import ReverseConnectionConfig
from sentinel_twisted.proxy.factory import ReverseConnectionFactory

from ..rawagent import (
    AGENT_RESPONSE,
    HANDSHAKE_REQUEST,
    HANDSHAKE_RESPONSE,
    REQUEST_HEADERS,
    FrameParser,
    answer,
    frame,
    registration,
)
from ..twistd_support import twistd_command

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0


def temp_dir(test: Any, prefix: str = "st-rel-") -> str:
    # Short paths: a UNIX socket path must fit in 108 bytes.
    directory = tempfile.mkdtemp(prefix=prefix)
    test.addCleanup(shutil.rmtree, directory, True)
    return directory


def headers(cid: str, uri: str = "/") -> m.RequestHeadersEvent:
    return m.RequestHeadersEvent(
        metadata=m.RequestMetadata(
            correlation_id=cid,
            request_id=cid,
            client_ip="203.0.113.9",
            client_port=40000,
            timestamp="2026-01-01T00:00:00Z",
        ),
        method="GET",
        uri=uri,
        headers={"host": ["example.com"]},
    )


class Listener:
    """A factory listening on one endpoint of the real reactor."""

    def __init__(self, factory: ReverseConnectionFactory, port: Any, address: str) -> None:
        self.factory = factory
        self.pool = factory.pool
        self.port = port
        self.address = address

    @inlineCallbacks
    def stop(self, close_connections: bool = True) -> Generator[Any, Any, None]:
        port, self.port = self.port, None
        if port is not None:
            yield port.stopListening()
        if close_connections:
            yield self.pool.close_all("test over")


@inlineCallbacks
def listen(
    test: Any,
    description: str,
    token_checker: Any = None,
    clock: Any = None,
    **config: Any,
) -> Generator[Any, Any, Listener]:
    """
    Start a listener; it is stopped (and its agents closed) at cleanup.
    Its timers (request timeouts, write stalls) run on C{clock}, the
    reactor by default: a test that gives a memory clock decides when they
    fire, so a slow machine cannot fire them early.
    """
    factory = ReverseConnectionFactory(
        ReverseConnectionConfig(**config), token_checker=token_checker, clock=clock or reactor
    )
    port = yield serverFromString(reactor, description).listen(factory)
    host = port.getHost()
    address = host.name if hasattr(host, "name") else f"{host.host}:{host.port}"
    if isinstance(address, bytes):
        address = address.decode()
    listener = Listener(factory, port, address)
    test.addCleanup(listener.stop)
    return listener


class Program:
    """
    One C{twistd -n} program; stdout and stderr go to a file the test
    polls.  Killed at cleanup if still running.
    """

    def __init__(self, test: Any, cwd: str, *args: str, name: str = "twistd", env: dict[str, str] | None = None) -> None:
        self.cwd = cwd
        self.path = os.path.join(cwd, f"{name}.out")
        self._out: IO[bytes] | None = open(self.path, "wb")
        environment = dict(os.environ)
        # The test agents live in tests/reliability/agents.py.
        environment["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), environment.get("PYTHONPATH", "")) if p
        )
        environment.update(env or {})
        self.process = subprocess.Popen(
            twistd_command("-n", "--pidfile=", *args),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env=environment,
        )
        test.addCleanup(self.kill)

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        with open(self.path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.output()))

    def running(self) -> bool:
        return self.process.poll() is None

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait_exit(self, timeout: float = STOP_TIMEOUT) -> int:
        """Wait (blocking) for the program to exit; its exit status."""
        try:
            status = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the program did not exit within {timeout}s:\n{self.output()}") from None
        self.close_output()
        return status

    def close_output(self) -> None:
        out, self._out = self._out, None
        if out is not None:
            out.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(STOP_TIMEOUT)
        self.close_output()


def wait_output(program: Program, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
    """Block until C{pattern} appears in the program's output."""
    deadline = time.monotonic() + timeout
    while True:
        found = re.search(pattern, program.output())
        if found:
            return found
        if not program.running():
            raise AssertionError(f"the program exited ({program.process.returncode}):\n{program.output()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {pattern!r}:\n{program.output()}")
        time.sleep(0.02)


class AnsweringAgent(Protocol):
    """
    A raw agent (L{tests.rawagent} framing, no sentinel_twisted code) that
    registers and answers every event with allow at once.
    """

    def __init__(self, agent_id: str) -> None:
        self.agent_id = agent_id
        self.parser = FrameParser()
        self.response: dict[str, Any] | None = None
        self.registered: Deferred[dict[str, Any]] = Deferred()
        self.closed: Deferred[None] = Deferred()
        self.answered = 0
        self.frames: list[tuple[int, Any]] = []

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(frame(HANDSHAKE_REQUEST, registration(self.agent_id)))

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        for message_type, body in self.parser.feed(data):
            self.frames.append((message_type, body))
            if message_type == HANDSHAKE_RESPONSE and self.response is None:
                self.response = body
                self.registered.callback(body)
            elif message_type == REQUEST_HEADERS:
                cid = body["metadata"]["correlation_id"]
                self.answered += 1
                self.transport.write(frame(AGENT_RESPONSE, answer(cid)))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.registered.called:
            self.registered.errback(reason)
        self.closed.callback(None)


@inlineCallbacks
def connect_answering(address: str, agent_id: str) -> Generator[Any, Any, AnsweringAgent]:
    """An L{AnsweringAgent} connected to a UNIX path or C{host:port}, registered."""
    protocol = AnsweringAgent(agent_id)
    yield connectProtocol(client_endpoint(address), protocol)
    response = yield protocol.registered
    assert response["success"], response
    return protocol


def client_endpoint(address: str) -> Any:
    if address.startswith("/"):
        return UNIXClientEndpoint(reactor, address)
    host, _, port = address.rpartition(":")
    return TCP4ClientEndpoint(reactor, host, int(port))
