"""
RequestHeaders metadata taken from the real request, over plain TCP and TLS.
"""

from __future__ import annotations

import datetime
import os
import re
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.trial.unittest import TestCase

from .support import REQUEST_HEADERS, Harness, RawClient, _OneShot, wait_until

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")


def self_signed(directory: str, name: str) -> tuple[str, bytes]:
    """A key and certificate for C{name} in one PEM file; returns (path, cert PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path = os.path.join(directory, "server.pem")
    with open(path, "wb") as f:
        f.write(key_pem + cert_pem)
    return path, cert_pem


class MetadataTests(TestCase):
    timeout = 20

    def test_metadata_from_a_plain_request(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            agent = await h.agent("waf")
            trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            client = await h.raw(
                b"GET /api/items?id=42 HTTP/1.1\r\nHost: shop.example:8443\r\n"
                b"X-Request-Id: req-1\r\ntraceparent: " + trace.encode() + b"\r\n"
                b"Cookie: a=1\r\nCookie: b=2\r\n\r\n"
            )
            await wait_until(lambda: b"upstream saw" in client.received, what="the response")
            (event,) = agent.of_type(REQUEST_HEADERS)
            metadata = event["metadata"]
            self.assertEqual(event["correlation_id"], metadata["correlation_id"])
            self.assertEqual(event["method"], "GET")
            self.assertEqual(event["uri"], "/api/items?id=42")
            self.assertEqual(event["headers"]["cookie"], ["a=1", "b=2"])
            self.assertEqual(event["headers"]["host"], ["shop.example:8443"])
            self.assertEqual(metadata["client_ip"], "127.0.0.1")
            self.assertEqual(metadata["client_port"], client.transport.getHost().port)
            self.assertEqual(metadata["server_name"], "shop.example")
            self.assertEqual(metadata["protocol"], "HTTP/1.1")
            self.assertEqual(metadata["request_id"], "req-1")
            self.assertEqual(metadata["traceparent"], trace)
            self.assertIsNone(metadata["tls_version"])
            self.assertIsNone(metadata["tls_cipher"])
            self.assertRegex(metadata["timestamp"], RFC3339)

        return ensureDeferred(go())

    def test_without_traceparent_or_request_id(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()
            agent = await h.agent("waf")
            client = await h.raw(b"GET / HTTP/1.0\r\nHost: [::1]:80\r\n\r\n")
            await client.lost
            self.assertIn(b"upstream saw /", client.received)
            (event,) = agent.of_type(REQUEST_HEADERS)
            metadata = event["metadata"]
            self.assertNotIn("traceparent", metadata)
            self.assertEqual(metadata["request_id"], metadata["correlation_id"])
            self.assertEqual(metadata["protocol"], "HTTP/1.0")
            self.assertEqual(metadata["server_name"], "::1")

        return ensureDeferred(go())

    def test_metadata_over_tls_names_version_cipher_and_sni(self) -> Any:
        async def go() -> None:
            harness = Harness(self)
            pem, cert_pem = self_signed(harness.dir, "sni.example")
            h = await harness.start(http=f"ssl:0:interface=127.0.0.1:privateKey={pem}:certKey={pem}")
            agent = await h.agent("waf")
            client = RawClient()
            h.raw_clients.append(client)
            endpoint = wrapClientTLS(
                optionsForClientTLS("sni.example", trustRoot=Certificate.loadPEM(cert_pem)),
                TCP4ClientEndpoint(reactor, "127.0.0.1", h.http_port),
            )
            await endpoint.connect(_OneShot(client))
            client.transport.write(b"GET /secure HTTP/1.1\r\nHost: other.example\r\n\r\n")
            await wait_until(lambda: b"upstream saw /secure" in client.received, what="the response")
            (event,) = agent.of_type(REQUEST_HEADERS)
            metadata = event["metadata"]
            self.assertIn(metadata["tls_version"], ("TLSv1.2", "TLSv1.3"))
            self.assertTrue(metadata["tls_cipher"])
            self.assertEqual(metadata["server_name"], "sni.example")
            (seen,) = h.upstream.requests
            self.assertEqual(seen["headers"]["x-forwarded-proto"], ["https"])
            self.assertEqual(seen["headers"]["x-forwarded-host"], ["other.example"])

        return ensureDeferred(go())
