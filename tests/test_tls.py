"""
TLS with agent identity: C{twistd sentinel-reverse --listen ssl:...
--require-client-cert --client-ca FILE}.  The TLS handshake demands a client
certificate signed by the CA, and a registering agent's id must be a name in
it (subjectAltName DNS or URI, or the common name).  Certificates are made
at test time; every connection is on 127.0.0.1.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import tempfile
from collections.abc import Generator
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import (
    SSL4ClientEndpoint,
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    clientFromString,
    connectProtocol,
    serverFromString,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import Clock
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sentinel_twisted import messages as m
from sentinel_twisted._tls import tls_failure
from sentinel_twisted.agent import Agent, AgentConnector
from sentinel_twisted.agent.forward import ForwardAgentFactory
from sentinel_twisted.agent.protocol import AgentClientFactory, AgentSettings
from sentinel_twisted.proxy._identity import (
    CertificateNames,
    identity_problem,
    verifying_server_endpoint,
)
from sentinel_twisted.proxy.auth import StaticTokenChecker
from sentinel_twisted.proxy.config import ReverseConnectionConfig
from sentinel_twisted.proxy.dialled import ForwardConnectionFactory
from sentinel_twisted.proxy.factory import ReverseConnectionFactory, rejection_reason
from sentinel_twisted.proxy.pool import AgentPool
from sentinel_twisted.tap import Options, StartupError, make_listener

from ._proxy_support import captured_log, log_text
from .reliability.invariants import wait_until
from .reliability.support import Program, headers

_PEM = serialization.Encoding.PEM
_NOW = datetime.datetime.now(datetime.timezone.utc)


def _name(common_name: str | None) -> x509.Name:
    if common_name is None:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "test")])
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class CA:
    """A certificate authority made for one test run."""

    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_NOW - datetime.timedelta(days=1))
            .not_valid_after(_NOW + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    def issue(
        self,
        common_name: str | None,
        dns: tuple[str, ...] = (),
        uris: tuple[str, ...] = (),
        ips: tuple[str, ...] = (),
    ) -> tuple[Any, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_NOW - datetime.timedelta(days=1))
            .not_valid_after(_NOW + datetime.timedelta(days=1))
        )
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.UniformResourceIdentifier(u) for u in uris]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return key, builder.sign(self.key, hashes.SHA256())


def write_pair(directory: str, stem: str, key: Any, certificate: x509.Certificate) -> tuple[str, str]:
    key_path = os.path.join(directory, f"{stem}.key")
    cert_path = os.path.join(directory, f"{stem}.pem")
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(_PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    with open(cert_path, "wb") as f:
        f.write(certificate.public_bytes(_PEM))
    return cert_path, key_path


class Certificates:
    """The proxy's CA and certificate, a client CA, and agent certificates."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="st-tls-")
        # The agents trust the proxy's CA: a directory holding only it.
        self.trust = os.path.join(self.dir, "trust")
        os.mkdir(self.trust)
        server_ca = CA("proxy CA")
        with open(os.path.join(self.trust, "proxy-ca.pem"), "wb") as f:
            f.write(server_ca.certificate.public_bytes(_PEM))
        self.server_cert, self.server_key = write_pair(
            self.dir, "server", *server_ca.issue("localhost", dns=("localhost",), ips=("127.0.0.1",))
        )
        self.client_ca = CA("agents CA")
        self.client_ca_path = os.path.join(self.dir, "agents-ca.pem")
        with open(self.client_ca_path, "wb") as f:
            f.write(self.client_ca.certificate.public_bytes(_PEM))
        self.rogue_ca = CA("agents CA")  # same name, other key

    def agent(self, stem: str, common_name: str | None, ca: CA | None = None, **names: Any) -> tuple[str, str]:
        return write_pair(self.dir, stem, *(ca or self.client_ca).issue(common_name, **names))

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def listener_options(certs: Certificates, *extra: str, port: int = 0) -> Options:
    options = Options()
    options.parseOptions([
        "--listen", f"ssl:{port}:interface=127.0.0.1:privateKey={certs.server_key}:certKey={certs.server_cert}",
        "--require-client-cert", "--client-ca", certs.client_ca_path,
        "--http", "none", "--status", "none", *extra,
    ])  # fmt: skip
    return options


