# -*- test-case-name: tests.test_protocol -*-
"""
L{ReverseConnectionProtocol}: the proxy's end of one reverse connection.

It turns bytes into frames (L{FrameReceiver}) and frames into the events
of the registration machine (L{sentinel_twisted.proxy._registration}).  Policy
(allowlist, tokens, connection caps) is the factory's; this module only
asks it.
"""

from __future__ import annotations

import socket
import struct
from typing import TYPE_CHECKING, Any

from twisted.internet import error as ierror
from twisted.internet.address import UNIXAddress
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IPushProducer,
    ISSLTransport,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .. import messages as m
from .._peertext import peer_text
from .._sending import send_now, writes_through
from ..errors import (
    AgentProtocolError,
    ControlFrameTooLarge,
    InvalidMessage,
    MessageTooLarge,
    RequestTimeout,
    format_duration,
)
from ..wire import _HEADER, MAX_MESSAGE_SIZE, FrameReceiver, MessageType
from ._identity import client_certificate
from ._registration import new_lifecycle

if TYPE_CHECKING:
    from .connection import AgentConnection
    from .factory import ReverseConnectionFactory

__all__ = ["HOLD_FRAMES_FOR_TURN", "HoldFramesForTurn", "ReverseConnectionProtocol", "send_after_read"]

#: The module's logger.
log = Logger(namespace="sentinel_twisted.protocol")
_CONNECTION_DONE = Failure(ierror.ConnectionDone())


def describe_peer(transport: object) -> str:
    """
    C{HOST:PORT} of a TCP peer, C{unix} for a UNIX socket (C{unix:NAME} for
    one whose peer bound a name), for log lines and the status site.
    """
    try:
        peer = transport.getPeer()  # type: ignore[attr-defined]
    except Exception:
        return "unknown"
    host = getattr(peer, "host", None)
    if host is not None:
        return f"{host}:{peer.port}"
    name = getattr(peer, "name", None)
    if name:
        # The peer binds its socket to a name of its choosing: any bytes (an
        # abstract one starts with a NUL), made readable text.
        if isinstance(name, bytes):
            name = name.decode("utf-8", "backslashreplace")
        return f"unix:{peer_text(name)}"
    return "unix"


def peer_credentials(transport: object) -> tuple[int, int, int] | None:
    """
    C{(pid, uid, gid)} of the process at the other end of a UNIX socket
    (C{SO_PEERCRED}, as the kernel saw it at C{connect}); C{None} for
    other sockets or where the system does not tell.
    """
    option = getattr(socket, "SO_PEERCRED", None)
    try:
        if option is None or not isinstance(transport.getPeer(), UNIXAddress):  # type: ignore[attr-defined]
            return None
        handle = transport.getHandle()  # type: ignore[attr-defined]
        data = handle.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
    except Exception:
        return None
    pid, uid, gid = struct.unpack("3i", data)
    return pid, uid, gid


#: How many proxy-side reads are under way (nested: an answer's callback
#: may run another connection's read), and the protocols holding frames
#: to send when they are done (insertion-ordered).
_reading = [0]
_holding: dict[Any, None] = {}
#: How many requests sent before a read must still wait for its frames to
#: wait for the end of the reactor's turn: at lower concurrency a turn
#: rarely reads more than one connection, and waiting would only cost.
#: At the end of a read, the requests waiting now less those added during
#: the read are the ones sent before it that still wait for answers (which
#: other connections may bring in the same turn).
_BATCH_WAITING = 8


#: The current holding period: from the first frame held after a send of
#: everything held to the next such send.  A pool's choice of connection
#: made in an earlier period is not joined (see AgentPool.select).
_hold_period = [0]


def _begin_holding() -> None:
    """Frames may be held from now on: a new holding period unless one is under way."""
    if not _holding:
        _hold_period[0] += 1


def _send_all_held() -> None:
    _hold_period[0] += 1
    while _holding:
        protocol = next(iter(_holding))
        del _holding[protocol]
        protocol._send_held()


def send_after_read(sender: Any) -> bool:
    """
    While frames are being read (answers handled), have C{sender._send_held()}
    called once the read is done, with the frames written meanwhile, and
    return C{True}; else return C{False} (the caller sends now).  For other
    connections written to while answers are handled (the gateway's clients:
    a response's last chunk and its end then leave in one send).
    """
    if _reading[0]:
        _holding[sender] = None
        return True
    return False


#: How many callers asked for frames to wait for the end of the reactor's
#: turn (see L{HoldFramesForTurn}).
_for_turn = [0]
#: The clock whose turn's end is awaited, and the call that ends it there.
_turn_end: list[Any] = [None, None]


