"""
Floods, over real sockets: thousands of idle connections that never
register (the cap on connections awaiting registration), one agent id
registering far beyond its connection cap, and oversize or zero-length
frames before registration.
"""

from __future__ import annotations

import os
import resource
import struct
from collections.abc import Generator
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    UNIXClientEndpoint,
    connectProtocol,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase

from ..rawagent import HANDSHAKE_RESPONSE, PeerClosed, RawAgentProtocol
from .invariants import Accounting, settle, wait_until
from .support import listen, temp_dir

IDLE = 2000
CAP = 1000


class Idle(Protocol):
    """Connects and says nothing."""

    def __init__(self) -> None:
        self.closed: Deferred[None] = Deferred()
        self.lost = False

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        self.closed.callback(None)


def _enough_descriptors(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed and (hard == resource.RLIM_INFINITY or hard >= needed):
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    elif soft < needed:
        raise SkipTest(f"needs {needed} file descriptors, the hard limit is {hard}")


class PendingRegistrationCapTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_two_thousand_idle_connections_against_the_cap(self) -> Generator[Any, Any, None]:
        _enough_descriptors(IDLE * 2 + CAP + 500)
        yield settle()
        books = Accounting()
        listener = yield listen(
            self, f"tcp:0:interface=127.0.0.1:backlog={IDLE + 100}",
            max_pending_registrations=CAP, handshake_timeout=60.0,
            # All from one address: the global cap is tested, not the per-address one.
            max_pending_registrations_per_peer=IDLE,
        )  # fmt: skip
        factory = listener.factory
        host, port = listener.address.split(":")
        endpoint = TCP4ClientEndpoint(reactor, host, int(port))

        idle = [Idle() for _ in range(IDLE)]
        for protocol in idle:
            # Not all at once: the clients' own connects are not what is tested.
            yield connectProtocol(endpoint, protocol)
        yield wait_until(
            lambda: factory.awaiting_registration + factory.rejections["pending_limit"] == IDLE,
            "the listener to see every connection", 30,
        )  # fmt: skip
        self.assertEqual(factory.awaiting_registration, CAP)
        self.assertEqual(factory.rejections["pending_limit"], IDLE - CAP)
        # The ones beyond the cap were closed at once, the others are held.
        yield wait_until(lambda: sum(p.lost for p in idle) == IDLE - CAP, "the refused connections to close")
        cap_lines = [e for e in books.events if "awaiting registration (limit" in (e.get("log_format") or "")]
        self.assertEqual(len(cap_lines), 1, "the cap is logged once, not per refused connection")
        self.assertIn(
            f"{CAP} connections are awaiting registration (limit {CAP}); closing new connections",
            books.log_text(),
        )

        # A real agent cannot register while the cap is reached...
        refused = RawAgentProtocol()
        yield connectProtocol(endpoint, refused)
        refused.register("latecomer").addErrback(lambda f: f.trap(PeerClosed))
        yield refused.closed
        self.assertNotIn("latecomer", listener.pool)

        # ...and can once some idle connections are gone.
        held = [p for p in idle if not p.lost]
        for protocol in held[:10]:
            protocol.transport.loseConnection()
        yield wait_until(lambda: factory.awaiting_registration == CAP - 10, "ten idle connections to go")
        self.assertIn("Connections awaiting registration are below the limit again", books.log_text())
        agent = RawAgentProtocol()
        yield connectProtocol(endpoint, agent)
        message_type, body = yield agent.register("latecomer")
        self.assertEqual((message_type, body["success"]), (HANDSHAKE_RESPONSE, True))
        self.assertIn("latecomer", listener.pool)

        for protocol in held[10:]:
            protocol.transport.loseConnection()
        agent.transport.loseConnection()
        yield gatherResults([p.closed for p in idle] + [agent.closed])
        yield wait_until(lambda: factory.awaiting_registration == 0 and len(listener.pool) == 0, "everything to close")
        yield listener.stop()
        yield books.verify(self, [factory])


def _bindable(address: str) -> None:
    """Skip unless connections can be made from C{address} (Linux: all of 127/8 is loopback)."""
    import socket

    probe = socket.socket()
    try:
        probe.bind((address, 0))
    except OSError as e:
        raise SkipTest(f"cannot connect from {address}: {e}") from None
    finally:
        probe.close()


def _dual_stack() -> None:
    """Skip unless ::1 works and an IPv6 socket on :: takes IPv4 connections too."""
    import socket

    for address in ("::1", "::"):
        try:
            probe = socket.socket(socket.AF_INET6)
        except OSError as e:
            raise SkipTest(f"no IPv6: {e}") from None
        try:
            # What a listener on :: gets: the system's default.
            v6only = probe.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
            probe.bind((address, 0))
        except OSError as e:
            raise SkipTest(f"cannot bind to {address}: {e}") from None
        finally:
            probe.close()
        if v6only:
            raise SkipTest("IPv6 sockets take no IPv4 connections here (IPV6_V6ONLY)")


class PendingRegistrationsPerPeerTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def open_idle(self, host: str, port: int, source: str, count: int) -> Generator[Any, Any, list[Idle]]:
        endpoint = TCP4ClientEndpoint(reactor, host, port, bindAddress=(source, 0))
        idle = [Idle() for _ in range(count)]
        for protocol in idle:
            yield connectProtocol(endpoint, protocol)
        return idle

    @inlineCallbacks
    def register_from(
        self, listener: Any, agent_id: str, source: str | None = None, port: int | None = None
    ) -> Generator[Any, Any, RawAgentProtocol]:
        """
        An agent that registers over IPv4 (to 127.0.0.1:C{port}, the
        listener's port by default), from C{source} if given.
        """
        if port is None:
            port = int(listener.address.rsplit(":", 1)[1])
        bind = None if source is None else (source, 0)
        agent = RawAgentProtocol()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=bind), agent)
        message_type, body = yield agent.register(agent_id)
        self.assertEqual((message_type, body["success"]), (HANDSHAKE_RESPONSE, True))
        self.assertIn(agent_id, listener.pool)
        return agent

    @inlineCallbacks
    def close_all(self, listener: Any, books: Accounting, connections: list[Any]) -> Generator[Any, Any, None]:
        for protocol in connections:
            if not protocol.lost:
                protocol.transport.loseConnection()
        yield gatherResults([p.closed for p in connections])
        factory = listener.factory
        yield wait_until(lambda: factory.awaiting_registration == 0 and len(listener.pool) == 0, "everything to close")
        self.assertEqual(factory.pending_by_peer, {})
        yield listener.stop()
        yield books.verify(self, [factory])

    @inlineCallbacks
    def test_an_idle_flood_closes_its_own_connections_and_an_agent_at_its_address_registers(
        self,
    ) -> Generator[Any, Any, None]:
        _bindable("127.0.0.2")
        _enough_descriptors(2 * 200 + 500)
        yield settle()
        books = Accounting()
        listener = yield listen(
            self, "tcp:0:interface=127.0.0.1", max_pending_registrations=100, pending_eviction_age=0
        )
        factory = listener.factory
        host, port = listener.address.split(":")
        idle = yield self.open_idle(host, int(port), "127.0.0.2", 200)
        yield wait_until(
            lambda: factory.rejections["peer_pending_evicted"] == 200 - 64,
            "the listener to see every connection",
        )
        self.assertEqual(factory.awaiting_registration, 64)
        self.assertEqual(factory.rejections["pending_limit"], 0)
        self.assertEqual(factory.rejections["peer_pending_limit"], 0)
        # Each newcomer closed the oldest of its address's idle connections.
        yield wait_until(lambda: sum(p.lost for p in idle) == 200 - 64, "the oldest ones to close")
        self.assertEqual([p.lost for p in idle], [True] * (200 - 64) + [False] * 64)
        # An agent behind the same address gets in, and so does one elsewhere.
        agent = yield self.register_from(listener, "agent-1", "127.0.0.2")
        elsewhere = yield self.register_from(listener, "agent-2")
        self.assertEqual({key: len(held) for key, held in factory.pending_by_peer.items()}, {"127.0.0.2": 63})
        yield self.close_all(listener, books, [*idle, agent, elsewhere])

    @inlineCallbacks
    def test_ipv4_mapped_peers_count_as_their_ipv4_address(self) -> Generator[Any, Any, None]:
        _bindable("127.0.0.2")
        _dual_stack()
        yield settle()
        books = Accounting()
        listener = yield listen(
            self, "tcp6:0:interface=\\:\\:", max_pending_registrations_per_peer=5, pending_eviction_age=0
        )
        factory = listener.factory
        port = listener.port.getHost().port
        # Over IPv4 into the IPv6 socket: the listener sees ::ffff:127.0.0.2.
        idle = yield self.open_idle("127.0.0.1", port, "127.0.0.2", 8)
        idle6 = [Idle() for _ in range(2)]
        for protocol in idle6:
            yield connectProtocol(TCP6ClientEndpoint(reactor, "::1", port), protocol)
        yield wait_until(
            lambda: factory.awaiting_registration == 7 and factory.rejections["peer_pending_evicted"] == 3,
            "the listener to see every connection",
        )
        self.assertEqual(
            {key: len(held) for key, held in factory.pending_by_peer.items()},
            {"127.0.0.2": 5, "::/64": 2},
        )
        agent = yield self.register_from(listener, "agent-1", "127.0.0.2", port)
        self.assertEqual(factory.rejections["peer_pending_evicted"], 4)
        yield self.close_all(listener, books, [*idle, *idle6, agent])

    @inlineCallbacks
    def test_at_the_cap_the_busiest_address_makes_room(self) -> Generator[Any, Any, None]:
        sources = [f"127.0.2.{i}" for i in range(1, 5)]
        for source in sources:
            _bindable(source)
        _enough_descriptors(2 * 120 + 500)
        yield settle()
        books = Accounting()
        listener = yield listen(self, "tcp:0:interface=127.0.0.1", max_pending_registrations=100)
        factory = listener.factory
        host, port = listener.address.split(":")
        idle: list[Idle] = []
        for source in sources:
            idle += yield self.open_idle(host, int(port), source, 30)
        yield wait_until(
            lambda: factory.awaiting_registration + factory.rejections["pending_evicted"]
            + factory.rejections["pending_limit"] == 120,
            "the listener to see every connection",
        )
        self.assertEqual(factory.awaiting_registration, 100)
        self.assertGreater(factory.rejections["pending_evicted"], 0)
        self.assertLessEqual(max(len(held) for held in factory.pending_by_peer.values()), 30)
        agent = yield self.register_from(listener, "agent-1")
        self.assertGreater(factory.rejections["pending_evicted"], 0)
        yield self.close_all(listener, books, [*idle, agent])


class RegistrationStormTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_one_agent_id_beyond_its_cap(self) -> Generator[Any, Any, None]:
        yield settle()
        books = Accounting()
        path = os.path.join(temp_dir(self), "p.sock")
        listener = yield listen(self, f"unix:{path}:mode=600", max_connections_per_agent=4)
        factory = listener.factory

        @inlineCallbacks
        def attempt() -> Generator[Any, Any, tuple[RawAgentProtocol, dict[str, Any]]]:
            agent = RawAgentProtocol()
            yield connectProtocol(UNIXClientEndpoint(reactor, path), agent)
            _, body = yield agent.register("storm")
            return agent, body

        storm = yield gatherResults([attempt() for _ in range(40)])
        accepted = [a for a, body in storm if body["success"]]
        refused = [(a, body) for a, body in storm if not body["success"]]
        self.assertEqual(len(accepted), 4)
        self.assertEqual(len(refused), 36)
        for _, body in refused:
            self.assertEqual(
                body["error"],
                "Connection limit reached: agent 'storm' already holds 4 registered connections (max: 4)",
            )
            self.assertEqual(body["connection_id"], "")
        # The proxy closes every refused connection after its answer.
        yield gatherResults([a.closed for a, _ in refused])
        self.assertEqual(factory.registered_connections("storm"), 4)
        self.assertEqual(len(listener.pool.connections("storm")), 4)
        self.assertEqual(factory.rejections["connection_limit"], 36)

        # Closing connections releases their slots, exactly.
        for agent in accepted[:2]:
            agent.transport.loseConnection()
        yield gatherResults([a.closed for a in accepted[:2]])
        yield wait_until(lambda: factory.registered_connections("storm") == 2, "two slots to be released")
        again = yield gatherResults([attempt() for _ in range(3)])
        self.assertEqual(sorted(body["success"] for _, body in again), [False, True, True])
        self.assertEqual(factory.registered_connections("storm"), 4)

        for agent in accepted[2:] + [a for a, _ in again]:
            if not agent.lost:
                agent.transport.loseConnection()
        yield gatherResults([a.closed for a in accepted[2:] + [a for a, _ in again]])
        yield wait_until(lambda: len(listener.pool) == 0, "the pool to empty")
        self.assertEqual(factory.registered_connections("storm"), 0)
        yield listener.stop()
        yield books.verify(self, [factory])


