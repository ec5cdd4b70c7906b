# -*- test-case-name: tests.test_tls -*-
"""
Agent identity from TLS client certificates.

With C{--require-client-cert}, the listener's C{ssl:} endpoints demand a
client certificate signed by the configured CA (the TLS handshake fails
without one), and a registering agent's C{agent_id} must be one of the
names the certificate was issued for: a subjectAltName DNS name or URI, or
the subject's common name.  A valid certificate for C{waf-1} therefore
cannot register as C{waf-2}.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, ISSLTransport
from zope.interface import implementer

__all__ = [
    "CertificateNames",
    "SwappableTrust",
    "client_certificate",
    "identity_problem",
    "load_ca_certificates",
    "verifying_server_endpoint",
]

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL)
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SHOWN_NAMES = 6

#: The parameters Twisted's own C{ssl:} server endpoint parser takes.
_SSL_PARAMETERS = frozenset(
    {"port", "privateKey", "certKey", "sslmethod", "interface", "backlog", "extraCertChain", "dhParameters"}
)


class CertificateNames:
    """The names a certificate was issued for."""

    def __init__(self, common_names: list[str], dns_names: list[str], uris: list[str]) -> None:
        self.common_names = common_names
        self.dns_names = dns_names
        self.uris = uris

    @classmethod
    def of(cls, certificate: Any) -> CertificateNames:
        """
        The names of a pyOpenSSL C{X509} (what C{getPeerCertificate()}
        returns) or a C{cryptography} certificate.
        """
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        if hasattr(certificate, "to_cryptography"):
            certificate = certificate.to_cryptography()
        common_names = [
            str(a.value) for a in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        ]
        try:
            san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return cls(common_names, [], [])
        return cls(
            common_names,
            list(san.get_values_for_type(x509.DNSName)),
            list(san.get_values_for_type(x509.UniformResourceIdentifier)),
        )

    def __contains__(self, name: object) -> bool:
        return name in self.dns_names or name in self.uris or name in self.common_names

    def describe(self) -> str:
        """C{CN=waf-1, DNS:waf-1.example, URI:spiffe://...}, shortened."""
        parts = (
            [f"CN={n}" for n in self.common_names]
            + [f"DNS:{n}" for n in self.dns_names]
            + [f"URI:{n}" for n in self.uris]
        )
        if not parts:
            return "no subject names"
        shown = ", ".join(_UNPRINTABLE.sub("?", p) for p in parts[:_SHOWN_NAMES])
        if len(parts) > _SHOWN_NAMES:
            shown += f", and {len(parts) - _SHOWN_NAMES} more"
        return shown


def client_certificate(transport: Any) -> Any:
    """
    The client certificate of a TLS transport, else C{None}.

    Only the TLS options make it trustworthy: the listener's C{ssl:}
    endpoints (L{verifying_server_endpoint}) end the handshake unless the
    certificate verifies against the trusted CAs, so a certificate seen
    here was signed by one of them.  An embedding program that sets
    C{require_client_cert} must give its TLS endpoints such options too.
    """
    if transport is None or not ISSLTransport.providedBy(transport):
        return None
    try:
        return transport.getPeerCertificate()
    except Exception:
        return None


def identity_problem(agent_id: str, certificate: Any) -> str | None:
    """
    Why C{certificate} does not let its holder register as C{agent_id}, or
    C{None} if it does.
    """
    if certificate is None:
        return f"agent '{agent_id}' presented no client certificate"
    try:
        names = CertificateNames.of(certificate)
    except Exception as e:
        # A certificate the CA signed but that cryptography cannot read
        # (a malformed extension): it proves nothing, so refuse.
        return f"the client certificate of agent '{agent_id}' cannot be read ({e})"
    if agent_id in names:
        return None
    return f"agent id '{agent_id}' does not match the client certificate ({names.describe()})"


def load_ca_certificates(path: str, what: str = "client CA file") -> list[Any]:
    """
    The certificates of a PEM file (one or more CA certificates), as
    L{twisted.internet.ssl.Certificate}s.

    @param what: what the file is, for the errors.
    @raise ValueError: if the file cannot be read or holds none.
    """
    from twisted.internet import ssl

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"cannot read the {what} {path}: {e.strerror or e}") from None
    blocks = _PEM.findall(data)
    if not blocks:
        raise ValueError(f"the {what} {path} holds no PEM certificate")
    try:
        return [ssl.Certificate.loadPEM(block) for block in blocks]
    except Exception as e:
        raise ValueError(f"the {what} {path} holds a certificate that cannot be loaded: {e}") from None