def _await_turn_end(clock: Any) -> None:
    """Have everything held sent at the end of C{clock}'s turn (once per turn)."""
    awaited, call = _turn_end
    # A call of another clock (a test's, never advanced) does not count.
    if awaited is clock and call.active():
        return
    _turn_end[0] = clock
    _turn_end[1] = clock.callLater(0, _turn_ended)


def _turn_ended() -> None:
    _turn_end[0] = _turn_end[1] = None
    if not _reading[0]:
        _send_all_held()


class HoldFramesForTurn:
    """
    Within C{with HOLD_FRAMES_FOR_TURN:}, frames sent over plain sockets
    wait for the end of the reactor's turn and leave together, one send per
    connection: for callers that send one event per read of their own (the
    gateway, one request per client read), so that the events of every
    client read in one turn share a send, as answers read together do.
    """

    def __enter__(self) -> None:
        if not _for_turn[0]:
            _begin_holding()
        _for_turn[0] += 1

    def __exit__(self, *exc_info: object) -> None:
        _for_turn[0] -= 1


#: See L{HoldFramesForTurn}.
HOLD_FRAMES_FOR_TURN = HoldFramesForTurn()


@implementer(IPushProducer, IHandshakeListener)
class _PooledConnectionProtocol(FrameReceiver):
    """
    What the proxy's end of an agent connection is once it is in the pool,
    whoever dialled: the L{FrameSink <sentinel_twisted.proxy.connection.FrameSink>}
    its L{AgentConnection} writes through, and back-pressure from the
    transport (it pauses us when the agent stops reading and its write
    buffer fills, and resumes us when it drains).

    A connection it closes is gone within the factory's C{close_grace}
    (see L{_end_transport}), whatever the peer and the TLS layer do.
    """

    connection: AgentConnection | None = None
    _abort_on_close = False
    # A TLS transport whose handshake has not completed: until it does,
    # nothing written reaches the peer (see _end_transport).
    _tls_handshake_pending = False
    # Aborts a close that is overdue; None when no close waits.
    _close_timer: IDelayedCall | None = None
    _transport_gone = False
    _producing = False
    _close_detail: str | None = None
    _lifecycle: Any
    # frame_received is an attribute that changes with the connection's
    # state (registration, the connection's own handler, ignore): the
    # framing calls it per frame, with no method in between.
    #: The factory that built it (a listener's or a dialler's).
    factory: Any
    # Frames written while frames are being read, sent at the end of the
    # read (see send_frame); None: this transport takes the usual path.
    _outgoing: list[bytes] | None = None

    def makeConnection(self, transport: Any) -> None:
        if writes_through(transport):
            self._outgoing = []
        elif ISSLTransport.providedBy(transport):
            self._tls_handshake_pending = True
        super().makeConnection(transport)

    def handshakeCompleted(self) -> None:
        """The TLS handshake is done (L{IHandshakeListener}): what is written now reaches the peer."""
        self._tls_handshake_pending = False

    # What is the same for every connection of one factory is read from it
    # rather than copied into each instance: an instance dict past a dozen
    # or so keys stops sharing its keys, and costs 650 bytes more per
    # connection (idle registered connections are counted in thousands).

    @property
    def MAX_CONTROL_LENGTH(self) -> int:  # type: ignore[override]
        """The longest small control frame read, in bytes (the factory's limit); a longer one is skipped."""
        limit: int = self.factory.config.max_control_frame_size
        return limit

    @property
    def frame_budget(self) -> Any:  # type: ignore[override]
        """The factory's account of the bytes held in incomplete frames."""
        return self.factory.frame_budget

    @property
    def frame_clock(self) -> Any:  # type: ignore[override]
        """The factory's clock once in the pool: a started frame must end within the deadline."""
        return self.factory.clock if self.connection is not None else None

    @property
    def frame_timeout(self) -> float | None:  # type: ignore[override]
        """The frame deadline once in the pool; C{None} before (the handshake has its timeout)."""
        if self.connection is None:
            return None
        deadline: float = self.factory.config.frame_deadline
        return deadline

    # -- writing at once ------------------------------------------------------
    #
    # A Twisted transport buffers every write until the reactor's next turn
    # and watches the socket for writability meanwhile: per round trip at
    # low concurrency, an extra turn and two epoll_ctl calls.  On a plain
    # socket whose buffer is empty we send at once instead.  Frames written
    # while the proxy's ends are reading (answers that lead to new
    # requests) are held and sent together when the read is done, one send
    # per connection, so batching is kept at high concurrency.  Whatever
    # the socket does not take goes to the transport, which carries on.

    def send_frame(self, message_type: int, payload: bytes) -> None:
        held = self._outgoing
        if held is None or self.transport is None:
            super().send_frame(message_type, payload)
            return
        size = len(payload)
        if size >= MAX_MESSAGE_SIZE:
            raise MessageTooLarge(size + 1, MAX_MESSAGE_SIZE)
        held.append(_HEADER.pack(size + 1, message_type))
        held.append(payload)
        if _reading[0]:
            _holding[self] = None
        elif _for_turn[0]:
            _holding[self] = None
            _await_turn_end(self.transport.reactor)  # type: ignore[attr-defined]
        else:
            self._send_held()

    def dataReceived(self, data: bytes) -> None:
        # _begin_holding and the _BATCH_WAITING test spelled out, and the
        # framing's dataReceived called directly: this runs per read.
        reading = _reading
        # The requests waiting on the pool's connections and ever sent on
        # them (see _BATCH_WAITING).
        counts = self.factory.pool.pending_counts
        added = counts[1]
        if not reading[0] and not _holding:
            _hold_period[0] += 1
        reading[0] += 1
        try:
            FrameReceiver.dataReceived(self, data)
        finally:
            reading[0] -= 1
            if not reading[0] and _holding:
                if counts[0] - (counts[1] - added) >= _BATCH_WAITING:
                    # Answers from other connections may be read in this
                    # turn too: what they lead to leaves with what this
                    # read led to, one send per connection at the end of
                    # the turn of the reactor that runs the transports (only
                    # socket transports, which have one, hold frames).
                    _await_turn_end(self.transport.reactor)  # type: ignore[union-attr]
                else:
                    # Few requests in flight: little would come to join.
                    _send_all_held()

    def _send_held(self) -> None:
        held = self._outgoing
        if not held:
            return
        data = b"".join(held)
        held.clear()
        transport: Any = self.transport
        if transport is not None:
            send_now(transport, data)

    def _end_transport(self) -> None:
        """
        Close (or abort, see L{close_connection}) after what is held is sent.

        A close waits on the peer: for it to read what is still buffered,
        and over TLS for the TLS session to end.  Twisted's TLS layer holds
        a close requested before the TLS handshake is complete, with
        anything written, until that handshake completes, which a peer that
        sends nothing (or part of a ClientHello) never lets happen.  Such a
        connection is aborted at once, as nothing written could reach its
        peer anyway; any other close that is not done within the factory's
        C{close_grace} is aborted then (L{_close_overdue}).
        """
        self._send_held()
        transport: Any = self.transport
        if transport is None or self._transport_gone:
            return
        if self._abort_on_close or self._tls_handshake_pending:
            transport.abortConnection()
            return
        transport.loseConnection()
        if self._close_timer is None and not self._transport_gone:
            self._close_timer = self.factory.clock.callLater(
                self.factory.config.close_grace, self._close_overdue
            )

    def _close_overdue(self) -> None:
        """The close grace is over and the connection is still there: abort it."""
        self._close_timer = None
        transport: Any = self.transport
        if transport is None or self._transport_gone:
            return
        self.factory.log_limiter.info(
            log,
            "close-overdue",
            "Connection from {peer} was not gone {grace} after it was closed; aborting it",
            peer=peer_text(getattr(self, "peer", "unknown"), 100),
            grace=format_duration(self.factory.config.close_grace),
        )
        transport.abortConnection()

    def _stop_close_timer(self) -> None:
        timer, self._close_timer = self._close_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _ignore_frame(self, message_type: int, payload: bytes) -> None:
        pass

    def _serve(self, connection: AgentConnection) -> None:
        """Frames go to C{connection} from now on, which joins the pool."""
        self.connection = connection
        self.frame_received = connection.frame_received  # type: ignore[method-assign]
        self.MAX_LENGTH = MAX_MESSAGE_SIZE
        # A frame, once started, must be complete within the deadline (see
        # frame_clock and frame_timeout: they follow self.connection).
        # Back-pressure: the transport pauses us when the agent stops reading
        # and its write buffer fills, and resumes us when it drains.
        transport = self.transport
        if transport is not None:
            transport.registerProducer(self, True)  # type: ignore[attr-defined]
            self._producing = True
        self.factory.connection_registered(connection)

    def leave_registered(self, detail: str, close: bool) -> None:
        """Lifecycle: a connection in the pool ends (and is closed first if C{close})."""
        connection = self.connection
        assert connection is not None
        self.frame_received = self._ignore_frame  # type: ignore[method-assign]
        if close:
            self._close_detail = detail
            connection.mark_closing(detail)
            self.stop_parsing()
            transport = self.transport
            if transport is not None and self._producing:
                # A registered producer would keep the transport open.
                self._producing = False
                transport.unregisterProducer()  # type: ignore[attr-defined]
            self._end_transport()
        failed = connection.connection_lost(detail, transport_gone=not close)
        self.factory.connection_gone(connection, detail, failed)

    def frame_error(self, error: AgentProtocolError) -> None:
        self._lifecycle.protocol_violated(error)

    def control_frame_too_large(self, error: ControlFrameTooLarge) -> bool:
        """
        A Ping, Pong, HealthStatus or FlowControl over the control frame
        limit: skipped on a connection in the pool (the stream is sound, and
        its requests carry on), refused before (only the handshake may come).
        """
        connection = self.connection
        if connection is None:
            return False
        connection.log_limiter.warn(
            log,
            "control-frame-skipped",
            "Agent {agent_id} sent a {kind} frame of {size} bytes on connection {connection_id}, "
            "over the limit of {limit} for a {kind} frame; skipped it",
            kind=error.kind,
            size=error.size,
            limit=error.limit,
            **connection.log_fields(),
        )
        return True

    def connectionLost(self, reason: Failure = _CONNECTION_DONE) -> None:
        self._transport_gone = True
        self._stop_close_timer()
        detail = self.lost_detail(reason)
        # Whatever part of a frame is left goes (and leaves the budget).
        self.stop_parsing()
        self._lifecycle.connection_lost(detail)

    def close_connection(self, detail: str, abort: bool = False) -> None:
        """
        Close (or abort) the connection; see L{FrameSink <sentinel_twisted.proxy.connection.FrameSink>}.
        An abort of a connection already closing (waiting for its peer to
        read what is buffered) drops it now rather than at the close grace.
        """
        if abort and self._close_timer is not None:
            self._stop_close_timer()
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self._abort_on_close = abort
        self._lifecycle.close(detail)

    def pauseProducing(self) -> None:
        if self.connection is not None:
            self.connection.set_write_blocked(True)

    def resumeProducing(self) -> None:
        if self.connection is not None:
            self.connection.set_write_blocked(False)

    def stopProducing(self) -> None:
        pass


