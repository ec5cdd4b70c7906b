# -*- test-case-name: tests.gateway.test_gateway -*-
"""
Body inspection: a chain of stages, one per agent that asked for body
events, between the body's source and its destination.

Each stage cuts the bytes it receives into chunks of its agent's
C{preferred_chunk_size}, sends one chunk at a time (base64, with
C{chunk_index}, C{is_last} and the running byte count) and passes on what
the agent's answer says: the chunk, its replacement, or nothing.  A chunk
is forwarded only once its agent has answered, so a block decision always
arrives before the last byte reaches the other side.  An agent that answers
with C{needs_more: false} before the end has seen enough: the rest of the
body passes it by.

Memory stays bounded whatever an agent answers:

 - back-pressure: a stage sends its agent the next chunk only while what
   comes after it (the next stage, the upstream connection, the client) is
   not L{busy <BodySink.busy>}; a stage is busy past its chunk and
   L{STAGE_ROOM}, the upstream body past L{STAGE_ROOM} held, the client
   while its connection asks the gateway to pause.  So an agent that
   answers every one-byte chunk with megabytes gets its next chunk only
   once those megabytes have left.
 - a cap on replacements: what an agent's replacements make of a body may
   not be larger than C{max_size} (C{--max-replaced-body-size}) unless the
   body was that large already; past it the answer is an agent error.
"""

from __future__ import annotations

from binascii import b2a_base64
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from twisted.python.failure import Failure

from .. import messages as m
from ..errors import InvalidMessage
from .decisions import apply_body_mutation

if TYPE_CHECKING:
    from .exchange import AgentSlot

__all__ = [
    "STAGE_ROOM",
    "Answered",
    "BodySink",
    "Failed",
    "InspectionStage",
    "Pressure",
    "StageOwner",
    "chunk_sizes",
    "clamp_chunk_size",
    "inspection_chain",
]

#: Largest chunk we send: its base64 form must fit in one 16 MiB frame.
MAX_CHUNK_SIZE = 8 * 1024 * 1024
#: Smallest chunk we send (but the last of a body): an agent that prefers
#: one-byte chunks would otherwise cost an event, and an answer, per byte.
MIN_CHUNK_SIZE = 4 * 1024
#: The chunk size for an agent that states no preference.
DEFAULT_CHUNK_SIZE = 64 * 1024
#: Bytes a stage (beyond its chunk size) or the upstream body holds before
#: it is busy: the stage before it sends its agent no more chunks.
STAGE_ROOM = 256 * 1024


def clamp_chunk_size(preferred: int) -> int:
    """
    An agent's C{preferred_chunk_size}, within C{[MIN_CHUNK_SIZE,
    MAX_CHUNK_SIZE]} (C{0} or less: the default).
    """
    if preferred <= 0:
        return DEFAULT_CHUNK_SIZE
    return min(max(preferred, MIN_CHUNK_SIZE), MAX_CHUNK_SIZE)


class BodySink(Protocol):
    """Where body bytes go next."""

    def feed(self, data: bytes) -> None:
        """Take the next piece of the body."""

    def end(self) -> None:
        """The body is complete."""

    @property
    def busy(self) -> bool:
        """
        Whether it holds enough for now: the stage that feeds it sends its
        agent no more chunks (whose answers could add to it) until
        L{Pressure.drained}.
        """


class Pressure:
    """
    Bytes held in one direction of an exchange.  Above C{high} the source
    is paused, below C{low} it is resumed, so a slow agent or a slow peer
    bounds the memory one request can take.

    It also carries the other way of back-pressure: stages that wait for a
    L{busy <BodySink.busy>} sink after them are called back when a sink of
    this direction has drained (L{wait}, L{drained}).

    @ivar held: bytes held right now.
    """

    __slots__ = ("_high", "_low", "_pause", "_paused", "_resume", "_waiting", "held")

    def __init__(
        self, pause: Callable[[], None], resume: Callable[[], None], high: int, low: int
    ) -> None:
        self._pause = pause
        self._resume = resume
        self._high = high
        self._low = low
        self._paused = False
        self._waiting: list[Callable[[], None]] = []
        self.held = 0

    def add(self, count: int) -> None:
        """C{count} more bytes are held; pause the source above C{high}."""
        self.held += count
        if not self._paused and self.held > self._high:
            self._paused = True
            self._pause()

    def sub(self, count: int) -> None:
        """C{count} bytes left; resume the source below C{low}."""
        self.held -= count
        if self._paused and self.held < self._low:
            self._paused = False
            self._resume()

    def wait(self, callback: Callable[[], None]) -> None:
        """Call C{callback} once a sink of this direction has drained."""
        if callback not in self._waiting:
            self._waiting.append(callback)

    def drained(self) -> None:
        """A sink took bytes out: the stages waiting try again (and wait again if need be)."""
        waiting, self._waiting = self._waiting, []
        for callback in waiting:
            callback()

    def release(self) -> None:
        """Stop holding anything back (the exchange is over)."""
        self.held = 0
        self._waiting = []
        if self._paused:
            self._paused = False
            self._resume()


