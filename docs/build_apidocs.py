#!/usr/bin/env python3
"""
Build the API reference from the docstrings with pydoctor.

    python docs/build_apidocs.py [OUTPUT_DIRECTORY]

The output goes to build/apidocs by default.  Any warning (a link to
nothing, a malformed docstring) fails the build with exit status 3, so the
reference cannot rot quietly; so does a public name without a docstring,
or a public data attribute without a description (see L{undocumented},
which C{tests/test_apidocs.py} runs too).  Used by
`tox -e docs` and by CI.

Docstrings link to Twisted, the standard library, msgspec and attrs the
way Twisted's own do (C{L{Deferred}}).  Intersphinx would need the network
to fetch those projects' inventories, so a first pass collects the outside
names pydoctor could not resolve, and each one that names a real object of
those projects (checked by importing it) gets an inventory entry pointing
at its documentation.  A name that does not exist stays a warning.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pkgutil
import re
import subprocess
import sys
import tempfile
import zlib
from importlib.metadata import version
from pathlib import Path

from zope.interface import implementedBy

ROOT = Path(__file__).resolve().parent.parent

#: Where each outside project keeps its API documentation.
DOCS = {
    "twisted": "https://docs.twisted.org/en/stable/api",
    "python": "https://docs.python.org/3",
    "msgspec": "https://jcristharif.com/msgspec",
    "attrs": "https://www.attrs.org/en/stable",
    "zope.interface": "https://zopeinterface.readthedocs.io/en/latest",
}

_UNRESOLVED = re.compile(r'Cannot find link target for "([\w.]+)"')


def pydoctor(output: str, *extra: str) -> tuple[int, str]:
    command = [
        sys.executable,
        "-m",
        "pydoctor",
        "--project-name=sentinel_twisted",
        f"--project-version={version('sentinel_twisted')}",
        f"--project-base-dir={ROOT}",
        "--docformat=epytext",
        f"--html-output={output}",
        "--quiet",
        *extra,
        str(ROOT / "sentinel_twisted"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    return done.returncode, done.stdout + done.stderr


def find(name: str) -> tuple[object, str, str] | None:
    """C{(object, module name, rest)} for a dotted name that exists, else C{None}."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj: object = importlib.import_module(module_name)
        except Exception:
            continue
        try:
            for attribute in parts[cut:]:
                obj = getattr(obj, attribute)
        except AttributeError:
            return None
        return obj, module_name, ".".join(parts[cut:])
    return None


def has_page(obj: object) -> bool:
    """pydoctor gives modules, classes and interfaces a page of their own."""
    return inspect.ismodule(obj) or isinstance(obj, type) or type(obj).__name__ == "InterfaceClass"


def role(obj: object) -> str:
    if inspect.ismodule(obj):
        return "py:module"
    if has_page(obj):
        return "py:class"
    if callable(obj):
        return "py:function"
    return "py:data"


def location(name: str) -> tuple[str, str, str] | None:
    """C{(project, role, uri)} of an outside object, or C{None} if it is unknown."""
    found = find(name)
    if found is None:
        return None
    obj, module_name, rest = found
    top = module_name.split(".")[0]
    if top == "twisted":
        # pydoctor's layout: a page per module and class, anchors for the rest.
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):
            owner = find(".".join(parts[:cut]))
            if owner is not None and has_page(owner[0]):
                anchor = ".".join(parts[cut:])
                page = ".".join(parts[:cut]) + ".html"
                return "twisted", role(obj), page + (f"#{anchor}" if anchor else "")
        return None
    if top in sys.stdlib_module_names:
        return "python", role(obj), f"library/{module_name}.html#{name}"
    if top == "msgspec":
        return "msgspec", role(obj), f"api.html#{name}"
    if top in ("attr", "attrs"):
        return "attrs", role(obj), f"api.html#{name}"
    if module_name.startswith("zope.interface"):
        return "zope.interface", role(obj), "api/index.html"
    return None


def write_inventory(path: Path, project: str, entries: list[tuple[str, str, str]]) -> None:
    """A Sphinx objects.inv (version 2) listing C{(name, role, uri)}."""
    header = (
        "# Sphinx inventory version 2\n"
        f"# Project: {project}\n"
        "# Version: \n"
        "# The remainder of this file is compressed using zlib.\n"
    )
    body = "".join(f"{name} {kind} 1 {uri} -\n" for name, kind, uri in sorted(entries))
    path.write_bytes(header.encode() + zlib.compress(body.encode()))


