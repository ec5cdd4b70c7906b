"""
Where the tests find the reference peers (C{rust-proxy}, C{rust-fwd-agent},
...): programs built from the reference crate, published beside the
repository in C{../shared/peers} (see its README).  C{$SENTINEL_PEERS}
points the tests at another directory.

Missing peers fail the interop tests with a clear message: a suite that
passes without them has proved nothing about interoperability.  The one
exception is a test run from an unpacked sdist, which has no C{../shared}
beside it: those tests are skipped, naming the path they looked in.
"""

from __future__ import annotations

import os
from pathlib import Path

from twisted.trial.unittest import SkipTest

__all__ = ["PEERS_ENV", "peer"]

PEERS_ENV = "SENTINEL_PEERS"
ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


class PeersMissing(AssertionError):
    """A reference peer program is not where CI puts it."""


def peers_dir() -> Path:
    override = os.environ.get(PEERS_ENV)
    return Path(override) if override else SHARED / "peers"


def peer(name: str) -> str:
    """The path of reference peer C{name}; fails (or skips, from an sdist) if it is missing."""
    directory = peers_dir()
    path = directory / name
    if os.access(path, os.X_OK):
        return str(path)
    if not os.environ.get(PEERS_ENV) and not SHARED.exists() and (ROOT / "PKG-INFO").exists():
        raise SkipTest(
            f"run from an sdist without the reference peers: {directory} does not exist "
            f"(set ${PEERS_ENV} to a directory holding {name} to run this test)"
        )
    raise PeersMissing(
        f"reference peer {path} is missing or not executable. CI provides the peers in "
        f"../shared/peers beside the repository; restore them there, or set ${PEERS_ENV} "
        f"to a directory that holds {name}."
    )