class ClientCertificateTests(TestCase):
    """An in-process listener built by the twistd plugin's own code."""

    timeout = 30

    @inlineCallbacks
    def setUp(self) -> Generator[Any, Any, None]:
        self.certs = Certificates()
        self.addCleanup(self.certs.remove)
        top = make_listener(listener_options(self.certs), reactor)
        self.top = top
        self.factory = top.factory
        [service] = list(top)
        self.port = yield service.endpoint.listen(service.factory)
        self.addCleanup(self.stop)
        self.connectors: list[AgentConnector] = []

    @inlineCallbacks
    def stop(self) -> Generator[Any, Any, None]:
        for connector in self.connectors:
            if connector.running:
                yield connector.stopService()
        yield self.port.stopListening()
        yield self.factory.pool.close_all("test over")

    def connect(self, agent_id: str, cert: tuple[str, str] | None) -> AgentConnector:
        endpoint = f"tls:localhost:{self.port.getHost().port}:trustRoots={self.certs.trust}"
        if cert is not None:
            endpoint += f":certificate={cert[0]}:privateKey={cert[1]}"
        connector = AgentConnector(
            Agent(), endpoint, agent_id, reactor=reactor,
            initial_delay=0.05, max_delay=0.1, jitter=lambda: 0.0, drain_grace=0.5,
        )  # fmt: skip
        self.connectors.append(connector)
        connector.startService()
        return connector

    @inlineCallbacks
    def registers(self, agent_id: str, cert: tuple[str, str]) -> Generator[Any, Any, None]:
        connector = self.connect(agent_id, cert)
        yield connector.when_registered()
        answer = yield self.factory.pool.send_request_headers(agent_id, headers("tls-1"))
        self.assertEqual(answer.decision, m.ALLOW)

    def test_common_name_matching_the_agent_id_registers(self) -> Any:
        return self.registers("waf-1", self.certs.agent("waf-1", "waf-1"))

    def test_subject_alt_name_dns_matching_registers(self) -> Any:
        return self.registers("waf-2", self.certs.agent("waf-2", "someone else", dns=("waf-2",)))

    def test_subject_alt_name_uri_matching_registers(self) -> Any:
        uri = "spiffe://example.org/agent/waf-3"
        return self.registers(uri, self.certs.agent("waf-3", None, uris=(uri,)))

    @inlineCallbacks
    def test_a_certificate_for_another_agent_is_refused_for_good(self) -> Generator[Any, Any, None]:
        connector = self.connect("waf-9", self.certs.agent("waf-1", "waf-1"))
        error = yield connector.when_failed()
        self.assertEqual(
            error.reason,  # type: ignore[attr-defined]
            "Authentication failed: agent id 'waf-9' does not match the client certificate (CN=waf-1)",
        )
        self.assertFalse(error.retryable)  # type: ignore[attr-defined]
        self.assertEqual(self.factory.rejections["client_certificate"], 1)
        self.assertEqual(len(self.factory.pool), 0)

    @inlineCallbacks
    def refused_by_tls(self, cert: tuple[str, str] | None) -> Generator[Any, Any, None]:
        connector = self.connect("waf-1", cert)
        # The handshake fails: the connector keeps trying, the listener never
        # sees a registration.
        yield wait_until(lambda: any(s.retries >= 2 for s in connector.slots), "failed attempts", 10)
        self.assertEqual(connector.registered_count, 0)
        self.assertIsNone(connector.failure)
        self.assertEqual(self.factory.registrations, 0)
        self.assertEqual(sum(self.factory.rejections.values()), 0, self.factory.rejections)
        yield wait_until(lambda: self.factory.awaiting_registration == 0, "the failed handshakes to close")
        yield connector.stopService()
        self.flushLoggedErrors()

    def test_no_certificate_is_refused_in_the_handshake(self) -> Any:
        return self.refused_by_tls(None)

    def test_a_certificate_from_another_ca_is_refused_in_the_handshake(self) -> Any:
        return self.refused_by_tls(self.certs.agent("rogue", "waf-1", ca=self.certs.rogue_ca))

    def test_a_reloaded_client_ca_applies_to_new_connections(self) -> Any:
        """SIGHUP rereads --client-ca: an agent of the new CA now registers."""
        with open(self.certs.client_ca_path, "wb") as f:
            f.write(self.certs.rogue_ca.certificate.public_bytes(_PEM))
        self.assertTrue(self.top.reloader.reload())
        return self.registers("waf-1", self.certs.agent("rogue", "waf-1", ca=self.certs.rogue_ca))


