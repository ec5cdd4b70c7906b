# -*- test-case-name: tests.agent.test_tls_verification -*-
"""
Checking the identity of a TLS peer after the handshake.

Twisted's client TLS options verify the server's name during the handshake,
but only a C{service_identity.VerificationError} stops it: a certificate
without any subjectAltName raises C{CertificateError}, which is logged and
otherwise ignored, and the connection goes on.  An agent must not send its
token to a proxy it has not verified, so it checks again, itself, before
it writes anything.
"""

from __future__ import annotations

from typing import Any

__all__ = ["server_identity_error"]


def server_identity_error(transport: Any) -> str | None:
    """
    Why the TLS server on C{transport} is not who we dialled, or C{None}
    if it is.  The name checked is the SNI name we sent (Twisted sends the
    dialled host name), or the peer's IP address when we dialled an address.
    """
    try:
        from service_identity import CertificateError, VerificationError
        from service_identity.pyopenssl import verify_hostname, verify_ip_address
    except ImportError:  # pragma: no cover - service_identity is a dependency
        return "service_identity is not installed, so the proxy's certificate cannot be verified"
    connection = transport.getHandle()
    if connection.get_peer_certificate() is None:
        return "the proxy presented no certificate"
    name = connection.get_servername()
    try:
        if name:
            verify_hostname(connection, name.decode("ascii"))
        else:
            verify_ip_address(connection, transport.getPeer().host)
    except (CertificateError, VerificationError) as e:
        return f"the proxy's certificate does not match {name.decode('ascii') if name else transport.getPeer().host}: {e}"
    return None
