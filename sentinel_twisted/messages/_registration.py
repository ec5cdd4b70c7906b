# -*- test-case-name: tests.test_messages -*-
"""
Registration: the agent's capabilities, its RegistrationRequest and the
proxy's RegistrationResponse.
"""

from __future__ import annotations

from typing import Any

from msgspec import Struct, field

from ._types import U32, U64, EventType, check_u64


class AgentFeatures(Struct, kw_only=True):
    """
    C{capabilities.features}; every field is required on the wire.

    @ivar streaming_body: the agent inspects bodies chunk by chunk.
    @ivar websocket: the agent inspects WebSocket frames.
    @ivar guardrails: the agent answers GuardrailInspect events.
    @ivar config_push: the agent accepts Configure events.
    @ivar metrics_export: the agent can export metrics.
    @ivar concurrent_requests: how many requests the agent handles at once.
    @ivar cancellation: the agent understands Cancel frames.
    @ivar flow_control: the agent may send FlowControl (pause, resume).
    @ivar health_reporting: the agent sends HealthStatus frames.
    """

    streaming_body: bool = False
    websocket: bool = False
    guardrails: bool = False
    config_push: bool = False
    metrics_export: bool = False
    concurrent_requests: U32 = 1
    cancellation: bool = False
    flow_control: bool = False
    health_reporting: bool = False


class AgentLimits(Struct, kw_only=True):
    """
    C{capabilities.limits}; every field is required on the wire.

    @ivar max_body_size: the most body bytes the agent inspects; the
        gateway answers C{413} to a longer body the agent asked to see.
    @ivar max_concurrency: events the agent handles at once per connection.
    @ivar preferred_chunk_size: the size of the body chunks it is sent.
    """

    max_body_size: U64 = 10 * 1024 * 1024
    max_concurrency: U32 = 100
    preferred_chunk_size: U64 = 64 * 1024

    def __post_init__(self) -> None:
        check_u64(self, 'max_body_size', 'preferred_chunk_size')


class AgentCapabilities(Struct, kw_only=True):
    """
    What an agent announces in its RegistrationRequest: who it is, which
    events it wants (C{supported_events}, numbers of L{EventType}), its
    features and its limits.  Kept on its L{AgentConnection
    <sentinel_twisted.proxy.connection.AgentConnection>} as C{capabilities}.

    @ivar agent_id: the agent's id (as in its RegistrationRequest).
    @ivar name: a human-readable name of the agent.
    @ivar version: the agent's own software version.
    @ivar supported_events: the L{EventType} numbers the agent wants to be
        sent; only C{request_headers} when absent.
    @ivar features: what the agent can do (L{AgentFeatures}).
    @ivar limits: how much the agent takes (L{AgentLimits}).
    """

    agent_id: str
    name: str
    version: str
    supported_events: list[int] = field(default_factory=lambda: [1])
    features: AgentFeatures = field(default_factory=AgentFeatures)
    limits: AgentLimits = field(default_factory=AgentLimits)

    @property
    def events(self) -> frozenset[EventType]:
        """The known event types the agent handles (unknown numbers are ignored)."""
        events = frozenset(EventType(n) for n in self.supported_events if 0 <= n <= 7)
        # At most 256 distinct sets exist; sharing them saves every registered
        # connection its own copy (a five-element frozenset is 728 bytes).
        return _EVENT_SETS.setdefault(events, events)


_EVENT_SETS: dict[frozenset[EventType], frozenset[EventType]] = {}


class RegistrationRequest(Struct, kw_only=True):
    """
    The first frame of an agent connection (HandshakeRequest).  Its C{repr}
    never shows the token.

    @ivar protocol_version: must be L{PROTOCOL_VERSION}.
    @ivar auth_token: checked by the listener's
        L{ITokenChecker <sentinel_twisted.proxy.auth.ITokenChecker>}, if any.
    @ivar metadata: any JSON the agent sends; shown on the status site.
    @ivar agent_id: the agent's id; the pool keeps its connections under it.
    @ivar capabilities: what the agent wants and can do
        (L{AgentCapabilities}).
    """

    protocol_version: int
    agent_id: str
    capabilities: AgentCapabilities
    auth_token: str | None = None
    metadata: Any = None

    def __repr__(self) -> str:
        # Never show the token, not even in a traceback or a debug log.
        token = "None" if self.auth_token is None else "'<redacted>'"
        return (
            f"RegistrationRequest(protocol_version={self.protocol_version!r}, "
            f"agent_id={self.agent_id!r}, capabilities={self.capabilities!r}, "
            f"auth_token={token}, metadata={self.metadata!r})"
        )


class RegistrationResponse(Struct, kw_only=True):
    """
    The listener's answer to a RegistrationRequest (HandshakeResponse).  On
    success C{error} is C{None} and C{connection_id} names the connection;
    on failure C{error} is the reason and the connection is closed.

    @ivar success: whether the registration was accepted.
    @ivar error: why it was refused, C{None} on success (and when absent:
        the reference reads a missing C{error} as C{null}).
    @ivar proxy_id: the proxy's id.
    @ivar proxy_version: the proxy's software version.
    @ivar connection_id: the id the proxy gave the connection.
    """

    success: bool
    error: str | None = None
    proxy_id: str
    proxy_version: str
    connection_id: str


