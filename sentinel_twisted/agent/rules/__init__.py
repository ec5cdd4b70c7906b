# -*- test-case-name: tests.agent.test_rules -*-
"""
A rule engine, and L{RulesAgent}: the agent C{twistd sentinel-agent} runs.

Rules live in a TOML (or JSON) file and are checked in file order against
each request's headers (and, for C{body} and C{body_contains}, its body).  A rule
matches when every condition in its C{match} table holds.  Header
operations and tags of every matching rule accumulate; the first matching
rule with a decision (C{block}, C{redirect}, C{require_header}) decides and
ends the evaluation.  No decision means allow.  A decision taken on the
body carries what the header phase gathered (its response header
operations, rule ids and tags), just as one taken on the headers does.
A rule looks like this::

    [[rules]]
    id = "no-admin"
    match = { path = "^/admin(/|$)" }
    block = { status = 403, body = "Forbidden" }

Errors are reported with the file, the rule and the reason, all of them at
once; a reload (SIGHUP) that finds a bad file keeps the rules it had.
"""

from __future__ import annotations

import ipaddress
import json
import os
import posixpath
import re
import sys
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import unquote, unquote_plus, urlsplit

import attrs
import re2  # type: ignore[import-untyped]
from twisted.logger import Logger

from ... import messages as m
from .._interfaces import HandlerResult
from ..base import Agent
from ..responses import ResponseBuilder, allow

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib  # type: ignore[import-not-found]

__all__ = [
    "Pattern",
    "Rule",
    "RuleSet",
    "RulesAgent",
    "RulesError",
    "compile_pattern",
    "load_rules",
    "parse_rules",
]

#: The module's logger.
log = Logger(namespace="sentinel_twisted.agent.rules")

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
_MATCH_KEYS = frozenset(
    {
        "method",
        "path",
        "uri",
        "query",
        "header",
        "header_present",
        "header_missing",
        "client_ip",
        "client_ip_not",
        "any_header",
        "body",
        "body_contains",
    }
)
_RULE_KEYS = frozenset(
    {
        "id",
        "description",
        "enabled",
        "match",
        "block",
        "redirect",
        "require_header",
        "request_headers",
        "response_headers",
        "tags",
    }
)
_TOP_KEYS = frozenset({"rules", "defaults"})
_DEFAULT_KEYS = frozenset({"block_status", "block_body", "redirect_status"})
_OP_KEYS = frozenset({"set", "add", "remove"})
#: Bytes of the body before each chunk that C{body} patterns see with it.
BODY_WINDOW = 8192
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


class RulesError(Exception):
    """
    A rules file that cannot be used.  C{problems} holds one line per
    problem (C{rule 'id' (#n): reason}); C{str()} prefixes each with the
    file name.

    @ivar source: the file (or other source) of the rules.
    @ivar problems: one line per problem.
    """

    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__(source, problems)
        self.source = source
        self.problems = problems

    def __str__(self) -> str:
        return "\n".join(f"{self.source}: {p}" for p in self.problems)


class _Problems(Exception):
    """Problems in one part of a rule, gathered by the compiler."""


@attrs.frozen
class _Defaults:
    block_status: int = 403
    block_body: str = "Forbidden"
    redirect_status: int = 302


class Pattern(Protocol):
    """A compiled rule pattern (RE2): what the rules ask of one."""

    def search(self, text: str) -> object | None:
        """A match of the pattern anywhere in C{text}, or C{None}."""


