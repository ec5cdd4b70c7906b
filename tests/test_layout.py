"""
The package's layout: the proxy side lives in L{sentinel_twisted.proxy},
and the import paths it had before keep working, with the same objects.
"""

from __future__ import annotations

import importlib
import pickle

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
        "default_retry_policy",
        "encoding_list",
        "failure_reason",
        "parse_agent_endpoint",
    ],
    "factory": ["Rejection", "ReverseConnectionFactory", "rejection_reason"],
    "pending": ["PendingTable"],
    "pool": ["AgentInfo", "AgentPool", "IAgentPoolObserver", "PoolObserver"],
    "protocol": ["ReverseConnectionProtocol", "describe_peer", "peer_credentials"],
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
