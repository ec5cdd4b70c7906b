# -*- test-case-name: tests.agent.test_rules -*-
"""
Compiling a rules document (TOML or JSON) into a L{RuleSet}, every
problem reported at once with its rule.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import sys
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

import re2  # type: ignore[import-untyped]

from ... import messages as m
from ...wire import MAX_MESSAGE_SIZE
from ._decode import MAX_INFLATE_RATIO, MAX_INFLATED_SIZE, BodyPolicy
from ._evaluate import RuleSet
from ._limits import (
    MAX_HEADER_BYTES,
    MAX_HEADERS,
    MAX_METHOD_LENGTH,
    MAX_URI_LENGTH,
    TOKEN,
    RequestPolicy,
)
from ._model import Pattern, Rule, RulesError, _Defaults, _Problems

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib  # type: ignore[import-not-found]


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
_TOP_KEYS = frozenset({"rules", "defaults", "body", "request"})
_DEFAULT_KEYS = frozenset({"block_status", "block_body", "redirect_status"})
_OP_KEYS = frozenset({"set", "add", "remove"})


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
    if not isinstance(value, str) or TOKEN.fullmatch(value) is None:
        raise _Problems(f"{where}: invalid header name {_show(value)}")
    return value.lower()


#: Where IPv4-mapped IPv6 addresses are (RFC 4291 section 2.5.5.2).
_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def _network(cidr: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """
    A C{client_ip} network.  One of IPv4-mapped addresses
    (C{::ffff:10.0.0.0/104}, as dual-stack servers log IPv4 clients) is
    its IPv4 network: a client address is matched as IPv4 when it is
    mapped, so the IPv6 form would never match any client.
    """
    network = ipaddress.ip_network(cidr, strict=False)
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_IPV4_MAPPED):
        mapped = network.network_address.ipv4_mapped
        assert mapped is not None
        return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def _method(value: str, where: str) -> str:
    # A request whose method is no token never reaches the rules (see
    # [request]): a rule on one would silently match nothing.
    if TOKEN.fullmatch(value) is None:
        raise _Problems(f"{where}: invalid method {_show(value)} (a method is an HTTP token, as GET or PURGE)")
    return value


def _header_value(value: Any, where: str) -> str:
    if not isinstance(value, str) or any(c in value for c in "\r\n\0"):
        raise _Problems(f"{where}: header value must be a single-line string, got {_show(value)}")
    return value


#: The statuses a block (C{block}, C{require_header}, C{[defaults]
#: block_status}) may answer with: a client or server error.  The wire lets
#: an agent send any status, but the gateway of C{twistd sentinel-reverse}
#: answers C{500} in place of a block outside these, so a rule that says
#: C{302} or C{200} is refused when the file is loaded, not at request time.
_BLOCK_STATUSES = (400, 599)
_BLOCK_HINT = "a block answers with a client or server error; redirect takes 300 to 399"


def _status(value: Any, low: int, high: int, where: str, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        why = f" ({hint})" if hint else ""
        raise _Problems(f"{where}: status must be an integer from {low} to {high}{why}, got {_show(value)}")
    return value


def _block_status(value: Any, where: str) -> int:
    return _status(value, *_BLOCK_STATUSES, where, _BLOCK_HINT)


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
                f["methods"] = frozenset(
                    x.upper() for x in methods if self.step(_method, x, "match.method") is not None
                )
        for key in ("path", "uri", "query", "any_header", "body"):
            if key in match:
                pattern = self.step(_regex, match[key], f"match.{key}")
                if pattern is not None:
                    f[key] = pattern
        if "header" in match:
            table = self.step(_table, match["header"], "match.header")
            if table == {}:
                # Read as no condition, it would match every request.
                self.problems.append('match.header: no header named (give name = "regex")')
            elif table is not None:
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
                        networks.append(_network(cidr))
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
        status = _block_status(table.get("status", d.block_status), "block.status")
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
        status = _block_status(table.get("status", 400), "require_header.status")
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
            block_status=_block_status(table.get("block_status", 403), "defaults.block_status"),
            block_body=body,
            redirect_status=_status(table.get("redirect_status", 302), 300, 399, "defaults.redirect_status"),
        )
    except _Problems as e:
        problems.append(str(e))
        return _Defaults()


#: A bound of a C{[request]} table that lets any event through (a proxy's
#: events are at most 16 MiB), for the message that says 0 is not one.
_NO_BOUND = MAX_MESSAGE_SIZE


def _policy_table(
    raw: Any, name: str, counts: Mapping[str, int], problems: list[str], zero_hint: str = ""
) -> dict[str, Any] | None:
    """
    The keys of a policy table (C{[body]}, C{[request]}): C{uninspectable}
    (C{"block"}, the default, or C{"allow"}) and the positive integers
    C{counts} gives the defaults of.  Every problem is added to
    C{problems}, each naming the table and its key; C{None}: there were
    some.
    """
    if raw is None:
        return {}
    try:
        table = _table(raw, name)
    except _Problems as e:
        problems.append(str(e))
        return None
    found: list[str] = []
    try:
        _unknown(table, frozenset({"uninspectable", *counts}), f"{name}: ")
    except _Problems as e:
        found.append(str(e))
    values: dict[str, Any] = {}
    uninspectable = table.get("uninspectable", "block")
    if uninspectable not in ("block", "allow"):
        found.append(f"{name}.uninspectable: expected \"block\" or \"allow\", got {_show(uninspectable)}")
    values["uninspectable"] = uninspectable
    for key, default in counts.items():
        value = table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            hint = zero_hint if value == 0 and not isinstance(value, bool) else ""
            found.append(f"{name}.{key}: expected a positive integer, got {_show(value)}{hint}")
        values[key] = value
    problems.extend(found)
    return None if found else values


def _body_policy(raw: Any, problems: list[str]) -> BodyPolicy:
    counts = {"max_inflated_size": MAX_INFLATED_SIZE, "max_inflate_ratio": MAX_INFLATE_RATIO}
    values = _policy_table(raw, "body", counts, problems)
    return BodyPolicy() if values is None else BodyPolicy(**values)


def _request_policy(raw: Any, problems: list[str]) -> RequestPolicy:
    counts = {
        "max_uri_length": MAX_URI_LENGTH,
        "max_header_bytes": MAX_HEADER_BYTES,
        "max_headers": MAX_HEADERS,
        "max_method_length": MAX_METHOD_LENGTH,
    }
    hint = f" (0 is not \"no limit\": events are at most {_NO_BOUND:,} bytes, so {_NO_BOUND} lets any through)"
    values = _policy_table(raw, "request", counts, problems, hint)
    return RequestPolicy() if values is None else RequestPolicy(**values)


#: How deep a rules document may nest tables and arrays: a rule's deepest
#: value (C{rules[0].match.header.NAME}) is five levels down.
_MAX_DEPTH = 32

#: A lone surrogate: JSON's C{"\\ud800"} makes one, and it is no text
#: (it cannot be encoded, matched, or sent to a proxy).
_SURROGATE = re.compile("[\ud800-\udfff]")


def _unusable_values(document: Any) -> list[str]:
    """
    The places where C{document} holds a string that is no text, or nests
    deeper than L{_MAX_DEPTH} (which the rest of the compiler, and the
    messages quoting values, would meet as a C{RecursionError}).
    """
    problems: list[str] = []
    stack: list[tuple[str, Any, int]] = [("", document, 0)]
    while stack:
        where, value, depth = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value) is not None:
                problems.append(f"{where or 'the document'}: {_show(value)} holds a lone surrogate, which is not text")
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth == _MAX_DEPTH:
            problems.append(f"{where or 'the document'}: tables and arrays nested more than {_MAX_DEPTH} deep")
            continue
        if isinstance(value, list):
            stack.extend((f"{where}[{i}]", v, depth + 1) for i, v in enumerate(value))
            continue
        for key, v in value.items():
            name = f"{where}.{key}" if where else str(key)
            stack.append((name, key, depth + 1))
            stack.append((name, v, depth + 1))
    return sorted(set(problems))


def parse_rules(document: Any, source: str = "<rules>") -> RuleSet:
    """
    Compile a parsed rules document (the TOML or JSON object).

    @raise RulesError: listing every problem found.
    """
    problems: list[str] = _unusable_values(document)
    if problems:
        raise RulesError(source, problems)
    if not isinstance(document, dict):
        raise RulesError(source, [f"expected a table with a 'rules' array, got {_show(document)}"])
    try:
        _unknown(document, _TOP_KEYS, "")
    except _Problems as e:
        problems.append(str(e))
    defaults = _defaults(document.get("defaults"), problems)
    body = _body_policy(document.get("body"), problems)
    request = _request_policy(document.get("request"), problems)
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
    return RuleSet(tuple(rules), source, body, request)


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
            document = json.loads(text, object_pairs_hook=_json_table)
        except (json.JSONDecodeError, _DuplicateKey) as e:
            raise RulesError(source, [f"invalid JSON: {e}"]) from None
        except RecursionError:
            raise RulesError(source, ["invalid JSON: arrays or objects nested too deeply"]) from None
    else:
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise RulesError(source, [f"invalid TOML: {e}"]) from None
        except RecursionError:
            raise RulesError(source, ["invalid TOML: arrays or tables nested too deeply"]) from None
    return parse_rules(document, source)


class _DuplicateKey(ValueError):
    """A JSON object with a key twice."""


def _json_table(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """
    A JSON object, refused when it has a key twice: C{json.loads} keeps the
    last silently, so a second C{"rules"} or C{"match"} would drop the
    first without a word (TOML refuses a key defined twice).
    """
    table: dict[str, Any] = {}
    for key, value in pairs:
        if key in table:
            raise _DuplicateKey(f"the key {_show(key)} appears twice in one object")
        table[key] = value
    return table