@attrs.frozen(kw_only=True)
class Rule:
    """
    One compiled rule.  Conditions that are C{None} or empty always hold.

    @ivar id: the rule's id, from the file.
    @ivar position: its place in the file, from 1.
    @ivar description: what it is for, from the file.
    @ivar methods: the methods it applies to (upper-case), C{None} for all.
    @ivar path: a pattern the request path must match (searched, not
        anchored).
    @ivar uri: the whole request target must match it.
    @ivar query: the query must match it.
    @ivar headers: C{(name, pattern)}: a value of each named header must match
        its pattern.
    @ivar any_header: some header value must match it.
    @ivar header_present: headers that must be there.
    @ivar header_missing: headers that must not be there.
    @ivar client_ip: networks the client address must be in (one of them);
        empty: any address.
    @ivar client_ip_not: networks the client address must not be in.
    @ivar body_contains: byte strings the body must contain (any of them).
    @ivar body: the body must match it.
    @ivar decision: what the rule decides when it matches, C{None}: it decides
        nothing.
    @ivar request_ops: header operations on the request when it matches.
    @ivar response_ops: header operations on the response when it matches.
    @ivar tags: audit tags added when it matches.
    """

    id: str
    position: int
    description: str = ""
    methods: frozenset[str] | None = None
    path: Pattern | None = None
    uri: Pattern | None = None
    query: Pattern | None = None
    headers: tuple[tuple[str, Pattern], ...] = ()
    any_header: Pattern | None = None
    header_present: tuple[str, ...] = ()
    header_missing: tuple[str, ...] = ()
    client_ip: tuple[_Network, ...] = ()
    client_ip_not: tuple[_Network, ...] = ()
    body_contains: tuple[bytes, ...] = ()
    body: Pattern | None = None
    decision: m.Decision | None = None
    request_ops: tuple[m.HeaderOp, ...] = ()
    response_ops: tuple[m.HeaderOp, ...] = ()
    tags: tuple[str, ...] = ()

    @property
    def on_body(self) -> bool:
        """Whether the rule looks at the body (and so decides on it)."""
        return bool(self.body_contains) or self.body is not None

    def matches(self, request: _RequestView) -> bool:
        """Whether every condition except those on the body holds."""
        if self.methods is not None and request.method not in self.methods:
            return False
        if self.path is not None and not _any_search(self.path, request.paths):
            return False
        if self.uri is not None and not _any_search(self.uri, request.uris):
            return False
        if self.query is not None and not _any_search(self.query, request.queries):
            return False
        for name, pattern in self.headers:
            if not _any_search(pattern, request.headers.get(name, ())):
                return False
        if self.any_header is not None and not _any_search(self.any_header, request.header_values):
            return False
        for name in self.header_present:
            if name not in request.headers:
                return False
        for name in self.header_missing:
            if name in request.headers:
                return False
        if self.client_ip and not _in_networks(request.client_ip, self.client_ip):
            return False
        if self.client_ip_not and _in_networks(request.client_ip, self.client_ip_not):
            return False
        return True


def _in_networks(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None, networks: tuple[_Network, ...]
) -> bool:
    # An unparseable client address is in no network: "client_ip" does not
    # match it and "client_ip_not" does, the cautious reading of both.
    return ip is not None and any(ip in net for net in networks if ip.version == net.version)


def _any_search(pattern: Pattern, values: Iterable[str]) -> bool:
    return any(pattern.search(v) is not None for v in values)


def _normalize_path(path: str) -> str:
    """
    Collapse repeated slashes and resolve C{.} and C{..} segments.  A
    trailing slash survives, and a last segment C{.} or C{..} leaves one
    (C{/a/b/.} is C{/a/b/}, C{/a/b/..} is C{/a/}), as RFC 3986 section
    5.2.4 removes dot segments.
    """
    if not path:
        return "/"
    collapsed = re.sub(r"/{2,}", "/", path)
    normalized = posixpath.normpath(collapsed)
    if normalized == ".":
        normalized = "/"
    directory = collapsed.endswith("/") or collapsed.rpartition("/")[2] in (".", "..")
    if directory and not normalized.endswith("/"):
        normalized += "/"
    return normalized


#: A path parameter (RFC 3986 section 3.3): C{;} up to the end of its segment.
_PATH_PARAMETER = re.compile(r";[^/]*")


def _without_parameters(path: str) -> str:
    """
    C{/admin;x/a;b=1} as C{/admin/a}: servlet containers (Tomcat, Jetty) and
    the frameworks on them drop path parameters before they route, so
    C{/admin;x} reaches C{/admin} there (and C{/a/..;/admin} is C{/admin}).
    """
    return _PATH_PARAMETER.sub("", path)