class TwistdAgentClientCertificateTests(TestCase):
    """C{twistd sentinel-agent --connect tls:...:certificate=...:privateKey=...}."""

    timeout = 40

    @inlineCallbacks
    def test_twistd_agent_presents_its_certificate(self) -> Generator[Any, Any, None]:
        certs = Certificates()
        self.addCleanup(certs.remove)
        top = make_listener(listener_options(certs), reactor)
        [service] = list(top)
        port = yield service.endpoint.listen(service.factory)
        self.addCleanup(port.stopListening)
        self.addCleanup(top.factory.pool.close_all)
        cert, key = certs.agent("edge", "edge-waf")
        rules = os.path.join(certs.dir, "rules.toml")
        with open(rules, "w") as f:
            f.write('[[rules]]\nid = "deny"\nmatch = { path = "^/deny" }\nblock = { status = 403 }\n')
        agent = Program(
            self, certs.dir, "sentinel-agent", "--agent-id", "edge-waf", "--rules", rules,
            "--connect", f"tls:localhost:{port.getHost().port}:trustRoots={certs.trust}:certificate={cert}:privateKey={key}",
            name="agent",
        )  # fmt: skip
        yield wait_until(lambda: "edge-waf" in top.factory.pool, "the agent to register", 20)
        denied = yield top.factory.pool.send_request_headers("edge-waf", headers("t1", "/deny"))
        self.assertEqual(denied.decision.status, 403)  # type: ignore[attr-defined]
        agent.kill()


class AdmissionOrderTests(SynchronousTestCase):
    """Where the certificate check sits among the registration checks."""

    def setUp(self) -> None:
        self.ca = CA("agents CA")
        _, self.waf1 = self.ca.issue("waf-1")

    def factory(self, **config: Any) -> ReverseConnectionFactory:
        return ReverseConnectionFactory(
            ReverseConnectionConfig(require_client_cert=True, **config),
            token_checker=StaticTokenChecker({"waf-1": "right", "waf-2": "right"}),
            clock=Clock(),
        )

    def admit(self, factory: ReverseConnectionFactory, agent_id: str, token: str | None, cert: Any) -> str:
        request = m.RegistrationRequest(
            protocol_version=2, agent_id=agent_id,
            capabilities=m.AgentCapabilities(agent_id=agent_id, name="a", version="1"), auth_token=token,
        )  # fmt: skip
        error = factory.admit(request, cert)
        return "ok" if error is None else f"{rejection_reason(error)}: {error}"

    def test_the_allowlist_comes_first(self) -> None:
        factory = self.factory(allowed_agents=["waf-1"])
        self.assertEqual(
            self.admit(factory, "bot", "right", None),
            "not_allowed: Invalid message format: Agent 'bot' is not in the allowed list",
        )

    def test_then_the_certificate_then_the_token(self) -> None:
        factory = self.factory(allowed_agents=["waf-*"], require_auth=True)
        self.assertEqual(
            self.admit(factory, "waf-2", "wrong", self.waf1),
            "client_certificate: Authentication failed: agent id 'waf-2' does not match "
            "the client certificate (CN=waf-1)",
        )
        self.assertEqual(
            self.admit(factory, "waf-1", None, None),
            "client_certificate: Authentication failed: agent 'waf-1' presented no client certificate",
        )
        self.assertEqual(
            self.admit(factory, "waf-1", "wrong", self.waf1),
            "auth_failed: Authentication failed: invalid token for agent 'waf-1'",
        )
        self.assertEqual(self.admit(factory, "waf-1", "right", self.waf1), "ok")
        self.assertEqual(factory.registered_connections("waf-1"), 1)
        self.assertEqual(factory.registered_connections("waf-2"), 0)

    def test_without_the_setting_certificates_are_not_consulted(self) -> None:
        factory = ReverseConnectionFactory(ReverseConnectionConfig(), clock=Clock())
        self.assertEqual(self.admit(factory, "waf-2", None, self.waf1), "ok")


