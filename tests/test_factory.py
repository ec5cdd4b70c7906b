"""
L{ReverseConnectionFactory}: admission in SPEC section 3's order, the
per-agent and pending-registration caps, and its log lines.
"""

from __future__ import annotations

from typing import Any

import msgspec
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.ssl import CertificateOptions
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import TestCase

from sentinel_twisted import __version__
from sentinel_twisted import messages as m
from sentinel_twisted.proxy.auth import StaticTokenChecker
from sentinel_twisted.proxy.config import ReverseConnectionConfig
from sentinel_twisted.proxy.factory import ReverseConnectionFactory
from sentinel_twisted.wire import MessageType, encode_frame

from ._proxy_support import (
    PEER,
    Proxy,
    capabilities,
    captured_log,
    log_text,
    lose,
    registration_frame,
    take_frames,
)

TOKEN = "tok-3f9a-very-secret"
WRONG = "tok-wrong-guess-0000"


def refusal(proxy: Proxy, agent_id: str = "waf-1", **kwargs: Any) -> str | None:
    """Register and return the error text (None when accepted)."""
    protocol, transport = proxy.connect()
    response = proxy.registration_response(protocol, transport, registration_frame(agent_id, **kwargs))
    if response.success:
        return None
    assert transport.disconnecting
    assert response.connection_id == ""
    lose(protocol)
    return response.error


class ValidationOrderTests(TestCase):
    """The first failing check wins, in SPEC section 3's order."""

    def strict_proxy(self) -> Proxy:
        proxy = Proxy(
            token_checker=StaticTokenChecker({"waf-1": TOKEN, "": TOKEN}),
            allowed_agents=["waf-*"],
            require_auth=True,
            max_connections_per_agent=1,
        )
        proxy.register("waf-1", token=TOKEN)  # fills waf-1's only slot
        return proxy

    def test_version_is_checked_first(self) -> None:
        self.assertEqual(
            refusal(self.strict_proxy(), "", version=1),
            "Protocol version mismatch: expected 2, got 1",
        )

    def test_empty_agent_id_is_checked_before_the_allowlist(self) -> None:
        self.assertEqual(
            refusal(self.strict_proxy(), ""), "Invalid message format: Agent ID cannot be empty"
        )

    def test_allowlist_is_checked_before_authentication(self) -> None:
        self.assertEqual(
            refusal(self.strict_proxy(), "bot-1"),
            "Invalid message format: Agent 'bot-1' is not in the allowed list",
        )

    def test_missing_token_is_checked_before_the_token_and_the_cap(self) -> None:
        self.assertEqual(
            refusal(self.strict_proxy(), "waf-1"),
            "Invalid message format: Authentication required but no token provided",
        )

    def test_wrong_token_is_checked_before_the_cap(self) -> None:
        self.assertEqual(
            refusal(self.strict_proxy(), "waf-1", token=WRONG),
            "Authentication failed: invalid token for agent 'waf-1'",
        )

    def test_connection_cap_is_checked_last(self) -> None:
        self.assertEqual(
            refusal(self.strict_proxy(), "waf-1", token=TOKEN),
            "Connection limit reached: agent 'waf-1' already holds 1 registered connection (max: 1)",
        )

    def test_allowlist_is_checked_before_our_own_checks(self) -> None:
        # The spec's checks come first: an agent that is not allowed hears
        # that, whatever its id's size or its metadata.
        not_allowed = "Invalid message format: Agent '{}' is not in the allowed list"
        long_id = "bot-" + "x" * 300
        self.assertEqual(refusal(self.strict_proxy(), long_id), not_allowed.format(long_id))
        self.assertEqual(
            refusal(self.strict_proxy(), "bot-1", metadata={"pad": "x" * 70_000}),
            not_allowed.format("bot-1"),
        )

    def test_missing_token_is_checked_before_our_own_checks(self) -> None:
        self.assertEqual(
            refusal(self.strict_proxy(), "waf-1", metadata={"pad": "x" * 70_000}),
            "Invalid message format: Authentication required but no token provided",
        )
        self.assertEqual(
            refusal(self.strict_proxy(), "waf-" + "x" * 300),
            "Invalid message format: Authentication required but no token provided",
        )

    def test_our_own_checks_come_before_the_token_and_the_cap(self) -> None:
        error = refusal(self.strict_proxy(), "waf-1", token=WRONG, metadata={"pad": "x" * 70_000})
        self.assertIn("Registration metadata is too large", error or "")

    def test_all_checks_passed_registers(self) -> None:
        proxy = Proxy(
            token_checker=StaticTokenChecker({"waf-2": TOKEN}),
            allowed_agents=["waf-*"],
            require_auth=True,
        )
        self.assertIsNone(refusal(proxy, "waf-2", token=TOKEN))