class _RequestView:
    """What rules look at in a RequestHeaders event, computed once."""

    __slots__ = ("method", "paths", "uris", "queries", "headers", "client_ip", "_header_values")

    def __init__(self, event: m.RequestHeadersEvent) -> None:
        self.method = event.method.upper()
        uri = event.uri
        if uri.startswith("/") or not uri:
            raw_path, _, raw_query = uri.partition("?")
        else:
            parts = urlsplit(uri)
            raw_path, raw_query = parts.path, parts.query
        decoded = unquote(raw_path)
        self.paths = _unique(
            (
                raw_path,
                decoded,
                _normalize_path(decoded),
                _normalize_path(_without_parameters(decoded)),
            )
        )
        self.uris = _unique((uri, unquote(uri)))
        self.queries = _unique((raw_query, unquote_plus(raw_query)))
        headers: dict[str, list[str]] = {}
        for name, values in event.headers.items():
            headers.setdefault(name.lower(), []).extend(values)
        self.headers = headers
        self._header_values: tuple[str, ...] | None = None
        try:
            ip = ipaddress.ip_address(event.metadata.client_ip)
        except ValueError:
            self.client_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
        else:
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            self.client_ip = ip

    @property
    def header_values(self) -> tuple[str, ...]:
        """Every header's values, as sent and percent-decoded (for C{any_header})."""
        if self._header_values is None:
            values = [v for vs in self.headers.values() for v in vs]
            self._header_values = _unique([*values, *map(unquote_plus, values)])
        return self._header_values


def _unique(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values))


# --------------------------------------------------------------------------
# Compiling


