"""
Test-session settings shared by every test module.

trial's C{TestCase.mktemp} makes its directories relative to the working
directory, which under pytest is the repository; point it at a temporary
directory instead so a test run leaves the tree clean.

Hypothesis's health checks on speed and data size fail a test on a
loaded machine (CI's two cores, running sockets and subprocesses) without
any property failing: they are off for every property test, and so is the
deadline, as the modules that set their own settings do already.
"""

from __future__ import annotations

import os
import tempfile

from hypothesis import HealthCheck, settings
from twisted.trial import unittest

settings.register_profile(
    "sentinel",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("sentinel")

_ROOT = tempfile.mkdtemp(prefix="sentinel-twisted-tests-")


def _mktemp(self: unittest.SynchronousTestCase) -> str:
    """A fresh path (not created) in a directory of its own, as trial's is."""
    name = f"{type(self).__name__}.{self._testMethodName}"[:64]
    return os.path.join(tempfile.mkdtemp(prefix=name + "-", dir=_ROOT), "temp")


unittest.SynchronousTestCase.mktemp = _mktemp  # type: ignore[method-assign]
