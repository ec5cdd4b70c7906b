"""
An agent dialling C{tls:} sends nothing, above all not its token, before the
proxy's certificate has been verified for the host it dialled.
"""

from __future__ import annotations

import datetime
import os
import tempfile

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer, reactor, ssl, task
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.trial.unittest import TestCase

from sentinel_twisted.agent import Agent, AgentConnector
from sentinel_twisted.proxy.config import ReverseConnectionConfig
from sentinel_twisted.proxy.factory import ReverseConnectionFactory

from .._proxy_support import captured_log, log_text


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificates(directory: str, server_name: str, san: bool = True) -> tuple[str, str, str]:
    """A CA, and a server certificate it signs for C{server_name}."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("test CA"))
        .issuer_name(_name("test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(server_name))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if san:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(server_name)]), critical=False
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    pem = serialization.Encoding.PEM
    ca_path = os.path.join(directory, "ca.pem")
    with open(ca_path, "wb") as f:
        f.write(ca.public_bytes(pem))
    server_path = os.path.join(directory, "server.pem")
    with open(server_path, "wb") as f:
        f.write(
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
            + cert.public_bytes(pem)
        )
    return ca_path, server_path, server_name


class TLSVerificationTests(TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def _dial(self, server_name: str, san: bool = True):  # type: ignore[no-untyped-def]
        directory = tempfile.mkdtemp()
        ca_path, server_path, _ = _certificates(directory, server_name, san)
        with open(server_path, "rb") as f:
            server_options = ssl.PrivateCertificate.loadPEM(f.read()).options()
        factory = ReverseConnectionFactory(ReverseConnectionConfig())
        port = yield SSL4ServerEndpoint(reactor, 0, server_options, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        received: list[str] = []
        original = factory.admit

        def spy(request):  # type: ignore[no-untyped-def]
            received.append(request.auth_token)
            return original(request)

        factory.admit = spy  # type: ignore[method-assign]
        connector = AgentConnector(
            Agent(),
            f"tls:localhost:{port.getHost().port}:trustRoots={directory}",
            "waf-1",
            auth_token="secret-token-123",
        )
        connector.startService()
        self.addCleanup(connector.stopService)
        for _ in range(150):
            if received or connector.registered_count:
                break
            yield task.deferLater(reactor, 0.02, lambda: None)
        return received, connector

    @defer.inlineCallbacks
    def test_the_right_certificate_registers(self):  # type: ignore[no-untyped-def]
        received, connector = yield self._dial("localhost")
        self.assertEqual(received, ["secret-token-123"])

    @defer.inlineCallbacks
    def test_a_certificate_for_another_host_gets_no_registration_and_no_token(self):  # type: ignore[no-untyped-def]
        with captured_log() as events:
            received, connector = yield self._dial("wronghost")
            yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(received, [], "the agent sent its registration to an unverified proxy")
        self.assertEqual(connector.registered_count, 0)
        text = log_text(events)
        self.assertIn("Registration failed: the proxy's certificate does not match localhost", text)
        self.assertNotIn("VerificationError", text)

    @defer.inlineCallbacks
    def test_a_certificate_without_subject_alt_name_gets_no_registration(self):  # type: ignore[no-untyped-def]
        # Signed by the trusted CA; Twisted alone would log a traceback and
        # complete the handshake.
        with captured_log() as events:
            received, connector = yield self._dial("localhost", san=False)
            yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(received, [], "the agent sent its registration to an unverified proxy")
        self.assertEqual(connector.registered_count, 0)
        self.assertIn(
            "Registration failed: the proxy's certificate has no subjectAltName (the common name is not used)",
            log_text(events),
        )