def _strings(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise _Problems(f"{where}: expected a string or a non-empty list of strings, got {_show(value)}")


def _show(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


_RE2_OPTIONS = re2.Options()
# A bad pattern is reported with its file and rule, not by RE2 on stderr.
_RE2_OPTIONS.log_errors = False


def compile_pattern(value: str) -> Pattern:
    r"""
    A rule's regular expression, compiled with RE2: matching takes time
    linear in the input whatever the pattern, so no request can make a rule
    backtrack for minutes.  (Python's C{re} can, on patterns as plain as
    C{( |/\*.*\*/)+x}: forty repetitions of C{" /* */"} keep it busy for
    longer than twenty seconds.)  The syntax is RE2's, as in the Rust
    C{regex} crate the reference agents use: no lookaround, no
    backreferences.

    @raise ValueError: the pattern is not valid RE2.
    """
    try:
        pattern: Pattern = re2.compile(value, options=_RE2_OPTIONS)
    except re2.error as e:
        reason = e.args[0] if e.args else e
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise ValueError(str(reason)) from None
    return pattern


def _regex(value: Any, where: str) -> Pattern:
    if not isinstance(value, str):
        raise _Problems(f"{where}: expected a regular expression string, got {_show(value)}")
    try:
        return compile_pattern(value)
    except ValueError as e:
        raise _Problems(f"{where}: invalid regular expression {value!r}: {e}") from None


def _header_name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _TOKEN.match(value):
        raise _Problems(f"{where}: invalid header name {_show(value)}")
    return value.lower()


def _header_value(value: Any, where: str) -> str:
    if not isinstance(value, str) or any(c in value for c in "\r\n\0"):
        raise _Problems(f"{where}: header value must be a single-line string, got {_show(value)}")
    return value


def _status(value: Any, low: int, high: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _Problems(f"{where}: status must be an integer from {low} to {high}, got {_show(value)}")
    return value


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Problems(f"{where}: expected a table, got {_show(value)}")
    return value


def _unknown(table: Mapping[str, Any], known: frozenset[str], where: str) -> None:
    extra = sorted(set(table) - known)
    if extra:
        raise _Problems(
            f"{where}unknown key{'s' if len(extra) > 1 else ''} {', '.join(map(repr, extra))} "
            f"(known: {', '.join(sorted(known))})"
        )


class _RuleCompiler:
    def __init__(self, raw: dict[str, Any], position: int, defaults: _Defaults) -> None:
        self.raw = raw
        self.position = position
        self.defaults = defaults
        self.problems: list[str] = []
        self.fields: dict[str, Any] = {}

    def step(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except _Problems as e:
            self.problems.append(str(e))
            return None

    def compile(self) -> Rule | None:
        raw = self.raw
        self.step(_unknown, raw, _RULE_KEYS, "")
        description = raw.get("description", "")
        if not isinstance(description, str):
            self.problems.append("description: expected a string")
        enabled = raw.get("enabled", True)
        if not isinstance(enabled, bool):
            self.problems.append("enabled: expected true or false")
        match = raw.get("match", {})
        if self.step(_table, match, "match") is not None:
            self.step(_unknown, match, _MATCH_KEYS, "match: ")
            self.step(self._match, match)
        self.step(self._actions, raw)
        tags = raw.get("tags")
        if tags is not None:
            self.fields["tags"] = tuple(self.step(_strings, tags, "tags") or ())
        if self.problems or enabled is not True:
            return None
        return Rule(
            id=raw["id"], position=self.position, description=description, **self.fields
        )

    def _match(self, match: dict[str, Any]) -> None:
        f = self.fields
        if "method" in match:
            methods = self.step(_strings, match["method"], "match.method")
            if methods is not None:
                f["methods"] = frozenset(x.upper() for x in methods)
        for key in ("path", "uri", "query", "any_header", "body"):
            if key in match:
                pattern = self.step(_regex, match[key], f"match.{key}")
                if pattern is not None:
                    f[key] = pattern
        if "header" in match:
            table = self.step(_table, match["header"], "match.header")
            if table is not None:
                headers = []
                for name, pattern in table.items():
                    where = f"match.header.{name}"
                    hname = self.step(_header_name, name, where)
                    regex = self.step(_regex, pattern, where)
                    if hname is not None and regex is not None:
                        headers.append((hname, regex))
                f["headers"] = tuple(headers)
        for key in ("header_present", "header_missing"):
            if key in match:
                names = self.step(_strings, match[key], f"match.{key}") or []
                f[key] = tuple(
                    n for n in (self.step(_header_name, x, f"match.{key}") for x in names) if n
                )
        for key in ("client_ip", "client_ip_not"):
            if key in match:
                networks = []
                for cidr in self.step(_strings, match[key], f"match.{key}") or []:
                    try:
                        networks.append(ipaddress.ip_network(cidr, strict=False))
                    except ValueError as e:
                        self.problems.append(f"match.{key}: {e}")
                f[key] = tuple(networks)
        if "body_contains" in match:
            needles = self.step(_strings, match["body_contains"], "match.body_contains") or []
            if any(not n for n in needles):
                self.problems.append("match.body_contains: empty strings match everything")
            f["body_contains"] = tuple(n.encode("utf-8") for n in needles)
            if "body" in match:
                self.problems.append(
                    "match: body and body_contains may be met by different chunks; "
                    "give one of them per rule"
                )

    def _actions(self, raw: dict[str, Any]) -> None:
        f = self.fields
        decisions = [k for k in ("block", "redirect", "require_header") if k in raw]
        if len(decisions) > 1:
            raise _Problems(f"at most one of block, redirect, require_header; got {', '.join(decisions)}")
        if "block" in raw:
            self.step(self._block, raw["block"])
        elif "redirect" in raw:
            self.step(self._redirect, raw["redirect"])
        elif "require_header" in raw:
            self.step(self._require, raw["require_header"])
        for key, target in (("request_headers", "request_ops"), ("response_headers", "response_ops")):
            if key in raw:
                ops = self.step(self._ops, raw[key], key)
                if ops is not None:
                    f[target] = ops
        if not decisions and not any(k in raw for k in ("request_headers", "response_headers", "tags")):
            raise _Problems(
                "no action: give block, redirect, require_header, request_headers, "
                "response_headers or tags"
            )
        body_key = next((k for k in ("body_contains", "body") if f.get(k)), None)
        if body_key and "decision" not in f and not self.problems:
            raise _Problems(
                f"match.{body_key} needs block or redirect: headers are already on their "
                "way when the body arrives"
            )

    def _block(self, value: Any) -> None:
        d = self.defaults
        if value is True:
            self.fields["decision"] = m.Block(d.block_status, d.block_body, None)
            return
        table = _table(value, "block")
        _unknown(table, frozenset({"status", "body", "headers"}), "block: ")
        status = _status(table.get("status", d.block_status), 100, 599, "block.status")
        body = table.get("body", d.block_body if status == d.block_status else _phrase(status))
        if body is not None and not isinstance(body, str):
            raise _Problems(f"block.body: expected a string, got {_show(body)}")
        headers = None
        if "headers" in table:
            headers = {
                _header_name(k, "block.headers"): _header_value(v, f"block.headers.{k}")
                for k, v in _table(table["headers"], "block.headers").items()
            }
        self.fields["decision"] = m.Block(status, body, headers)

    def _redirect(self, value: Any) -> None:
        if isinstance(value, str):
            value = {"url": value}
        table = _table(value, "redirect")
        _unknown(table, frozenset({"url", "status"}), "redirect: ")
        url = table.get("url")
        if not isinstance(url, str) or not url or any(c in url for c in "\r\n\0"):
            raise _Problems(f"redirect.url: expected a non-empty single-line string, got {_show(url)}")
        status = _status(table.get("status", self.defaults.redirect_status), 300, 399, "redirect.status")
        self.fields["decision"] = m.Redirect(url, status)

    def _require(self, value: Any) -> None:
        if isinstance(value, str):
            value = {"name": value}
        table = _table(value, "require_header")
        _unknown(table, frozenset({"name", "status", "body"}), "require_header: ")
        name = _header_name(table.get("name"), "require_header.name")
        status = _status(table.get("status", 400), 100, 599, "require_header.status")
        body = table.get("body", f"Missing required header: {name}")
        if not isinstance(body, str):
            raise _Problems(f"require_header.body: expected a string, got {_show(body)}")
        self.fields["header_missing"] = (*self.fields.get("header_missing", ()), name)
        self.fields["decision"] = m.Block(status, body, None)

    def _ops(self, value: Any, where: str) -> tuple[m.HeaderOp, ...]:
        table = _table(value, where)
        _unknown(table, _OP_KEYS, f"{where}: ")
        ops: list[m.HeaderOp] = []
        for kind in ("set", "add"):
            if kind in table:
                for name, val in _table(table[kind], f"{where}.{kind}").items():
                    hname = _header_name(name, f"{where}.{kind}")
                    hval = _header_value(val, f"{where}.{kind}.{name}")
                    ops.append(m.SetHeader(hname, hval) if kind == "set" else m.AddHeader(hname, hval))
        if "remove" in table:
            for name in _strings(table["remove"], f"{where}.remove"):
                ops.append(m.RemoveHeader(_header_name(name, f"{where}.remove")))
        if not ops:
            raise _Problems(f"{where}: no header operations")
        return tuple(ops)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"Status {status}"


def _defaults(raw: Any, problems: list[str]) -> _Defaults:
    if raw is None:
        return _Defaults()
    try:
        table = _table(raw, "defaults")
        _unknown(table, _DEFAULT_KEYS, "defaults: ")
        body = table.get("block_body", "Forbidden")
        if not isinstance(body, str):
            raise _Problems(f"defaults.block_body: expected a string, got {_show(body)}")
        return _Defaults(
            block_status=_status(table.get("block_status", 403), 100, 599, "defaults.block_status"),
            block_body=body,
            redirect_status=_status(table.get("redirect_status", 302), 300, 399, "defaults.redirect_status"),
        )
    except _Problems as e:
        problems.append(str(e))
        return _Defaults()


def parse_rules(document: Any, source: str = "<rules>") -> RuleSet:
    """
    Compile a parsed rules document (the TOML or JSON object).

    @raise RulesError: listing every problem found.
    """
    problems: list[str] = []
    if not isinstance(document, dict):
        raise RulesError(source, [f"expected a table with a 'rules' array, got {_show(document)}"])
    try:
        _unknown(document, _TOP_KEYS, "")
    except _Problems as e:
        problems.append(str(e))
    defaults = _defaults(document.get("defaults"), problems)
    raw_rules = document.get("rules", [])
    if not isinstance(raw_rules, list):
        raise RulesError(source, problems + ["'rules' must be an array of tables ([[rules]])"])
    rules: list[Rule] = []
    seen: dict[str, int] = {}
    for position, raw in enumerate(raw_rules, 1):
        if not isinstance(raw, dict):
            problems.append(f"rule #{position}: expected a table, got {_show(raw)}")
            continue
        rule_id = raw.get("id")
        if not isinstance(rule_id, str) or not _ID.match(rule_id):
            label = f"rule #{position}"
            problems.append(
                f"{label}: 'id' must be a string of letters, digits, '_', '.', ':' or '-', "
                f"got {_show(rule_id)}"
            )
            continue
        label = f"rule '{rule_id}' (#{position})"
        if rule_id in seen:
            problems.append(f"{label}: duplicate id (first used by rule #{seen[rule_id]})")
            continue
        seen[rule_id] = position
        compiler = _RuleCompiler(raw, position, defaults)
        rule = compiler.compile()
        problems.extend(f"{label}: {p}" for p in compiler.problems)
        if rule is not None:
            rules.append(rule)
    if problems:
        raise RulesError(source, problems)
    return RuleSet(tuple(rules), source)


def load_rules(path: str | os.PathLike[str]) -> RuleSet:
    """
    Read and compile a rules file: JSON if it ends in C{.json}, else TOML.

    @raise RulesError: for an unreadable file, a syntax error, or bad rules.
    """
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            data = f.read()
    except OSError as e:
        raise RulesError(source, [f"cannot read the rules file: {e.strerror or e}"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RulesError(source, [f"not UTF-8: {e}"]) from None
    if source.endswith(".json"):
        try:
            document = json.loads(text)
        except json.JSONDecodeError as e:
            raise RulesError(source, [f"invalid JSON: {e}"]) from None
    else:
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise RulesError(source, [f"invalid TOML: {e}"]) from None
    return parse_rules(document, source)


# --------------------------------------------------------------------------
# Evaluating


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
    """

    response: ResponseBuilder
    decided_by: Rule | None
    body_rules: tuple[Rule, ...]
    response_ops: tuple[m.HeaderOp, ...] = ()
    rule_ids: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()


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
    """

    rules: tuple[Rule, ...]
    source: str = "<rules>"

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
        """
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


class _BodyScan:
    """
    A request whose body some rules still have to see.  Each chunk is
    looked at with the end of the body before it: the longest needle less
    one byte for C{body_contains}, so no needle split across chunks is
    missed, and L{BODY_WINDOW} bytes for C{body} patterns.
    """

    __slots__ = ("verdict", "tail", "keep", "method", "uri", "client_ip", "json")

    def __init__(self, verdict: Verdict, event: m.RequestHeadersEvent) -> None:
        self.verdict = verdict
        self.method = event.method
        self.uri = event.uri
        self.client_ip = event.metadata.client_ip
        #: Whether the body is JSON (its string escapes are decoded for
        #: C{body} patterns); C{None}: no Content-Type, told by the first byte.
        self.json = _json_content_type(event.headers)
        self.tail = b""
        keep = [len(n) - 1 for r in verdict.body_rules for n in r.body_contains]
        if any(r.body is not None for r in verdict.body_rules):
            keep.append(BODY_WINDOW)
        self.keep = max(keep, default=0)

    def feed(self, chunk: bytes) -> Rule | None:
        data = self.tail + chunk
        if self.json is None and data.strip():
            self.json = data.lstrip()[:1] in (b"{", b"[")
        texts: tuple[str, ...] | None = None
        for rule in self.verdict.body_rules:
            if rule.body is not None:
                if texts is None:
                    texts = _body_texts(data, bool(self.json))
                if _any_search(rule.body, texts):
                    return rule
            elif any(needle in data for needle in rule.body_contains):
                return rule
        self.tail = data[-self.keep :] if self.keep else b""
        return None

    def decided(self, rule: Rule) -> ResponseBuilder:
        """The answer for C{rule} deciding on the body."""
        assert rule.decision is not None
        verdict = self.verdict
        builder = ResponseBuilder(rule.decision)
        builder.response_header_ops([*verdict.response_ops, *rule.response_ops])
        builder.rule(*verdict.rule_ids, rule.id)
        return builder.tag(*dict.fromkeys([*verdict.tags, *rule.tags]))


def _body_texts(data: bytes, json_body: bool = False) -> tuple[str, ...]:
    """
    A body's bytes as C{body} patterns see them: as text, form-decoded and,
    for a JSON body, with JSON's string escapes decoded (C{\\u0055NION} is
    C{UNION} to the application that parses it).
    """
    text = data.decode("utf-8", "replace")
    if json_body:
        return _unique((text, unquote_plus(text), _json_unescape(text)))
    return _unique((text, unquote_plus(text)))


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


class RulesAgent(Agent):
    """
    An agent that applies a L{RuleSet} from a file, reloadable at run time.

    Requests whose headers match a body rule are answered with
    C{needs_more} and their body chunks are scanned (across chunk
    boundaries); the first chunk in which a body rule matches decides.

    @param max_concurrency: events served at once per connection
        (announced in the capabilities); at least 1.
    @cvar name: the agent's name in its capabilities.
    @ivar path: the rules file.
    @ivar ruleset: the rules in force.
    @ivar max_concurrency: events served at once per connection (announced in
        the capabilities).
    """

    name = "sentinel-rules"
    #: Requests awaiting a body scan that are remembered at most (oldest go first).
    max_tracked_bodies = 10_000

    def __init__(self, path: str | os.PathLike[str], *, max_concurrency: int | None = None) -> None:
        if max_concurrency is not None and (
            isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1
        ):
            raise ValueError(f"max_concurrency must be a positive integer, got {max_concurrency!r}")
        self.path = os.fspath(path)
        self.ruleset = load_rules(self.path)
        if max_concurrency is not None:
            self.max_concurrency = max_concurrency
        self._bodies: OrderedDict[str, _BodyScan] = OrderedDict()

    def reload(self) -> bool:
        """
        Re-read the rules file.  On any error the current rules stay in
        force and the error is logged; returns whether the new rules took.
        """
        try:
            ruleset = load_rules(self.path)
        except RulesError as e:
            log.error(
                "Rules reload failed; keeping the {count} rule(s) in force:\n{error}",
                count=len(self.ruleset),
                error=str(e),
            )
            return False
        if ruleset.needs_body != self.ruleset.needs_body:
            log.warn(
                "The reloaded rules {change} request bodies; connections announce this when "
                "they register, so it takes effect as they reconnect",
                change="inspect" if ruleset.needs_body else "no longer inspect",
            )
        self.ruleset = ruleset
        log.info("Reloaded {count} rule(s) from {path}", count=len(ruleset), path=self.path)
        return True

    def supported_events(self) -> list[int]:
        events = [int(m.EventType.REQUEST_HEADERS)]
        if self.ruleset.needs_body:
            events += [int(m.EventType.REQUEST_BODY_CHUNK), int(m.EventType.REQUEST_COMPLETE)]
        return events

    def on_request_headers(self, event: m.RequestHeadersEvent) -> HandlerResult:
        verdict = self.ruleset.evaluate(event)
        cid = m.event_correlation_id(event)
        if verdict.decided_by is not None:
            self._log_decision(verdict.decided_by, event.method, event.uri, event.metadata.client_ip, cid)
        elif verdict.body_rules:
            self._track(cid, _BodyScan(verdict, event))
        return verdict.response

    def on_request_body_chunk(self, event: m.RequestBodyChunkEvent) -> HandlerResult:
        cid = event.correlation_id
        scan = self._bodies.get(cid)
        if scan is None:
            return allow()
        rule = scan.feed(event.body)
        if rule is not None or event.is_last:
            del self._bodies[cid]
        if rule is None:
            return allow().needs_more(not event.is_last)
        self._log_decision(
            rule, scan.method, f"{scan.uri} (body chunk {event.chunk_index})", scan.client_ip, cid
        )
        return scan.decided(rule)

    def on_request_complete(self, event: m.RequestCompleteEvent) -> HandlerResult:
        self._bodies.pop(event.correlation_id, None)
        return allow()

    def _track(self, cid: str, scan: _BodyScan) -> None:
        self._bodies[cid] = scan
        self._bodies.move_to_end(cid)
        while len(self._bodies) > self.max_tracked_bodies:
            self._bodies.popitem(last=False)

    def _log_decision(self, rule: Rule, method: str, uri: str, client_ip: str, cid: str) -> None:
        decision = rule.decision
        if isinstance(decision, m.Block):
            action = f"blocked ({decision.status})"
        elif isinstance(decision, m.Redirect):
            action = f"redirected ({decision.status} {decision.url})"
        else:
            action = "decided"
        log.info(
            "Rule {rule} {action}: {method} {uri}{client} [{cid}]",
            rule=rule.id,
            action=action,
            method=method,
            uri=uri,
            client=f" from {client_ip}" if client_ip else "",
            cid=cid,
        )
