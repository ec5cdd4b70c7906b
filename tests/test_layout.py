"""
The package's layout: the proxy side lives in L{sentinel_twisted.proxy},
and the import paths it had before keep working, with the same objects.
"""

from __future__ import annotations

import ast
import importlib
import pickle
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import TestCase

#: Every public name of every module that moved into the proxy package,
#: by its old module: what users may already import.  The old module must
#: give the very object the new one has.
MOVED = {
    "auth": [
        "ITokenChecker",
        "StaticTokenChecker",
        "TokenFileChecker",
        "TokenFileError",
        "parse_token_file",
    ],
    "config": [
        "MAX_ALLOW_FILE_BYTES",
        "AgentAllowlist",
        "AllowFileError",
        "ReverseConnectionConfig",
        "read_allow_file",
    ],
    "connection": ["AgentConnection", "ConnectionInfo", "FrameSink", "new_correlation_id"],
    "dialled": [
        "MAX_HANDSHAKE_RESPONSE_SIZE",
        "DialledAgentService",
        "ForwardConnectionFactory",
        "ForwardConnectionProtocol",
        "HandshakeRefused",
        "TLSFailed",
        "default_retry_policy",
        "encoding_list",
        "failure_reason",
        "parse_agent_endpoint",
    ],
    "factory": ["Rejection", "ReverseConnectionFactory", "rejection_reason"],
    "pending": ["PendingTable", "Waiter"],
    "pool": ["AgentInfo", "AgentPool", "IAgentPoolObserver", "PoolObserver"],
    "protocol": [
        "HOLD_FRAMES_FOR_TURN",
        "HoldFramesForTurn",
        "ReverseConnectionProtocol",
        "describe_peer",
        "peer_credentials",
        "send_after_read",
    ],
}


class OldImportPathTests(TestCase):
    def test_every_old_name_is_the_new_object(self) -> None:
        for module, names in MOVED.items():
            old = importlib.import_module(f"sentinel_twisted.{module}")
            new = importlib.import_module(f"sentinel_twisted.proxy.{module}")
            for name in names:
                with self.subTest(module=module, name=name):
                    self.assertIs(getattr(old, name), getattr(new, name))

    def test_the_lists_cover_every_public_name_of_the_new_modules(self) -> None:
        """
        A public name the new module exports is in the list above, so the
        old path cannot silently miss one.
        """
        for module, names in MOVED.items():
            new = importlib.import_module(f"sentinel_twisted.proxy.{module}")
            self.assertEqual(set(new.__all__) - set(names), set(), module)

    def test_star_import_from_an_old_path(self) -> None:
        """C{from sentinel_twisted.pool import *} gives what the new module exports."""
        for module in MOVED:
            old = importlib.import_module(f"sentinel_twisted.{module}")
            new = importlib.import_module(f"sentinel_twisted.proxy.{module}")
            self.assertEqual(old.__all__, new.__all__)
            namespace: dict[str, object] = {}
            exec(f"from sentinel_twisted.{module} import *", namespace)
            namespace.pop("__builtins__")
            self.assertEqual(namespace, {name: getattr(new, name) for name in new.__all__})

    def test_a_pickle_naming_an_old_path_loads(self) -> None:
        """A class pickled under its old module name unpickles to the same class."""
        from sentinel_twisted.proxy.pool import AgentPool

        self.assertIs(pickle.loads(b"csentinel_twisted.pool\nAgentPool\n."), AgentPool)

    def test_classes_name_their_new_module(self) -> None:
        """New pickles, reprs and the API reference name the proxy package."""
        from sentinel_twisted.pool import AgentPool

        self.assertEqual(AgentPool.__module__, "sentinel_twisted.proxy.pool")


#: The floor: what both sides share.  Each may import only other floor
#: modules of the package, never the proxy side, the agent side, the
#: gateway, the status site or the programs.
FLOOR = {
    "errors": {"_cancel"},
    "_cancel": set(),
    "wire": {"errors", "_reading"},
    "messages": {"errors", "wire", "_cancel", "_values"},
    "forward": {"errors", "messages", "_values"},
    "endpoints": set(),
    "_peertext": set(),
    "_ratelimit": set(),
    "_redial": set(),
    "_tls": {"_peertext"},
    "_sending": set(),
    "_reading": set(),
    "_values": set(),
    "busypoll": set(),
    "_operator_files": set(),
}


