"""A mypy plugin that reads the vmstate field types as the values they hold.

``Bytes[n]``, ``VarBytes[n]``, ``Str[n]``, ``Array[T, n]`` and ``VarArray[T, n]``
(:mod:`pcidev.vmstate.types`) are built at run time from a length, which is a value,
not a type: without help a type checker refuses ``VarBytes[4096]`` as an annotation.
With this plugin mypy reads them as ``bytes``, ``bytes``, ``str``, ``tuple[T, ...]``
and ``tuple[T, ...]``; the length is left to the vmstate codec, which checks it when
the description is built. Enable it in the mypy configuration of a project that
describes state with these types (pcidev's own is in pyproject.toml)::

    [tool.mypy]
    plugins = ["pcidev.vmstate.mypy_plugin"]

Only mypy imports this module.
"""

from __future__ import annotations

from collections.abc import Callable

from mypy.plugin import AnalyzeTypeContext, Plugin
from mypy.types import Type

__all__ = ["VmstateTypesPlugin", "plugin"]

_TYPES = "pcidev.vmstate.types"
#: the types with a length only, and the builtin each stands for
_SIZED = {f"{_TYPES}.Bytes": "builtins.bytes", f"{_TYPES}.VarBytes": "builtins.bytes",
          f"{_TYPES}.Str": "builtins.str"}
#: the types with an element type and a length (a tuple of that element type)
_ARRAYS = {f"{_TYPES}.Array", f"{_TYPES}.VarArray"}


def _sized(builtin: str, name: str) -> Callable[[AnalyzeTypeContext], Type]:
    def analyze(ctx: AnalyzeTypeContext) -> Type:
        if len(ctx.type.args) != 1:
            ctx.api.fail(f"use {name}[length]", ctx.context)
        return ctx.api.named_type(builtin, [])
    return analyze


def _array(name: str) -> Callable[[AnalyzeTypeContext], Type]:
    def analyze(ctx: AnalyzeTypeContext) -> Type:
        if len(ctx.type.args) != 2:
            ctx.api.fail(f"use {name}[element_type, length]", ctx.context)
            return ctx.api.named_type("builtins.tuple", [ctx.api.named_type("builtins.object", [])])
        return ctx.api.named_type("builtins.tuple", [ctx.api.analyze_type(ctx.type.args[0])])
    return analyze


class VmstateTypesPlugin(Plugin):
    """Analyzes an annotation with a vmstate field type as the type of its values."""

    def get_type_analyze_hook(self, fullname: str) -> Callable[[AnalyzeTypeContext], Type] | None:
        short = fullname.rpartition(".")[2]
        if fullname in _SIZED:
            return _sized(_SIZED[fullname], short)
        if fullname in _ARRAYS:
            return _array(short)
        return None


def plugin(version: str) -> type[Plugin]:
    """The entry point mypy calls.

    :param version: the mypy version (any: the hook used is part of the stable plugin API).
    :returns: the plugin class.
    """
    return VmstateTypesPlugin
