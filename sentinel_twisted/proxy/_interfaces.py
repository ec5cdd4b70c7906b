"""
The seams users plug into: token checking and pool observers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from zope.interface import Interface

if TYPE_CHECKING:
    from .connection import AgentConnection


class ITokenChecker(Interface):
    """Decides whether an agent's registration token is valid."""

    def check_token(agent_id: str, token: str) -> bool:
        """
        Return whether C{token} authenticates C{agent_id}.  Implementations
        compare in constant time and never log the token.
        """


class IAgentPoolObserver(Interface):
    """
    Told about the life of registered agent connections.  Every method is
    called in the reactor thread; exceptions are logged and swallowed.
    """

    def agent_registered(connection: AgentConnection) -> None:
        """A connection registered and joined the pool."""

    def agent_disconnected(connection: AgentConnection, reason: str) -> None:
        """A registered connection left the pool."""

    def health_changed(connection: AgentConnection, state: int | None) -> None:
        """An agent sent a HealthStatus."""

    def flow_control_changed(connection: AgentConnection, paused: bool) -> None:
        """An agent paused or resumed a connection."""

    def metrics_reported(connection: AgentConnection, report: dict[str, Any]) -> None:
        """An agent sent a MetricsReport."""

    def config_update_requested(connection: AgentConnection, request: dict[str, Any]) -> None:
        """An agent sent a ConfigUpdateRequest."""