class AdmissionTests(TestCase):
    def test_other_protocol_version_is_refused(self) -> None:
        for version in (0, 1, 3):
            self.assertEqual(
                refusal(Proxy(), version=version),
                f"Protocol version mismatch: expected 2, got {version}",
            )

    def test_empty_allowlist_admits_every_agent(self) -> None:
        self.assertIsNone(refusal(Proxy(), "anything-at-all"))

    def test_allowlist_admits_exact_ids_and_globs(self) -> None:
        proxy = Proxy(allowed_agents=["auth", "waf-*"])
        self.assertIsNone(refusal(proxy, "auth"))
        self.assertIsNone(refusal(proxy, "waf-eu-1"))
        self.assertIsNotNone(refusal(proxy, "auth-2"))
        self.assertIsNotNone(refusal(proxy, "xwaf-1"))

    def test_a_pattern_admits_the_id_it_spells(self) -> None:
        proxy = Proxy(allowed_agents=["waf[1]", "team?"])
        self.assertIsNone(refusal(proxy, "waf[1]"))
        self.assertIsNone(refusal(proxy, "team?"))
        self.assertIsNone(refusal(proxy, "teamX"))  # a glob, as documented

    def test_token_without_require_auth_is_still_checked(self) -> None:
        proxy = Proxy(token_checker=StaticTokenChecker({"waf-1": TOKEN}))
        self.assertEqual(
            refusal(proxy, token=WRONG), "Authentication failed: invalid token for agent 'waf-1'"
        )
        self.assertIsNone(refusal(proxy, token=TOKEN))

    def test_no_token_without_require_auth_is_admitted(self) -> None:
        proxy = Proxy(token_checker=StaticTokenChecker({"waf-1": TOKEN}))
        self.assertIsNone(refusal(proxy))

    def test_token_of_another_agent_is_refused(self) -> None:
        proxy = Proxy(
            token_checker=StaticTokenChecker({"waf-1": TOKEN, "waf-2": "other"}), require_auth=True
        )
        self.assertIsNotNone(refusal(proxy, "waf-2", token=TOKEN))

    def test_unknown_agent_with_a_token_is_refused(self) -> None:
        proxy = Proxy(token_checker=StaticTokenChecker({"waf-1": TOKEN}), require_auth=True)
        self.assertEqual(
            refusal(proxy, "waf-9", token=TOKEN),
            "Authentication failed: invalid token for agent 'waf-9'",
        )

    def test_token_is_never_echoed_or_logged(self) -> None:
        proxy = Proxy(token_checker=StaticTokenChecker({"waf-1": TOKEN}), require_auth=True)
        protocol, transport = proxy.connect()
        with captured_log() as events:
            protocol.dataReceived(registration_frame("waf-1", token=WRONG))
            written = transport.value()
            lose(protocol)
        self.assertTrue(events)
        everything = log_text(events)
        for secret in (WRONG, TOKEN):
            self.assertNotIn(secret, everything)
            self.assertNotIn(secret.encode(), written)

    def test_accepted_token_is_never_logged(self) -> None:
        proxy = Proxy(token_checker=StaticTokenChecker({"waf-1": TOKEN}), require_auth=True)
        with captured_log() as events:
            protocol, _, _ = proxy.register("waf-1", token=TOKEN)
            lose(protocol)
        self.assertNotIn(TOKEN, log_text(events))


class ConnectionCapTests(TestCase):
    def test_cap_is_enforced_before_the_success_response(self) -> None:
        proxy = Proxy(max_connections_per_agent=2)
        proxy.register("waf-1")
        proxy.register("waf-1")
        protocol, transport = proxy.connect()
        response = proxy.registration_response(protocol, transport, registration_frame("waf-1"))
        self.assertFalse(response.success)
        self.assertEqual(
            response.error,
            "Connection limit reached: agent 'waf-1' already holds 2 registered connections (max: 2)",
        )
        self.assertEqual(len(proxy.pool.connections("waf-1")), 2)

    def test_default_cap_is_four(self) -> None:
        proxy = Proxy()
        for _ in range(4):
            proxy.register("waf-1")
        self.assertIsNotNone(refusal(proxy, "waf-1"))

    def test_cap_holds_after_one_of_two_live_connections_leaves(self) -> None:
        proxy = Proxy(max_connections_per_agent=2)
        first, _, _ = proxy.register("waf-1")
        proxy.register("waf-1")
        lose(first)
        self.assertEqual(proxy.factory.registered_connections("waf-1"), 1)
        self.assertIsNone(refusal(proxy, "waf-1"))
        self.assertEqual(
            refusal(proxy, "waf-1"),
            "Connection limit reached: agent 'waf-1' already holds 2 registered connections (max: 2)",
        )
        self.assertEqual(len(proxy.pool.connections("waf-1")), 2)

    def test_cap_is_per_agent(self) -> None:
        proxy = Proxy(max_connections_per_agent=1)
        proxy.register("waf-1")
        self.assertIsNone(refusal(proxy, "waf-2"))

    def test_slot_is_released_when_a_connection_is_lost(self) -> None:
        proxy = Proxy(max_connections_per_agent=1)
        protocol, _, _ = proxy.register("waf-1")
        lose(protocol)
        self.assertEqual(proxy.factory.registered_connections("waf-1"), 0)
        proxy.register("waf-1")

    def test_slot_is_released_when_the_proxy_closes_a_connection(self) -> None:
        proxy = Proxy(max_connections_per_agent=1)
        _, _, connection = proxy.register("waf-1")
        connection.close()
        proxy.register("waf-1")

    def test_refused_registrations_take_no_slot(self) -> None:
        proxy = Proxy(max_connections_per_agent=1, allowed_agents=["waf-1"], require_auth=True)
        for _ in range(3):
            refusal(proxy, "waf-1")
        self.assertEqual(proxy.factory.registered_connections("waf-1"), 0)

    def test_connections_that_never_register_take_no_slot(self) -> None:
        proxy = Proxy(max_connections_per_agent=1)
        for _ in range(3):
            protocol, _ = proxy.connect()
            lose(protocol)
        proxy.register("waf-1")


