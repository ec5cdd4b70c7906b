"""
The proxy side of the Sentinel Agent Protocol v2: the listener's policy
and registration for agents that dial in (reverse mode,
L{ReverseConnectionFactory}), the connections the proxy dials to agents
that listen (forward mode, L{DialledAgentService}), and the pool that
holds both kinds and sends them events (L{AgentPool}).  For example::

    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString
    from sentinel_twisted.proxy import (
        AgentPool,
        ReverseConnectionConfig,
        ReverseConnectionFactory,
    )

    pool = AgentPool()
    factory = ReverseConnectionFactory(ReverseConnectionConfig(), pool)
    serverFromString(reactor, "unix:sentinel-reverse.sock").listen(factory)
    pool.connect_agent("unix:/run/waf-agent.sock", agent_id="waf")
"""

from __future__ import annotations

from .auth import ITokenChecker, StaticTokenChecker, TokenFileChecker, TokenFileError
from .config import AgentAllowlist, AllowFileError, ReverseConnectionConfig
from .connection import AgentConnection, ConnectionInfo
from .dialled import DialledAgentService, HandshakeRefused
from .factory import Rejection, ReverseConnectionFactory, rejection_reason
from .pending import PendingTable
from .pool import AgentInfo, AgentPool, IAgentPoolObserver, PoolObserver
from .protocol import ReverseConnectionProtocol

__all__ = [
    "AgentAllowlist",
    "AgentConnection",
    "AgentInfo",
    "AgentPool",
    "AllowFileError",
    "ConnectionInfo",
    "DialledAgentService",
    "HandshakeRefused",
    "IAgentPoolObserver",
    "ITokenChecker",
    "PendingTable",
    "PoolObserver",
    "Rejection",
    "ReverseConnectionConfig",
    "ReverseConnectionFactory",
    "ReverseConnectionProtocol",
    "StaticTokenChecker",
    "TokenFileChecker",
    "TokenFileError",
    "rejection_reason",
]