def package_imports(module: str) -> set[str]:
    """
    The package's modules that C{sentinel_twisted.<module>} (all of it, if
    it is a package) imports anywhere in its source: at the top, in a
    function, or for the type checker only; each named by its first part
    below C{sentinel_twisted}.
    """
    top = Path(importlib.import_module("sentinel_twisted").__file__ or "").parent
    where = top / module.replace(".", "/")
    paths = sorted(where.rglob("*.py")) if where.is_dir() else [where.with_suffix(".py")]
    found = set()
    for path in paths:
        package = list(path.relative_to(top.parent).parent.parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = package[: len(package) - node.level + 1]
                names = [node.module] if node.module else [a.name for a in node.names]
                targets = [base + name.split(".") for name in names]
            elif (node.module or "").startswith("sentinel_twisted."):
                targets = [(node.module or "").split(".")]
            else:
                continue
            for target in targets:
                if len(target) > 1 and target[1] not in ("__version__", module.split(".")[0]):
                    found.add(target[1])
    return found


class FloorTests(TestCase):
    def test_the_floor_imports_nothing_above_it(self) -> None:
        for module, allowed in FLOOR.items():
            with self.subTest(module=module):
                self.assertEqual(package_imports(module) - allowed, set())

    def test_the_two_sides_share_the_floor_and_nothing_else(self) -> None:
        """
        The proxy side and the agent side import the floor (the agent's
        program also the twistd helpers it shares with the proxy's), never
        each other, the gateway, the status site or the programs.
        """
        self.assertLessEqual(package_imports("proxy"), set(FLOOR))
        self.assertLessEqual(package_imports("agent"), set(FLOOR) | {"_twistd"})

    def test_errors_name_a_cancel_reason_without_the_messages(self) -> None:
        """
        C{RequestCancelled} says which reason it was, in words, with only
        C{sentinel_twisted.errors} imported (in a fresh interpreter, where
        nothing else has imported the messages yet).
        """
        script = (
            "import sys\n"
            "from sentinel_twisted.errors import RequestCancelled\n"
            "print(RequestCancelled('c-1', 4))\n"
            "print(sorted(m for m in sys.modules if m.startswith('sentinel_twisted')))\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
        )
        text, modules = done.stdout.splitlines()
        self.assertEqual(text, "Request cancelled: 'c-1' (proxy_shutdown)")
        self.assertNotIn("sentinel_twisted.messages", modules)
        self.assertEqual(
            modules, str(["sentinel_twisted", "sentinel_twisted._cancel", "sentinel_twisted.errors"])
        )

    def test_messages_name_the_same_cancel_reasons(self) -> None:
        from sentinel_twisted._cancel import CancelReason
        from sentinel_twisted.messages import CancelReason as FromMessages

        self.assertIs(FromMessages, CancelReason)


def runtime_imports() -> dict[str, set[str]]:
    """
    For each module of the package, the package's modules it imports when
    it runs: at the top or inside a function, but not the imports made for
    the type checker only (under C{if TYPE_CHECKING:}).
    """
    package = Path(importlib.import_module("sentinel_twisted").__file__ or "").parent
    graph: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        where = parts if path.name == "__init__.py" else parts[:-1]
        tree = ast.parse(path.read_text())
        typing_only = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING")
            for statement in node.body
            for inner in ast.walk(statement)
        }
        found = graph.setdefault(".".join(parts), set())
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or not node.level or id(node) in typing_only:
                continue
            base = where[: len(where) - node.level + 1]
            names = [node.module] if node.module else [alias.name for alias in node.names]
            for name in names:
                target = base + name.split(".")
                if not (package.parent.joinpath(*target).with_suffix(".py").exists()):
                    if not package.parent.joinpath(*target, "__init__.py").exists():
                        target = target[:-1]
                found.add(".".join(target))
    return graph


class ImportCycleTests(TestCase):
    def test_no_module_imports_itself_at_run_time(self) -> None:
        """
        Following the imports a module makes when it runs never leads back
        to it: the layers import downwards, and a module that needs a name
        from above for its annotations imports it for the type checker only.
        """
        graph = runtime_imports()
        for start in sorted(graph):
            seen: set[str] = set()
            stack = list(graph[start])
            while stack:
                module = stack.pop()
                with self.subTest(module=start):
                    self.assertNotEqual(module, start, "an import cycle")
                if module not in seen:
                    seen.add(module)
                    stack.extend(graph.get(module, ()))

    def test_the_registration_machine_knows_no_protocol(self) -> None:
        """
        The lifecycle machine drives reverse and dialled connections alike
        through a typing protocol, without importing either.
        """
        from sentinel_twisted.proxy import _registration

        tree = ast.parse(Path(_registration.__file__ or "").read_text())
        imported = {
            node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level
        }
        self.assertEqual(imported, {"errors", "connection"})
