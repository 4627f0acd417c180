"""Sphinx extension for pcidev's API pages: each object documented once, where it is defined.

The packages re-export names from their modules (``pcidev.PciDevice`` is
``pcidev.device.PciDevice``).  Documenting both would make every short reference
ambiguous, so a re-exported object is documented only on the page of its canonical module
(the deepest documented module holding it, preferring the one it is defined in) and the
package page lists it with a link instead.  The documented modules are the pages
``docs/api/<module>.rst``.

Every name a page documents needs a description: a docstring for a class or function, a
``#:`` comment for data (autodoc leaves data without one out).  A name without one is a
build warning (an error under ``-W``) naming it.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from sphinx.application import Sphinx
from sphinx.errors import PycodeError
from sphinx.pycode import ModuleAnalyzer
from sphinx.util import logging

API_DIR = Path(__file__).resolve().parent.parent / "api"

logger = logging.getLogger(__name__)


def documented_modules() -> list[str]:
    """The module names with an API page.

    :returns: the names, sorted.
    """
    return sorted(p.stem for p in API_DIR.glob("*.rst") if p.stem != "index")


def _modules() -> dict[str, ModuleType]:
    return {name: importlib.import_module(name) for name in documented_modules()}


def canonical_module(name: str, obj: object, modules: dict[str, ModuleType], asking: str | None = None) -> str | None:
    """The documented module whose page documents ``obj``.

    Data has no ``__module__``: its home is a module whose source assigns the name.  Two
    modules assigning the same name an equal small value (``msi.CTRL`` and ``msix.CTRL``,
    both ``2``) hold the same object, yet each is its own name: the ``asking`` module, if
    it assigns the name itself, is the home of its own.

    :param name: the name ``obj`` is exported under.
    :param obj: the object.
    :param modules: the documented modules by name.
    :param asking: the module whose name this is, if known.
    :returns: the module name, or ``None`` if no documented module holds ``obj``.
    """
    holders = [m for m in modules if getattr(modules[m], name, _MISSING) is obj and _documents(modules[m], name, obj)]
    if not holders:
        return None
    if inspect.isclass(obj) or inspect.isfunction(obj):
        defined_in = obj.__module__
        if defined_in in holders:
            return defined_in
        prefixes = [m for m in holders if defined_in.startswith(m + ".")]
        if prefixes:
            return max(prefixes, key=len)
    else:
        if asking in holders and name in _assigned_names(asking):
            return asking
        holders = [m for m in holders if name in _assigned_names(m)] or holders
    return max(holders, key=lambda m: (m.count("."), m))


@functools.cache
def _assigned_names(module: str) -> frozenset[str]:
    """The names a module's source assigns at its top level (empty if it has no source)."""
    try:
        tree = ast.parse(inspect.getsource(importlib.import_module(module)))
    except (OSError, TypeError):
        return frozenset()
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign | ast.AugAssign):
            targets = [node.target]
        else:
            continue
        for target in targets:
            names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    return frozenset(names)


