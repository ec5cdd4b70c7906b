#!/usr/bin/env python3
"""
A toy proxy that embeds the sentinel_twisted listener.

Policy agents dial in to the endpoint given on the command line and
register.  Every line typed on standard input is one client request, which
the proxy runs past the agent before (pretending to) forward it upstream:

    GET /path [body]     an HTTP exchange: request headers, request body,
                         response headers, response body, request complete
                         (any method works: POST /login user=alice ...)
    WS text              a WebSocket text frame sent by a client
    PROMPT text          an LLM prompt to inspect for prompt injection
    CONFIGURE {json}     push a configuration to the agent
    HANGUP               every client still waiting hangs up

Run it, then start an agent that dials the same endpoint:

    python examples/embed_listener.py unix:/tmp/sentinel.sock:mode=600:lockfile=1

The embedding guide, docs/embedding.md, walks through this file.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, stdio, task
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import serverFromString
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from sentinel_twisted import messages as m
from sentinel_twisted.endpoints import (
    SocketInUse,
    clear_stale_unix_socket,
    unix_socket_path,
    with_owner_only_mode,
)
from sentinel_twisted.errors import (
    AgentUnavailable,
    ConnectionClosed,
    FlowControlPaused,
    RequestCancelled,
    RequestTimeout,
)
from sentinel_twisted.proxy import (
    AgentConnection,
    AgentPool,
    PoolObserver,
    ReverseConnectionConfig,
    ReverseConnectionFactory,
    TokenFileChecker,
)


def say(text: str) -> None:
    print(text, flush=True)


# -- 1. The proxy's own request object ---------------------------------------


@dataclass
class ProxiedRequest:
    """What our toy proxy knows about one client request (yours will differ)."""

    id: str
    method: str
    uri: str
    headers: dict[str, list[str]]
    body: bytes = b""
    status: int | None = None  # set once the request has an answer
    response_headers: dict[str, list[str]] = field(default_factory=dict)
    response_body: bytes = b""
    response_header_ops: list[m.HeaderOp] = field(default_factory=list)
    upstream: str = "default"
    forwarded: bool = False
    outcome: str = ""


def apply_header_op(headers: dict[str, list[str]], op: m.HeaderOp) -> None:
    name = op.name.lower()
    if isinstance(op, m.SetHeader):
        headers[name] = [op.value]
    elif isinstance(op, m.AddHeader):
        headers.setdefault(name, []).append(op.value)
    elif isinstance(op, m.RemoveHeader):
        headers.pop(name, None)


def apply_response(request: ProxiedRequest, answer: m.AgentResponse) -> bool:
    """
    Apply an agent's answer to our request.  Returns True when the answer
    ends the request (block, redirect, challenge): the client gets
    request.status and nothing goes upstream.
    """
    for op in answer.request_headers:
        apply_header_op(request.headers, op)
    # Response header changes wait for the response to exist.
    request.response_header_ops.extend(answer.response_headers)
    if answer.request_body_mutation is not None:
        replacement = answer.request_body_mutation.replacement
        if replacement is not None:  # None passes the chunk, b"" drops it
            request.body = replacement
    if answer.response_body_mutation is not None:
        replacement = answer.response_body_mutation.replacement
        if replacement is not None:
            request.response_body = replacement
    request.upstream = answer.routing_metadata.get("upstream", request.upstream)
    if answer.audit.rule_ids or answer.audit.tags:
        say(f"[{request.id}] audit: rules={answer.audit.rule_ids} tags={answer.audit.tags}")

    decision = answer.decision
    if isinstance(decision, m.Block):
        request.status = decision.status
        request.response_headers = {k.lower(): [v] for k, v in (decision.headers or {}).items()}
        request.response_body = (decision.body or "").encode()
        request.outcome = "blocked by agent"
    elif isinstance(decision, m.Redirect):
        request.status = decision.status
        request.response_headers = {"location": [decision.url]}
        request.outcome = "redirected by agent"
    elif isinstance(decision, m.Challenge):
        # Our proxy answers a challenge with a page the client must solve.
        request.status = 403
        request.response_body = f"challenge: {decision.challenge_type}".encode()
        request.outcome = "challenged by agent"
    else:  # m.Allow
        return False
    return True


# -- 2. Failures: one policy for every error the pool can report --------------


def apply_failure(request: ProxiedRequest, failure: Failure, fail_open: bool) -> None:
    """Turn a failed agent call into what the client gets."""
    error = failure.value
    if isinstance(error, RequestCancelled):
        # We cancelled it (pool.cancel_request / cancel_all): the reason says why.
        request.outcome = f"cancelled ({m.CancelReason(error.reason).name.lower()})"
        request.status = 499
        return
    if isinstance(error, CancelledError):
        # Someone called .cancel() on the Deferred: here, the client hung up.
        request.outcome = "client hung up"
        request.status = 499  # nobody left to answer
        return
    if isinstance(error, AgentUnavailable):
        status, what = 503, "no agent connected"
    elif isinstance(error, FlowControlPaused):
        # not_reading: none asked for a pause; the agent reads none of them.
        status, what = 503, "agent not reading" if error.not_reading else "agent asked for backpressure"
        request.response_headers["retry-after"] = ["1"]
    elif isinstance(error, RequestTimeout):
        status, what = 504, "agent did not answer in time"
    elif isinstance(error, ConnectionClosed):
        status, what = 502, "agent connection lost"
    else:
        failure.raiseException()  # a bug in this program: let it show
    if fail_open:
        request.outcome = f"{what} ({error}); failing open"
        request.status = None  # go on without the agent
    else:
        request.outcome = f"{what} ({error})"
        request.status = status


# -- 3. Watching agents come and go --------------------------------------------


class AgentWatcher(PoolObserver):
    """Pool observer: say what happens to the agents' connections."""

    def agent_registered(self, connection: AgentConnection) -> None:
        events = ",".join(sorted(e.name.lower() for e in connection.events))
        say(
            f"agent {connection.agent_id} registered connection "
            f"{connection.connection_id} (events: {events})"
        )

    def agent_disconnected(self, connection: AgentConnection, reason: str) -> None:
        say(f"agent {connection.agent_id} lost connection {connection.connection_id}: {reason}")

    def flow_control_changed(self, connection: AgentConnection, paused: bool) -> None:
        state = "paused" if paused else "resumed"
        say(f"agent {connection.agent_id} {state} connection {connection.connection_id}")

    def health_changed(self, connection: AgentConnection, state: int | None) -> None:
        name = m.HealthState(state).name.lower() if state in (1, 2, 3, 4) else str(state)
        say(f"agent {connection.agent_id} health: {name}")


