"""
The reference test vectors of the wire contract.

The repository ships a copy in C{tests/data/vectors} (reference data,
produced by the reference implementation's own types), so a fresh clone
tests the wire without anything beside it.  C{$SENTINEL_VECTORS} points the
tests at another directory; C{tests/test_vectors.py} proves the copy
byte-identical to C{../shared/vectors} whenever that exists.  Missing
vectors are a test failure with a clear message, never a silent skip: a
suite that passes without them has checked nothing about interoperability.
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path
from typing import Any

__all__ = [
    "VECTORS_ENV",
    "VectorsMissing",
    "by_name",
    "comparable",
    "frame_bytes",
    "ignored_fields",
    "load_all",
    "negative",
    "payload_json",
    "positive",
    "same_json",
    "vectors_dir",
]

VECTORS_ENV = "SENTINEL_VECTORS"
DEFAULT_DIR = Path(__file__).resolve().parent / "data" / "vectors"
#: Where the reference vectors are published beside the repository; the
#: shipped copy must stay byte-identical to it.
SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "vectors"

#: The RegistrationResponse fields that name the proxy rather than the
#: protocol (SPEC section 6): ours say "sentinel-proxy" and our version.
_PROXY_FIELDS = ("proxy_id", "proxy_version")
_HANDSHAKE_RESPONSE = 0x02


class VectorsMissing(AssertionError):
    """The shared vectors cannot be found; every vector test fails with this."""


#: The vectors of the ten events, one of each shape the reference writes.
EVENT_VECTORS = (
    "evt_request_headers",
    "evt_request_headers_minimal_metadata",
    "evt_request_body_chunk",
    "evt_response_headers",
    "evt_response_body_chunk",
    "evt_request_complete",
    "evt_websocket_frame",
    "evt_guardrail_inspect",
    "evt_guardrail_inspect_pii_minimal",
    "evt_configure",
)


def vectors_dir() -> Path:
    override = os.environ.get(VECTORS_ENV)
    path = Path(override) if override else DEFAULT_DIR
    if not path.is_dir() or not any(path.glob("*.json")):
        source = f"${VECTORS_ENV}={override}" if override else "the default location"
        raise VectorsMissing(
            f"No test vectors found in {path} ({source}). The repository ships "
            f"them in tests/data/vectors; restore that directory, or set "
            f"{VECTORS_ENV} to a directory of vectors."
        )
    return path


@cache
def _load(path: str) -> tuple[dict[str, Any], ...]:
    vectors = []
    for file in sorted(Path(path).glob("*.json")):
        if file.name == "index.json":
            continue
        with file.open(encoding="utf-8") as f:
            vector = json.load(f)
        vector.setdefault("name", file.stem)
        vectors.append(vector)
    return tuple(vectors)


def load_all() -> list[dict[str, Any]]:
    """Every vector (not the index), sorted by file name."""
    return list(_load(str(vectors_dir())))


def index_names() -> list[str]:
    """The names C{index.json} lists (empty if there is no index)."""
    index = vectors_dir() / "index.json"
    if not index.exists():
        return []
    with index.open(encoding="utf-8") as f:
        return list(json.load(f).get("files", []))


def by_name(name: str) -> dict[str, Any]:
    for vector in load_all():
        if vector["name"] == name:
            return vector
    raise VectorsMissing(f"vector {name!r} is not in {vectors_dir()}")


def positive() -> list[dict[str, Any]]:
    return [v for v in load_all() if v.get("kind") == "positive"]


def negative() -> list[dict[str, Any]]:
    return [v for v in load_all() if v.get("kind") == "negative"]


def frame_bytes(vector: dict[str, Any]) -> bytes:
    """The vector's frame as bytes (C{frame_hex}); C{b""} when it has none."""
    return bytes.fromhex(vector.get("frame_hex") or "")


def payload_json(vector: dict[str, Any]) -> Any:
    """The vector's payload, parsed."""
    return json.loads(vector["payload"])


def ignored_fields(vector: dict[str, Any]) -> tuple[str, ...]:
    """Fields whose values may differ: C{varying_fields}, plus the proxy's
    name and version in a RegistrationResponse."""
    fields = tuple(vector.get("varying_fields") or ())
    if vector.get("message_type") == _HANDSHAKE_RESPONSE:
        fields += _PROXY_FIELDS
    return fields


def comparable(value: Any, ignore: tuple[str, ...] | list[str]) -> Any:
    """
    A deep copy of parsed JSON in which each (dotted) C{ignore} field that
    is present has the value C{"<varying>"}: its value may differ, but it
    must still be present (or absent) on both sides.
    """
    copy = json.loads(json.dumps(value))
    for dotted in ignore:
        *parents, last = dotted.split(".")
        node = copy
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and last in node:
            node[last] = "<varying>"
    return copy


def same_json(actual: Any, vector: dict[str, Any]) -> tuple[Any, Any]:
    """C{(ours, theirs)} ready for C{assertEqual}: C{actual} (bytes, str or
    parsed JSON) and the vector's payload, both without ignored fields."""
    if isinstance(actual, (bytes, bytearray, str)):
        actual = json.loads(actual)
    ignore = ignored_fields(vector)
    return comparable(actual, ignore), comparable(payload_json(vector), ignore)
