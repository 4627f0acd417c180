"""What every ``pcidev`` subcommand is made of: :class:`Command`, :class:`CliContext`.

A subcommand lives in its own module of :mod:`pcidev.cli` and exposes one
``COMMAND`` object; :data:`pcidev.cli.COMMAND_MODULES` lists the modules
explicitly (nothing registers itself on import)::

    def _configure(parser):
        parser.add_argument("name")

    @command("hello", help="say hello", configure=_configure)
    def COMMAND(args, ctx):
        print("hello", args.name)

A command returns its exit status (``None`` means 0) and reports failures by
raising :class:`~pcidev.errors.PcidevError` (one line on standard error, exit
status 1) or :class:`UsageError` (exit status 2).
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Sequence

import attrs

from pcidev.errors import PcidevError
from pcidev.plugins import PcidevPluginManager, load_registry
from pcidev.registry import DeviceRegistry

__all__ = ["CliContext", "Command", "RunFunction", "UsageError", "command"]


class UsageError(PcidevError):
    """The command line itself is wrong (exit status 2)."""


class CliContext:
    """What a command gets besides its parsed arguments.

    :param pm: the plugin manager, with every plugin loaded (and those blocked
        with ``-p no:NAME`` left out): commands build nothing else.
    :param plugin_specs: the ``-p`` options that selected those plugins, for a
        command that starts processes of its own (they get the same selection,
        e.g. :class:`~pcidev.transport.link.process.DeviceProcess`'s ``plugin_specs``).
    """

    def __init__(self, pm: PcidevPluginManager, *, plugin_specs: Sequence[str] = ()) -> None:
        self.pm = pm
        self.plugin_specs = tuple(plugin_specs)

    @functools.cached_property
    def registry(self) -> DeviceRegistry:
        """The device registry, built from the plugins on first use.

        :raises PluginError: if a plugin's registration fails.
        """
        return load_registry(self.pm)


#: Signature of a command's implementation: ``run(args, ctx) -> exit status or None``.
RunFunction = Callable[[argparse.Namespace, CliContext], "int | None"]


@attrs.frozen
class Command:
    """A ``pcidev`` subcommand.

    :param name: the subcommand name.
    :param help: one-line description for ``pcidev --help``.
    :param run: ``run(args, ctx)`` executes the command and returns the exit
        status (``None`` for 0).
    :param configure: ``configure(parser)`` adds the command's own arguments.
    """

    name: str
    help: str
    run: RunFunction
    configure: Callable[[argparse.ArgumentParser], None] | None = None


def command(
    name: str,
    *,
    help: str,
    configure: Callable[[argparse.ArgumentParser], None] | None = None,
) -> Callable[[RunFunction], Command]:
    """Make the decorated function the implementation of a :class:`Command`.

    :param name: the subcommand name.
    :param help: one-line description.
    :param configure: optional function adding the command's arguments to its parser.
    :returns: a decorator turning ``run(args, ctx)`` into the :class:`Command`.
    """

    def decorate(run: RunFunction) -> Command:
        return Command(name, help, run, configure)

    return decorate
