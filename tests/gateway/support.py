"""
End-to-end scaffolding for the gateway tests, all over real sockets on
127.0.0.1 and UNIX sockets in a temporary directory:

  HTTP client -> gateway (twistd sentinel-reverse's services) -> agents
  (L{ScriptedAgent}: written from SPEC.md with C{struct} and C{json}, nothing
  from C{sentinel_twisted}) -> upstream (L{Upstream}, a plain twisted.web site).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import struct
import tempfile
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint, serverFromString
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.logger import LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.resource import Resource

# -- the agent side, from SPEC.md -------------------------------------------------

HANDSHAKE_REQUEST = 0x01
HANDSHAKE_RESPONSE = 0x02
REQUEST_HEADERS = 0x10
REQUEST_BODY_CHUNK = 0x11
RESPONSE_HEADERS = 0x12
RESPONSE_BODY_CHUNK = 0x13
REQUEST_COMPLETE = 0x14
AGENT_RESPONSE = 0x20
HEALTH_STATUS = 0x30
FLOW_CONTROL = 0x33
CANCEL = 0x40
PING = 0x41
PONG = 0x42

EVENT_TYPES = {REQUEST_HEADERS, REQUEST_BODY_CHUNK, RESPONSE_HEADERS, RESPONSE_BODY_CHUNK, REQUEST_COMPLETE}

_LENGTH = struct.Struct("!I")


def logged_problems(events: list[Any]) -> list[str]:
    """
    The log lines of C{events} that say something went wrong unseen: a
    logged failure, an error or critical line, an unhandled error.
    """
    from twisted.logger import LogLevel, formatEvent

    return [
        formatEvent(e)
        for e in events
        if "log_failure" in e
        or e.get("log_level") in (LogLevel.error, LogLevel.critical)
        or "Unhandled" in (formatEvent(e) or "")
    ]


def property_knobs(name: str, examples: int) -> tuple[int, list[Any], bool]:
    """
    The examples, phases and derandomisation of a property module over
    real sockets, each changed from the environment to search further:
    C{SENTINEL_<name>_PROP_EXAMPLES=N} examples per run;
    C{SENTINEL_<name>_PROP_SHRINK=0} reports a failing example as found;
    C{SENTINEL_<name>_PROP_RANDOM=1} tries other examples on each run.
    """
    from hypothesis import Phase

    prefix = f"SENTINEL_{name}_PROP_"
    count = int(os.environ.get(prefix + "EXAMPLES", str(examples)))
    phases = [Phase.explicit, Phase.generate]
    if os.environ.get(prefix + "SHRINK") != "0":
        phases.append(Phase.shrink)
    return count, phases, os.environ.get(prefix + "RANDOM") != "1"


def encode_frame(message_type: int, body: Any) -> bytes:
    payload = json.dumps(body).encode("utf-8")
    return _LENGTH.pack(len(payload) + 1) + bytes([message_type]) + payload


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def warnings(events: list[Any]) -> list[str]:
    """The text of the warnings among captured log C{events}."""
    return [formatEvent(e) for e in events if e.get("log_level") == LogLevel.warn]


def event_cid(message_type: int, body: dict[str, Any]) -> str:
    """The id an agent answers by: metadata's for RequestHeaders, else top-level."""
    if message_type == REQUEST_HEADERS:
        return str(body["metadata"]["correlation_id"])
    return str(body["correlation_id"])


def answer(decision: Any = "allow", **fields: Any) -> dict[str, Any]:
    """An AgentResponse body (without the correlation id, added on sending)."""
    body = {"version": 2, "decision": decision}
    body.update(fields)
    return body


def block(status: int = 403, body: str | None = None, headers: dict[str, str] | None = None) -> dict[str, Any]:
    return answer({"block": {"status": status, "body": body, "headers": headers}})


Decider = Callable[["ScriptedAgent", int, dict[str, Any]], "dict[str, Any] | None"]


def allow_all(agent: ScriptedAgent, message_type: int, body: dict[str, Any]) -> dict[str, Any] | None:
    return answer()