class BadFramesBeforeRegistrationTests(TestCase):
    timeout = 20

    @inlineCallbacks
    def refused_with(self, data: bytes, error: str) -> Generator[Any, Any, None]:
        yield settle()
        books = Accounting()
        path = os.path.join(temp_dir(self), "p.sock")
        listener = yield listen(self, f"unix:{path}:mode=600")
        agent = RawAgentProtocol()
        yield connectProtocol(UNIXClientEndpoint(reactor, path), agent)
        agent.send_raw(data)
        message_type, body = yield agent.next_frame()
        self.assertEqual((message_type, body["success"], body["error"]), (HANDSHAKE_RESPONSE, False, error))
        # Closed by the proxy at once: nothing more was sent, nothing waited for.
        yield agent.closed
        self.assertEqual(agent.unread_frames(), [])
        yield wait_until(lambda: listener.factory.awaiting_registration == 0, "the slot to be freed")
        self.assertIn("Rejected registration of agent (unknown) from unix", books.log_text())
        self.assertIn(error, books.log_text())
        yield listener.stop()
        yield books.verify(self, [listener.factory])

    def test_oversize_first_frame(self) -> Any:
        return self.refused_with(struct.pack(">IB", 0x7F000003, 0x01), "Message too large: 2130706435 bytes (max: 16777216)")

    def test_zero_length_first_frame(self) -> Any:
        return self.refused_with(struct.pack(">I", 0), "Invalid message format: Zero-length message")

    def test_unknown_type_first(self) -> Any:
        return self.refused_with(struct.pack(">IB", 1, 0xEE), "Invalid message format: Unknown message type: 0xee")