#: What takes an agent's answer to an event, and the argument given with it.
Answered = Callable[[m.AgentResponse, Any], object]
#: What takes the failure of an event (timeout, loss, cancel...), and the argument.
Failed = Callable[[Failure, Any], object]


class StageOwner(Protocol):
    """
    What a stage needs from its exchange.

    @cvar correlation_id: the exchange's correlation id, for the events of its
        stages.
    """

    correlation_id: str

    @property
    def is_over(self) -> bool:
        """Whether the exchange has been answered or abandoned."""

    def send_to(self, slot: AgentSlot, event: m.Event, answered: Answered, failed: Failed, arg: Any) -> None:
        """
        Send an event of this request to the slot's agent: then
        C{answered(answer, arg)} or C{failed(failure, arg)}, once.
        """

    def body_answered(self, slot: AgentSlot, answer: m.AgentResponse) -> bool:
        """An agent answered a body chunk; C{False} if the exchange ends there."""

    def body_failed(self, slot: AgentSlot, failure: Failure) -> bool:
        """An agent could not answer a body chunk; C{False} if the exchange ends there."""

    def internal_error(self, failure: Failure) -> None:
        """A bug: answer C{500} and log it."""


class InspectionStage:
    """
    One agent's view of a body.  C{start()} is called once the agent has
    answered the headers event of the same direction (events of one request
    go one at a time over one connection); until then input is held.

    @ivar owner: the exchange the body belongs to.
    @ivar slot: the agent this stage shows the body to.
    @ivar next: where the body goes after this stage (the next agent's stage,
        or the upstream or client).
    """

    def __init__(
        self,
        owner: StageOwner,
        slot: AgentSlot,
        *,
        response: bool,
        chunk_size: int,
        total_size: int | None,
        next_stage: BodySink,
        pressure: Pressure,
        max_size: int,
    ) -> None:
        self.owner = owner
        self.slot = slot
        self.next = next_stage
        self._response = response
        self._chunk_size = chunk_size
        self._total_size = total_size
        self._pressure = pressure
        self._max_size = max_size
        self._buffer = bytearray()
        self._index = 0
        self._count = 0
        #: Bytes passed on after the agent's answers (replacements included).
        self._out = 0
        self._ended = False
        self._started = False
        self._bypass = False
        self._finished = False
        self._in_flight: bytes | None = None
        self._in_flight_last = False

    @property
    def waiting(self) -> bool:
        """Whether a chunk waits for its answer."""
        return self._in_flight is not None

    @property
    def busy(self) -> bool:
        """Past its chunk and L{STAGE_ROOM} held (once bypassed: whether what follows is busy)."""
        if self._bypass:
            return self.next.busy
        return len(self._buffer) > self._chunk_size + STAGE_ROOM

    def feed(self, data: bytes) -> None:
        """More body: held and sent to the agent in chunks of its preferred size."""
        if self._bypass:
            self.next.feed(data)
            return
        buffer = self._buffer
        buffer += data
        self._pressure.add(len(data))
        # Nothing to send before a whole chunk is held (or the body ends):
        # no call to _pump for each small piece.
        if len(buffer) > self._chunk_size or self._ended:
            self._pump()

    def end(self) -> None:
        """The body is complete: its last chunk goes out marked C{is_last}."""
        self._ended = True
        if self._bypass:
            self._finish()
        else:
            self._pump()

    def start(self) -> None:
        """The agent answered the headers event: start sending the body."""
        self._started = True
        if self._ended or len(self._buffer) > self._chunk_size:
            self._pump()

    def bypass(self) -> None:
        """
        Stop inspecting: what is held (and the chunk in flight) goes on
        unchanged, and so does everything after it.
        """
        if self._bypass:
            return
        self._bypass = True
        held = self._in_flight or b""
        self._in_flight = None
        if self._buffer:
            held += bytes(self._buffer)
            self._buffer.clear()
        if held:
            self._pressure.sub(len(held))
            self.next.feed(held)
        if self._ended:
            self._finish()
        # Whoever waited for this stage now waits for what follows it.
        self._pressure.drained()

    def _finish(self) -> None:
        if not self._finished:
            self._finished = True
            self.next.end()

    def _pump(self) -> None:
        if (
            not self._started
            or self._in_flight is not None
            or self._bypass
            or self.owner.is_over
        ):
            return
        buffer = self._buffer
        size = self._chunk_size
        if len(buffer) <= size and not self._ended:
            return
        if self.next.busy:
            # The agent's answer to the next chunk (a replacement of up to
            # a frame's worth) would go where enough is held already: it
            # waits until that has drained.
            self._pressure.wait(self._pump)
            return
        was_busy = len(buffer) > size + STAGE_ROOM
        if len(buffer) > size:
            chunk = bytes(buffer[:size])
            del buffer[:size]
            last = False
        elif self._ended:
            if not buffer and self._index == 0:
                # No body at all: nothing to inspect.
                self._bypass = True
                self._finish()
                return
            chunk = bytes(buffer)
            buffer.clear()
            last = True
        else:
            return
        self._count += len(chunk)
        data = b2a_base64(chunk, newline=False).decode("ascii")
        event: m.Event
        if self._response:
            event = m.ResponseBodyChunkEvent(
                correlation_id=self.owner.correlation_id,
                data=data,
                is_last=last,
                total_size=self._total_size,
                chunk_index=self._index,
                bytes_sent=self._count,
            )
        else:
            event = m.RequestBodyChunkEvent(
                correlation_id=self.owner.correlation_id,
                data=data,
                is_last=last,
                total_size=self._total_size,
                chunk_index=self._index,
                bytes_received=self._count,
            )
        self._index += 1
        self._in_flight = chunk
        self._in_flight_last = last
        self.owner.send_to(self.slot, event, self._answer_arrived, self._answer_failed, None)
        if was_busy and not self.busy:
            self._pressure.drained()

    def _answer_arrived(self, answer: m.AgentResponse, _: None) -> None:
        # The handling in the try itself: one call per answered chunk.
        try:
            chunk = self._in_flight
            owner = self.owner
            if chunk is None or owner.is_over:
                return
            if not owner.body_answered(self.slot, answer):
                return
            mutation = answer.response_body_mutation if self._response else answer.request_body_mutation
            if mutation is not None and mutation.data is not None and mutation.chunk_index != self._index - 1:
                # A replacement or a drop meant for another chunk: applied
                # to this one it would change bytes the agent never judged.
                self._failed(
                    Failure(
                        InvalidMessage(
                            f"its body mutation is for chunk {mutation.chunk_index}, "
                            f"but it was answering chunk {self._index - 1}"
                        )
                    )
                )
                return
            try:
                out = apply_body_mutation(chunk, mutation)
            except ValueError as e:
                self._failed(Failure(InvalidMessage(str(e))))
                return
            out_total = self._out + len(out)
            if out_total > self._max_size and out_total > self._count:
                self._failed(
                    Failure(
                        InvalidMessage(
                            f"its body replacements make {out_total} bytes of {self._count}, over "
                            f"the gateway's limit of {self._max_size} (--max-replaced-body-size)"
                        )
                    )
                )
                return
            self._out = out_total
            self._in_flight = None
            self._pressure.sub(len(chunk))
            if out:
                self.next.feed(out)
            if self._in_flight_last:
                self._bypass = True
                self._finish()
            elif not answer.needs_more:
                self.bypass()
            else:
                self._pump()
        except Exception:
            self.owner.internal_error(Failure())

    def _answer_failed(self, failure: Failure, _: None) -> None:
        try:
            self._failed(failure)
        except Exception:
            self.owner.internal_error(Failure())

    def _failed(self, failure: Failure) -> Any:
        if self._in_flight is None or self.owner.is_over:
            return None
        if self.owner.body_failed(self.slot, failure):
            # Failing open: the agent is out of this request.
            self.bypass()
        return None


def chunk_sizes(slots: list[AgentSlot]) -> list[int]:
    """The chunk size each agent of C{slots} is sent (its preference, clamped)."""
    return [clamp_chunk_size(s.connection.capabilities.limits.preferred_chunk_size) for s in slots]


def inspection_chain(
    owner: StageOwner,
    slots: list[AgentSlot],
    sizes: list[int],
    *,
    response: bool,
    total_size: int | None,
    tail: BodySink,
    pressure: Pressure,
    max_size: int,
) -> BodySink:
    """
    One L{InspectionStage} per agent of C{slots}, in their order, each
    passing the body on to the next and the last to C{tail}; each slot's
    C{stage} is set.  Returns where the body goes first (C{tail} when no
    agent inspects it).
    """
    head = tail
    for slot, chunk_size in reversed(list(zip(slots, sizes, strict=True))):
        stage = InspectionStage(
            owner,
            slot,
            response=response,
            chunk_size=chunk_size,
            total_size=total_size,
            next_stage=head,
            pressure=pressure,
            max_size=max_size,
        )
        slot.stage = stage
        head = stage
    return head
