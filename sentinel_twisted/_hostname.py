# -*- test-case-name: tests.gateway.test_target -*-
"""
What a C{Host} header value may be (RFC 9112 section 3.2, RFC 3986):
L{valid_host}, for the gateway and the status site alike.
"""

from __future__ import annotations

import re

__all__ = ["HOST", "PCT", "valid_host"]

#: A percent-encoded byte (RFC 3986 pct-encoded).
PCT = rb"%[0-9A-Fa-f]{2}"
#: host = IP-literal / IPv4address / reg-name; port = *DIGIT.  No userinfo,
#: and no ",": the gateway's X-Forwarded-Host is the Host (an absolute-form
#: target's authority, or what agrees with it), and a comma there would
#: make it a list of two hosts.
HOST = re.compile(rb"\A(?:\[[0-9A-Fa-f:.]+\]|(?:[A-Za-z0-9\-._~!$&'()*+;=]|" + PCT + rb")+)(?::[0-9]*)?\Z")


def valid_host(value: bytes) -> bool:
    """
    Whether a C{Host} header value is C{uri-host [ ":" port ]} (RFC 9112
    section 3.2, RFC 3986): a reg-name, an IPv4 address or a bracketed IP
    literal, and a port of digits.  Stricter than the RFC in two ways: an
    empty host is refused (nginx refuses it too), and so is a C{,} (never in
    a DNS name; it would split the X-Forwarded-Host made of it in two).
    """
    return HOST.match(value) is not None