@implementer(IOpenSSLServerConnectionCreator)
class SwappableTrust:
    """
    The TLS options of a listener that verifies client certificates, with
    CAs that can be replaced while it listens (SIGHUP): each new
    connection is verified against the CAs of the moment; connections
    already made are not touched.

    @param make: builds the C{CertificateOptions} for a list of CA
        certificates.
    """

    def __init__(self, make: Callable[[list[Any]], Any], ca_certificates: list[Any]) -> None:
        self._make = make
        self.options = make(ca_certificates)

    def set_ca_certificates(self, ca_certificates: list[Any]) -> None:
        """Verify new connections against C{ca_certificates} from now on."""
        self.options = self._make(ca_certificates)

    def serverConnectionForTLS(self, protocol: Any) -> Any:
        return self.options.serverConnectionForTLS(protocol)

    def getContext(self) -> Any:
        return self.options.getContext()


def verifying_server_endpoint(reactor: Any, description: str, ca_certificates: list[Any]) -> Any:
    """
    An C{ssl:} server endpoint like Twisted's own (same parameters), whose
    TLS handshake requires a client certificate signed by one of
    C{ca_certificates}.

    @raise ValueError: for a description that is not an C{ssl:} endpoint
        or whose parameters are wrong, and for unreadable key files.
    """
    from twisted.internet import ssl
    from twisted.internet.endpoints import SSL4ServerEndpoint
    from twisted.python.filepath import FilePath

    from ..endpoints import parse_description

    args, kwargs = parse_description(description)
    if args[0] != "ssl":
        raise ValueError(f"client certificates need an ssl: endpoint, not {args[0]}:")
    unknown = set(kwargs) - _SSL_PARAMETERS
    if unknown:
        raise ValueError(f"unknown ssl: parameter(s): {', '.join(sorted(unknown))}")
    positional = args[1:]
    if len(positional) > 1 or (positional and "port" in kwargs):
        raise ValueError("an ssl: endpoint takes one port")
    port = kwargs.get("port", positional[0] if positional else None)
    if port is None:
        raise ValueError("an ssl: endpoint needs a port")
    private_key = kwargs.get("privateKey", "server.pem")
    cert_key = kwargs.get("certKey", private_key)
    try:
        private = ssl.PrivateCertificate.loadPEM(
            FilePath(cert_key).getContent() + b"\n" + FilePath(private_key).getContent()
        )
        chain = None
        if "extraCertChain" in kwargs:
            pems = _PEM.findall(FilePath(kwargs["extraCertChain"]).getContent())
            if not pems:
                raise ValueError(f"the chain file {kwargs['extraCertChain']} holds no PEM certificate")
            chain = [ssl.Certificate.loadPEM(pem).original for pem in pems]
        dh = None
        if "dhParameters" in kwargs:
            dh = ssl.DiffieHellmanParameters.fromFile(FilePath(kwargs["dhParameters"]))
    except OSError as e:
        raise ValueError(f"cannot read {e.filename}: {e.strerror}") from None
    extra: dict[str, Any] = {}
    if "sslmethod" in kwargs:
        from OpenSSL import SSL

        method = getattr(SSL, kwargs["sslmethod"], None)
        if not isinstance(method, int):
            raise ValueError(f"unknown sslmethod {kwargs['sslmethod']!r}")
        extra["method"] = method

    def options(cas: list[Any]) -> Any:
        return ssl.CertificateOptions(
            privateKey=private.privateKey.original,
            certificate=private.original,
            extraCertChain=chain,
            dhParameters=dh,
            # A trust root makes the server ask for a client certificate,
            # require one, and verify it against these CAs.
            trustRoot=ssl.trustRootFromCertificates(cas),
            **extra,
        )

    return SSL4ServerEndpoint(
        reactor,
        int(port),
        SwappableTrust(options, ca_certificates),
        backlog=int(kwargs.get("backlog", 50)),
        interface=kwargs.get("interface", ""),
    )
