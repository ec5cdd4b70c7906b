"""
An C{https} upstream's certificate must chain to the trusted CAs and name
the URL's host in a subjectAltName.  Twisted's own check lets a certificate
without any subjectAltName through (logging a traceback); ours fails the
handshake before the request goes out.  Real TLS on 127.0.0.1, certificates
made for the test.
"""

from __future__ import annotations

import datetime
import os
import shutil
import tempfile
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID, NameOID
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.internet.testing import MemoryReactorClock
from twisted.python.usage import UsageError
from twisted.trial.unittest import TestCase
from twisted.web.http_headers import Headers

from sentinel_twisted.gateway.config import GatewayConfig
from sentinel_twisted.gateway.upstream import ForwardRequest, HTTPUpstream, UpstreamFailed
from sentinel_twisted.services import StartupError
from sentinel_twisted.tap import Options, add_gateway, make_listener

from .._proxy_support import captured_log, log_text
from ..test_tls import _PEM, CA, write_pair
from .support import Harness, listen_for, wait_until


class _Upstream(Protocol):
    """Records what reaches it; answers C{200 ok} to a request head."""

    def connectionMade(self) -> None:
        self.received = b""
        self.factory.seen.append(self)  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if b"\r\n\r\n" in self.received:
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")  # type: ignore[union-attr]


class _Body:
    """A response body's sink."""

    def __init__(self) -> None:
        self.data = b""
        self.ended = False

    def response_data(self, data: bytes) -> None:
        self.data += data

    def response_end(self, error: Any) -> None:
        self.ended = True


class UpstreamCertificateTests(TestCase):
    timeout = 20

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="st-uptls-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.ca = CA("upstream CA")
        self.trust = trustRootFromCertificates([Certificate.loadPEM(self.ca.certificate.public_bytes(_PEM))])

    async def request(
        self, common_name: str, pair: tuple[Any, x509.Certificate] | None = None, **names: Any
    ) -> tuple[Any, list[_Upstream], str]:
        """
        One request to an https upstream on localhost whose certificate the
        test's CA issued for C{common_name} and C{names} (or C{pair}'s, a key
        and certificate); returns the response or the failure, what the
        upstream received, and the log.
        """
        cert, key = write_pair(self.dir, "upstream", *(pair or self.ca.issue(common_name, **names)))
        factory = Factory.forProtocol(_Upstream)
        factory.seen = []  # type: ignore[attr-defined]
        port = await listen_for(self, factory, f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}")
        upstream = HTTPUpstream(reactor, f"https://localhost:{port.getHost().port}", trust_root=self.trust)
        # Before the port closes (clean-ups run last first).
        self.addCleanup(upstream.close)
        with captured_log() as events:
            try:
                outcome: Any = await upstream.forward(ForwardRequest(b"GET", b"/x", Headers({b"host": [b"localhost"]}), None))
            except UpstreamFailed as e:
                outcome = e
        return outcome, factory.seen, log_text(events)  # type: ignore[attr-defined]

    def test_a_certificate_naming_the_host_is_taken(self) -> Any:
        async def go() -> None:
            response, seen, _ = await self.request("localhost", dns=("localhost",))
            self.assertEqual(response.code, 200)
            self.assertIn(b"GET /x HTTP/1.1", seen[0].received)
            body = _Body()
            response.deliver(body)
            await wait_until(lambda: body.ended, what="the body")
            self.assertEqual(body.data, b"ok")

        return ensureDeferred(go())

    def test_a_certificate_without_subject_alt_name_gets_no_request(self) -> Any:
        # Issued by the trusted CA, its common name the host dialled: Twisted
        # alone would send the request, and log a traceback.
        async def go() -> None:
            failure, seen, text = await self.request("localhost")
            self.assertIsInstance(failure, UpstreamFailed)
            self.assertIn("the upstream's certificate has no subjectAltName (the common name is not used)", str(failure))
            self.assertEqual([p.received for p in seen], [b""] * len(seen))
            self.assertNotIn("while verifying certificate", text)

        return ensureDeferred(go())

    def test_a_certificate_for_another_host_gets_no_request(self) -> Any:
        async def go() -> None:
            failure, seen, _ = await self.request("other", dns=("other.example",))
            self.assertIsInstance(failure, UpstreamFailed)
            self.assertIn("the upstream's certificate does not match localhost", str(failure))
            self.assertEqual([p.received for p in seen], [b""] * len(seen))

        return ensureDeferred(go())

    def test_a_certificate_from_another_ca_gets_no_request(self) -> Any:
        async def go() -> None:
            self.ca, trusted = CA("another CA"), self.ca
            failure, seen, _ = await self.request("localhost", dns=("localhost",))
            self.assertIsInstance(failure, UpstreamFailed)
            self.assertIn("certificate verify failed", str(failure))
            self.assertEqual([p.received for p in seen], [b""] * len(seen))
            self.assertIsNot(trusted, self.ca)

        return ensureDeferred(go())

    def test_an_unreadable_subject_alt_name_is_told_as_such_in_few_words(self) -> Any:
        # A self-signed certificate (nobody's CA needed) whose subjectAltName
        # holds a 3000-byte "IP address": the name check cannot read it, and
        # the reason, which quotes it, is the certificate's and is bounded.
        async def go() -> None:
            failure, seen, _ = await self.request("", pair=_self_signed_with_san(b"\x87\x82\x0b\xb8" + b"A" * 3000))
            self.assertIsInstance(failure, UpstreamFailed)
            self.assertTrue(str(failure).startswith("the upstream's certificate cannot be checked: "), str(failure)[:200])
            self.assertLess(len(str(failure)), 300)
            self.assertEqual([p.received for p in seen], [b""] * len(seen))

        return ensureDeferred(go())