class PendingRegistrationCapTests(TestCase):
    def test_connections_beyond_the_cap_are_refused(self) -> None:
        proxy = Proxy(max_pending_registrations=2)
        proxy.connect()
        proxy.connect()
        with captured_log() as events:
            for _ in range(2):
                transport = StringTransport()
                proxy.factory.buildProtocol(PEER).makeConnection(transport)
                self.assertTrue(transport.disconnecting)
        self.assertEqual(proxy.factory.rejections["pending_limit"], 2)
        self.assertEqual(proxy.factory.awaiting_registration, 2)
        self.assertEqual(len(events), 1, "the cap is logged once, not per connection")

    def test_connections_beyond_the_cap_over_tls_are_refused(self) -> None:
        # An ssl: listener wraps whatever the factory builds in TLS: a
        # refusal must be a protocol that closes, not None (which TLS wraps,
        # then fails on with a traceback per connection).
        proxy = Proxy(max_pending_registrations=1)
        proxy.connect()
        wrapped = TLSMemoryBIOFactory(CertificateOptions(), False, proxy.factory).buildProtocol(PEER)
        transport = StringTransport()
        wrapped.makeConnection(transport)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(proxy.factory.awaiting_registration, 1)

    def test_the_cap_warning_comes_again_after_a_flood_ends(self) -> None:
        proxy = Proxy(max_pending_registrations=1)
        protocol, _ = proxy.connect()
        with captured_log() as events:
            proxy.factory.buildProtocol(PEER).makeConnection(StringTransport())
            protocol.dataReceived(registration_frame())
            proxy.connect()
            proxy.factory.buildProtocol(PEER).makeConnection(StringTransport())
        levels = [e["log_level"].name for e in events if "registration" in (e.get("log_format") or "")]
        self.assertEqual(levels, ["warn", "info", "warn"])

    def test_registering_frees_a_place(self) -> None:
        proxy = Proxy(max_pending_registrations=1)
        protocol, _ = proxy.connect()
        protocol.dataReceived(registration_frame())
        self.assertIsNotNone(proxy.factory.buildProtocol(PEER))

    def test_refusal_frees_a_place(self) -> None:
        proxy = Proxy(max_pending_registrations=1)
        protocol, _ = proxy.connect()
        protocol.dataReceived(encode_frame(MessageType.PING, b"{}"))
        self.assertIsNotNone(proxy.factory.buildProtocol(PEER))

    def test_handshake_timeout_frees_a_place(self) -> None:
        proxy = Proxy(max_pending_registrations=1)
        proxy.connect()
        proxy.clock.advance(10)
        self.assertIsNotNone(proxy.factory.buildProtocol(PEER))

    def test_disconnect_frees_a_place(self) -> None:
        proxy = Proxy(max_pending_registrations=1)
        protocol, _ = proxy.connect()
        lose(protocol)
        self.assertIsNotNone(proxy.factory.buildProtocol(PEER))

    def test_registered_connections_do_not_count(self) -> None:
        proxy = Proxy(max_pending_registrations=1)
        for i in range(3):
            proxy.register(f"waf-{i}")
        self.assertEqual(proxy.factory.awaiting_registration, 0)


def connect_from(proxy: Proxy, address: Any) -> tuple[Any, StringTransport]:
    """A connection from C{address}: what the factory built for it, and its transport."""
    protocol = proxy.factory.buildProtocol(address)
    transport = StringTransport(peerAddress=address)
    protocol.makeConnection(transport)
    return protocol, transport


def begin_registration(protocol: Any) -> None:
    """The first bytes of a registration arrive, and not the rest."""
    protocol.dataReceived(registration_frame()[:7])


def registers(protocol: Any, transport: StringTransport) -> bool:
    """Whether a registration sent on C{protocol} is accepted."""
    protocol.dataReceived(registration_frame())
    return not transport.disconnecting and getattr(protocol, "connection", None) is not None


def refusal_text(transport: StringTransport) -> str:
    """The error of the RegistrationResponse the proxy wrote on C{transport}."""
    [(kind, payload)] = take_frames(transport)
    assert kind == MessageType.HANDSHAKE_RESPONSE
    response = m.decode(payload, m.RegistrationResponse)
    assert not response.success
    return response.error or ""


OTHER = IPv4Address("TCP", "192.0.2.7", 40001)


def v6(host: str) -> IPv6Address:
    return IPv6Address("TCP", host, 40002)