class ScriptedAgent(Protocol):
    """
    A policy agent on a raw socket.  Every event is recorded in C{events};
    C{decide(agent, type, body)} returns the answer to send at once, or
    C{None} to hold the event (answer it later with L{reply}).
    """

    def __init__(
        self,
        agent_id: str,
        *,
        events: tuple[int, ...] = (1,),
        chunk_size: int = 65536,
        max_body: int = 1048576,
        decide: Decider = allow_all,
        metadata: Any = None,
        protocol_version: int = 2,
    ) -> None:
        self.agent_id = agent_id
        self.supported_events = events
        self.chunk_size = chunk_size
        self.max_body = max_body
        self.decide = decide
        self.metadata = metadata
        self.protocol_version = protocol_version
        self.buffer = bytearray()
        self.registration: dict[str, Any] | None = None
        self.registered: Deferred[dict[str, Any]] = Deferred()
        self.lost: Deferred[None] = Deferred()
        self.events: list[tuple[int, dict[str, Any]]] = []
        self.cancels: list[dict[str, Any]] = []
        self.held: list[tuple[int, dict[str, Any]]] = []
        self._waiters: list[tuple[Callable[[], bool], Deferred[None]]] = []
        self.connected = False

    # -- connection ----------------------------------------------------------------

    def connectionMade(self) -> None:
        self.connected = True
        request = {
            "protocol_version": self.protocol_version,
            "agent_id": self.agent_id,
            "capabilities": {
                "agent_id": self.agent_id,
                "name": "scripted test agent",
                "version": "1.0.0",
                "supported_events": list(self.supported_events),
                "features": {
                    "streaming_body": True,
                    "websocket": False,
                    "guardrails": False,
                    "config_push": False,
                    "metrics_export": False,
                    "concurrent_requests": 64,
                    "cancellation": True,
                    "flow_control": True,
                    "health_reporting": True,
                },
                "limits": {
                    "max_body_size": self.max_body,
                    "max_concurrency": 64,
                    "preferred_chunk_size": self.chunk_size,
                },
            },
            "auth_token": None,
            "metadata": self.metadata,
        }
        self.transport.write(encode_frame(HANDSHAKE_REQUEST, request))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected = False
        if not self.registered.called:
            self.registered.errback(reason)
        self.lost.callback(None)
        self._check()

    def dataReceived(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while len(buffer) >= 4:
            (length,) = _LENGTH.unpack_from(buffer)
            if len(buffer) < 4 + length:
                break
            message_type = buffer[4]
            payload = bytes(buffer[5 : 4 + length])
            del buffer[: 4 + length]
            self.frame_received(message_type, json.loads(payload))

    def frame_received(self, message_type: int, body: Any) -> None:
        if message_type == HANDSHAKE_RESPONSE:
            self.registration = body
            if body["success"]:
                self.registered.callback(body)
            else:
                self.registered.errback(Failure(RuntimeError(body["error"])))
        elif message_type in EVENT_TYPES:
            self.events.append((message_type, body))
            reply = self.decide(self, message_type, body)
            if reply is None:
                self.held.append((message_type, body))
            else:
                self.reply(message_type, body, reply)
        elif message_type == CANCEL:
            self.cancels.append(body)
        elif message_type == PING:
            self.transport.write(encode_frame(PONG, body))
        self._check()

    # -- acting ----------------------------------------------------------------------

    def reply(self, message_type: int, body: dict[str, Any], response: dict[str, Any]) -> None:
        response = dict(response)
        audit = dict(response.get("audit") or {})
        custom = dict(audit.get("custom") or {})
        custom["correlation_id"] = event_cid(message_type, body)
        audit["custom"] = custom
        response["audit"] = audit
        self.transport.write(encode_frame(AGENT_RESPONSE, response))

    def release(self, response: dict[str, Any] | None = None, index: int = 0) -> tuple[int, dict[str, Any]]:
        """Answer a held event (the oldest by default)."""
        message_type, body = self.held.pop(index)
        self.reply(message_type, body, response or answer())
        return message_type, body

    def pause(self) -> None:
        self.transport.write(encode_frame(FLOW_CONTROL, {"action": 1}))

    def resume(self) -> None:
        self.transport.write(encode_frame(FLOW_CONTROL, {"action": 2}))

    def health(self, state: int) -> None:
        self.transport.write(encode_frame(HEALTH_STATUS, {"state": state, "agent_id": self.agent_id}))

    def drop(self) -> None:
        self.transport.abortConnection()

    def of_type(self, message_type: int) -> list[dict[str, Any]]:
        return [body for t, body in self.events if t == message_type]

    # -- waiting -------------------------------------------------------------------

    def wait(self, predicate: Callable[[], bool], timeout: float = 5.0) -> Deferred[None]:
        """Fires once C{predicate()} holds after some frame (or at once)."""
        if predicate():
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiters.append((predicate, waiter))
        return waiter.addTimeout(timeout, reactor)

    def _check(self) -> None:
        keep = []
        for predicate, waiter in self._waiters:
            if waiter.called:
                continue
            if predicate():
                waiter.callback(None)
            else:
                keep.append((predicate, waiter))
        self._waiters = keep


# -- the upstream ------------------------------------------------------------------------


class Upstream(Resource):
    """
    A test upstream.  Records each request (method, uri, headers, body) and
    answers by path:

      - C{/slow}: never answers (until the test ends);
      - C{/drop}: closes the connection without answering;
      - C{/bytes?n=N}: answers N bytes of C{x} in 4 KiB writes;
      - C{/cut}: answers 5,000 of the 100,000 bytes it announces, then
        breaks its connection;
      - C{/echo-body}: answers the request body;
      - anything else: C{200 upstream saw PATH} with C{X-Upstream: yes}.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[dict[str, Any]] = []
        self.waiting: list[Any] = []

    def render(self, request: Any) -> Any:
        body = request.content.read()
        self.requests.append(
            {
                "method": request.method.decode(),
                "uri": request.uri.decode(),
                "headers": {
                    k.decode().lower(): [v.decode() for v in vs]
                    for k, vs in request.requestHeaders.getAllRawHeaders()
                },
                "body": body,
            }
        )
        path = request.path
        if path == b"/slow":
            self.waiting.append(request)
            return server.NOT_DONE_YET
        if path == b"/drop":
            request.transport.abortConnection()
            return server.NOT_DONE_YET
        if path == b"/bytes":
            count = int(request.args[b"n"][0])
            request.setHeader(b"Content-Length", b"%d" % count)
            sent = 0
            while sent < count:
                piece = min(4096, count - sent)
                request.write(b"x" * piece)
                sent += piece
            request.finish()
            return server.NOT_DONE_YET
        if path == b"/cut":
            request.setHeader(b"Content-Length", b"100000")
            request.write(b"c" * 5000)
            reactor.callLater(0.01, request.transport.abortConnection)
            return server.NOT_DONE_YET
        if path == b"/echo-body":
            request.setHeader(b"Content-Type", b"application/octet-stream")
            return body
        request.setHeader(b"X-Upstream", b"yes")
        request.setHeader(b"Content-Type", b"text/plain")
        return b"upstream saw " + request.uri


# -- tracking server-side connections, so every test ends with a clean reactor ----------


class OneAgentPool:
    """An in-memory pool of one agent, C{agent_id}, whose one connection is C{connection}."""

    def __init__(self, connection: Any, agent_id: str) -> None:
        self.connection = connection
        self.agent_id = agent_id

    def agent_ids(self) -> list[str]:
        return [self.agent_id]

    def select(self, agent_id: str) -> Any:
        return self.connection

    def add_observer(self, observer: object) -> None:
        """Its agent never comes or goes."""


def unreachable_url() -> str:
    """An http URL on loopback where nothing listens (a port just freed)."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return f"http://127.0.0.1:{port}"


def track(factory: Any) -> set[Any]:
    """Record the live protocols a server factory builds."""
    live: set[Any] = set()
    build = factory.buildProtocol

    def tracked(addr: Any) -> Any:
        protocol = build(addr)
        if protocol is None:
            return None
        lost = protocol.connectionLost

        def connection_lost(reason: Failure = connectionDone) -> Any:
            live.discard(protocol)
            return lost(reason)

        protocol.connectionLost = connection_lost
        live.add(protocol)
        return protocol

    factory.buildProtocol = tracked
    return live


async def listen_for(test: Any, factory: Any, description: str = "tcp:0:interface=127.0.0.1") -> Any:
    """
    Listen with C{factory} on C{description} for the length of C{test}: the
    port is closed, and the connections it took aborted, at its clean-up.
    """
    live = track(factory)
    port = await serverFromString(reactor, description).listen(factory)

    async def stop() -> None:
        await port.stopListening()
        for protocol in list(live):
            protocol.transport.abortConnection()
        await wait_until(lambda: not live, what="connections to close")

    test.addCleanup(lambda: ensureDeferred(stop()))
    return port


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    """Poll (bounded) until C{predicate()} holds."""
    waited = 0.0
    while not predicate():
        if waited >= timeout:
            raise AssertionError(f"timed out waiting for {what}: {reactor.getDelayedCalls()}")
        await deferLater(reactor, 0.01, lambda: None)
        waited += 0.01


# -- the HTTP client -------------------------------------------------------------------------


class Response:
    def __init__(self, code: int, headers: Headers, body: bytes) -> None:
        self.code = code
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<Response {self.code} {self.body[:200]!r}>"


class _Collect(Protocol):
    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.data))
        else:
            self.done.errback(reason)


