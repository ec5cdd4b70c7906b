"""
Test-session settings shared by every test module.

trial's C{TestCase.mktemp} makes its directories relative to the working
directory, which under pytest is the repository; point it at a temporary
directory instead so a test run leaves the tree clean.
"""

from __future__ import annotations

import os
import tempfile

from twisted.trial import unittest

_ROOT = tempfile.mkdtemp(prefix="sentinel-twisted-tests-")
_original_mktemp = unittest.TestCase.mktemp


def _mktemp(self: unittest.TestCase) -> str:
    path: str = _original_mktemp(self)
    return os.path.join(_ROOT, path)


unittest.TestCase.mktemp = _mktemp  # type: ignore[method-assign]