class PendingRegistrationPerPeerCapTests(TestCase):
    # With pending_eviction_age=0 an idle connection may be closed for a
    # newcomer at once; EvictionAgeTests covers the age.
    def test_beyond_the_per_peer_cap_the_oldest_idle_connection_makes_room(self) -> None:
        proxy = Proxy(pending_eviction_age=0, max_pending_registrations_per_peer=2)
        _, oldest = proxy.connect()
        _, younger = proxy.connect()
        _, transport = connect_from(proxy, IPv4Address("TCP", "127.0.0.1", 40009))
        self.assertFalse(transport.disconnecting)
        self.assertTrue(oldest.disconnecting)
        self.assertFalse(younger.disconnecting)
        self.assertEqual(
            refusal_text(oldest),
            "Too many connections from this address are awaiting registration; closed to make room",
        )
        self.assertEqual(dict(proxy.factory.rejections), {"peer_pending_evicted": 1})
        self.assertEqual(proxy.factory.awaiting_registration, 2)
        self.assertEqual(len(proxy.factory.pending_by_peer["127.0.0.1"]), 2)
        self.assertEqual(proxy.factory.last_rejection.reason, "peer_pending_evicted")  # type: ignore[union-attr]

    def test_an_agent_registers_from_an_address_flooded_with_idle_connections(self) -> None:
        proxy = Proxy(pending_eviction_age=0)
        flood = [proxy.connect()[1] for _ in range(64)]
        for _ in range(3):
            # The flood carries on, and only closes its own connections.
            flood.append(proxy.connect()[1])
        protocol, transport = connect_from(proxy, PEER)
        self.assertTrue(registers(protocol, transport))
        self.assertEqual(sum(t.disconnecting for t in flood), 4)
        self.assertTrue(all(t.disconnecting for t in flood[:4]))
        self.assertEqual(proxy.factory.rejections["peer_pending_evicted"], 4)
        self.assertEqual(proxy.factory.rejections["peer_pending_limit"], 0)
        self.assertEqual(proxy.factory.awaiting_registration, 63)

    def test_a_connection_partway_through_its_first_frame_is_passed_over(self) -> None:
        proxy = Proxy(pending_eviction_age=0, max_pending_registrations_per_peer=3)
        registering, registering_transport = proxy.connect()
        begin_registration(registering)
        _, idle = proxy.connect()
        _, youngest = proxy.connect()
        protocol, transport = connect_from(proxy, PEER)
        self.assertFalse(registering_transport.disconnecting)
        self.assertTrue(idle.disconnecting)
        self.assertFalse(youngest.disconnecting)
        self.assertFalse(transport.disconnecting)
        # The one passed over finishes its registration.
        registering.dataReceived(registration_frame()[7:])
        self.assertIsNotNone(registering.connection)

    def test_with_every_connection_partway_through_a_frame_newcomers_are_refused(self) -> None:
        proxy = Proxy(pending_eviction_age=0, max_pending_registrations_per_peer=2)
        proxy.connect()
        first, _ = proxy.connect()
        second, _ = connect_from(proxy, PEER)
        self.assertEqual(proxy.factory.rejections["peer_pending_evicted"], 1)
        begin_registration(first)
        begin_registration(second)
        _, transport = connect_from(proxy, PEER)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(proxy.factory.rejections["peer_pending_limit"], 1)
        self.assertEqual(proxy.factory.rejections["peer_pending_evicted"], 1)
        self.assertEqual(proxy.factory.awaiting_registration, 2)
        # Neither was cut short: both still register.
        for protocol in (first, second):
            protocol.dataReceived(registration_frame()[7:])
            self.assertIsNotNone(protocol.connection)

    def test_the_default_per_peer_cap_is_64(self) -> None:
        proxy = Proxy(pending_eviction_age=0)
        for _ in range(64):
            begin_registration(proxy.connect()[0])
        _, transport = connect_from(proxy, PEER)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(proxy.factory.rejections["peer_pending_limit"], 1)

    def test_other_addresses_still_register(self) -> None:
        proxy = Proxy(pending_eviction_age=0, max_pending_registrations_per_peer=1)
        proxy.connect()
        protocol, transport = connect_from(proxy, OTHER)
        protocol.dataReceived(registration_frame())
        self.assertFalse(transport.disconnecting)
        self.assertIsNotNone(protocol.connection)

    def test_the_cap_applies_to_tls_listeners(self) -> None:
        proxy = Proxy(pending_eviction_age=0, max_pending_registrations_per_peer=1)
        begin_registration(proxy.connect()[0])
        wrapped = TLSMemoryBIOFactory(CertificateOptions(), False, proxy.factory).buildProtocol(PEER)
        transport = StringTransport()
        wrapped.makeConnection(transport)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(proxy.factory.rejections["peer_pending_limit"], 1)

    def test_unix_connections_are_not_counted_per_peer(self) -> None:
        proxy = Proxy(pending_eviction_age=0, max_pending_registrations_per_peer=1)
        for _ in range(3):
            _, transport = connect_from(proxy, UNIXAddress(None))
            self.assertFalse(transport.disconnecting)
        self.assertEqual(proxy.factory.awaiting_registration, 3)
        self.assertEqual(proxy.factory.pending_by_peer, {})

    def test_a_registration_frees_a_place_of_its_address(self) -> None:
        proxy = Proxy(pending_eviction_age=0, max_pending_registrations_per_peer=1)
        protocol, _ = proxy.connect()
        protocol.dataReceived(registration_frame())
        proxy.connect()
        self.assertEqual(proxy.factory.rejections, {})

    def test_an_address_leaves_the_table_with_its_last_pending_connection(self) -> None:
        proxy = Proxy(pending_eviction_age=0)
        registering, _ = proxy.connect()
        leaving, _ = proxy.connect()
        connect_from(proxy, OTHER)
        self.assertEqual(
            {host: len(held) for host, held in proxy.factory.pending_by_peer.items()},
            {"127.0.0.1": 2, "192.0.2.7": 1},
        )
        registering.dataReceived(registration_frame())
        lose(leaving)
        proxy.clock.advance(10)
        self.assertEqual(proxy.factory.pending_by_peer, {})

    def test_refusals_are_logged_rate_limited_with_the_address_escaped(self) -> None:
        proxy = Proxy(max_pending_registrations_per_peer=1)
        peer = IPv6Address("TCP", "fe80::1%eth0\n\x1b[31m", 1)
        begin_registration(connect_from(proxy, peer)[0])
        with captured_log() as events:
            for _ in range(100):
                _, transport = connect_from(proxy, IPv6Address("TCP", peer.host, 2))
                self.assertTrue(transport.disconnecting)
        lines = [formatEvent(e) or "" for e in events]
        self.assertLessEqual(len(lines), 5)
        self.assertIn("(limit 1 per address), none of them idle for 1.0s or more", lines[0])
        self.assertIn("fe80::%eth0\\x0a\\x1b[31m/64", lines[0])
        self.assertNotIn("\x1b", "".join(lines))
        self.assertEqual(proxy.factory.rejections["peer_pending_limit"], 100)

    def test_evictions_are_logged_rate_limited(self) -> None:
        proxy = Proxy(pending_eviction_age=0, max_pending_registrations_per_peer=1)
        with captured_log() as events:
            for _ in range(101):
                _, transport = connect_from(proxy, v6("2001:db8:1:2::1"))
                self.assertFalse(transport.disconnecting)
        lines = [formatEvent(e) or "" for e in events]
        # At most a burst of each of two kinds (the warning, the rejection)
        # per period.
        self.assertLessEqual(len(lines), 10)
        self.assertIn(
            "1 connections from 2001:db8:1:2::/64 are awaiting registration (limit 1 per address); "
            "closed the oldest one that had sent nothing to make room for a new one",
            lines[1],
        )
        self.assertIn("(peer_pending_evicted)", lines[0])
        self.assertEqual(dict(proxy.factory.rejections), {"peer_pending_evicted": 100})
        self.assertEqual(proxy.factory.awaiting_registration, 1)