class IdentityTests(SynchronousTestCase):
    def test_names_and_their_description(self) -> None:
        ca = CA("agents CA")
        _, cert = ca.issue("waf-1", dns=("a.example", "b.example"), uris=("spiffe://x/y",))
        names = CertificateNames.of(cert)
        for name in ("waf-1", "a.example", "b.example", "spiffe://x/y"):
            self.assertIn(name, names)
        self.assertNotIn("WAF-1", names)
        self.assertNotIn("c.example", names)
        self.assertEqual(names.describe(), "CN=waf-1, DNS:a.example, DNS:b.example, URI:spiffe://x/y")

    def test_long_and_odd_descriptions_are_shortened_and_cleaned(self) -> None:
        ca = CA("agents CA")
        _, cert = ca.issue("evil\nCN=admin", dns=tuple(f"n{i}.example" for i in range(10)))
        problem = identity_problem("waf-1", cert)
        self.assertEqual(
            problem,
            "agent id 'waf-1' does not match the client certificate (CN=evil?CN=admin, "
            "DNS:n0.example, DNS:n1.example, DNS:n2.example, DNS:n3.example, DNS:n4.example, and 5 more)",
        )

    def test_no_names_at_all(self) -> None:
        _, cert = CA("agents CA").issue(None)
        self.assertEqual(
            identity_problem("waf-1", cert),
            "agent id 'waf-1' does not match the client certificate (no subject names)",
        )


class OptionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.certs = Certificates()
        self.addCleanup(self.certs.remove)

    def test_the_options_go_together(self) -> None:
        for args in (["--require-client-cert"], ["--client-ca", self.certs.client_ca_path]):
            options = Options()
            error = self.assertRaises(
                usage.UsageError, options.parseOptions,
                ["--listen", "ssl:7443:privateKey=k.pem", *args, "--http", "none"],
            )  # fmt: skip
            self.assertIn("--require-client-cert and --client-ca FILE go together", str(error))

    def test_an_ssl_listener_is_needed(self) -> None:
        options = Options()
        error = self.assertRaises(
            usage.UsageError, options.parseOptions,
            ["--listen", "unix:/tmp/x.sock", "--require-client-cert", "--client-ca", "ca.pem"],
        )  # fmt: skip
        self.assertEqual(str(error), "--require-client-cert needs an ssl: --listen endpoint")

    def test_the_config_follows_the_flag(self) -> None:
        options = listener_options(self.certs)
        self.assertTrue(options["config"].require_client_cert)
        self.assertEqual(options["client-ca"], self.certs.client_ca_path)

    def test_an_unreadable_or_empty_ca_file_stops_the_start(self) -> None:
        options = listener_options(self.certs)
        options["client-ca"] = os.path.join(self.certs.dir, "missing.pem")
        error = self.assertRaises(StartupError, make_listener, options, Clock())
        self.assertIn("cannot read the client CA file", str(error))
        empty = os.path.join(self.certs.dir, "empty.pem")
        with open(empty, "w") as f:
            f.write("no certificate here\n")
        options["client-ca"] = empty
        error = self.assertRaises(StartupError, make_listener, options, Clock())
        self.assertEqual(str(error), f"--client-ca: the client CA file {empty} holds no PEM certificate")

    def test_bad_ssl_endpoints(self) -> None:
        from sentinel_twisted.proxy._identity import load_ca_certificates

        cas = load_ca_certificates(self.certs.client_ca_path)
        key = self.certs.server_key
        for description, text in [
            ("tcp:7443", "client certificates need an ssl: endpoint"),
            (f"ssl:7443:privateKey={key}:colour=blue", "unknown ssl: parameter(s): colour"),
            ("ssl:privateKey=x.pem", "an ssl: endpoint needs a port"),
            ("ssl:7443:privateKey=/no/such/key.pem", "cannot read /no/such/key.pem"),
            (f"ssl:7443:privateKey={key}:certKey={self.certs.server_cert}:sslmethod=NOPE", "unknown sslmethod 'NOPE'"),
        ]:
            error = self.assertRaises(ValueError, verifying_server_endpoint, Clock(), description, cas)
            self.assertIn(text, str(error), description)


