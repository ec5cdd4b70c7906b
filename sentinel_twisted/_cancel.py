# -*- test-case-name: tests.test_layout -*-
"""
The reasons a request is cancelled, below both the messages (the Cancel
frame's C{reason}) and the errors (L{RequestCancelled
<sentinel_twisted.errors.RequestCancelled>} names its reason), so that
neither of those has to import the other.  Users import it from
L{sentinel_twisted.messages}.
"""

from __future__ import annotations

import enum


class CancelReason(enum.IntEnum):
    """
    C{reason} of a Cancel frame (the reference's enum discriminants).

    @cvar CLIENT_DISCONNECT: the client went away.
    @cvar TIMEOUT: the agent did not answer in time.
    @cvar BLOCKED_BY_AGENT: another agent blocked the request.
    @cvar UPSTREAM_ERROR: the upstream failed.
    @cvar PROXY_SHUTDOWN: the proxy is shutting down.
    @cvar MANUAL: cancelled by an operator or by code.
    """

    CLIENT_DISCONNECT = 0
    TIMEOUT = 1
    BLOCKED_BY_AGENT = 2
    UPSTREAM_ERROR = 3
    PROXY_SHUTDOWN = 4
    MANUAL = 5
