# -*- test-case-name: tests.agent.test_base -*-
"""
L{Agent}: a base class that allows everything.

Subclasses override the C{on_*} handlers they care about; the events the
agent subscribes to, and the features it announces, follow from which
handlers a subclass overrides.  Class attributes declare the rest (name,
version, limits, feature overrides).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import ClassVar

import msgspec
from zope.interface import implementer

from .. import __version__
from .. import messages as m
from ._interfaces import HandlerResult, IAgent
from .responses import allow

__all__ = ["EVENT_HANDLERS", "Agent"]

#: The handler method of each event type.
EVENT_HANDLERS: dict[m.EventType, str] = {
    m.EventType.CONFIGURE: "on_configure",
    m.EventType.REQUEST_HEADERS: "on_request_headers",
    m.EventType.REQUEST_BODY_CHUNK: "on_request_body_chunk",
    m.EventType.RESPONSE_HEADERS: "on_response_headers",
    m.EventType.RESPONSE_BODY_CHUNK: "on_response_body_chunk",
    m.EventType.REQUEST_COMPLETE: "on_request_complete",
    m.EventType.WEBSOCKET_FRAME: "on_websocket_frame",
    m.EventType.GUARDRAIL_INSPECT: "on_guardrail_inspect",
}

_FEATURE_NAMES = frozenset(m.AgentFeatures.__struct_fields__)


@implementer(IAgent)
class Agent:
    """
    An agent that allows everything.  Override handlers to do more.

    @cvar name: announced in the capabilities (default: the class name).
    @cvar version: announced in the capabilities.
    @cvar events: the event types to subscribe to; C{None} derives them from
        the overridden handlers (request headers if none is).
    @cvar features: overrides of the derived L{AgentFeatures
        <sentinel_twisted.messages.AgentFeatures>} fields.
    @cvar max_concurrency: events served at once per connection; at this
        many the connection asks the proxy to pause (FlowControl).
    @cvar max_body_size: largest body the agent wants to see.
    @cvar preferred_chunk_size: body chunk size the agent prefers.
    """

    name: ClassVar[str] = ""
    version: ClassVar[str] = __version__
    events: ClassVar[Collection[int] | None] = None
    features: ClassVar[Mapping[str, bool | int]] = {}
    max_concurrency: int = 100
    max_body_size: int = 10 * 1024 * 1024
    preferred_chunk_size: int = 64 * 1024

    # -- capabilities ----------------------------------------------------------

    def handles(self, event_type: m.EventType) -> bool:
        """Whether this agent overrides the handler of C{event_type}."""
        method = EVENT_HANDLERS[event_type]
        if method in vars(self):
            return True
        return getattr(type(self), method, None) is not getattr(Agent, method)

    def supported_events(self) -> list[int]:
        """The event numbers announced as C{supported_events}."""
        if self.events is not None:
            return sorted({int(e) for e in self.events})
        found = [int(e) for e in EVENT_HANDLERS if self.handles(e)]
        return sorted(found) if found else [int(m.EventType.REQUEST_HEADERS)]

    def capabilities(self, agent_id: str) -> m.AgentCapabilities:
        events = set(self.supported_events())
        features = m.AgentFeatures(
            streaming_body=bool(
                events & {m.EventType.REQUEST_BODY_CHUNK, m.EventType.RESPONSE_BODY_CHUNK}
            ),
            websocket=m.EventType.WEBSOCKET_FRAME in events,
            guardrails=m.EventType.GUARDRAIL_INSPECT in events,
            config_push=m.EventType.CONFIGURE in events,
            metrics_export=False,
            concurrent_requests=self.max_concurrency,
            cancellation=True,
            flow_control=True,
            health_reporting=True,
        )
        if self.features:
            unknown = set(self.features) - _FEATURE_NAMES
            if unknown:
                raise ValueError(
                    f"{type(self).__name__}.features: unknown feature(s) "
                    f"{', '.join(sorted(unknown))}; known: {', '.join(sorted(_FEATURE_NAMES))}"
                )
            features = msgspec.structs.replace(features, **self.features)
        return m.AgentCapabilities(
            agent_id=agent_id,
            name=self.name or type(self).__name__,
            version=self.version,
            supported_events=sorted(events),
            features=features,
            limits=m.AgentLimits(
                max_body_size=self.max_body_size,
                max_concurrency=self.max_concurrency,
                preferred_chunk_size=self.preferred_chunk_size,
            ),
        )

    def health(self) -> int:
        return m.HealthState.HEALTHY

    # -- handlers: allow everything ----------------------------------------

    def on_request_headers(self, event: m.RequestHeadersEvent) -> HandlerResult:
        return allow()

    def on_request_body_chunk(self, event: m.RequestBodyChunkEvent) -> HandlerResult:
        return allow()

    def on_response_headers(self, event: m.ResponseHeadersEvent) -> HandlerResult:
        return allow()

    def on_response_body_chunk(self, event: m.ResponseBodyChunkEvent) -> HandlerResult:
        return allow()

    def on_request_complete(self, event: m.RequestCompleteEvent) -> HandlerResult:
        return allow()

    def on_websocket_frame(self, event: m.WebSocketFrameEvent) -> HandlerResult:
        return allow().websocket_allow()

    def on_guardrail_inspect(self, event: m.GuardrailInspectEvent) -> HandlerResult:
        return allow()

    def on_configure(self, event: m.ConfigureEvent) -> HandlerResult:
        return allow()