class _ChunkedBody:
    """A request body of unknown length (sent chunked)."""

    length = UNKNOWN_LENGTH

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    def startProducing(self, consumer: Any) -> Deferred[None]:
        for piece in self.pieces:
            consumer.write(piece)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class Client:
    """An HTTP/1.1 client; persistent connections are closed at cleanup."""

    def __init__(self) -> None:
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.agent = Agent(reactor, pool=self.pool)

    async def request(
        self,
        method: str,
        url: str,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        chunks: list[bytes] | None = None,
    ) -> Response:
        producer: Any = None
        if chunks is not None:
            producer = _ChunkedBody(chunks)
        elif body is not None:
            producer = _FixedBody(body)
        h = Headers({k: [v] for k, v in (headers or {}).items()})
        response = await self.agent.request(method.encode(), url.encode(), h, producer)
        collector = _Collect()
        response.deliverBody(collector)
        data = await collector.done
        return Response(response.code, response.headers, data)

    def close(self) -> Deferred[None]:
        closed: Deferred[None] = self.pool.closeCachedConnections()
        return closed


class _FixedBody(_ChunkedBody):
    """A request body of known length, written at once."""

    def __init__(self, data: bytes) -> None:
        super().__init__([data])
        self.length = len(data)  # type: ignore[assignment]


