# -*- test-case-name: tests.agent.test_tls_verification,tests.test_tls -*-
"""
Checking the identity of a TLS peer, and saying why a TLS connection
failed.

Twisted's client TLS options verify the server's name during the handshake,
but only a C{service_identity.VerificationError} stops it: a certificate
without any subjectAltName raises C{CertificateError}, which is logged with
a traceback and otherwise ignored, and the connection goes on.  So the name
check is done here, in OpenSSL's verification of the server's certificate,
where a failure fails the handshake with its reason: L{client_tls_options}
for connections we make the TLS options of (the gateway's upstream), and
L{check_server_name} for those an endpoint string made (an agent dialling a
proxy, a proxy dialling an agent).  Those two also check again, themselves,
once the handshake is done and before they write anything
(L{server_identity_error}).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import optionsForClientTLS
from twisted.python.failure import Failure
from zope.interface import implementer

from ._peertext import peer_text

__all__ = ["NoSubjectAltName", "check_server_name", "client_tls_options", "server_identity_error", "tls_failure"]

#: Characters of a certificate's own text (an invalid name in it) quoted.
_CERTIFICATE_TEXT = 100


def server_identity_error(transport: Any, role: str = "proxy") -> str | None:
    """
    Why the TLS server on C{transport} is not who we dialled, or C{None}
    if it is.  The name checked is the SNI name we sent (Twisted sends the
    dialled host name), or the peer's IP address when we dialled an address.
    Only subjectAltName entries count, never the subject's common name.

    @param role: what the server is, for the text (C{proxy}, C{agent}).
    """
    try:
        from service_identity import CertificateError, VerificationError
        from service_identity.pyopenssl import extract_patterns, verify_hostname, verify_ip_address
    except ImportError:  # pragma: no cover - service_identity is a dependency
        return f"service_identity is not installed, so the {role}'s certificate cannot be verified"
    try:
        connection = transport.getHandle()
        certificate = connection.get_peer_certificate()
        host, named = _dialled_host(connection, transport)
    except Exception as e:
        # Not a TLS connection we can inspect: nothing is verified.
        return f"the {role}'s certificate cannot be inspected: {e}"
    if certificate is None:
        return f"the {role} presented no certificate"
    try:
        if not extract_patterns(certificate):
            return f"the {role}'s certificate has no subjectAltName (the common name is not used)"
        if named:
            verify_hostname(connection, host)
        else:
            verify_ip_address(connection, host)
    except VerificationError:
        return f"the {role}'s certificate does not match {host}"
    except CertificateError as e:
        return f"the {role}'s certificate cannot be checked: {peer_text(e, _CERTIFICATE_TEXT)}"
    return None


def _dialled_host(connection: Any, transport: Any) -> tuple[str, bool]:
    """
    What the server's certificate must name, and whether it is a name: the
    SNI name sent on C{connection} (Twisted sends the dialled host name),
    else the address of the peer of C{transport}, the dialled address.

    @raise CertificateError: with neither an SNI name nor a transport.
    """
    name = connection.get_servername()
    if name:
        return name.decode("ascii"), True
    if transport is None:
        from service_identity import CertificateError

        raise CertificateError("no name or address to check the certificate against")
    return transport.getPeer().host, False


def check_server_name(transport: Any) -> None:
    """
    Have the TLS handshake on C{transport}, a client's that has not begun
    (call it from C{connectionMade}), fail unless the server's certificate
    names the host dialled in a subjectAltName: the name Twisted sends as
    SNI, or the peer's address when an address was dialled.  What the
    handshake fails with, L{tls_failure} puts in words.  Nothing happens
    on a transport without an OpenSSL connection, nor on one that does not
    verify the server's certificate at all (an C{ssl:} endpoint without
    C{caCertsDir=}, which Twisted's name check does not cover either).
    """
    from OpenSSL.SSL import VERIFY_FAIL_IF_NO_PEER_CERT, VERIFY_PEER, Connection

    handle = getattr(transport, "getHandle", None)
    connection = handle() if handle is not None else None
    if isinstance(connection, Connection) and connection.get_verify_mode() & VERIFY_PEER:
        # In place of Twisted's callback, as in _NamedServer below.
        connection.set_verify(VERIFY_PEER | VERIFY_FAIL_IF_NO_PEER_CERT, _name_check(transport, None))


class NoSubjectAltName(Exception):
    """The server's certificate has no subjectAltName (the common name is not used)."""


def tls_failure(error: BaseException, role: str, handshake_done: bool = False) -> str | None:
    """
    What a TLS failure that ended a connection means, in words (the
    certificate's name check, the TLS library's own reason), or C{None}
    when C{error} is not a TLS failure.

    @param role: what the peer is, for the text (C{proxy}, C{agent}).
    @param handshake_done: whether the TLS handshake had completed.
    """
    # Both come with Twisted's TLS extra, a dependency.
    from OpenSSL import SSL
    from service_identity import CertificateError, VerificationError

    if isinstance(error, NoSubjectAltName):
        return f"the {role}'s certificate has no subjectAltName (the common name is not used)"
    if isinstance(error, VerificationError):
        hosts = [_mismatched_name(mismatch) for mismatch in getattr(error, "errors", [])]
        named = [host for host in hosts if host]
        return f"the {role}'s certificate does not match {named[0] if named else 'the dialled name'}"
    if isinstance(error, CertificateError):
        return f"the {role}'s certificate cannot be checked: {peer_text(error, _CERTIFICATE_TEXT)}"
    if isinstance(error, SSL.Error):
        what = "TLS error" if handshake_done else "TLS handshake failed"
        return f"{what}: {_openssl_reason(error)}"
    return None


