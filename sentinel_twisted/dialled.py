"""
The old import path of L{sentinel_twisted.proxy.dialled} (forward mode
on the proxy side, the connections the proxy dials), kept so that
existing imports keep working: every name here is the same object as the
one in the new module.
"""

from __future__ import annotations

from .proxy.dialled import (
    MAX_HANDSHAKE_RESPONSE_SIZE,
    DialledAgentService,
    ForwardConnectionFactory,
    ForwardConnectionProtocol,
    HandshakeRefused,
    TLSFailed,
    default_retry_policy,
)
from .proxy.dialled import encoding_list as encoding_list
from .proxy.dialled import failure_reason as failure_reason
from .proxy.dialled import parse_agent_endpoint as parse_agent_endpoint

__all__ = [
    "MAX_HANDSHAKE_RESPONSE_SIZE",
    "DialledAgentService",
    "ForwardConnectionFactory",
    "ForwardConnectionProtocol",
    "HandshakeRefused",
    "TLSFailed",
    "default_retry_policy",
]