def _self_signed_with_san(general_names: bytes) -> tuple[Any, x509.Certificate]:
    """A key and a certificate signed by it whose subjectAltName's DER
    SEQUENCE holds C{general_names}, encoded or not."""
    size = len(general_names)
    value = b"\x30\x82" + size.to_bytes(2, "big") + general_names
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, value), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, certificate


class UpstreamCATests(TestCase):
    """
    C{--upstream-ca FILE}: an https upstream whose certificate a private CA
    issued is reached through the program, with that CA and only with it.
    """

    timeout = 20

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="st-upca-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.ca = CA("private upstream CA")
        self.ca_path = os.path.join(self.dir, "ca.pem")
        with open(self.ca_path, "wb") as f:
            f.write(self.ca.certificate.public_bytes(_PEM))

    async def through_the_program(self, *argv: str, scheme: str = "https") -> tuple[Any, list[_Upstream]]:
        cert, key = write_pair(self.dir, "upstream", *self.ca.issue("localhost", dns=("localhost",)))
        factory = Factory.forProtocol(_Upstream)
        factory.seen = []  # type: ignore[attr-defined]
        port = await listen_for(self, factory, f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}")
        h = await Harness(self).start("--upstream", f"{scheme}://localhost:{port.getHost().port}", *argv)
        await h.agent("waf")
        return await h.get("/x"), factory.seen  # type: ignore[attr-defined]

    def test_the_private_ca_lets_the_request_through(self) -> Any:
        async def go() -> None:
            response, seen = await self.through_the_program("--upstream-ca", self.ca_path)
            self.assertEqual((response.code, response.body), (200, b"ok"))
            self.assertIn(b"GET /x HTTP/1.1", seen[0].received)

        return ensureDeferred(go())

    def test_an_upstream_in_upper_case_too(self) -> Any:
        # A scheme is case-insensitive: HTTPS:// was refused as not https.
        async def go() -> None:
            response, seen = await self.through_the_program("--upstream-ca", self.ca_path, scheme="HTTPS")
            self.assertEqual((response.code, response.body), (200, b"ok"))
            self.assertIn(b"GET /x HTTP/1.1", seen[0].received)

        return ensureDeferred(go())

    def test_without_it_the_system_cas_refuse_the_upstream(self) -> Any:
        async def go() -> None:
            with captured_log():
                response, seen = await self.through_the_program()
            self.assertEqual(response.code, 502)
            self.assertEqual([p.received for p in seen], [b""] * len(seen))

        return ensureDeferred(go())

    def test_only_with_an_https_upstream(self) -> None:
        for argv in (["--upstream", "http://localhost:8080"], []):
            with self.subTest(argv=argv):
                with self.assertRaises(UsageError) as raised:
                    Options().parseOptions(["--upstream-ca", self.ca_path, *argv])
                self.assertIn("--upstream-ca is for an https:// --upstream", str(raised.exception))

    def test_an_unreadable_file_stops_the_start_in_one_line(self) -> None:
        empty = os.path.join(self.dir, "empty.pem")
        open(empty, "wb").close()
        for path, words in ((os.path.join(self.dir, "missing.pem"), "cannot read the upstream CA file"), (empty, "holds no PEM certificate")):
            with self.subTest(path=path):
                options = Options()
                options.parseOptions(
                    ["--listen", f"unix:{self.dir}/a.sock", "--upstream", "https://localhost", "--upstream-ca", path]
                )
                top = make_listener(options, MemoryReactorClock())
                with self.assertRaises(StartupError) as raised:
                    add_gateway(top, options, MemoryReactorClock())
                self.assertTrue(str(raised.exception).startswith("--upstream-ca: "), str(raised.exception))
                self.assertIn(words, str(raised.exception))

    def test_another_error_is_not_put_down_to_it(self) -> None:
        # Without --upstream-ca, a ValueError building the gateway is a bug
        # to show as such, not a line about a file nobody gave.
        import sentinel_twisted.gateway.service as gateway_service

        def broken(*args: Any, **kwargs: Any) -> None:
            raise ValueError("a bug")

        self.patch(gateway_service, "Gateway", broken)
        options = Options()
        options.parseOptions(["--listen", f"unix:{self.dir}/a.sock", "--upstream", "https://localhost"])
        top = make_listener(options, MemoryReactorClock())
        with self.assertRaises(ValueError) as raised:
            add_gateway(top, options, MemoryReactorClock())
        self.assertNotIsInstance(raised.exception, StartupError)
        self.assertEqual(str(raised.exception), "a bug")

    def test_the_library_config_refuses_it_without_https(self) -> None:
        with self.assertRaises(ValueError):
            GatewayConfig(upstream="http://localhost", upstream_ca=self.ca_path)
        with self.assertRaises(ValueError):
            GatewayConfig(upstream_ca=self.ca_path)