def _mismatched_name(mismatch: Any) -> str | None:
    """The name we dialled, from a C{service_identity} mismatch."""
    service_id = getattr(mismatch, "mismatched_id", None)
    hostname = getattr(service_id, "hostname", None)
    if isinstance(hostname, bytes):
        return hostname.decode("ascii", "replace")
    if hostname is not None:
        return str(hostname)
    ip = getattr(service_id, "ip", None)
    return None if ip is None else str(ip)


def _openssl_reason(error: BaseException) -> str:
    """
    C{certificate verify failed}: the reason of an C{OpenSSL.SSL.Error},
    whose argument is OpenSSL's error queue, a list of C{(library,
    function, reason)} triples from the first cause to the TLS layer's own
    verdict, the last one.
    """
    queue = error.args[0] if len(error.args) == 1 else None
    if isinstance(queue, list) and queue and isinstance(queue[-1], tuple) and queue[-1]:
        return peer_text(queue[-1][-1], _CERTIFICATE_TEXT)
    return peer_text(error, _CERTIFICATE_TEXT) or type(error).__name__


def client_tls_options(hostname: str, trust_root: Any = None) -> IOpenSSLClientConnectionCreator:
    """
    Twisted's C{optionsForClientTLS(hostname, trust_root)} (the platform's
    CAs by default), except that the server's certificate must name
    C{hostname} in a subjectAltName for the handshake to succeed.  Twisted's
    own check fails the handshake for a certificate that names another
    host, but one without any subjectAltName only makes it log a traceback:
    OpenSSL's verdict on the chain stands, and a certificate any trusted CA
    issued without one would be taken for any host.
    """
    return _NamedServer(optionsForClientTLS(hostname, trust_root), hostname)


@implementer(IOpenSSLClientConnectionCreator)
class _NamedServer:
    """The connections of C{options}, with the server's name checked by L{_name_check}."""

    def __init__(self, options: Any, hostname: str) -> None:
        from service_identity.hazmat import DNS_ID, IPAddress_ID

        self._options = options
        is_address = isIPAddress(hostname) or isIPv6Address(hostname)
        self._service_id = IPAddress_ID(hostname) if is_address else DNS_ID(hostname)

    def clientConnectionForTLS(self, tlsProtocol: Any) -> Any:
        from OpenSSL.SSL import VERIFY_FAIL_IF_NO_PEER_CERT, VERIFY_PEER

        connection = self._options.clientConnectionForTLS(tlsProtocol)
        # In place of Twisted's callback, which lets a certificate without
        # any subjectAltName through.
        connection.set_verify(VERIFY_PEER | VERIFY_FAIL_IF_NO_PEER_CERT, _name_check(tlsProtocol, self._service_id))
        return connection


def _name_check(tls_protocol: Any, service_id: Any) -> Any:
    """
    An OpenSSL verify callback: the chain as OpenSSL judged it, and the
    server's certificate (depth 0) naming C{service_id} (C{None}: the SNI
    name sent, or the peer's address without one).  A failed check fails
    the handshake, with the reason given to C{tls_protocol}.
    """
    from service_identity import CertificateError, VerificationError
    from service_identity.hazmat import DNS_ID, IPAddress_ID, verify_service_identity
    from service_identity.pyopenssl import extract_patterns

    # The protocol is held until the server's certificate is checked, not
    # for as long as the connection lives (it holds the connection).
    holding = [tls_protocol]

    def verify(connection: Any, certificate: Any, error: int, depth: int, ok: int) -> bool:
        if depth != 0:
            return bool(ok)
        protocol = holding.pop() if holding else None
        try:
            patterns = extract_patterns(certificate)
            if not patterns:
                raise NoSubjectAltName()
            wanted = service_id
            if wanted is None:
                host, named = _dialled_host(connection, protocol)
                wanted = DNS_ID(host) if named else IPAddress_ID(host)
            verify_service_identity(patterns, [wanted], [])
        except Exception as e:
            # Another host's (VerificationError), no subjectAltName at all
            # (NoSubjectAltName), or one the check cannot read: refused.
            # What cannot be read is the certificate's fault, told as such
            # (tls_failure bounds a CertificateError's text, which may quote
            # the certificate at length).
            if protocol is not None:
                reason = e
                if not isinstance(e, (CertificateError, VerificationError, NoSubjectAltName)):
                    reason = CertificateError(f"unreadable subjectAltName: {e}")
                protocol.failVerification(Failure(reason))
            return False
        return bool(ok)

    return verify
