# -*- test-case-name: tests.agent.test_rules -*-
"""
Evaluating the rules against a request: the header phase's L{Verdict},
and the body rules that wait for the body.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Mapping

import attrs

from ... import messages as m
from ..._peertext import peer_text
from ..responses import ResponseBuilder
from ._decode import (
    JSON_STARTS,
    BodyPolicy,
    Inflater,
    Transcoder,
    Uninspectable,
    content_codings,
    unsupported,
)
from ._limits import TAG, RequestPolicy
from ._model import Rule, _any_search, _RequestView, _unique, percent_decoded

#: Bytes of the body before each chunk that C{body} patterns see with it.
BODY_WINDOW = 8192

#: Characters of the proxy's method, client address and correlation id a
#: log line quotes (the URI gets the default, L{peer_text}'s).
SHORT_TEXT_IN_LOG = 64


def request_in_log(method: str, uri: str, client_ip: str) -> dict[str, str]:
    """
    The request a log line names, as the proxy sent it: cut short and
    escaped (a URI of megabytes, or one with a newline or a terminal
    escape, must not become the log's).  The fields C{method}, C{uri} and
    C{client} (C{" from ADDRESS"}, or nothing without an address).
    """
    return {
        "method": peer_text(method, SHORT_TEXT_IN_LOG),
        "uri": peer_text(uri),
        "client": f" from {peer_text(client_ip, SHORT_TEXT_IN_LOG)}" if client_ip else "",
    }


@attrs.frozen
class Verdict:
    """
    The outcome of the header phase: the answer to send, the rule that
    decided (if any), and the body rules still waiting for the body.  The
    response header operations, rule ids and tags gathered are kept for a
    decision taken on the body.

    @ivar response: the answer to send.
    @ivar decided_by: the rule that decided, C{None}: none did (allow, unless
        a body rule decides).
    @ivar body_rules: the body rules still waiting for the body.
    @ivar response_ops: the response header operations gathered.
    @ivar rule_ids: the ids of the rules that matched.
    @ivar tags: the tags gathered.
    @ivar uninspectable: why the request was past the bounds of the rules'
        L{RequestPolicy} (no rule saw it: the answer is the policy's),
        C{None}: it was within them.
    """

    response: ResponseBuilder
    decided_by: Rule | None
    body_rules: tuple[Rule, ...]
    response_ops: tuple[m.HeaderOp, ...] = ()
    rule_ids: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    uninspectable: Uninspectable | None = None


@attrs.frozen
class RuleSet:
    """
    The rules of one file, in order (see L{load_rules}).  The first rule
    that matches and has a decision decides; rules without one only add
    header operations and tags::

        verdict = load_rules("rules.toml").evaluate(event)
        answer = verdict.response.build()

    @ivar rules: the rules, in file order.
    @ivar source: where they came from (the file name), for messages.
    @ivar body: how body rules decode bodies, and what they do with one
        they cannot decode (the file's C{[body]} table).
    @ivar request: how large a request the rules inspect, and what happens
        to a larger one (the file's C{[request]} table).
    """

    rules: tuple[Rule, ...]
    source: str = "<rules>"
    body: BodyPolicy = BodyPolicy()
    request: RequestPolicy = RequestPolicy()

    def __len__(self) -> int:
        return len(self.rules)

    @property
    def needs_body(self) -> bool:
        """Whether any rule looks at request bodies."""
        return any(r.on_body for r in self.rules)

    def evaluate(self, event: m.RequestHeadersEvent) -> Verdict:
        """
        Apply the rules to a request's headers.  Rules that need the body are
        left in the verdict's C{body_rules}, and the answer asks for more
        (C{needs_more}) unless a header rule decided.

        A request past the bounds of the L{RequestPolicy} (its method,
        target, headers or client address) is not looked at: it is
        refused, or let through unmatched, by the policy (the verdict's
        C{uninspectable} says why), before anything is decoded,
        upper-cased or parsed.
        """
        failure = self.request.check(
            event.uri, event.headers, method=event.method, client_ip=event.metadata.client_ip
        )
        if failure is not None:
            return self._uninspectable(failure)
        request = _RequestView(event)
        request_ops: list[m.HeaderOp] = []
        response_ops: list[m.HeaderOp] = []
        rule_ids: list[str] = []
        tags: list[str] = []
        body_rules: list[Rule] = []
        decided: Rule | None = None
        decision: m.Decision = m.ALLOW
        for rule in self.rules:
            if not rule.matches(request):
                continue
            if rule.on_body:
                body_rules.append(rule)
                continue
            rule_ids.append(rule.id)
            tags.extend(rule.tags)
            request_ops.extend(rule.request_ops)
            response_ops.extend(rule.response_ops)
            if rule.decision is not None:
                decided, decision = rule, rule.decision
                break
        unique_tags = tuple(dict.fromkeys(tags))
        builder = ResponseBuilder(decision)
        builder.request_header_ops(request_ops).response_header_ops(response_ops)
        builder.rule(*rule_ids).tag(*unique_tags)
        if decided is not None:
            return Verdict(builder, decided, ())
        if body_rules:
            builder.needs_more()
        return Verdict(
            builder, None, tuple(body_rules), tuple(response_ops), tuple(rule_ids), unique_tags
        )

    def _uninspectable(self, failure: Uninspectable) -> Verdict:
        """The policy's answer for a request past its bounds."""
        if self.request.blocks:
            decision: m.Decision = m.Block(failure.status, f"Request cannot be inspected: {failure.reason}")
        else:
            decision = m.ALLOW
        builder = ResponseBuilder(decision).reason(failure.code).tag(TAG)
        return Verdict(builder, None, (), uninspectable=failure)


class _Reading:
    """
    One reading of a body (as sent, inflated, or transcoded to UTF-8)
    matched by the body rules.  Each piece is looked at with the end of
    the reading before it: the longest needle less one byte for
    C{body_contains}, so no needle split across pieces is missed, and
    L{BODY_WINDOW} bytes for C{body} patterns.

    @ivar json: whether JSON's string escapes are decoded for C{body}
        patterns; C{None}: not known yet (told by the first non-blank byte).
    """

    __slots__ = ("tail", "keep", "json")

    def __init__(self, keep: int, json: bool | None) -> None:
        self.tail = b""
        self.keep = keep
        self.json = json

    def feed(self, rules: tuple[Rule, ...], piece: bytes) -> Rule | None:
        data = self.tail + piece
        if self.json is None:
            start = data.removeprefix(codecs.BOM_UTF8).lstrip()
            if start:
                self.json = start[0] in JSON_STARTS
        texts: tuple[str, ...] | None = None
        for rule in rules:
            if rule.body is not None:
                if texts is None:
                    texts = _body_texts(data, bool(self.json))
                if _any_search(rule.body, texts):
                    return rule
            elif any(needle in data for needle in rule.body_contains):
                return rule
        self.tail = data[-self.keep :] if self.keep else b""
        return None


class _BodyScan:
    """
    A request whose body some rules still have to see, read as an upstream
    may decode it: as sent; inflated when it has a C{gzip} or C{deflate}
    content coding; as text when it is a JSON document in UTF-16 or UTF-32
    (see L{sentinel_twisted.agent.rules._decode}).  A body that cannot be
    decoded is refused or let through (matched as far as it was decoded)
    by the rules' L{BodyPolicy}; so is a compressed one when C{inflate} is
    false (the agent inflates as many bodies at once as it can afford).

    Of the request, only what a log line shows is kept (L{request_in_log}):
    thousands of requests may wait for their bodies, each with a target of
    up to C{max_uri_length}.
    """

    __slots__ = (
        "verdict",
        "policy",
        "logged",
        "raw",
        "inflater",
        "inflated",
        "transcoder",
        "transcoded",
        "coding_failure",
        "failures",
    )

    def __init__(
        self, verdict: Verdict, event: m.RequestHeadersEvent, policy: BodyPolicy, inflate: bool = True
    ) -> None:
        self.verdict = verdict
        self.policy = policy
        #: The request as a log line names it (L{request_in_log}).
        self.logged = request_in_log(event.method, event.uri, event.metadata.client_ip)
        keep = [len(n) - 1 for r in verdict.body_rules for n in r.body_contains]
        if any(r.body is not None for r in verdict.body_rules):
            keep.append(BODY_WINDOW)
        window = max(keep, default=0)
        # A JSON Content-Type reads the body as JSON; any other is told by
        # the body's first byte, as parsers that ignore the type read it.
        json = True if _json_content_type(event.headers) else None
        self.raw = _Reading(window, json)
        codings = content_codings(event.headers)
        #: Why the content coding cannot be decoded, told once the body
        #: turns out not to be empty.
        self.coding_failure = unsupported(codings)
        self.inflater: Inflater | None = None
        self.inflated: _Reading | None = None
        if codings and self.coding_failure is None:
            if inflate:
                self.inflater = Inflater(codings[0], policy)
                self.inflated = _Reading(window, json)
            else:
                self.coding_failure = Uninspectable(
                    "too many compressed request bodies are being inspected at once", 503, "body_inflate_busy"
                )
        self.transcoder: Transcoder | None = Transcoder()
        self.transcoded = _Reading(window, True)
        #: What could not be decoded (let through by the policy), for the log.
        self.failures: list[Uninspectable] = []

    @property
    def tail(self) -> bytes:
        """The end of the body as sent that the next chunk is matched with."""
        return self.raw.tail

    def feed(self, chunk: bytes, last: bool = False) -> Rule | Uninspectable | None:
        """The rule that decides on C{chunk}, or why the body cannot be inspected."""
        rules = self.verdict.body_rules
        rule = self.raw.feed(rules, chunk)
        if rule is not None:
            return rule
        failure = self.coding_failure
        if failure is not None:
            if not chunk:
                return None
            self.coding_failure = None
            if self.policy.blocks:
                return failure
            self.failures.append(failure)
            self.transcoder = None
        if self.inflater is None:
            return self._decoded(chunk, last)
        assert self.inflated is not None
        for piece in self.inflater.feed(chunk, last):
            rule = self.inflated.feed(rules, piece)
            if rule is None:
                rule = self._decoded(piece, False)
            if rule is not None:
                return rule
        failure = self.inflater.failure
        if failure is not None:
            self.inflater = None
            if self.policy.blocks:
                return failure
            self.failures.append(failure)
            self.transcoder = None
        elif last:
            return self._decoded(b"", True)
        return None

    def _decoded(self, piece: bytes, last: bool) -> Rule | None:
        """Match the body's text, when it is UTF-16 or UTF-32, by C{piece}."""
        if self.transcoder is None:
            return None
        text = self.transcoder.feed(piece, last)
        if self.transcoder.charset is not None and self.transcoder.charset.startswith("utf-8"):
            self.transcoder = None
        return self.transcoded.feed(self.verdict.body_rules, text) if text else None

    def evicted(self) -> _BodyScan:
        """This scan with its readers and inflater let go: what a refusal needs."""
        self.raw = self.transcoded = _Reading(0, None)
        self.inflated = self.inflater = self.transcoder = None
        return self

    def decided(self, rule: Rule) -> ResponseBuilder:
        """The answer for C{rule} deciding on the body."""
        assert rule.decision is not None
        verdict = self.verdict
        builder = ResponseBuilder(rule.decision)
        builder.response_header_ops([*verdict.response_ops, *rule.response_ops])
        builder.rule(*verdict.rule_ids, rule.id)
        return builder.tag(*dict.fromkeys([*verdict.tags, *rule.tags]))

    def refused(self, failure: Uninspectable) -> ResponseBuilder:
        """The answer for a body the rules cannot inspect (the policy blocks)."""
        verdict = self.verdict
        builder = ResponseBuilder(m.Block(failure.status, f"Request body cannot be inspected: {failure.reason}"))
        builder.response_header_ops(verdict.response_ops)
        builder.rule(*verdict.rule_ids).reason(failure.code)
        return builder.tag(*dict.fromkeys([*verdict.tags, "body-uninspectable"]))


def _body_texts(data: bytes, json_body: bool = False) -> tuple[str, ...]:
    """
    A body's bytes as C{body} patterns see them: as text, form-decoded and,
    for a JSON body, with JSON's string escapes decoded (C{\\u0055NION} is
    C{UNION} to the application that parses it).
    """
    text = data.decode("utf-8", "replace")
    if json_body:
        return _unique((text, percent_decoded(text, plus=True), _json_unescape(text)))
    return _unique((text, percent_decoded(text, plus=True)))


def _json_content_type(headers: Mapping[str, list[str]]) -> bool | None:
    """
    Whether a request's Content-Type is JSON (C{application/json},
    C{application/vnd.api+json}, ...); C{None} when it has none.
    """
    values = [v for name, vs in headers.items() if name.lower() == "content-type" for v in vs]
    if not values:
        return None
    for value in values:
        media = value.partition(";")[0].strip().lower()
        if media.endswith("/json") or media.endswith("+json"):
            return True
    return False


_JSON_ESCAPE = re.compile(
    r"\\(?:u([dD][89abAB][0-9a-fA-F]{2})\\u([dD][c-fC-F][0-9a-fA-F]{2})|u([0-9a-fA-F]{4})|([\"\\/bfnrt]))"
)
_JSON_SIMPLE = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


def _json_unescape_one(match: re.Match[str]) -> str:
    high, low, code, simple = match.groups()
    if high is not None:
        return chr(0x10000 + ((int(high, 16) - 0xD800) << 10) + (int(low, 16) - 0xDC00))
    if code is not None:
        char = int(code, 16)
        # A lone surrogate cannot be text.
        return "\ufffd" if 0xD800 <= char <= 0xDFFF else chr(char)
    return _JSON_SIMPLE[simple]


def _json_unescape(text: str) -> str:
    """
    Decode JSON's string escapes anywhere in C{text}, left to right (a
    window of a body may hold half a document, so it is not parsed).
    """
    return _JSON_ESCAPE.sub(_json_unescape_one, text) if "\\" in text else text