# -- 4. Sending the eight events --------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def forward_upstream(request: ProxiedRequest) -> None:
    """Pretend to send the request upstream; the upstream always says 200."""
    request.forwarded = True
    request.response_headers = {"content-type": ["text/plain"]}
    request.response_body = f"hello from {request.upstream} for {request.uri}".encode()


class ToyProxy:
    def __init__(self, pool: AgentPool, agent_id: str, fail_open: bool) -> None:
        self.pool = pool
        self.agent_id = agent_id
        self.fail_open = fail_open
        self.waiting: set[Deferred[Any]] = set()  # agent calls clients wait for
        self.running: set[Deferred[None]] = set()
        self._ids = itertools.count(1)
        self._ws_frames = itertools.count()

    def ask(self, call: Deferred[m.AgentResponse]) -> Deferred[m.AgentResponse]:
        """Track an agent call so that a client hanging up can cancel it."""
        self.waiting.add(call)

        def done(result: object) -> object:
            self.waiting.discard(call)
            return result

        return call.addBoth(done)

    def hang_up(self) -> None:
        for call in list(self.waiting):
            call.cancel()  # the agent gets a Cancel frame; we get CancelledError

    def handle_line(self, line: str) -> None:
        verb, _, rest = line.strip().partition(" ")
        if not verb:
            return
        if verb == "HANGUP":
            self.hang_up()
            return
        request_id = f"req-{next(self._ids)}"
        if verb == "WS":
            work = self.websocket_frame(request_id, rest)
        elif verb == "PROMPT":
            work = self.guardrail(request_id, rest)
        elif verb == "CONFIGURE":
            work = self.configure(request_id, rest)
        else:
            uri, _, body = rest.partition(" ")
            request = ProxiedRequest(
                id=request_id,
                method=verb,
                uri=uri or "/",
                headers={"host": ["shop.example"], "user-agent": ["toy-client/1.0"]},
                body=body.encode(),
            )
            work = self.http_exchange(request)
        running = defer.ensureDeferred(work)
        self.running.add(running)
        running.addBoth(lambda _: self.running.discard(running))

    async def http_exchange(self, request: ProxiedRequest) -> None:
        try:
            await self.inspect(request)
        except Exception:
            apply_failure(request, Failure(), self.fail_open)
        if request.status is None:  # allowed, or failing open
            if not request.forwarded:
                forward_upstream(request)
            request.status = 200
            request.outcome = request.outcome or "allowed"
        for op in request.response_header_ops:
            apply_header_op(request.response_headers, op)
        say(f"[{request.id}] {request.method} {request.uri} -> {request.status} {request.outcome}")
        if request.forwarded:
            say(f"[{request.id}]   upstream {request.upstream} got {request.headers} {request.body!r}")
        say(f"[{request.id}]   client got {request.response_headers} {request.response_body!r}")

    async def inspect(self, request: ProxiedRequest) -> None:
        """Run one HTTP exchange past the agent, on one of its connections."""
        # Every event of one request goes to the same connection, so the
        # agent sees them all.  select() raises AgentUnavailable or
        # FlowControlPaused when no connection can take a new request.
        connection = self.pool.select(self.agent_id)
        wanted = connection.events  # the event types the agent declared
        cid = request.id  # one correlation id for the whole exchange
        started = time.time()

        metadata = m.RequestMetadata(
            correlation_id=cid,
            request_id=request.id,
            client_ip="203.0.113.7",
            client_port=54321,
            server_name="shop.example",
            timestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        )
        answer = await self.ask(
            connection.send_request_headers(
                m.RequestHeadersEvent(
                    metadata=metadata,
                    method=request.method,
                    uri=request.uri,
                    headers=request.headers,
                )
            )
        )
        if apply_response(request, answer):
            return

        body_wanted = bool(request.body) and m.EventType.REQUEST_BODY_CHUNK in wanted
        if body_wanted or answer.needs_more:
            answer = await self.ask(
                connection.send_request_body_chunk(
                    m.RequestBodyChunkEvent(
                        data=b64(request.body),
                        is_last=True,
                        total_size=len(request.body),
                        chunk_index=0,
                        bytes_received=len(request.body),
                    ),
                    correlation_id=cid,
                )
            )
            if apply_response(request, answer):
                return

        forward_upstream(request)
        if m.EventType.RESPONSE_HEADERS in wanted:
            answer = await self.ask(
                connection.send_response_headers(
                    m.ResponseHeadersEvent(status=200, headers=request.response_headers),
                    correlation_id=cid,
                )
            )
            if apply_response(request, answer):
                return
        if m.EventType.RESPONSE_BODY_CHUNK in wanted:
            body = request.response_body
            answer = await self.ask(
                connection.send_response_body_chunk(
                    m.ResponseBodyChunkEvent(
                        data=b64(body),
                        is_last=True,
                        total_size=len(body),
                        chunk_index=0,
                        bytes_sent=len(body),
                    ),
                    correlation_id=cid,
                )
            )
            apply_response(request, answer)

        if m.EventType.REQUEST_COMPLETE in wanted:
            # Tell the agent how it ended (for its logs); its answer changes nothing.
            await self.ask(
                connection.send_request_complete(
                    m.RequestCompleteEvent(
                        status=request.status or 200,
                        duration_ms=int((time.time() - started) * 1000),
                        request_body_size=len(request.body),
                        response_body_size=len(request.response_body),
                    ),
                    correlation_id=cid,
                )
            )

    async def websocket_frame(self, request_id: str, text: str) -> None:
        event = m.WebSocketFrameEvent(
            opcode="text",
            data=b64(text.encode()),
            client_to_server=True,
            frame_index=next(self._ws_frames),
            client_ip="203.0.113.7",
        )
        try:
            answer = await self.ask(
                self.pool.send_websocket_frame(self.agent_id, event, correlation_id=request_id)
            )
        except Exception:
            request = ProxiedRequest(request_id, "WS", "", {})
            apply_failure(request, Failure(), self.fail_open)
            say(f"[{request_id}] WS frame -> {request.outcome}")
            return
        verdict = answer.websocket_decision
        if isinstance(verdict, m.WebSocketClose):
            outcome = f"close the socket ({verdict.code} {verdict.reason})"
        elif isinstance(verdict, m.WebSocketDrop) or not answer.is_allow:
            outcome = "drop the frame"
        else:
            outcome = "forward the frame"
        say(f"[{request_id}] WS frame -> {outcome}")

    async def guardrail(self, request_id: str, prompt: str) -> None:
        event = m.GuardrailInspectEvent(inspection_type="prompt_injection", content=prompt)
        request = ProxiedRequest(request_id, "PROMPT", "", {})
        try:
            answer = await self.ask(
                self.pool.send_guardrail_inspect(self.agent_id, event, correlation_id=request_id)
            )
            if not apply_response(request, answer):
                request.outcome = "prompt passed"
        except Exception:
            apply_failure(request, Failure(), self.fail_open)
        say(f"[{request_id}] PROMPT -> {request.outcome} {request.response_body!r}")

    async def configure(self, request_id: str, text: str) -> None:
        try:
            config = json.loads(text or "{}")
        except ValueError as e:
            say(f"[{request_id}] CONFIGURE -> not JSON: {e}")
            return
        event = m.ConfigureEvent(config=config, config_version=request_id)
        request = ProxiedRequest(request_id, "CONFIGURE", "", {})
        try:
            answer = await self.ask(
                self.pool.send_configure(self.agent_id, event, correlation_id=request_id)
            )
            request.outcome = "accepted" if answer.is_allow else "rejected"
        except Exception:
            apply_failure(request, Failure(), self.fail_open)
        say(f"[{request_id}] CONFIGURE -> {request.outcome}")