class ReverseConnectionProtocol(_PooledConnectionProtocol):
    """
    One agent connection on the proxy side.

    @ivar factory: the listener that accepted the connection.
    @ivar connection: the connection in the pool once the agent has
        registered, else C{None}.
    @ivar peer: the agent's address for logs (C{unix} or C{HOST:PORT}),
        C{unknown} before the connection is made.
    @ivar peer_credentials: C{(pid, uid, gid)} of a UNIX socket's peer
        (C{SO_PEERCRED}), C{None} elsewhere.
    @ivar MAX_LENGTH: the longest frame accepted, in bytes: the registration
        limit until the agent has registered.
    @ivar MAX_CONTROL_LENGTH: the longest small control frame read, in
        bytes; a longer one is skipped once registered.
    @ivar frame_clock: the factory's clock, for the frame deadline.
    @ivar pending_key: what the factory counts this connection against
        while it awaits registration: the peer's IPv4 address or IPv6 /64
        prefix (C{None}: a UNIX socket, or not counted).
    """

    peer_role = "agent"
    peer_credentials: tuple[int, int, int] | None = None
    pending_key: str | None = None

    def __init__(self, factory: ReverseConnectionFactory) -> None:
        self.factory = factory
        self.connection: AgentConnection | None = None
        self.peer = "unknown"
        self._lifecycle, self._core = new_lifecycle(self)
        self.frame_received = self._registration_frame  # type: ignore[method-assign]
        self._awaiting = True
        # Until registration a RegistrationRequest is all that may come.
        self.MAX_LENGTH = min(MAX_MESSAGE_SIZE, factory.config.max_registration_frame_size)

    # -- Twisted protocol -----------------------------------------------------

    def connectionMade(self) -> None:
        self.peer = describe_peer(self.transport)
        credentials = peer_credentials(self.transport)
        if credentials is not None:
            self.peer_credentials = credentials
        self._core.handshake_timer = self.factory.clock.callLater(
            self.factory.config.handshake_timeout, self._lifecycle.handshake_timed_out
        )

    def frame_budget_exceeded(self, held: int, total: int, limit: int) -> None:
        connection = self.connection
        self.factory.log_limiter.warn(
            log,
            "frame-budget",
            "Incomplete frames of all agent connections held {total} bytes (max: {limit}); "
            "closing {who} from {peer}, which held {held} of them",
            total=total,
            limit=limit,
            held=held,
            who=(
                "connection {connection_id} of agent {agent_id}".format(**connection.log_fields())
                if connection is not None
                else "a connection awaiting registration"
            ),
            peer=peer_text(self.peer, 100),
        )
        # Its peer sent much and read little, likely: do not wait on it.
        self._abort_on_close = True
        super().frame_budget_exceeded(held, total, limit)

    # -- registration ---------------------------------------------------------

    def _registration_frame(self, message_type: int, payload: bytes) -> None:
        if message_type != MessageType.HANDSHAKE_REQUEST:
            error = InvalidMessage(
                "Expected registration request (HandshakeRequest), got "
                + MessageType(message_type).wire_name
            )
            self._lifecycle.registration_refused(error, "")
            return
        try:
            request = m.decode_registration_request(payload)
        except AgentProtocolError as e:
            self._lifecycle.registration_refused(e, "")
            return
        if self.factory.config.require_client_cert:
            refusal = self.factory.admit(request, client_certificate(self.transport))
        else:
            # The common case calls admit() as it always has (wrappers of it
            # in embedding code keep working).
            refusal = self.factory.admit(request)
        if refusal is not None:
            self._lifecycle.registration_refused(refusal, request.agent_id)
            return
        self._share_with_agent(request)
        connection = self.factory.create_connection(self, request)
        self._lifecycle.registration_accepted(connection)

    def make_room(self, error: AgentProtocolError) -> None:
        """
        The factory needs this connection's place: refuse the registration it
        awaits with C{error} (counted and logged as any refusal) and close.
        """
        self._lifecycle.registration_refused(error, "")

    def _share_with_agent(self, request: m.RegistrationRequest) -> None:
        """
        The connections of one agent normally declare identical capabilities
        and metadata: a new one shares the copies its agent's live
        connection holds (about 1 KiB saved per registered connection).
        They are read-only by convention, like every registration field.
        """
        pool = getattr(self.factory, "pool", None)
        if pool is None:
            return
        for other in pool.connections(request.agent_id)[:1]:
            if other.capabilities == request.capabilities:
                request.capabilities = other.capabilities
            if request.metadata is not None and other.metadata == request.metadata:
                request.metadata = other.metadata

    def _write_response(self, response: m.RegistrationResponse) -> None:
        transport = self.transport
        if transport is not None and not getattr(transport, "disconnecting", False):
            self.send_frame(MessageType.HANDSHAKE_RESPONSE, m.encode(response))

    def _leave_awaiting(self) -> None:
        if self._awaiting:
            self._awaiting = False
            self.factory.registration_finished(self)

    # -- outputs of the lifecycle machine ----------------------------------

    def enter_registered(self, connection: AgentConnection) -> None:
        """Lifecycle: the registration was admitted; answer it and start serving C{connection}."""
        self._leave_awaiting()
        self._write_response(self.factory.success_response(connection.connection_id))
        self._serve(connection)

    def reject(self, error: AgentProtocolError, agent_id: str) -> None:
        """Lifecycle: refuse the registration with C{error} and close."""
        self._leave_awaiting()
        self.frame_received = self._ignore_frame  # type: ignore[method-assign]
        self.stop_parsing()
        self._write_response(self.factory.failure_response(error))
        self.factory.registration_rejected(error, agent_id, self.peer)
        self._close_detail = f"registration rejected: {error}"
        self._end_transport()

    def handshake_expired(self) -> None:
        """Lifecycle: no registration within the handshake timeout."""
        self.reject(RequestTimeout(self.factory.config.handshake_timeout), "")

    def drop(self, detail: str) -> None:
        """Lifecycle: close an unregistered connection without an answer (unreadable input)."""
        self._leave_awaiting()
        self.frame_received = self._ignore_frame  # type: ignore[method-assign]
        self.stop_parsing()
        self._close_detail = detail
        self._end_transport()

    def left_unregistered(self, detail: str) -> None:
        """Lifecycle: the connection ended before registering."""
        self._leave_awaiting()
        self.factory.log_limiter.info(
            log,
            "left-unregistered",
            "Connection from {peer} ended before registering: {detail}",
            peer=peer_text(self.peer, 100),
            detail=peer_text(detail, 100),
        )

    def finish_lost(self, detail: str) -> None:
        """Lifecycle: the transport is gone; wake whoever waits for the close."""
        self._leave_awaiting()
        connection = self.connection
        if connection is not None:
            # Wake close() waiters now that the transport is really gone.
            connection.connection_lost(detail)

