"""
The request headers the agents judge are the ones the upstream receives:
the forwarding headers are the gateway's own whatever the client sent, and
header names with an underscore (which a WSGI upstream reads as dashes,
out of the agents' sight) are dropped before the agents see the request.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import UNIXAddress
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sentinel_twisted import messages as m
from sentinel_twisted.gateway.decisions import HOP_BY_HOP

from .._proxy_support import captured_log, log_text
from .support import REQUEST_HEADERS, Harness, ScriptedAgent, answer
from .test_target import InMemory

#: The client address of an in-memory request (StringTransport's).
PEER = "192.168.1.1"


def agents_view_is_the_upstreams(test: SynchronousTestCase, served: InMemory) -> None:
    """
    Every header the upstream received is, name and values, one the agent
    was shown; the agent was shown no other but the hop-by-hop ones,
    C{Host} and C{Content-Length} (the gateway's to set upstream).
    """
    (event,) = served.seen
    (upstream,) = served.upstream.headers
    shown = {name: [v.encode("utf-8") for v in values] for name, values in event.headers.items()}
    received = {name.decode("latin-1"): values for name, values in upstream.items()}
    not_forwarded = {n.decode() for n in HOP_BY_HOP} | {"host", "content-length"}
    test.assertEqual({k: v for k, v in shown.items() if k not in not_forwarded}, received)


class ForwardingHeaderTests(SynchronousTestCase):
    """The forwarding headers are the gateway's, and the agents see them so."""

    def test_the_clients_forwarding_headers_are_replaced(self) -> None:
        served = InMemory(
            b"GET /reset HTTP/1.1\r\nHost: shop.example\r\n"
            b"X-Forwarded-Host: evil.example\r\nX-Forwarded-Proto: https\r\n"
            b"Forwarded: host=evil.example;proto=https\r\nX-Forwarded-For: 10.9.9.9\r\n\r\n"
        )
        self.assertEqual(served.status, b"200")
        (upstream,) = served.upstream.headers
        self.assertEqual(upstream[b"x-forwarded-host"], [b"shop.example"])
        self.assertEqual(upstream[b"x-forwarded-proto"], [b"http"])
        self.assertEqual(upstream[b"x-forwarded-for"], [b"10.9.9.9, " + PEER.encode()])
        self.assertNotIn(b"forwarded", upstream)
        agents_view_is_the_upstreams(self, served)

    def test_without_host_the_clients_forwarded_host_is_removed(self) -> None:
        served = InMemory(
            b"GET /reset HTTP/1.0\r\nX-Forwarded-Host: evil.example\r\n"
            b"Forwarded: host=evil.example;proto=https\r\n\r\n"
        )
        self.assertEqual(served.status, b"200")
        (upstream,) = served.upstream.headers
        self.assertNotIn(b"x-forwarded-host", upstream)
        self.assertNotIn(b"forwarded", upstream)
        self.assertEqual(upstream[b"x-forwarded-proto"], [b"http"])
        agents_view_is_the_upstreams(self, served)

    def test_without_a_client_address_the_clients_forwarded_for_is_kept(self) -> None:
        # On a UNIX socket the client is a local process the socket's
        # permissions admitted (a front proxy): its chain is all there is.
        served = InMemory(
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.9.9.9\r\n\r\n", peer=UNIXAddress(None)
        )
        self.assertEqual(served.status, b"200")
        (upstream,) = served.upstream.headers
        self.assertEqual(upstream[b"x-forwarded-for"], [b"10.9.9.9"])
        self.assertEqual(served.seen[0].metadata.client_ip, "")
        agents_view_is_the_upstreams(self, served)

    def test_the_client_cannot_drop_them_through_connection(self) -> None:
        served = InMemory(
            b"GET / HTTP/1.1\r\nHost: x\r\n"
            b"Connection: X-Forwarded-For, X-Forwarded-Host, X-Forwarded-Proto, X-Other\r\n"
            b"X-Other: 1\r\n\r\n"
        )
        (upstream,) = served.upstream.headers
        self.assertEqual(upstream[b"x-forwarded-for"], [PEER.encode()])
        self.assertEqual(upstream[b"x-forwarded-host"], [b"x"])
        self.assertEqual(upstream[b"x-forwarded-proto"], [b"http"])
        self.assertNotIn(b"x-other", upstream)

    def test_an_agent_may_still_change_them(self) -> None:
        served = InMemory(
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            answer=m.AgentResponse(request_headers=[m.SetHeader(name="X-Forwarded-For", value="203.0.113.7")]),
        )
        self.assertEqual(served.upstream.headers[0][b"x-forwarded-for"], [b"203.0.113.7"])
        self.assertEqual(served.seen[0].headers["x-forwarded-for"], [PEER])


class UnderscoreHeaderTests(SynchronousTestCase):
    """
    C{X_Internal_User} is C{HTTP_X_INTERNAL_USER} to a WSGI upstream, as
    C{X-Internal-User} is: an agent removing C{x-internal-user} would miss
    it.  Dropped by default (nginx's C{underscores_in_headers off}).
    """

    REMOVE = m.AgentResponse(request_headers=[m.RemoveHeader(name="x-internal-user")])

    def test_dropped_before_the_agents_see_them(self) -> None:
        with captured_log() as events:
            served = InMemory(
                b"GET /whoami HTTP/1.1\r\nHost: x\r\nX_Internal_User: admin\r\nX-Internal-User: admin\r\n"
                b"X_Forwarded_Host: evil.example\r\nAccept: */*\r\n\r\n",
                answer=self.REMOVE,
            )
        self.assertEqual(served.status, b"200")
        (upstream,) = served.upstream.headers
        self.assertEqual([n for n in upstream if b"internal" in n or b"_" in n], [])
        self.assertEqual(upstream[b"x-forwarded-host"], [b"x"])
        self.assertEqual(upstream[b"accept"], [b"*/*"])
        self.assertNotIn("x_internal_user", served.seen[0].headers)
        text = log_text(events)
        self.assertIn(
            "Dropped request header(s) with an underscore in the name from GET request: "
            "X_internal_user, X_forwarded_host",
            text,
        )

    def test_the_agents_view_is_the_upstreams(self) -> None:
        served = InMemory(b"GET / HTTP/1.1\r\nHost: x\r\nX_A: 1\r\nX-B: 2\r\n\r\n")
        self.assertEqual(set(served.upstream.headers[0]) & {b"x_a", b"x-b"}, {b"x-b"})
        agents_view_is_the_upstreams(self, served)

    def test_kept_with_allow_underscore_headers(self) -> None:
        served = InMemory(
            b"GET / HTTP/1.1\r\nHost: x\r\nX_Internal_User: admin\r\n"
            b"X_Forwarded_Host: evil.example\r\nx_forwarded_for: 10.9.9.9\r\nForwarded_: x\r\n\r\n",
            allow_underscore_headers=True,
        )
        (upstream,) = served.upstream.headers
        self.assertEqual(upstream[b"x_internal_user"], [b"admin"])
        self.assertEqual(served.seen[0].headers["x_internal_user"], ["admin"])
        # Forwarding headers are the gateway's under any spelling.
        self.assertEqual([n for n in upstream if b"forwarded" in n and b"_" in n], [b"forwarded_"])
        self.assertEqual(upstream[b"x-forwarded-host"], [b"x"])
        agents_view_is_the_upstreams(self, served)


class EndToEndTests(TestCase):
    timeout = 20

    def test_an_agents_remove_cannot_be_dodged_with_underscores(self) -> Any:
        async def go() -> None:
            h = await Harness(self).start()

            def strip_identity(agent: ScriptedAgent, message_type: int, body: dict[str, Any]) -> dict[str, Any]:
                return answer(request_headers=[{"remove": {"name": "x-internal-user"}}])

            agent = await h.agent("waf", decide=strip_identity)
            for line in (b"X-Internal-User: admin", b"X_Internal_User: admin", b"x_internal-user: admin"):
                client = await h.raw(b"GET /whoami HTTP/1.1\r\nHost: x\r\n" + line + b"\r\nConnection: close\r\n\r\n")
                await client.lost
                self.assertTrue(client.received.startswith(b"HTTP/1.1 200 "), client.received)
                headers = h.upstream.requests[-1]["headers"]
                self.assertEqual(
                    [n for n in headers if n.replace("_", "-") == "x-internal-user"], [], (line, headers)
                )
                self.assertNotIn("x_internal_user", agent.of_type(REQUEST_HEADERS)[-1]["headers"])

        return ensureDeferred(go())