def public_modules(package: str = "sentinel_twisted") -> list[str]:
    """The package and its modules, but for those with a C{_private} part in their name."""
    top = importlib.import_module(package)
    names = [package]
    for info in pkgutil.walk_packages(top.__path__, package + "."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return sorted(names)


def _public(name: str) -> bool:
    return not name.startswith("_")


def _own_doc(obj: object) -> bool:
    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
    return bool(doc and doc.strip())


def _members(cls: type, package: str) -> dict[str, object]:
    """The public callables of a class, its own and those of its bases in the package."""
    members: dict[str, object] = {}
    for klass in reversed(cls.__mro__):
        if not klass.__module__.startswith(package):
            continue
        for name, value in vars(klass).items():
            kinds = (staticmethod, classmethod, property, type)
            if _public(name) and (isinstance(value, kinds) or inspect.isfunction(value)):
                members[name] = value
    return members


def _member_documented(cls: type, name: str, value: object) -> bool:
    if isinstance(value, type):
        return _own_doc(value)
    if isinstance(value, property):
        return bool(value.__doc__ and value.__doc__.strip())
    # Documented here, or an override of a documented method of a base
    # (Twisted's stringReceived, a Protocol's method): inspect.getdoc looks.
    if inspect.getdoc(getattr(cls, name)):
        return True
    # Or a method of an interface the class implements (IService.startService).
    for interface in implementedBy(cls).flattened():
        described = interface.get(name)
        if described is not None and (described.getDoc() or "").strip():
            return True
    return False


def undocumented(package: str = "sentinel_twisted") -> list[str]:
    """
    The public names of the package without a docstring: public modules,
    their public classes and functions, and the public methods and
    properties of those classes (a method that overrides a documented one
    counts as documented, and so does a method an implemented interface
    documents).  Names with a leading underscore, and everything in a
    module with one, are private; an object of a private module that a
    public module's C{__all__} exports is public.  Public data attributes
    without a description count too (see L{undocumented_data}).
    """
    missing: list[str] = []
    seen: set[int] = set()
    for module_name in public_modules(package):
        module = importlib.import_module(module_name)
        if not _own_doc(module):
            missing.append(module_name)
        exported = set(getattr(module, "__all__", ()))
        for name, obj in sorted(vars(module).items()):
            home = getattr(obj, "__module__", None) or ""
            # Defined here, or re-exported here from a private module (as
            # pydoctor shows it): each public object is checked once.
            reexported = name in exported and any(p.startswith("_") for p in home.split("."))
            if not _public(name) or (home != module_name and not reexported):
                continue
            if not (inspect.isclass(obj) or inspect.isfunction(obj) or type(obj).__name__ == "InterfaceClass"):
                continue
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            qualified = f"{module_name}.{name}"
            if not _own_doc(obj):
                missing.append(qualified)
            if type(obj).__name__ == "InterfaceClass":
                for member in sorted(obj.names()):  # type: ignore[attr-defined]
                    if not (obj[member].getDoc() or "").strip():  # type: ignore[index]
                        missing.append(f"{qualified}.{member}")
            elif inspect.isclass(obj):
                for member, value in sorted(_members(obj, package).items()):
                    if not _member_documented(obj, member, value):
                        missing.append(f"{qualified}.{member}")
    missing.extend(undocumented_data(package))
    return sorted(missing)


def undocumented_data(package: str = "sentinel_twisted") -> list[str]:
    """
    The public data attributes of the package that the API reference shows
    without a description, found with pydoctor's own model of the source
    (what the reference is built from): module constants and variables,
    class variables, struct and attrs fields, enum members and the instance
    variables methods set.  A docstring after the assignment, a C{#:}
    comment before it, an C{@ivar}/C{@cvar}/C{@var} field of the class or
    module docstring, or a described attribute of the same name in a base
    class counts; names with a leading underscore, or in a module or class
    with one, are private.
    """
    from pydoctor import model, options

    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.submodule_search_locations is not None
    where = Path(next(iter(spec.submodule_search_locations)))
    system = model.System(options.Options.from_args(["--docformat=epytext", "--quiet"]))
    builder = system.systemBuilder(system)
    builder.addModule(where)
    builder.buildModules()
    missing = []
    for obj in system.allobjects.values():
        # Properties are checked with the methods, by their docstrings.
        if not isinstance(obj, model.Attribute) or obj.kind is model.DocumentableKind.PROPERTY:
            continue
        name = obj.fullName()
        if any(part.startswith("_") for part in name.split(".")):
            continue
        doc, _ = model.get_docstring(obj)
        if not (doc or "").strip() and obj.parsed_docstring is None:
            missing.append(name)
    return sorted(missing)


def build(output: str) -> int:
    missing = undocumented()
    if missing:
        sys.stdout.write("".join(f"{name}: undocumented public name\n" for name in missing))
        return 3
    with tempfile.TemporaryDirectory(prefix="sentinel-apidocs-") as scratch:
        _, log = pydoctor(str(Path(scratch) / "first-pass"))
        entries: dict[str, list[tuple[str, str, str]]] = {}
        for name in sorted(set(_UNRESOLVED.findall(log))):
            where = location(name)
            if where is not None:
                project, kind, uri = where
                entries.setdefault(project, []).append((name, kind, uri))
        inventories = []
        for project, listed in entries.items():
            inventory = Path(scratch) / f"{project}.inv"
            write_inventory(inventory, project, listed)
            inventories.append(f"--intersphinx-file={inventory}::{DOCS[project]}")
        status, log = pydoctor(output, "--warnings-as-errors", *inventories)
    sys.stdout.write(log)
    if status == 0:
        print(f"API reference written to {output}/index.html")
    return status


if __name__ == "__main__":
    sys.exit(build(sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "build" / "apidocs")))