# -- 5. Wiring it up ------------------------------------------------------------------


class ClientLines(LineReceiver):
    """Standard input: one client request per line."""

    delimiter = b"\n"

    def __init__(self, proxy: ToyProxy, finished: Deferred[None]) -> None:
        self.proxy = proxy
        self.finished = finished

    def lineReceived(self, line: bytes) -> None:
        self.proxy.handle_line(line.decode("utf-8", "replace"))

    def connectionLost(self, reason: object = None) -> None:
        # End of input: let the requests in progress finish, then stop.
        done = defer.DeferredList(list(self.proxy.running))
        done.addBoth(lambda _: self.finished.callback(None))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("endpoint", help="server endpoint string, e.g. unix:/tmp/s.sock or tcp:7000")
    parser.add_argument("--agent", default="waf-1", help="agent id to send requests to")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for an answer")
    parser.add_argument("--token-file", help="require agents to authenticate with these tokens")
    parser.add_argument("--fail-open", action="store_true", help="let requests through when the agent fails")
    parser.add_argument(
        "--dial", action="append", default=[], metavar="ID=ENDPOINT",
        help="also dial an agent that listens (forward mode), e.g. waf-1=unix:/run/agents/waf.sock",
    )  # fmt: skip
    return parser.parse_args(argv)


