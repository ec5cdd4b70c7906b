"""
The life of one reverse connection on the proxy side, as an explicit state
machine: awaiting registration -> registered -> closed.

The machine decides what each event means in each state; the protocol
feeds it events and does the byte handling.  Frames themselves do not go
through the machine once registered: entering Registered points the
protocol's frame handler at the L{AgentConnection}, so the hot path costs
one attribute call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from automat import TypeMachineBuilder

from ..errors import AgentProtocolError
from .connection import AgentConnection

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall


class Lifecycle(Protocol):
    def registration_accepted(self, connection: AgentConnection) -> None:
        """The RegistrationRequest passed every check."""

    def registration_refused(self, error: AgentProtocolError, agent_id: str) -> None:
        """The first frame was not an acceptable RegistrationRequest."""

    def handshake_timed_out(self) -> None:
        """No complete RegistrationRequest within the handshake timeout."""

    def protocol_violated(self, error: AgentProtocolError) -> None:
        """The byte stream broke the framing rules."""

    def close(self, detail: str) -> None:
        """The proxy closes the connection."""

    def connection_lost(self, detail: str) -> None:
        """The transport is gone."""


class Connector(Protocol):
    """
    What the machine asks of the connection's protocol: a reverse one
    (L{ReverseConnectionProtocol
    <sentinel_twisted.proxy.protocol.ReverseConnectionProtocol>}) or a
    dialled one, whose handshake stands where the registration does.
    """

    def enter_registered(self, connection: AgentConnection) -> None:
        """Serve the registered connection."""

    def reject(self, error: AgentProtocolError, agent_id: str) -> None:
        """Answer a refused registration or handshake and close."""

    def handshake_expired(self) -> None:
        """Refuse a registration or handshake that took too long."""

    def drop(self, detail: str) -> None:
        """Close a connection that never registered."""

    def left_unregistered(self, detail: str) -> None:
        """Account for a connection lost before it registered."""

    def leave_registered(self, detail: str, close: bool) -> None:
        """Take a registered connection out of service, closing it if asked."""

    def finish_lost(self, detail: str) -> None:
        """The transport is gone after the machine closed."""


@dataclass
class Core:
    protocol: Connector
    handshake_timer: IDelayedCall | None = None
    connection: AgentConnection | None = field(default=None)


def _stop_handshake_timer(core: Core) -> None:
    timer, core.handshake_timer = core.handshake_timer, None
    if timer is not None and timer.active():
        timer.cancel()


def _build() -> object:
    builder = TypeMachineBuilder(Lifecycle, Core)
    awaiting = builder.state("AwaitingRegistration")
    registered = builder.state("Registered")
    closed = builder.state("Closed")

    @awaiting.upon(Lifecycle.registration_accepted).to(registered)
    def accept(machine: Lifecycle, core: Core, connection: AgentConnection) -> None:
        _stop_handshake_timer(core)
        core.connection = connection
        core.protocol.enter_registered(connection)

    @awaiting.upon(Lifecycle.registration_refused).to(closed)
    def refuse(machine: Lifecycle, core: Core, error: AgentProtocolError, agent_id: str) -> None:
        _stop_handshake_timer(core)
        core.protocol.reject(error, agent_id)

    @awaiting.upon(Lifecycle.handshake_timed_out).to(closed)
    def time_out(machine: Lifecycle, core: Core) -> None:
        core.handshake_timer = None
        core.protocol.handshake_expired()

    @awaiting.upon(Lifecycle.protocol_violated).to(closed)
    def violate_early(machine: Lifecycle, core: Core, error: AgentProtocolError) -> None:
        _stop_handshake_timer(core)
        core.protocol.reject(error, "")

    @awaiting.upon(Lifecycle.close).to(closed)
    def close_early(machine: Lifecycle, core: Core, detail: str) -> None:
        _stop_handshake_timer(core)
        core.protocol.drop(detail)

    @awaiting.upon(Lifecycle.connection_lost).to(closed)
    def lost_early(machine: Lifecycle, core: Core, detail: str) -> None:
        _stop_handshake_timer(core)
        core.protocol.left_unregistered(detail)

    @registered.upon(Lifecycle.protocol_violated).to(closed)
    def violate(machine: Lifecycle, core: Core, error: AgentProtocolError) -> None:
        core.protocol.leave_registered(str(error), close=True)

    @registered.upon(Lifecycle.close).to(closed)
    def close(machine: Lifecycle, core: Core, detail: str) -> None:
        core.protocol.leave_registered(detail, close=True)

    @registered.upon(Lifecycle.connection_lost).to(closed)
    def lost(machine: Lifecycle, core: Core, detail: str) -> None:
        core.protocol.leave_registered(detail, close=False)

    # Once closed, late events (a timer, the final connectionLost, a second
    # close) have nothing left to do.
    @closed.upon(Lifecycle.connection_lost).loop()
    def lost_after_close(machine: Lifecycle, core: Core, detail: str) -> None:
        core.protocol.finish_lost(detail)

    registered.upon(Lifecycle.handshake_timed_out).loop().returns(None)
    closed.upon(Lifecycle.close).loop().returns(None)
    closed.upon(Lifecycle.protocol_violated).loop().returns(None)
    closed.upon(Lifecycle.handshake_timed_out).loop().returns(None)

    return builder.build()


_machine_factory = _build()


def new_lifecycle(protocol: Connector) -> tuple[Lifecycle, Core]:
    core = Core(protocol)
    return _machine_factory(core), core  # type: ignore[operator]
