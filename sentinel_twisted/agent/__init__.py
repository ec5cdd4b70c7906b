"""
The agent side of the Sentinel Agent Protocol v2: Python agents that dial
a proxy, register, and answer its events (reverse mode, L{AgentConnector}),
or listen and answer the proxies that dial them (forward mode,
L{AgentListener}).  For
example::

    from sentinel_twisted.agent import Agent, allow, block, run_agent

    class NoAdmin(Agent):
        def on_request_headers(self, event):
            if event.uri.startswith("/admin"):
                return block(403, "Forbidden")
            return allow()

    run_agent(NoAdmin(), "unix:sentinel-reverse.sock", agent_id="no-admin")
"""

from __future__ import annotations

from ..messages import (
    AgentCapabilities,
    AgentFeatures,
    AgentLimits,
    AgentResponse,
    ConfigureEvent,
    EventType,
    GuardrailInspectEvent,
    HealthState,
    RequestBodyChunkEvent,
    RequestCompleteEvent,
    RequestHeadersEvent,
    ResponseBodyChunkEvent,
    ResponseHeadersEvent,
    WebSocketFrameEvent,
)
from ._interfaces import Answer, HandlerResult, IAgent
from .base import Agent
from .connector import AgentConnector, run_agent
from .errors import AgentHandlerError, HandshakeFailed, RegistrationFailed, RegistrationRejected
from .forward import AgentListener, ForwardAgentFactory, ForwardAgentProtocol
from .protocol import AgentClientFactory, AgentProtocol, AgentSettings, routing_id
from .responses import ResponseBuilder, allow, block, challenge, redirect, respond
from .rules import RulesAgent, RulesError, RuleSet, load_rules, parse_rules

__all__ = [
    "Agent",
    "AgentCapabilities",
    "AgentClientFactory",
    "AgentConnector",
    "AgentFeatures",
    "AgentHandlerError",
    "AgentLimits",
    "AgentListener",
    "AgentProtocol",
    "AgentResponse",
    "AgentSettings",
    "Answer",
    "ConfigureEvent",
    "EventType",
    "ForwardAgentFactory",
    "ForwardAgentProtocol",
    "GuardrailInspectEvent",
    "HandlerResult",
    "HandshakeFailed",
    "HealthState",
    "IAgent",
    "RegistrationFailed",
    "RegistrationRejected",
    "RequestBodyChunkEvent",
    "RequestCompleteEvent",
    "RequestHeadersEvent",
    "ResponseBodyChunkEvent",
    "ResponseBuilder",
    "ResponseHeadersEvent",
    "RuleSet",
    "RulesAgent",
    "RulesError",
    "WebSocketFrameEvent",
    "allow",
    "block",
    "challenge",
    "load_rules",
    "parse_rules",
    "redirect",
    "respond",
    "routing_id",
    "run_agent",
]
