"""
The API reference documents the API: every public name of the package
has a docstring, every public data attribute a description (the check
C{docs/build_apidocs.py} runs before pydoctor),
and what only the package calls stays off the public surface.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
import textwrap
from pathlib import Path
from types import ModuleType

from twisted.trial.unittest import TestCase

from sentinel_twisted.proxy.pool import AgentPool

ROOT = Path(__file__).resolve().parent.parent


def build_apidocs() -> ModuleType:
    """docs/build_apidocs.py as a module (docs/ is not a package)."""
    spec = importlib.util.spec_from_file_location("build_apidocs", ROOT / "docs" / "build_apidocs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class UndocumentedNamesTests(TestCase):
    def test_every_public_name_is_documented(self) -> None:
        self.assertEqual(build_apidocs().undocumented("sentinel_twisted"), [])

    def test_the_check_finds_what_is_undocumented(self) -> None:
        package = Path(tempfile.mkdtemp(prefix="apidocs-")) / "undoc_sample"
        package.mkdir()
        (package / "__init__.py").write_text('"""A package."""\n')
        (package / "_private.py").write_text("def helper():\n    pass\n")
        (package / "bare.py").write_text("X = 1\n")
        (package / "mod.py").write_text(
            textwrap.dedent(
                '''
                """A module."""
                import enum

                import msgspec
                from zope.interface import Interface, implementer

                LIMIT = 3

                #: Described.
                SIZE = 4


                class Colour(enum.Enum):
                    """
                    Colours.

                    @cvar RED: Described.
                    """

                    RED = 1
                    BLUE = 2


                class Point(msgspec.Struct):
                    """
                    A point.

                    @ivar x: Described.
                    """

                    x: int
                    y: int
                    _z: int = 0


                class IThing(Interface):
                    """A thing."""

                    def told():
                        """Told."""

                    def untold():
                        pass


                def documented():
                    """Yes."""


                def bare():
                    pass


                def _private():
                    pass


                class Base:
                    """A base."""

                    def __init__(self):
                        self.count = 0
                        self.label = ""
                        """Described."""
                        self._hidden_count = 0

                    def run(self):
                        """Runs."""

                    def stop(self):
                        pass

                    @property
                    def size(self):
                        return 0

                    def _hidden(self):
                        pass


                @implementer(IThing)
                class Child(Base):
                    def run(self):
                        pass

                    def told(self):
                        pass
                '''
            )
        )
        sys.path.insert(0, str(package.parent))
        self.addCleanup(sys.path.remove, str(package.parent))
        self.addCleanup(
            lambda: [sys.modules.pop(n) for n in list(sys.modules) if n.startswith("undoc_sample")]
        )
        self.assertEqual(
            build_apidocs().undocumented("undoc_sample"),
            [
                "undoc_sample.bare",
                "undoc_sample.bare.X",
                "undoc_sample.mod.Base.count",
                "undoc_sample.mod.Base.size",
                "undoc_sample.mod.Base.stop",
                "undoc_sample.mod.Child",
                "undoc_sample.mod.Child.size",
                "undoc_sample.mod.Child.stop",
                "undoc_sample.mod.Colour.BLUE",
                "undoc_sample.mod.IThing.untold",
                "undoc_sample.mod.LIMIT",
                "undoc_sample.mod.Point.y",
                "undoc_sample.mod.bare",
            ],
        )


class PublicSurfaceTests(TestCase):
    def test_connection_callbacks_are_not_public_pool_methods(self) -> None:
        public = {name for name in vars(AgentPool) if not name.startswith("_")}
        self.assertEqual({name for name in public if name.startswith("connection_")}, set())
        # They are still there, under private names, for the connections.
        self.assertTrue(callable(AgentPool._connection_answered))