def _documents(module: ModuleType, name: str, obj: object) -> bool:
    """Whether ``automodule :members:`` of ``module`` includes ``name`` (given a docstring)."""
    exported = getattr(module, "__all__", None)
    if exported is not None:
        return name in exported
    return (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__module__ == module.__name__


_MISSING = object()


class _State:
    modules: dict[str, ModuleType] = {}
    current: str | None = None


def _on_docstring(app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    if what == "module":
        _State.current = name


def _on_skip(app: Sphinx, what: str, name: str, obj: Any, skip: bool, options: Any) -> bool | None:
    current = _State.current
    if what != "module" or current is None or current not in _State.modules:
        return None
    if getattr(_State.modules[current], name, _MISSING) is not obj:
        return None
    home = canonical_module(name, obj, _State.modules, current)
    if home is not None and home != current:
        return True
    return None


def _role(obj: object) -> str:
    if inspect.isclass(obj):
        if issubclass(obj, BaseException):
            return "exc"
        return "class"
    if inspect.isfunction(obj) or inspect.isbuiltin(obj):
        return "func"
    if inspect.ismodule(obj):
        return "mod"
    return "data"


def reexports(module: str, modules: dict[str, ModuleType]) -> list[tuple[str, str, str]]:
    """The names of ``module.__all__`` documented on another page.

    :param module: a documented module.
    :param modules: the documented modules by name.
    :returns: ``(name, role, target)`` for each, in ``__all__`` order.
    """
    mod = modules[module]
    out = []
    for name in getattr(mod, "__all__", ()):
        obj = getattr(mod, name)
        if inspect.ismodule(obj):
            if obj.__name__ in modules:
                out.append((name, "mod", obj.__name__))
            continue
        home = canonical_module(name, obj, modules, module)
        if home is not None and home != module:
            # autodoc documents data only with a ``#:`` comment, undocumented classes and
            # functions not at all: those (a build warning already) are listed by name,
            # without a link.
            if role_is_linkable(obj):
                role = _role(obj) if getattr(obj, "__doc__", None) else "literal"
            else:
                role = "literal" if name in {n for n, _v in undescribed(home, modules)} else "data"
            out.append((name, role, f"{home}.{name}"))
    return out


def role_is_linkable(obj: object) -> bool:
    """Whether autodoc gives ``obj`` a reference target of its own (classes, functions).

    :param obj: an exported object.
    :returns: ``True`` for classes and functions.
    """
    return inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)


def undescribed(module: str, modules: dict[str, ModuleType]) -> list[tuple[str, object]]:
    """The names of ``module.__all__`` its page documents without a description: data
    (constants, type aliases) without a ``#:`` comment in the module's source, classes and
    functions without a docstring.

    :param module: a documented module.
    :param modules: the documented modules by name.
    :returns: ``(name, value)`` for each, in ``__all__`` order.
    """
    mod = modules[module]
    try:
        described = {name for (_cls, name) in ModuleAnalyzer.for_module(module).find_attr_docs()}
    except PycodeError:
        described = set()
    out = []
    for name in getattr(mod, "__all__", ()):
        obj = getattr(mod, name)
        if inspect.ismodule(obj) or canonical_module(name, obj, modules, module) != module:
            continue
        if inspect.isclass(obj) or inspect.isroutine(obj):
            if not (obj.__doc__ or "").strip():
                out.append((name, obj))
        elif name not in described:
            out.append((name, obj))
    return out


def _on_source_read(app: Sphinx, docname: str, source: list[str]) -> None:
    if not docname.startswith("api/"):
        return
    module = docname.removeprefix("api/")
    if module not in _State.modules:
        return
    lines: list[str] = []
    for name, value in undescribed(module, _State.modules):
        logger.warning("%s.%s is public (in __all__) but has no description: give it a %s",
                       module, name, "docstring" if inspect.isclass(value) or inspect.isroutine(value)
                       else "'#:' comment", location=docname)
    items = reexports(module, _State.modules)
    if items:
        lines += ["", "", "Re-exported here", "-" * 16, "",
                  f"Also importable from ``{module}``, documented where they are defined:", ""]
        lines += [f"* ``{module}.{name}`` (from :mod:`{target.rsplit('.', 1)[0]}`)" if role == "literal"
                  else f"* :{role}:`{module}.{name} <{target}>`" for name, role, target in items]
    if lines:
        source[0] += "\n".join(lines) + "\n"


def _on_env_updated(app: Sphinx, env: Any) -> list[str]:
    """Make every re-exported name a reference target, aliased to where it is documented."""
    domain = env.get_domain("py")
    objects = domain.objects
    for module in _State.modules:
        for name, _role_name, target in reexports(module, _State.modules):
            public = f"{module}.{name}"
            for key in [k for k in objects if k == target or k.startswith(target + ".")]:
                alias = public + key[len(target):]
                if alias not in objects:
                    entry = objects[key]
                    objects[alias] = type(entry)(entry.docname, entry.node_id, entry.objtype, True)
    return []


def _on_missing_reference(app: Sphinx, env: Any, node: Any, contnode: Any) -> Any:
    """Render a reference to a pcidev type variable as plain text.

    A ``TypeVar`` in a signature (``type[ConfigT]``) is not an object autodoc documents;
    any other unresolved reference still warns.
    """
    if node.get("refdomain") != "py" or node.get("reftype") != "class":
        return None
    target = node.get("reftarget", "")
    module_name, _, attr = target.rpartition(".")
    if not module_name.startswith(("pcidev.", "pcidev_nvme.")) and module_name not in ("pcidev", "pcidev_nvme"):
        return None
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        return None
    if isinstance(obj, TypeVar):
        return contnode
    return None


def setup(app: Sphinx) -> dict[str, Any]:
    """Register the event handlers.

    :param app: the Sphinx application.
    :returns: the extension's metadata.
    """
    _State.modules = _modules()
    app.connect("autodoc-process-docstring", _on_docstring)
    app.connect("autodoc-skip-member", _on_skip)
    app.connect("source-read", _on_source_read)
    app.connect("env-updated", _on_env_updated)
    app.connect("missing-reference", _on_missing_reference)
    return {"parallel_read_safe": False, "parallel_write_safe": True}