async def main(reactor: Any, *argv: str) -> None:
    args = parse_args(list(argv))
    config = ReverseConnectionConfig(
        request_timeout=args.timeout,
        require_auth=args.token_file is not None,
    )
    checker = TokenFileChecker(args.token_file) if args.token_file else None
    pool = AgentPool()
    pool.add_observer(AgentWatcher())
    factory = ReverseConnectionFactory(config, pool, token_checker=checker, clock=reactor)

    # Twisted makes UNIX sockets world-connectable (666) unless told
    # otherwise: make ours owner-only when the endpoint sets no mode.
    endpoint = with_owner_only_mode(args.endpoint)
    # A socket file left by a dead process would make listen() fail; one a
    # live process serves must not be stolen.
    path = unix_socket_path(endpoint)
    if path is not None:
        try:
            clear_stale_unix_socket(path)
        except SocketInUse as e:
            raise SystemExit(f"embed_listener: {e}") from None
    port = await serverFromString(reactor, endpoint).listen(factory)
    say(f"listening on {endpoint}")

    # Agents that listen (forward mode) join the same pool: it dials each,
    # redials with backoff when it goes away, and sends to it like to any.
    dialled = []
    for spec in args.dial:
        agent_id, _, agent_endpoint = spec.partition("=")
        service = pool.connect_agent(agent_endpoint, agent_id, connections=2, config=config, clock=reactor)
        dialled.append(service)

    proxy = ToyProxy(pool, args.agent, args.fail_open)

    async def shut_down() -> None:
        # Requests still waiting fail with RequestCancelled (proxy_shutdown),
        # the agents get a Cancel frame each, then their connections close.
        count = pool.cancel_all(m.CancelReason.PROXY_SHUTDOWN)
        if count:
            say(f"cancelled {count} waiting request(s)")
        for service in dialled:
            await service.stopService()  # no more redialling; closes its connections
        await port.stopListening()
        await pool.close_all("proxy shutting down")

    reactor.addSystemEventTrigger("before", "shutdown", lambda: defer.ensureDeferred(shut_down()))

    finished: Deferred[None] = Deferred()
    stdio.StandardIO(ClientLines(proxy, finished), reactor=reactor)
    await finished


if __name__ == "__main__":
    task.react(lambda reactor, *argv: defer.ensureDeferred(main(reactor, *argv)), sys.argv[1:])