class EvictionAgeTests(TestCase):
    def test_young_idle_connections_are_not_closed_for_a_newcomer(self) -> None:
        # A burst of agents from one host: their connections may simply not
        # have been read yet.  Newcomers are refused (they retry) until an
        # idle one is old enough to be a flood's.
        proxy = Proxy(max_pending_registrations_per_peer=2)
        _, oldest = proxy.connect()
        proxy.clock.advance(0.5)
        _, younger = proxy.connect()
        _, refused = connect_from(proxy, PEER)
        self.assertTrue(refused.disconnecting)
        self.assertFalse(oldest.disconnecting or younger.disconnecting)
        self.assertEqual(dict(proxy.factory.rejections), {"peer_pending_limit": 1})
        proxy.clock.advance(0.5)
        _, admitted = connect_from(proxy, PEER)
        self.assertFalse(admitted.disconnecting)
        self.assertTrue(oldest.disconnecting)
        self.assertFalse(younger.disconnecting)
        self.assertEqual(proxy.factory.rejections["peer_pending_evicted"], 1)

    def test_the_age_is_not_negative(self) -> None:
        self.assertRaises(ValueError, ReverseConnectionConfig, pending_eviction_age=-1)
        self.assertEqual(ReverseConnectionConfig().pending_eviction_age, 1.0)


class PendingRegistrationPeerKeyTests(TestCase):
    """
    What connections awaiting registration are counted against: an IPv4
    address, an IPv6 /64 prefix (a host may take any address in its /64).
    """

    def keys(self, proxy: Proxy) -> dict[str, int]:
        return {key: len(held) for key, held in proxy.factory.pending_by_peer.items()}

    def test_two_addresses_in_one_ipv6_64_share_a_cap(self) -> None:
        proxy = Proxy(pending_eviction_age=0, max_pending_registrations_per_peer=2)
        _, first = connect_from(proxy, v6("2001:db8:1:2::1"))
        connect_from(proxy, v6("2001:db8:1:2:ffff:ffff:ffff:fffe"))
        _, third = connect_from(proxy, v6("2001:db8:1:2:abcd::7"))
        self.assertTrue(first.disconnecting)
        self.assertFalse(third.disconnecting)
        self.assertEqual(self.keys(proxy), {"2001:db8:1:2::/64": 2})
        self.assertEqual(proxy.factory.rejections["peer_pending_evicted"], 1)

    def test_different_ipv6_64s_do_not_share_a_cap(self) -> None:
        proxy = Proxy(pending_eviction_age=0, max_pending_registrations_per_peer=1)
        transports = [
            connect_from(proxy, v6(host))[1]
            for host in ("2001:db8:1:2::1", "2001:db8:1:3::1", "2001:db8:2:2::1", "2001:db9:1:2::1")
        ]
        self.assertFalse(any(t.disconnecting for t in transports))
        self.assertEqual(
            self.keys(proxy),
            {"2001:db8:1:2::/64": 1, "2001:db8:1:3::/64": 1, "2001:db8:2:2::/64": 1, "2001:db9:1:2::/64": 1},
        )
        self.assertEqual(proxy.factory.rejections, {})

    def counted_as_ipv4(self, host: str, other_host: str) -> Any:
        """
        With one place per peer, C{host} (which carries 192.0.2.7) takes
        the place of 192.0.2.7's own connection, and C{other_host} (which
        carries 192.0.2.8) gets one of its own.
        """
        proxy = Proxy(pending_eviction_age=0, max_pending_registrations_per_peer=1)
        _, ipv4 = connect_from(proxy, OTHER)
        _, carried = connect_from(proxy, v6(host))
        self.assertTrue(ipv4.disconnecting)
        self.assertFalse(carried.disconnecting)
        self.assertEqual(self.keys(proxy), {"192.0.2.7": 1})
        _, other = connect_from(proxy, v6(other_host))
        self.assertFalse(other.disconnecting)
        self.assertEqual(self.keys(proxy), {"192.0.2.7": 1, "192.0.2.8": 1})
        return proxy

    def test_an_ipv4_mapped_address_counts_as_its_ipv4_address(self) -> None:
        self.counted_as_ipv4("::ffff:192.0.2.7", "::ffff:192.0.2.8")

    def test_a_nat64_address_counts_as_the_ipv4_address_it_carries(self) -> None:
        # A NAT64 translator shows every IPv4 client in 64:ff9b::/96: one /64
        # would make them all one peer.
        proxy = self.counted_as_ipv4("64:ff9b::192.0.2.7", "64:ff9b::c000:208")
        # Outside the /96, the prefix is an ordinary /64.
        connect_from(proxy, v6("64:ff9b:0:0:1::1"))
        self.assertEqual(self.keys(proxy), {"192.0.2.7": 1, "192.0.2.8": 1, "64:ff9b::/64": 1})

    def test_link_local_addresses_are_counted_per_64_and_zone(self) -> None:
        proxy = Proxy(pending_eviction_age=0, max_pending_registrations_per_peer=2)
        for host in ("fe80::1%eth0", "fe80::2%eth0", "fe80::1%eth1"):
            connect_from(proxy, v6(host))
        self.assertEqual(self.keys(proxy), {"fe80::%eth0/64": 2, "fe80::%eth1/64": 1})

    def test_a_registration_frees_the_place_it_held_in_its_64(self) -> None:
        proxy = Proxy(pending_eviction_age=0, max_pending_registrations_per_peer=2)
        connect_from(proxy, v6("2001:db8:1:2::1"))
        protocol, transport = connect_from(proxy, v6("2001:db8:1:2::2"))
        self.assertTrue(registers(protocol, transport))
        self.assertEqual(self.keys(proxy), {"2001:db8:1:2::/64": 1})


