"""
The life of one agent connection, as an explicit state machine:
registering -> serving -> draining -> closed.

The machine decides what each input means in each state; the protocol
does the byte handling and the work.  Events after registration do not go
through the machine: entering Serving points the protocol's frame handler
at the event dispatcher, so the hot path costs one attribute call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from automat import TypeMachineBuilder
from twisted.internet.defer import Deferred, succeed

from .. import messages as m
from ..errors import AgentProtocolError

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall

    from .protocol import AgentProtocol


class Lifecycle(Protocol):
    def registered(self, response: m.RegistrationResponse) -> None:
        """The proxy accepted the registration."""

    def refused(self, error: AgentProtocolError) -> None:
        """The registration did not go through (rejected, timed out, garbled)."""

    def protocol_violated(self, error: AgentProtocolError) -> None:
        """The proxy's byte stream broke the framing rules."""

    def drain(self, grace: float) -> None:
        """
        Stop taking events, finish in-flight ones within C{grace}, close.
        (Returns nothing, so that it may be called from inside a transition;
        the protocol hands out the Deferred of the connection's end.)
        """

    def drained(self) -> None:
        """Nothing is in flight any more, or the grace period is over."""

    def close(self, detail: str) -> None:
        """Close now; in-flight handlers are cancelled."""

    def connection_lost(self, detail: str) -> None:
        """The transport is gone."""


@dataclass
class Core:
    protocol: AgentProtocol
    timer: IDelayedCall | None = None
    lost: bool = False
    waiters: list[Deferred[None]] = field(default_factory=list)

    def stop_timer(self) -> None:
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def wait_lost(self) -> Deferred[None]:
        if self.lost:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self.waiters.append(waiter)
        return waiter

    def fire_waiters(self) -> None:
        self.lost = True
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            waiter.callback(None)


def _build() -> object:
    builder = TypeMachineBuilder(Lifecycle, Core)
    registering = builder.state("Registering")
    serving = builder.state("Serving")
    draining = builder.state("Draining")
    closed = builder.state("Closed")

    # -- registering -------------------------------------------------------

    @registering.upon(Lifecycle.registered).to(serving)
    def accepted(machine: Lifecycle, core: Core, response: m.RegistrationResponse) -> None:
        core.stop_timer()
        core.protocol.enter_serving(response)

    @registering.upon(Lifecycle.refused).to(closed)
    def refused(machine: Lifecycle, core: Core, error: AgentProtocolError) -> None:
        core.stop_timer()
        core.protocol.refuse(error)

    @registering.upon(Lifecycle.protocol_violated).to(closed)
    def violated_early(machine: Lifecycle, core: Core, error: AgentProtocolError) -> None:
        core.stop_timer()
        core.protocol.refuse(error)

    @registering.upon(Lifecycle.connection_lost).to(closed)
    def lost_early(machine: Lifecycle, core: Core, detail: str) -> None:
        core.stop_timer()
        core.fire_waiters()
        core.protocol.lost_unregistered(detail)

    @registering.upon(Lifecycle.close).to(closed)
    def close_early(machine: Lifecycle, core: Core, detail: str) -> None:
        core.stop_timer()
        core.protocol.abandon(detail)

    @registering.upon(Lifecycle.drain).to(closed)
    def drain_early(machine: Lifecycle, core: Core, grace: float) -> None:
        core.stop_timer()
        core.protocol.abandon("agent stopping before registration finished")

    # -- serving -----------------------------------------------------------

    @serving.upon(Lifecycle.drain).to(draining)
    def start_draining(machine: Lifecycle, core: Core, grace: float) -> None:
        core.timer = core.protocol.begin_drain(grace)

    @serving.upon(Lifecycle.close).to(closed)
    def close_serving(machine: Lifecycle, core: Core, detail: str) -> None:
        core.protocol.shut(detail)

    @serving.upon(Lifecycle.protocol_violated).to(closed)
    def violated(machine: Lifecycle, core: Core, error: AgentProtocolError) -> None:
        core.protocol.shut(f"protocol error from proxy: {error}")

    @serving.upon(Lifecycle.connection_lost).to(closed)
    def lost_serving(machine: Lifecycle, core: Core, detail: str) -> None:
        core.fire_waiters()
        core.protocol.lost_serving(detail)

    # -- draining ----------------------------------------------------------

    @draining.upon(Lifecycle.drained).to(closed)
    def finish_draining(machine: Lifecycle, core: Core) -> None:
        core.stop_timer()
        core.protocol.shut("drained")

    @draining.upon(Lifecycle.close).to(closed)
    def close_draining(machine: Lifecycle, core: Core, detail: str) -> None:
        core.stop_timer()
        core.protocol.shut(detail)

    @draining.upon(Lifecycle.protocol_violated).to(closed)
    def violated_draining(machine: Lifecycle, core: Core, error: AgentProtocolError) -> None:
        core.stop_timer()
        core.protocol.shut(f"protocol error from proxy: {error}")

    @draining.upon(Lifecycle.connection_lost).to(closed)
    def lost_draining(machine: Lifecycle, core: Core, detail: str) -> None:
        core.stop_timer()
        core.fire_waiters()
        core.protocol.lost_serving(detail)

    # -- closed: late inputs have nothing left to do ------------------------

    @closed.upon(Lifecycle.connection_lost).loop()
    def lost_closed(machine: Lifecycle, core: Core, detail: str) -> None:
        if not core.lost:
            core.fire_waiters()
            core.protocol.finish_lost(detail)

    draining.upon(Lifecycle.drain).loop().returns(None)
    closed.upon(Lifecycle.drain).loop().returns(None)
    registering.upon(Lifecycle.drained).loop().returns(None)
    serving.upon(Lifecycle.drained).loop().returns(None)
    serving.upon(Lifecycle.registered).loop().returns(None)
    serving.upon(Lifecycle.refused).loop().returns(None)
    draining.upon(Lifecycle.registered).loop().returns(None)
    draining.upon(Lifecycle.refused).loop().returns(None)
    closed.upon(Lifecycle.registered).loop().returns(None)
    closed.upon(Lifecycle.refused).loop().returns(None)
    closed.upon(Lifecycle.protocol_violated).loop().returns(None)
    closed.upon(Lifecycle.drained).loop().returns(None)
    closed.upon(Lifecycle.close).loop().returns(None)

    return builder.build()


_machine_factory = _build()


def new_lifecycle(protocol: AgentProtocol) -> tuple[Lifecycle, Core]:
    core = Core(protocol)
    return _machine_factory(core), core  # type: ignore[operator]