class _Peer(Protocol):
    """A raw peer: writes C{first} on connecting, then only listens, and notes its end."""

    def __init__(self, first: bytes = b"") -> None:
        self.first = first
        self.received = b""
        self.gone = False

    def connectionMade(self) -> None:
        if self.first:
            assert self.transport is not None
            self.transport.write(self.first)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.gone = True


#: The start of a TLS record that announces a 512-byte ClientHello, and the
#: first bytes of it: the rest never comes.
_HALF_A_CLIENT_HELLO = b"\x16\x03\x01\x02\x00" + b"\x01\x00\x01\xfc\x03\x03" + bytes(32)


class UnfinishedTLSHandshakeTests(TestCase):
    """
    SPEC 3.2: a connection must register within the handshake timeout or be
    closed, on a TLS listener too: a client that never completes its TLS
    handshake is closed (and its socket released), not held open by the
    TLS layer.  Real sockets on 127.0.0.1; every wait is bounded.
    """

    timeout = 30
    handshake_timeout = 0.3

    @inlineCallbacks
    def setUp(self) -> Generator[Any, Any, None]:
        self.certs = Certificates()
        self.addCleanup(self.certs.remove)
        self.factory = ReverseConnectionFactory(
            ReverseConnectionConfig(handshake_timeout=self.handshake_timeout, close_grace=1), clock=reactor
        )
        endpoint = serverFromString(
            reactor,
            f"ssl:0:interface=127.0.0.1:privateKey={self.certs.server_key}:certKey={self.certs.server_cert}",
        )
        self.port = yield endpoint.listen(self.factory)
        self.addCleanup(self.port.stopListening)

    @inlineCallbacks
    def closed_in_time(self, peer: _Peer, tls: bool = False) -> Generator[Any, Any, None]:
        port = self.port.getHost().port
        endpoint: Any = (
            SSL4ClientEndpoint(reactor, "127.0.0.1", port, CertificateOptions())
            if tls
            else TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        )
        yield connectProtocol(endpoint, peer)
        self.addCleanup(lambda: None if peer.gone else peer.transport.abortConnection())  # type: ignore[union-attr]
        yield wait_until(lambda: self.factory.awaiting_registration == 1, "the connection to be accepted")
        # The handshake timeout, the close grace and much slack: a bound, not a measure.
        yield wait_until(lambda: peer.gone, "the proxy to close the connection", 10)
        self.assertEqual(self.factory.awaiting_registration, 0)
        self.assertEqual(dict(self.factory.rejections), {"handshake_timeout": 1})

    def test_a_client_that_sends_nothing_is_closed(self) -> Any:
        return self.closed_in_time(_Peer())

    def test_a_client_that_sends_half_a_client_hello_is_closed(self) -> Any:
        return self.closed_in_time(_Peer(_HALF_A_CLIENT_HELLO))

    @inlineCallbacks
    def test_a_client_past_the_tls_handshake_gets_the_refusal_then_is_closed(self) -> Generator[Any, Any, None]:
        peer = _Peer()
        yield self.closed_in_time(peer, tls=True)
        self.assertIn(b'"Timeout after 300ms"', peer.received)


class StalledAgentTLSHandshakeTests(TestCase):
    """
    Forward mode: the proxy dials an agent over TLS and the agent accepts
    but never answers the TLS handshake.  The dialled connection is closed
    at the handshake timeout (so its slot can be redialled), although its
    HandshakeRequest waits unsent in the TLS layer.
    """

    timeout = 30

    @inlineCallbacks
    def test_the_connection_is_closed_at_the_handshake_timeout(self) -> Generator[Any, Any, None]:
        certs = Certificates()
        self.addCleanup(certs.remove)
        agents: list[_Peer] = []

        def silent_agent() -> _Peer:
            agents.append(_Peer())
            return agents[-1]

        listening = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(silent_agent)
        )
        self.addCleanup(listening.stopListening)
        port = listening.getHost().port
        factory = ForwardConnectionFactory(
            AgentPool(),
            description=f"tls:127.0.0.1:{port}",
            config=ReverseConnectionConfig(handshake_timeout=0.3, close_grace=1),
            clock=reactor,
        )
        endpoint = clientFromString(reactor, f"tls:127.0.0.1:{port}:trustRoots={certs.trust}")
        protocol = yield endpoint.connect(factory)
        self.addCleanup(lambda: None if agents and agents[0].gone else protocol.transport.abortConnection())
        yield wait_until(lambda: agents and agents[0].gone, "the proxy to close the dialled connection", 10)
        yield wait_until(lambda: factory.failures, "the failure to be counted")
        self.assertEqual(dict(factory.failures), {"handshake_timeout": 1})