class PendingRegistrationRoomTests(TestCase):
    """
    With every place taken, a newcomer takes the place of the oldest
    connection of the address holding the most places, if that is more than
    its own address holds.
    """

    def test_the_oldest_connection_of_the_busiest_address_makes_room(self) -> None:
        proxy = Proxy(max_pending_registrations=3)
        _, oldest_transport = proxy.connect()
        proxy.connect()
        connect_from(proxy, OTHER)
        protocol, transport = connect_from(proxy, IPv4Address("TCP", "198.51.100.1", 1))
        self.assertFalse(transport.disconnecting)
        self.assertTrue(oldest_transport.disconnecting)
        self.assertEqual(proxy.factory.rejections["pending_evicted"], 1)
        self.assertEqual(proxy.factory.rejections["pending_limit"], 0)
        self.assertEqual(proxy.factory.awaiting_registration, 3)
        self.assertEqual(len(proxy.factory.pending_by_peer["127.0.0.1"]), 1)
        [(kind, payload)] = take_frames(oldest_transport)
        response = m.decode(payload, m.RegistrationResponse)
        self.assertFalse(response.success)
        self.assertIn("closed to make room", response.error or "")
        protocol.dataReceived(registration_frame())
        self.assertIsNotNone(protocol.connection)

    def test_the_busiest_address_gives_up_an_idle_connection_before_one_mid_frame(self) -> None:
        proxy = Proxy(max_pending_registrations=4)
        oldest, oldest_transport = proxy.connect()
        begin_registration(oldest)
        _, idle_transport = proxy.connect()
        younger, younger_transport = proxy.connect()
        begin_registration(younger)
        connect_from(proxy, OTHER)
        _, transport = connect_from(proxy, IPv4Address("TCP", "198.51.100.1", 1))
        self.assertFalse(transport.disconnecting)
        self.assertTrue(idle_transport.disconnecting)
        self.assertFalse(oldest_transport.disconnecting)
        # With none idle left, the busiest address's oldest still makes room:
        # one address cannot keep the others out by trickling.
        _, transport = connect_from(proxy, IPv4Address("TCP", "198.51.100.2", 1))
        self.assertFalse(transport.disconnecting)
        self.assertTrue(oldest_transport.disconnecting)
        self.assertFalse(younger_transport.disconnecting)
        self.assertEqual(dict(proxy.factory.rejections), {"pending_evicted": 2})

    def test_an_address_holding_as_many_as_the_busiest_is_refused(self) -> None:
        proxy = Proxy(max_pending_registrations=2)
        proxy.connect()
        connect_from(proxy, OTHER)
        _, transport = connect_from(proxy, OTHER)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(proxy.factory.rejections["pending_limit"], 1)
        self.assertEqual(proxy.factory.rejections["pending_evicted"], 0)

    def test_a_unix_connection_makes_room_among_tcp_ones(self) -> None:
        proxy = Proxy(max_pending_registrations=1)
        _, tcp_transport = proxy.connect()
        _, transport = connect_from(proxy, UNIXAddress(None))
        self.assertFalse(transport.disconnecting)
        self.assertTrue(tcp_transport.disconnecting)

    def test_unix_connections_are_never_closed_to_make_room(self) -> None:
        proxy = Proxy(max_pending_registrations=1)
        _, unix_transport = connect_from(proxy, UNIXAddress(None))
        _, transport = proxy.connect()
        self.assertTrue(transport.disconnecting)
        self.assertFalse(unix_transport.disconnecting)
        self.assertEqual(proxy.factory.rejections["pending_limit"], 1)


class ResponseAndCounterTests(TestCase):
    def test_success_response_fields(self) -> None:
        proxy = Proxy(proxy_id="edge-7")
        protocol, transport = proxy.connect()
        response = proxy.registration_response(protocol, transport, registration_frame())
        self.assertEqual(response.proxy_id, "edge-7")
        self.assertEqual(response.proxy_version, "9.9.9")
        self.assertIsNone(response.error)
        self.assertTrue(response.success)

    def test_default_proxy_version_is_the_package_version(self) -> None:
        factory = ReverseConnectionFactory(clock=Proxy().clock)
        self.assertEqual(factory.success_response("c").proxy_version, __version__)
        self.assertEqual(factory.success_response("c").proxy_id, "sentinel-proxy")

    def test_registered_connection_uses_the_request_timeout(self) -> None:
        _, _, connection = Proxy(request_timeout=2.5).register()
        self.assertEqual(connection.request_timeout, 2.5)

    def test_connection_keeps_capabilities_and_metadata(self) -> None:
        _, _, connection = Proxy().register("waf-1", metadata={"region": "eu"})
        self.assertEqual(connection.metadata, {"region": "eu"})
        self.assertEqual(connection.capabilities.agent_id, "waf-1")
        self.assertEqual(connection.peer, "127.0.0.1:40000")

    def test_rejections_are_counted_by_reason(self) -> None:
        proxy = Proxy(allowed_agents=["waf-*"], require_auth=True, token_checker=StaticTokenChecker({"waf-1": TOKEN}))
        refusal(proxy, version=1)
        refusal(proxy, "")
        refusal(proxy, "bot")
        refusal(proxy, "waf-1")
        refusal(proxy, "waf-1", token=WRONG)
        protocol, _ = proxy.connect()
        protocol.dataReceived(b"\x00\x00\x00\x00")
        proxy.connect()
        proxy.clock.advance(10)
        self.assertEqual(
            dict(proxy.factory.rejections),
            {
                "version": 1,
                "empty_agent_id": 1,
                "not_allowed": 1,
                "auth_required": 1,
                "auth_failed": 1,
                "invalid_message": 1,
                "handshake_timeout": 1,
            },
        )

    def test_registrations_are_counted(self) -> None:
        proxy = Proxy()
        proxy.register("a")
        proxy.register("b")
        self.assertEqual(proxy.factory.registrations, 2)


