"""
An agent that serves several proxies: each endpoint kept on its own
(L{ProxyConnections}), host names that stand for a set of proxies and are
followed as their addresses come and go (L{ResolvedProxies}, with a fake
L{IHostnameResolver}), the per-proxy health, and the same over real
loopback listeners.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint, clientFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IHostnameResolver, IResolutionReceiver
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from sentinel_twisted import messages as m
from sentinel_twisted.agent import Agent, AgentConnector, block
from sentinel_twisted.agent._resolve import named_proxies, one_family
from sentinel_twisted.agent.tap import Options
from sentinel_twisted.endpoints import parse_description
from sentinel_twisted.proxy.config import ReverseConnectionConfig
from sentinel_twisted.proxy.factory import ReverseConnectionFactory

from .test_connector import NOT_ALLOWED, ScriptedEndpoint, run
from .test_with_proxy import headers, wait_for


@implementer(IHostnameResolver)
class FakeResolver:
    """Names to addresses, changed by the test; C{None}: the name server fails."""

    def __init__(self, names: dict[str, list[str]]) -> None:
        self.names = names
        self.asked: list[tuple[str, int]] = []

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Any = None,
        transportSemantics: str = "TCP",
    ) -> IResolutionReceiver:
        self.asked.append((hostName, portNumber))
        resolutionReceiver.resolutionBegan(None)  # type: ignore[arg-type]
        for address in self.names.get(hostName) or []:
            kind = IPv6Address if ":" in address else IPv4Address
            resolutionReceiver.addressResolved(kind("TCP", address, portNumber))
        resolutionReceiver.resolutionComplete()
        return resolutionReceiver


def scripted(clock: Clock, *scripts: list[str], **kw: Any) -> tuple[AgentConnector, list[ScriptedEndpoint]]:
    endpoints = [ScriptedEndpoint(clock, script) for script in scripts]
    kw.setdefault("jitter", lambda: 0.0)
    kw.setdefault("health_interval", 0)
    connector = AgentConnector(Agent(), endpoints, "waf-1", reactor=clock, **kw)
    return connector, endpoints


class SeveralEndpointsTests(SynchronousTestCase):
    def test_keeps_n_connections_to_each_proxy(self) -> None:
        clock = Clock()
        connector, endpoints = scripted(clock, ["accept"], ["accept"], ["accept"], connections=2)
        connector.startService()
        clock.advance(0)
        self.assertEqual([len(e.live()) for e in endpoints], [2, 2, 2])
        self.assertEqual(connector.registered_count, 6)
        self.assertEqual([p.state for p in connector.proxies()], ["registered"] * 3)

    def test_a_proxy_that_is_down_does_not_touch_the_others(self) -> None:
        clock = Clock()
        connector, (up, down) = scripted(clock, ["accept"], ["refuse"], connections=2, initial_delay=1)
        connector.startService()
        run(clock, 10)
        self.assertEqual(len(up.attempts), 2, "the proxy that is up is dialled once per connection")
        self.assertGreater(len(down.attempts), 4)
        self.assertEqual(connector.registered_count, 2)
        first, second = connector.health()["proxies"]
        self.assertEqual((first["state"], first["registered"]), ("registered", 2))
        self.assertEqual((second["state"], second["registered"]), ("connecting", 0))
        self.assertEqual(second["last_error"], "Connection was refused by other side: scripted refusal.")
        self.assertGreater(second["retries"], 2)

    def test_a_dropped_connection_reconnects_to_its_own_proxy(self) -> None:
        clock = Clock()
        connector, (a, b) = scripted(clock, ["accept"], ["accept"], initial_delay=1)
        connector.startService()
        clock.advance(0)
        b.connections[0].close()
        self.assertEqual([p.state for p in connector.proxies()], ["registered", "connecting"])
        run(clock, 2)
        self.assertEqual((len(a.attempts), len(b.attempts)), (1, 2))
        self.assertEqual(connector.registered_count, 2)

    def test_a_fatal_rejection_stops_only_that_proxy(self) -> None:
        clock = Clock()
        connector, (good, refusing) = scripted(clock, ["accept"], [NOT_ALLOWED], connections=2)
        failed = connector.when_failed()
        connector.startService()
        run(clock, 60)
        self.assertEqual(len(refusing.attempts), 2, "no retry to the proxy that refused for good")
        self.assertNoResult(failed)
        self.assertIsNone(connector.failure)
        self.assertEqual([p.state for p in connector.proxies()], ["registered", "rejected"])
        self.assertIn("not in the allowed list", connector.health()["proxies"][1]["last_error"])
        self.assertEqual(len(good.live()), 2)

    def test_the_connector_fails_once_every_proxy_refused_for_good(self) -> None:
        clock = Clock()
        connector, _ = scripted(clock, [NOT_ALLOWED], ["refuse", NOT_ALLOWED], initial_delay=1)
        failed = connector.when_failed()
        connector.startService()
        clock.advance(0)
        self.assertNoResult(failed)
        run(clock, 2)
        error = self.successResultOf(failed)
        self.assertIn("not in the allowed list", str(error))
        self.assertEqual(connector.health()["state"], "failed")

    def test_stop_drains_every_proxy(self) -> None:
        clock = Clock()
        connector, endpoints = scripted(clock, ["accept"], ["accept"], ["refuse"])
        connector.startService()
        clock.advance(0)
        stopped = connector.stopService()
        for endpoint in endpoints[:2]:
            self.assertTrue(endpoint.connections[0].transport.disconnecting)
            endpoint.connections[0].close()
        self.successResultOf(stopped)
        self.assertEqual([p.state for p in connector.proxies()], ["stopped"] * 3)
        self.assertFalse(any(s.service.running for s in connector.slots))

    def test_no_endpoint_is_an_error(self) -> None:
        self.assertRaises(ValueError, AgentConnector, Agent(), [], "waf-1", reactor=Clock())


class NamedProxiesTests(SynchronousTestCase):
    def test_host_names_stand_for_sets_of_proxies(self) -> None:
        for description, host, port in (
            ("tcp:proxies.example:7000", "proxies.example", 7000),
            ("tcp:host=proxies.example:port=7000:timeout=5", "proxies.example", 7000),
            ("tls:proxies.example:7443:trustRoots=/etc/ca", "proxies.example", 7443),
        ):
            named = named_proxies(description)
            assert named is not None, description
            self.assertEqual((named.host, named.port), (host, port))

    def test_addresses_and_other_endpoints_are_dialled_as_given(self) -> None:
        for description in (
            "tcp:127.0.0.1:7000",
            "tcp:host=2001\\:db8\\:\\:1:port=7000",
            "unix:/run/sentinel.sock",
            "tls:proxy.example:7443:endpoint=tcp\\:10.0.0.1\\:7443",
            "tcp:proxy.example",
            "ssl:proxy.example:7443",
        ):
            self.assertIsNone(named_proxies(description), description)

    def test_a_tcp_address_description_keeps_the_options(self) -> None:
        named = named_proxies("tcp:proxies.example:7000:timeout=5")
        assert named is not None
        endpoint = clientFromString(MemoryReactorClock(), named.address_description("10.1.2.3"))
        self.assertEqual((endpoint._host, endpoint._port, endpoint._timeout), ("10.1.2.3", 7000, 5))  # type: ignore[attr-defined]
        v6 = clientFromString(MemoryReactorClock(), named.address_description("2001:db8::7"))
        self.assertEqual(v6._host, "2001:db8::7")  # type: ignore[attr-defined]

    def test_a_tls_address_description_still_checks_the_name(self) -> None:
        named = named_proxies("tls:proxies.example:7443")
        assert named is not None
        description = named.address_description("2001:db8::7")
        endpoint = clientFromString(MemoryReactorClock(), description)
        inner = endpoint._wrappedEndpoint  # type: ignore[attr-defined]
        self.assertEqual((inner._host, inner._port), ("2001:db8::7", 7443))
        # The certificate is checked against the name (tests/test_tls.py
        # dials tls:localhost this way and checks a certificate for localhost).
        args, kwargs = parse_description(description)
        self.assertEqual((args, kwargs["host"]), (["tls"], "proxies.example"))

    def test_one_address_family(self) -> None:
        self.assertEqual(one_family(["::1", "127.0.0.1"]), ["127.0.0.1"])
        self.assertEqual(one_family(["10.0.0.10", "10.0.0.9", "10.0.0.10"]), ["10.0.0.9", "10.0.0.10"])
        self.assertEqual(one_family(["2001:db8::2", "2001:db8::1"]), ["2001:db8::1", "2001:db8::2"])
        self.assertEqual(one_family([]), [])


class FollowingANameTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.resolver = FakeResolver({"proxies.test": ["10.0.0.1", "10.0.0.2"]})
        self.events: list[LogEvent] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def connector(self, **kw: Any) -> AgentConnector:
        kw.setdefault("jitter", lambda: 0.0)
        kw.setdefault("health_interval", 0)
        return AgentConnector(
            Agent(), "tcp:proxies.test:7000", "waf-1", reactor=self.reactor,
            resolver=self.resolver, **kw,
        )  # fmt: skip

    def dialled(self) -> list[tuple[str, int]]:
        return [(host, port) for host, port, *_ in self.reactor.tcpClients]

    def logged(self) -> str:
        return "\n".join(formatEvent(e) for e in self.events)

    def test_every_address_is_a_proxy(self) -> None:
        connector = self.connector(connections=2)
        connector.startService()
        self.assertEqual(self.resolver.asked, [("proxies.test", 7000)])
        self.assertEqual(sorted(self.dialled()), [("10.0.0.1", 7000)] * 2 + [("10.0.0.2", 7000)] * 2)
        self.assertEqual([p.name for p in connector.proxies()], [
            "tcp:proxies.test:7000 (10.0.0.1)", "tcp:proxies.test:7000 (10.0.0.2)",
        ])  # fmt: skip
        [name] = connector.health()["names"]
        self.assertEqual(name["addresses"], ["10.0.0.1", "10.0.0.2"])

    def test_new_addresses_are_dialled_at_the_next_resolution(self) -> None:
        connector = self.connector(resolve_interval=30)
        connector.startService()
        self.resolver.names["proxies.test"].append("10.0.0.3")
        self.reactor.advance(29)
        self.assertEqual(len(self.dialled()), 2)
        self.reactor.advance(1)
        self.assertEqual(len(self.resolver.asked), 2)
        self.assertEqual(self.dialled()[-1], ("10.0.0.3", 7000))
        self.assertEqual([p.address for p in connector.proxies()], ["10.0.0.1", "10.0.0.2", "10.0.0.3"])
        self.assertIn("proxies.test has a new proxy at 10.0.0.3; connecting (3 proxy(ies) now)", self.logged())

    def test_addresses_that_left_are_drained(self) -> None:
        connector = self.connector(resolve_interval=30)
        connector.startService()
        [leaving, staying] = connector.proxies()
        self.resolver.names["proxies.test"] = ["10.0.0.2"]
        self.reactor.advance(30)
        self.assertEqual(connector.proxies(), [staying])
        self.assertEqual(leaving.state, "stopped")
        self.assertFalse(any(s.service.running for s in leaving.slots))
        self.assertTrue(all(s.service.running for s in staying.slots))
        self.assertIn("proxies.test no longer resolves to 10.0.0.1; draining its 0 connection(s)", self.logged())

    def test_a_resolution_that_finds_nothing_keeps_the_proxies(self) -> None:
        connector = self.connector(resolve_interval=30, initial_delay=1)
        connector.startService()
        self.resolver.names["proxies.test"] = []
        self.reactor.advance(30)
        self.assertEqual(len(connector.proxies()), 2)
        self.assertEqual(connector.health()["names"][0]["misses"], 1)
        self.reactor.advance(1)  # the retry comes sooner, with the backoff
        self.assertEqual(len(self.resolver.asked), 3)
        self.assertIn("proxies.test resolves to nothing (no address); keeping its 2 proxy(ies)", self.logged())
        self.resolver.names["proxies.test"] = ["10.0.0.9"]
        self.reactor.advance(2)
        self.assertEqual([p.address for p in connector.proxies()], ["10.0.0.9"])

    def test_a_name_with_no_address_at_start_is_asked_again(self) -> None:
        self.resolver.names["proxies.test"] = []
        connector = self.connector(resolve_interval=30, initial_delay=1)
        connector.startService()
        self.assertEqual(connector.proxies(), [])
        self.resolver.names["proxies.test"] = ["10.0.0.1"]
        self.reactor.advance(1)
        self.assertEqual(self.dialled(), [("10.0.0.1", 7000)])

    def test_stop_stops_resolving(self) -> None:
        connector = self.connector(resolve_interval=30)
        connector.startService()
        self.successResultOf(connector.stopService())
        self.reactor.advance(300)
        self.assertEqual(len(self.resolver.asked), 1)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_interval_zero_dials_the_name_as_one_proxy(self) -> None:
        connector = self.connector(resolve_interval=0)
        connector.startService()
        self.assertEqual(self.resolver.asked, [])
        self.assertEqual([p.name for p in connector.proxies()], ["tcp:proxies.test:7000"])

    def test_a_fatal_rejection_waits_for_the_names(self) -> None:
        # A static proxy refusing for good does not stop the connector while
        # a name has not brought its proxies yet.
        self.resolver.names["proxies.test"] = []
        refusing = ScriptedEndpoint(self.reactor, [NOT_ALLOWED])
        connector = AgentConnector(
            Agent(), [refusing, "tcp:proxies.test:7000"], "waf-1", reactor=self.reactor,
            resolver=self.resolver, jitter=lambda: 0.0, health_interval=0,
        )  # fmt: skip
        connector.startService()
        self.reactor.advance(0)
        self.assertEqual(connector.proxies()[0].state, "rejected")
        self.assertIsNone(connector.failure)


class TapTests(SynchronousTestCase):
    def parse(self, *args: str) -> Options:
        options = Options()
        options.parseOptions([*args, "--agent-id", "waf-1", "--agent", "sentinel_twisted.agent:Agent"])
        return options

    def test_connect_is_repeatable(self) -> None:
        options = self.parse("--connect", "unix:/a.sock", "--connect", "tcp:127.0.0.1:7000")
        self.assertEqual(options["connect"], ["unix:/a.sock", "tcp:127.0.0.1:7000"])
        self.assertEqual(options["resolve-interval"], 30.0)

    def test_resolve_interval(self) -> None:
        self.assertEqual(self.parse("--connect", "unix:/a", "--resolve-interval", "5")["resolve-interval"], 5.0)
        for bad in ("-1", "soon", "nan"):
            error = self.assertRaises(usage.UsageError, self.parse, "--connect", "unix:/a", "--resolve-interval", bad)
            self.assertIn("--resolve-interval", str(error))

    def test_the_same_endpoint_twice_is_an_error(self) -> None:
        error = self.assertRaises(usage.UsageError, self.parse, "--connect", "unix:/a", "--connect", "unix:/a")
        self.assertIn("the same endpoint is given twice", str(error))

    def test_the_service_dials_every_endpoint_and_reports_each(self) -> None:
        from sentinel_twisted.agent.tap import make_agent_service

        options = self.parse("--connect", "tcp:127.0.0.1:7001", "--connect", "tcp:127.0.0.1:7002", "--connections", "2")
        clock = MemoryReactorClock()
        service = make_agent_service(options, clock)
        service.connector.startService()
        self.assertEqual(sorted((h, p) for h, p, *_ in clock.tcpClients), [("127.0.0.1", 7001)] * 2 + [("127.0.0.1", 7002)] * 2)
        health = service.health()
        self.assertEqual([p["proxy"] for p in health["proxies"]], ["tcp:127.0.0.1:7001", "tcp:127.0.0.1:7002"])
        self.assertEqual([p["connections"] for p in health["proxies"]], [2, 2])


class Answering(Agent):
    def on_request_headers(self, event: m.RequestHeadersEvent) -> Any:
        return block(403, "Forbidden")


class LoopbackTests(TestCase):
    """Real listeners on loopback: 127.0.0.1, 127.0.0.2, ... all reach this host."""

    def setUp(self) -> None:
        self.proxies: dict[str, tuple[ReverseConnectionFactory, Any]] = {}
        self.connector: AgentConnector | None = None

    @inlineCallbacks
    def tearDown(self) -> Generator[Any, Any, None]:
        if self.connector is not None and self.connector.running:
            yield self.connector.stopService()
        for address in list(self.proxies):
            yield self.stop_proxy(address)

    @inlineCallbacks
    def start_proxy(self, address: str, port: int = 0) -> Generator[Any, Any, int]:
        factory = ReverseConnectionFactory(ReverseConnectionConfig(), clock=reactor)
        listening = yield TCP4ServerEndpoint(reactor, port, interface=address).listen(factory)
        self.proxies[address] = (factory, listening)
        return int(listening.getHost().port)

    @inlineCallbacks
    def stop_proxy(self, address: str) -> Generator[Any, Any, None]:
        factory, listening = self.proxies.pop(address)
        yield listening.stopListening()
        yield factory.pool.close_all("proxy going away")

    def start_agent(self, endpoints: Any, **kw: Any) -> AgentConnector:
        self.connector = AgentConnector(
            Answering(), endpoints, "waf-1", reactor=reactor, initial_delay=0.02, max_delay=0.1,
            jitter=lambda: 0.0, drain_grace=1.0, health_interval=0, **kw,
        )  # fmt: skip
        self.connector.startService()
        return self.connector

    def registered(self, address: str) -> int:
        factory, _ = self.proxies[address]
        return len(factory.pool.connections("waf-1")) if "waf-1" in factory.pool else 0

    @inlineCallbacks
    def answered(self, address: str, cid: str) -> Generator[Any, Any, None]:
        factory, _ = self.proxies[address]
        answer = yield factory.pool.send_request_headers("waf-1", headers(cid, "/x"))
        self.assertEqual(answer.decision, m.Block(403, "Forbidden", None))

    @inlineCallbacks
    def test_serves_three_proxies_at_once(self) -> Generator[Any, Any, None]:
        ports = []
        for address in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
            ports.append((yield self.start_proxy(address)))
        addresses = list(self.proxies)
        connector = self.start_agent([f"tcp:{a}:{p}" for a, p in zip(addresses, ports, strict=True)], connections=2)
        yield wait_for(lambda: connector.registered_count == 6, "two connections to each proxy")
        self.assertEqual([self.registered(a) for a in addresses], [2, 2, 2])
        for i, address in enumerate(addresses):
            yield self.answered(address, f"q{i}")
        # One proxy goes away: the others keep their connections.
        yield self.stop_proxy("127.0.0.2")
        yield wait_for(lambda: connector.registered_count == 4, "the connections to the others only")
        self.assertEqual([self.registered(a) for a in ("127.0.0.1", "127.0.0.3")], [2, 2])
        states = [p["state"] for p in connector.health()["proxies"]]
        self.assertEqual(states, ["registered", "connecting", "registered"])

    @inlineCallbacks
    def test_follows_a_name_as_proxies_come_and_go(self) -> Generator[Any, Any, None]:
        port = None
        for _ in range(20):  # one port number free on three addresses
            try:
                port = yield self.start_proxy("127.0.0.1")
                yield self.start_proxy("127.0.0.2", port)
                break
            except CannotListenError:
                for address in list(self.proxies):
                    yield self.stop_proxy(address)
        assert port is not None
        resolver = FakeResolver({"proxies.test": ["127.0.0.1", "127.0.0.2"]})
        connector = self.start_agent(f"tcp:proxies.test:{port}", resolver=resolver, resolve_interval=0.05)
        yield wait_for(lambda: self.registered("127.0.0.1") == 1 and self.registered("127.0.0.2") == 1, "both proxies")
        yield self.answered("127.0.0.2", "q1")
        # A third proxy comes up and into the name.
        yield self.start_proxy("127.0.0.3", port)
        resolver.names["proxies.test"].append("127.0.0.3")
        yield wait_for(lambda: self.registered("127.0.0.3") == 1, "the new proxy")
        yield self.answered("127.0.0.3", "q2")
        # The first leaves the name: its connection is drained and closed,
        # and not dialled again; the others keep theirs.
        resolver.names["proxies.test"] = ["127.0.0.2", "127.0.0.3"]
        yield wait_for(lambda: self.registered("127.0.0.1") == 0, "the connection to the proxy that left to close")
        yield wait_for(lambda: [p["address"] for p in connector.health()["proxies"]] == ["127.0.0.2", "127.0.0.3"], "it to drain")
        self.assertEqual((self.registered("127.0.0.2"), self.registered("127.0.0.3")), (1, 1))
        factory, _ = self.proxies["127.0.0.1"]
        self.assertEqual(factory.registrations, 1, "no new connection to the address that left")