class RawClient(Protocol):
    """A client that writes bytes and records what comes back."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: Deferred[None] = Deferred()
        self.is_lost = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.is_lost = True
        self.lost.callback(None)


# -- the harness -------------------------------------------------------------------------------


class Harness:
    """
    C{twistd sentinel-reverse}'s services built from its command line, with
    the agent listener on a UNIX socket in a temporary directory, the
    gateway and status site on ephemeral 127.0.0.1 ports, and (unless
    C{upstream=False}) a test upstream.
    """

    def __init__(self, test: Any) -> None:
        self.test = test
        self.dir = tempfile.mkdtemp(prefix="st-gw-")
        test.addCleanup(shutil.rmtree, self.dir, True)
        self.socket = os.path.join(self.dir, "agents.sock")
        self.agents: list[ScriptedAgent] = []
        self.client = Client()
        self.upstream = Upstream()
        self.upstream_port: Any = None
        self.top: Any = None
        self.gateway_service: Any = None
        self.http_port = 0
        self.status_port = 0
        self.live_http: set[Any] = set()
        self.live_upstream: set[Any] = set()
        self.live_status: set[Any] = set()
        self.raw_clients: list[RawClient] = []
        test.addCleanup(self.close)

    async def start(self, *argv: str, upstream: bool = True, http: str = "tcp:0:interface=127.0.0.1") -> Harness:
        from sentinel_twisted.gateway.service import GatewayService
        from sentinel_twisted.tap import Options, add_gateway, make_listener

        args = [
            "--listen", f"unix:{self.socket}",
            "--http", http,
            "--status", "tcp:0:interface=127.0.0.1",
            "--request-timeout", "5",
        ]  # fmt: skip
        if upstream and "--upstream" not in argv:
            site = server.Site(self.upstream)
            site.log = lambda request: None  # type: ignore[method-assign]
            self.live_upstream = track(site)
            self.upstream_port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(site)
            args += ["--upstream", f"http://127.0.0.1:{self.upstream_port.getHost().port}"]
        options = Options()
        options.parseOptions(args + list(argv))
        self.options = options
        top = make_listener(options, reactor)
        add_gateway(top, options, reactor)
        gateways = [s for s in top if isinstance(s, GatewayService)]
        self.gateway_service = gateways[0]
        self.live_http = track(self.gateway_service.site)
        self.live_status = track(self.gateway_service.status_site)
        top.startService()
        self.top = top
        self.factory = top.factory
        self.pool = top.factory.pool
        port = await self.gateway_service.http.listening
        self.http_port = port.getHost().port if hasattr(port.getHost(), "port") else 0
        status = await self.gateway_service.status.listening
        self.status_port = getattr(status.getHost(), "port", 0)
        return self

    @property
    def metrics(self) -> Any:
        return self.gateway_service.metrics

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def status_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.status_port}{path}"

    async def agent(self, agent_id: str, **kwargs: Any) -> ScriptedAgent:
        agent = ScriptedAgent(agent_id, **kwargs)
        self.agents.append(agent)
        await UNIXClientEndpoint(reactor, self.socket).connect(_OneShot(agent))
        await agent.registered
        return agent

    async def get(self, path: str, **kwargs: Any) -> Response:
        return await self.client.request("GET", self.url(path), **kwargs)

    async def post(self, path: str, body: bytes, **kwargs: Any) -> Response:
        return await self.client.request("POST", self.url(path), body=body, **kwargs)

    async def status(self, path: str) -> Response:
        return await self.client.request("GET", self.status_url(path))

    async def raw(self, data: bytes, port: int | None = None) -> RawClient:
        """Bytes to the gateway (or to C{port}: the status site's, say)."""
        client = RawClient()
        self.raw_clients.append(client)
        await TCP4ClientEndpoint(reactor, "127.0.0.1", port or self.http_port).connect(_OneShot(client))
        client.transport.write(data)
        return client

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else float(value)

    async def close(self) -> None:
        await self.client.close()
        for client in self.raw_clients:
            if not client.is_lost:
                client.transport.abortConnection()
        for request in self.upstream.waiting:
            if not request.finished and not request._disconnected:
                request.transport.abortConnection()
        for agent in self.agents:
            if agent.connected:
                agent.transport.abortConnection()
        if self.top is not None:
            await self.top.stopService()
        if self.upstream_port is not None:
            await self.upstream_port.stopListening()
        for live in (self.live_http, self.live_status, self.live_upstream):
            for protocol in list(live):
                transport = getattr(protocol, "_channel", protocol).transport
                if transport is not None:
                    transport.abortConnection()
        await wait_until(
            lambda: not (self.live_http or self.live_status or self.live_upstream)
            and all(not a.connected for a in self.agents)
            and all(c.is_lost for c in self.raw_clients)
            and (self.top is None or len(self.pool) == 0),
            what="every connection to close",
        )
        # Connection attempts (HostnameEndpoint) end a moment after success.
        await wait_until(
            lambda: not [call for call in reactor.getDelayedCalls() if "iterateEndpoint" in repr(call)],
            what="connection attempts to finish",
        )


class _OneShot(Factory):
    def __init__(self, protocol: Protocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self.protocol_instance


def small_chunks(test: Any) -> None:
    """
    Let agents of C{test} have chunks smaller than the gateway's floor
    (L{MIN_CHUNK_SIZE <sentinel_twisted.gateway.body.MIN_CHUNK_SIZE>}), so that
    a short body is cut in several chunks.
    """
    from sentinel_twisted.gateway import body

    test.patch(body, "MIN_CHUNK_SIZE", 1)