class LogTests(TestCase):
    def messages(self, events: list[Any]) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in events]

    def test_one_line_per_registration_naming_agent_and_connection(self) -> None:
        proxy = Proxy()
        with captured_log() as events:
            _, _, connection = proxy.register("waf-1")
        [line] = self.messages(events)
        self.assertIn("waf-1", line)
        self.assertIn(connection.connection_id, line)

    def test_one_line_per_rejection_with_its_reason(self) -> None:
        proxy = Proxy(allowed_agents=["waf-*"])
        with captured_log() as events:
            refusal(proxy, "bot-1")
        [line] = self.messages(events)
        self.assertIn("bot-1", line)
        self.assertIn("not_allowed", line)
        self.assertIn("is not in the allowed list", line)

    def test_a_flood_of_refused_registrations_logs_a_few_lines_and_a_count(self) -> None:
        proxy = Proxy(allowed_agents=["waf-*"])
        with captured_log() as events:
            for _ in range(1000):
                refusal(proxy, "bot-1")
            proxy.clock.advance(10)
        lines = self.messages(events)
        self.assertLessEqual(len(lines), 10)
        self.assertIn("more like it in the last 10 s", lines[-1])
        self.assertEqual(proxy.factory.rejections["not_allowed"], 1000)

    def test_one_line_per_disconnect_naming_agent_and_connection(self) -> None:
        proxy = Proxy()
        protocol, transport, connection = proxy.register("waf-1")
        with captured_log() as events:
            lose(protocol)
        [line] = self.messages(events)
        self.assertIn("waf-1", line)
        self.assertIn(connection.connection_id, line)
        self.assertIn("disconnected", line)
        take_frames(transport)

    def test_an_agent_that_registers_and_leaves_in_a_loop_logs_a_few_lines_and_a_count(self) -> None:
        # Each round is a connection the agent makes at will: without a
        # limit, one agent wrote thousands of lines a second.
        proxy = Proxy()
        with captured_log() as events:
            for _ in range(1000):
                protocol, transport, _ = proxy.register("flappy")
                lose(protocol)
            proxy.clock.advance(10)
        lines = self.messages(events)
        self.assertLessEqual(len(lines), 12)
        self.assertEqual(sum("registered connection" in line for line in lines), 6)
        self.assertEqual(sum("disconnected" in line for line in lines), 6)
        self.assertIn("(... and 994 more like it in the last 10 s)", lines[-1])
        self.assertEqual(proxy.factory.registrations, 1000)
        # Agents are limited apart: a fleet starting at once is logged whole.
        with captured_log() as events:
            for i in range(50):
                for _ in range(4):
                    proxy.register(f"waf-{i}")
        lines = self.messages(events)
        self.assertEqual(len(lines), 200)
        self.assertIn("waf-49", lines[-1])

    def test_an_agent_id_per_connection_is_bounded_too(self) -> None:
        # An id per round (any id is allowed): the limiter's records of
        # them are bounded, and so are the lines.
        proxy = Proxy()
        limiter = proxy.factory.log_limiter
        with captured_log() as events:
            for i in range(3 * limiter.MAX_KINDS):
                protocol, transport, _ = proxy.register(f"bot-{i}")
                lose(protocol)
        self.assertLessEqual(len(limiter._windows), limiter.MAX_KINDS + 1)
        self.assertLess(len(self.messages(events)), limiter.MAX_KINDS + 10)