class _RecordingAgentFactory(ForwardAgentFactory):
    """A listening agent that notes every proxy that completed its handshake."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handshakes: list[Any] = []

    def connection_registered(self, protocol: Any) -> None:
        self.handshakes.append(protocol)


class DialledAgentCertificateTests(TestCase):
    """
    Forward mode over TLS: the proxy dials an agent whose certificate is
    signed by a CA the proxy trusts (C{trustRoots=}), and must name the host
    dialled in a subjectAltName.  Nothing, not even the HandshakeRequest,
    goes to an agent whose certificate does not; the failure is counted and
    logged with the C{tls} reason, and the agent never joins the pool.
    Real TLS sockets on 127.0.0.1, certificates made for the test.
    """

    timeout = 30

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="st-fwdtls-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.ca = CA("agents CA")
        self.trust = os.path.join(self.dir, "trust")
        os.mkdir(self.trust)
        with open(os.path.join(self.trust, "ca.pem"), "wb") as f:
            f.write(self.ca.certificate.public_bytes(_PEM))

    def certificate(self, common_name: str, ca: CA | None = None, **names: Any) -> tuple[str, str]:
        return write_pair(self.dir, common_name, *(ca or self.ca).issue(common_name, **names))

    @inlineCallbacks
    def listen(self, cert: tuple[str, str], factory: Any) -> Generator[Any, Any, int]:
        endpoint = serverFromString(
            reactor, f"ssl:0:interface=127.0.0.1:privateKey={cert[1]}:certKey={cert[0]}"
        )
        port = yield endpoint.listen(factory)
        self.addCleanup(port.stopListening)
        return port.getHost().port  # type: ignore[no-any-return]

    @inlineCallbacks
    def dial_once(self, cert: tuple[str, str], host: str = "localhost") -> Generator[Any, Any, Any]:
        """
        Dial a raw TLS peer with C{cert} once; return the factory, the pool,
        the peer (what it received) and the log, once the attempt failed.
        """
        peers: list[_Peer] = []

        def peer() -> _Peer:
            peers.append(_Peer())
            return peers[-1]

        port = yield self.listen(cert, Factory.forProtocol(peer))
        pool = AgentPool()
        factory = ForwardConnectionFactory(
            pool,
            description=f"tls:{host}:{port}",
            agent_id="waf",
            # Long enough that only the certificate check can end the
            # attempt in time.
            config=ReverseConnectionConfig(handshake_timeout=20, close_grace=1),
            clock=reactor,
        )
        endpoint = clientFromString(reactor, f"tls:{host}:{port}:trustRoots={self.trust}")
        with captured_log() as events:
            protocol = yield endpoint.connect(factory)
            self.addCleanup(lambda: None if protocol._transport_gone else protocol.transport.abortConnection())
            yield wait_until(lambda: factory.failures, "the dialled handshake to fail", 10)
            yield wait_until(lambda: peers and peers[0].gone, "the connection to be closed", 10)
        return factory, pool, peers[0], log_text(events)

    @inlineCallbacks
    def test_a_certificate_without_subject_alt_name_gets_nothing_and_is_refused(
        self,
    ) -> Generator[Any, Any, None]:
        # Signed by the trusted CA, and its common name is the host dialled.
        factory, pool, peer, text = yield self.dial_once(self.certificate("localhost"))
        self.assertEqual(peer.received, b"", "the proxy wrote to an agent it had not verified")
        self.assertEqual(dict(factory.failures), {"tls": 1})
        self.assertEqual(dict(pool.dial_failures), {"tls": 1})
        self.assertEqual(len(pool), 0)
        self.assertIn(
            "failed (tls): the agent's certificate has no subjectAltName (the common name is not used)",
            text,
        )

    @inlineCallbacks
    def test_a_certificate_for_another_host_is_refused_with_the_tls_reason(self) -> Generator[Any, Any, None]:
        factory, pool, peer, text = yield self.dial_once(self.certificate("other", dns=("other.example",)))
        self.assertEqual(peer.received, b"")
        self.assertEqual(dict(factory.failures), {"tls": 1})
        self.assertEqual(len(pool), 0)
        self.assertIn("failed (tls): the agent's certificate does not match localhost", text)
        self.assertNotIn("VerificationError", text)

    @inlineCallbacks
    def test_a_certificate_for_another_address_is_refused_with_the_tls_reason(
        self,
    ) -> Generator[Any, Any, None]:
        cert = self.certificate("other", ips=("127.0.0.2",))
        factory, pool, peer, text = yield self.dial_once(cert, host="127.0.0.1")
        self.assertEqual(peer.received, b"")
        self.assertEqual(dict(factory.failures), {"tls": 1})
        self.assertIn("failed (tls): the agent's certificate does not match 127.0.0.1", text)

    @inlineCallbacks
    def test_a_certificate_from_an_untrusted_ca_is_refused_with_the_tls_reason(
        self,
    ) -> Generator[Any, Any, None]:
        cert = self.certificate("localhost", ca=CA("another CA"), dns=("localhost",))
        factory, pool, peer, text = yield self.dial_once(cert)
        self.assertEqual(peer.received, b"")
        self.assertEqual(dict(factory.failures), {"tls": 1})
        self.assertIn("failed (tls): TLS handshake failed: certificate verify failed", text)

    @inlineCallbacks
    def serves(self, cert: tuple[str, str], host: str) -> Generator[Any, Any, None]:
        agent = _RecordingAgentFactory(AgentSettings(agent=Agent(), agent_id="waf-1"), reactor)
        port = yield self.listen(cert, agent)
        pool = AgentPool()
        service = pool.connect_agent(f"tls:{host}:{port}:trustRoots={self.trust}", "waf", clock=reactor)
        self.addCleanup(service.stopService)
        yield wait_until(lambda: "waf" in pool, "the dialled agent to join the pool", 10)
        answer = yield pool.send_request_headers("waf", headers("fwd-tls-1"))
        self.assertEqual(answer.decision, m.ALLOW)
        self.assertEqual(len(agent.handshakes), 1)
        self.assertEqual(dict(pool.dial_failures), {})

    def test_a_certificate_naming_the_host_dialled_serves(self) -> Any:
        return self.serves(self.certificate("localhost", dns=("localhost",)), "localhost")

    def test_a_certificate_naming_the_address_dialled_serves(self) -> Any:
        return self.serves(self.certificate("agent", ips=("127.0.0.1",)), "127.0.0.1")

    @inlineCallbacks
    def test_an_agent_without_subject_alt_name_never_joins_and_is_redialled(
        self,
    ) -> Generator[Any, Any, None]:
        agent = _RecordingAgentFactory(AgentSettings(agent=Agent(), agent_id="waf-1"), reactor)
        port = yield self.listen(self.certificate("localhost"), agent)
        pool = AgentPool()
        service = pool.connect_agent(
            f"tls:localhost:{port}:trustRoots={self.trust}",
            "waf",
            clock=reactor,
            config=ReverseConnectionConfig(handshake_timeout=20),
            retry_policy=lambda attempt: 0.05,
        )
        self.addCleanup(service.stopService)
        yield wait_until(lambda: pool.dial_failures["tls"] >= 3, "three refused attempts", 10)
        from service_identity import CertificateError

        self.flushLoggedErrors(CertificateError)
        self.assertEqual(agent.handshakes, [], "the agent got a HandshakeRequest")
        self.assertNotIn("waf", pool)
        self.assertEqual(set(pool.dial_failures), {"tls"})
        self.assertEqual(dict(service.factories[0].failures), dict(pool.dial_failures))


class TLSFailureTextTests(SynchronousTestCase):
    """L{tls_failure}: a TLS failure that ended a connection, in words."""

    def test_a_name_mismatch_names_the_host_dialled(self) -> None:
        from service_identity import VerificationError
        from service_identity.hazmat import DNS_ID, DNSMismatch, IPAddress_ID, IPAddressMismatch

        error = VerificationError(errors=[DNSMismatch(mismatched_id=DNS_ID("agent.example"))])
        self.assertEqual(tls_failure(error, "agent"), "the agent's certificate does not match agent.example")
        error = VerificationError(errors=[IPAddressMismatch(mismatched_id=IPAddress_ID("10.0.0.5"))])
        self.assertEqual(tls_failure(error, "agent"), "the agent's certificate does not match 10.0.0.5")

    def test_openssl_errors_give_their_reasons(self) -> None:
        from OpenSSL import SSL

        error = SSL.Error([("SSL routines", "", "certificate verify failed")])
        self.assertEqual(tls_failure(error, "agent"), "TLS handshake failed: certificate verify failed")
        self.assertEqual(
            tls_failure(error, "agent", handshake_done=True), "TLS error: certificate verify failed"
        )

    def test_certificate_text_is_bounded_and_escaped(self) -> None:
        from service_identity import CertificateError

        text = tls_failure(CertificateError("Invalid DNS pattern '\x1b[31m" + "a" * 500 + "'."), "agent")
        assert text is not None
        self.assertTrue(text.startswith("the agent's certificate cannot be checked: Invalid DNS pattern '\\x1b[31maaa"))
        self.assertNotIn("\x1b", text)
        self.assertLess(len(text), 200)

    def test_other_errors_are_not_tls_failures(self) -> None:
        self.assertIsNone(tls_failure(ConnectionError("reset"), "agent"))


class AgentSideUnfinishedTLSHandshakeTests(TestCase):
    """
    The agent's ends: a TLS connection whose handshake does not complete is
    closed at the agent's own timeout (it writes nothing before the TLS
    handshake, so nothing holds the close).
    """

    timeout = 30

    def setUp(self) -> None:
        self.certs = Certificates()
        self.addCleanup(self.certs.remove)
        self.settings = AgentSettings(agent=Agent(), agent_id="waf-1", registration_timeout=0.3, close_grace=1)

    @inlineCallbacks
    def test_dialling_a_proxy_that_stalls_tls(self) -> Generator[Any, Any, None]:
        proxies: list[_Peer] = []

        def silent_proxy() -> _Peer:
            proxies.append(_Peer())
            return proxies[-1]

        listening = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(silent_proxy)
        )
        self.addCleanup(listening.stopListening)
        endpoint = clientFromString(
            reactor, f"tls:127.0.0.1:{listening.getHost().port}:trustRoots={self.certs.trust}"
        )
        protocol = yield endpoint.connect(AgentClientFactory(self.settings, reactor))
        self.addCleanup(lambda: None if protocol.when_lost().called else protocol.transport.abortConnection())
        yield wait_until(lambda: proxies and proxies[0].gone, "the agent to close the connection", 10)

    @inlineCallbacks
    def listening_agent_closes(self, peer: _Peer) -> Generator[Any, Any, None]:
        factory = ForwardAgentFactory(self.settings, reactor, handshake_timeout=0.3)
        endpoint = serverFromString(
            reactor,
            f"ssl:0:interface=127.0.0.1:privateKey={self.certs.server_key}:certKey={self.certs.server_cert}",
        )
        port = yield endpoint.listen(factory)
        self.addCleanup(port.stopListening)
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), peer)
        self.addCleanup(lambda: None if peer.gone else peer.transport.abortConnection())  # type: ignore[union-attr]
        yield wait_until(lambda: peer.gone, "the agent to close the connection", 10)
        yield wait_until(lambda: not factory.connections, "the agent to forget the connection")

    def test_a_listening_agent_closes_a_silent_proxy(self) -> Any:
        return self.listening_agent_closes(_Peer())

    def test_a_listening_agent_closes_half_a_client_hello(self) -> Any:
        return self.listening_agent_closes(_Peer(_HALF_A_CLIENT_HELLO))