class HardeningTests(TestCase):
    """Ours, beyond the reference: ids and checkers that could hurt the proxy."""

    def test_agent_id_with_a_newline_is_refused(self) -> None:
        self.assertEqual(
            refusal(Proxy(), "waf-1\nforged log line"),
            "Invalid message format: Agent ID cannot contain control, format or separator "
            "characters (U+000A at position 5)",
        )

    def test_agent_id_with_an_escape_sequence_is_refused_even_if_a_glob_matches(self) -> None:
        self.assertEqual(
            refusal(Proxy(allowed_agents=["waf-*"]), "waf-\x1b[2J"),
            "Invalid message format: Agent ID cannot contain control, format or separator "
            "characters (U+001B at position 4)",
        )

    def test_agent_id_over_256_bytes_is_refused(self) -> None:
        self.assertIsNone(refusal(Proxy(), "w" * 256))
        self.assertEqual(
            refusal(Proxy(), "w" * 257),
            "Invalid message format: Agent ID is too long: 257 bytes (max: 256)",
        )

    def test_agent_id_length_counts_utf8_bytes(self) -> None:
        self.assertEqual(
            refusal(Proxy(), "é" * 129),
            "Invalid message format: Agent ID is too long: 258 bytes (max: 256)",
        )

    def test_agent_id_length_limit_is_an_option(self) -> None:
        proxy = Proxy(max_agent_id_length=8)
        self.assertIsNone(refusal(proxy, "waf-1234"))
        self.assertEqual(
            refusal(proxy, "waf-12345"),
            "Invalid message format: Agent ID is too long: 9 bytes (max: 8)",
        )
        self.assertEqual(proxy.factory.rejections["bad_agent_id"], 1)

    def test_agent_id_with_a_line_separator_is_refused(self) -> None:
        # U+2028 ends a line for many log viewers: it forged a second line.
        self.assertEqual(
            refusal(Proxy(), "waf-1\u2028forged"),
            "Invalid message format: Agent ID cannot contain control, format or separator "
            "characters (U+2028 at position 5)",
        )

    def test_agent_id_with_format_characters_is_refused(self) -> None:
        for bad in ("waf\u200b1", "waf\u202e1", "waf\u20291", "waf\x851"):
            error = refusal(Proxy(), bad)
            self.assertIsNotNone(error, repr(bad))
            self.assertIn("cannot contain control, format or separator", error or "")

    def test_agent_id_with_other_unicode_is_admitted(self) -> None:
        self.assertIsNone(refusal(Proxy(), "waf-ünï 1"))

    def test_registration_metadata_over_64_kib_is_refused(self) -> None:
        self.assertIsNone(refusal(Proxy(), metadata={"pad": "x" * 60_000}))
        error = refusal(Proxy(), metadata={"pad": "x" * 70_000})
        self.assertEqual(
            error,
            "Invalid message format: Registration metadata is too large: 70010 bytes "
            f"(max: {64 * 1024})",
        )

    def test_registration_metadata_nested_over_64_levels_is_refused(self) -> None:
        """
        Metadata is shown on C{/agents}, encoded and (with C{--workers})
        decoded again at a deeper stack than the registration's: nested a
        few levels short of what the decoder takes (940 lists in 3 KB), it
        made every C{GET /agents} fail with a RecursionError while the
        agent stayed connected.
        """

        def nested(depth: int) -> Any:
            value: Any = {"leaf": 1}
            for i in range(depth - 1):
                value = [value] if i % 2 else {"k": value}
            return value

        self.assertIsNone(refusal(Proxy(), metadata=nested(64)))
        proxy = Proxy()
        self.assertEqual(
            refusal(proxy, metadata=nested(65)),
            "Invalid message format: Registration metadata is nested too deeply: "
            "more than 64 levels of lists and objects",
        )
        self.assertEqual(proxy.factory.rejections["metadata_too_large"], 1)

    def test_registration_metadata_limit_is_an_option(self) -> None:
        proxy = Proxy(max_metadata_size=100)
        self.assertIsNone(refusal(proxy, metadata={"region": "eu"}))
        self.assertIn("(max: 100)", refusal(proxy, metadata={"pad": "x" * 100}) or "")
        self.assertEqual(proxy.factory.rejections["metadata_too_large"], 1)

    def test_agent_capabilities_over_the_metadata_limit_are_refused(self) -> None:
        # The capabilities are peer text too (kept per connection, shown on
        # the status site): a fat name or event list is refused like fat
        # metadata, not held at a megabyte per connection.
        def response(**fields: Any) -> m.RegistrationResponse:
            proxy = Proxy()
            caps = msgspec.structs.replace(capabilities("waf-1"), **fields)
            payload = m.encode(
                m.RegistrationRequest(
                    protocol_version=m.PROTOCOL_VERSION, agent_id="waf-1", capabilities=caps
                )
            )
            protocol, transport = proxy.connect()
            frame = encode_frame(MessageType.HANDSHAKE_REQUEST, payload)
            return proxy.registration_response(protocol, transport, frame)

        self.assertTrue(response(name="n" * 1000).success)
        for fields in ({"name": "n" * 70_000}, {"version": "v" * 70_000}, {"supported_events": [1] * 40_000}):
            answer = response(**fields)
            self.assertFalse(answer.success)
            self.assertIn("Agent capabilities are too large", answer.error or "")

    def test_a_token_checker_that_raises_refuses_the_registration(self) -> None:
        class Broken:
            def check_token(self, agent_id: str, token: str) -> bool:
                raise RuntimeError("backend down")

        proxy = Proxy(token_checker=Broken())
        with captured_log() as events:
            error = refusal(proxy, "waf-1", token=TOKEN)
        self.assertEqual(error, "Authentication failed: invalid token for agent 'waf-1'")
        self.assertNotIn(TOKEN, log_text(events))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(proxy.factory.registered_connections("waf-1"), 0)


class PeerTextInLogTests(TestCase):
    """
    No log line carries more than about 200 characters of what a peer sent,
    nor a raw control, format or separator character.
    """

    def lines(self, events: list[Any]) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) or "" for e in events]

    def assertBounded(self, lines: list[str]) -> None:
        from sentinel_twisted._peertext import is_clean

        self.assertNotEqual(lines, [])
        for line in lines:
            self.assertLess(len(line), 400, line[:500])
            self.assertTrue(is_clean(line), repr(line[:500]))

    def test_refused_ids_are_logged_cut_and_escaped(self) -> None:
        proxy = Proxy(max_agent_id_length=100_000)
        with captured_log() as events:
            refusal(proxy, "\u2028" * 50_000)
        self.assertBounded(self.lines(events))

    def test_long_ids_of_registered_agents_are_cut(self) -> None:
        proxy = Proxy(max_agent_id_length=100_000)
        with captured_log() as events:
            protocol, transport, _ = proxy.register("w" * 50_000)
            protocol.dataReceived(encode_frame(MessageType.AGENT_RESPONSE, b"{}"))
            lose(protocol)
        self.assertBounded(self.lines(events))

    def test_error_texts_quoting_a_payload_are_cut_and_escaped(self) -> None:
        import json

        proxy = Proxy()
        protocol, transport, _ = proxy.register("waf-1")
        hostile = json.dumps({"version": 2, "decision": "\u2028\n" * 100_000}).encode()
        with captured_log() as events:
            protocol.dataReceived(encode_frame(MessageType.AGENT_RESPONSE, hostile))
            protocol.dataReceived(encode_frame(MessageType.FLOW_CONTROL, b'{"action": "\\u2028x"}'))
        self.assertBounded(self.lines(events))

    def test_refused_id_text_is_logged_once(self) -> None:
        proxy = Proxy()
        with captured_log() as events:
            refusal(proxy, "w" * 300_000)
        text = "\n".join(self.lines(events))
        self.assertLess(text.count("w" * 40), 2)


class StopTests(TestCase):
    def test_stopping_the_factory_leaves_no_rate_limit_timer(self) -> None:
        proxy = Proxy(allowed_agents=["waf-*"])
        proxy.factory.doStart()
        for _ in range(20):
            refusal(proxy, "bot-1")
        self.assertNotEqual(proxy.clock.getDelayedCalls(), [])
        proxy.factory.doStop()
        self.assertEqual(proxy.clock.getDelayedCalls(), [])
