"""The ``pcidev`` command line.

Usage::

    pcidev [--version] [-p no:NAME | -p MODULE]... [plugin options] COMMAND [...]

``-p no:NAME`` blocks the plugin ``NAME`` (as pytest's ``-p no:``), ``-p MODULE``
imports ``MODULE`` and registers it as an extra plugin.  Plugin options come
from :func:`~pcidev.hookspecs.pcidev_add_options` and go before the command.

Adding a command takes one decorated function in this module (or in a module
this one imports)::

    def _configure_serve(parser):
        parser.add_argument("socket")

    @command("serve", help="serve a device over vfio-user", configure=_configure_serve)
    def _serve(args, ctx):
        device_cls = ctx.registry.get(args.device)
        ...
        return 0

A command returns its exit status (``None`` means 0).  It reports failures by
raising :class:`~pcidev.errors.PcidevError`: :func:`main` prints one line to
standard error and exits with status 1.  Usage errors exit with status 2.  No
traceback reaches the user.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

import attrs

from pcidev import __version__
from pcidev.errors import PcidevError, PluginError
from pcidev.plugins import (
    PcidevPluginManager,
    add_plugin_options,
    load_registry,
    make_plugin_manager,
)
from pcidev.registry import DeviceRegistry

__all__ = ["COMMANDS", "CliContext", "Command", "UsageError", "command", "main"]

PROG = "pcidev"


class UsageError(PcidevError):
    """The command line itself is wrong (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


class CliContext:
    """What a command gets besides its parsed arguments.

    :param pm: the plugin manager, with every plugin loaded.
    """

    def __init__(self, pm: PcidevPluginManager) -> None:
        self.pm = pm

    @functools.cached_property
    def registry(self) -> DeviceRegistry:
        """The device registry, built from the plugins on first use.

        :raises PluginError: if a plugin's registration fails.
        """
        return load_registry(self.pm)


#: Signature of a command's implementation: ``run(args, ctx) -> exit status or None``.
RunFunction = Callable[[argparse.Namespace, "CliContext"], "int | None"]

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


#: Every subcommand, by name, in registration order.
COMMANDS: dict[str, Command] = {}


def command(
    name: str,
    *,
    help: str,
    configure: Callable[[argparse.ArgumentParser], None] | None = None,
) -> Callable[[RunFunction], RunFunction]:
    """Register the decorated function as the subcommand ``name``.

    :param name: the subcommand name.
    :param help: one-line description.
    :param configure: optional function adding the command's arguments to its parser.
    :returns: a decorator that registers the function and returns it unchanged.
    :raises ValueError: if ``name`` is already taken.
    """

    def decorate(run: RunFunction) -> RunFunction:
        if name in COMMANDS:
            raise ValueError(f"pcidev command {name!r} is defined twice")
        COMMANDS[name] = Command(name, help, run, configure)
        return run

    return decorate


# -- commands -------------------------------------------------------------------------


def _configure_plugins(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


@command("plugins", help="list loaded plugins and the device types they register",
         configure=_configure_plugins)
def _plugins(args: argparse.Namespace, ctx: CliContext) -> int:
    registry = ctx.registry
    pm = ctx.pm
    rows = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        origin = pm.plugin_origin(name)
        rows.append(
            {
                "name": name,
                "distribution": origin.distribution,
                "version": origin.version,
                "device_types": [e.name for e in registry.devices() if e.plugin == name],
                "components": [
                    f"{e.kind}/{e.name}" for e in registry.components() if e.plugin == name
                ],
            }
        )
    blocked = pm.blocked_names()
    if args.json:
        print(json.dumps({"plugins": rows, "blocked": blocked}, indent=2))
        return 0
    if not rows:
        print("no plugins loaded")
    else:
        table = [("PLUGIN", "DISTRIBUTION", "VERSION", "DEVICE TYPES")]
        for row in rows:
            table.append(
                (
                    row["name"],
                    row["distribution"] or "-",
                    row["version"] or "-",
                    ", ".join(row["device_types"]) or "-",
                )
            )
        widths = [max(len(line[i]) for line in table) for i in range(3)]
        for line in table:
            cells = [cell.ljust(width) for cell, width in zip(line, widths)]
            print("  ".join([*cells, line[3]]).rstrip())
    if blocked:
        print(f"blocked: {', '.join(blocked)}")
    return 0


@command("demo", help="run a short demonstration through the software host")
def _demo(args: argparse.Namespace, ctx: CliContext) -> int | None:
    try:
        demo = importlib.import_module("pcidev.demo")
    except ModuleNotFoundError as exc:
        if exc.name == "pcidev.demo":
            raise PcidevError("the demo is not available in this version of pcidev") from exc
        raise
    return demo.main(args)


#: Registry component kind of benchmarks (``pcidev bench NAME``).
BENCH_KIND = "bench"


def _configure_serve(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vfio-user", metavar="SOCKET", required=True,
                        help="UNIX socket to serve the device on (QEMU's vfio-user-pci connects to it)")
    parser.add_argument("device", metavar="DEVICE[,props]", help="device type and properties, e.g. nvme,ns=mem:size=64M")


@command("serve", help="serve a device to QEMU over vfio-user (pcidev serve --vfio-user SOCKET DEVICE[,props])",
         configure=_configure_serve)
def _serve(args: argparse.Namespace, ctx: CliContext) -> int | None:
    from pcidev.properties import split_device_spec
    from pcidev.transport.vfio_user.server import serve_device

    type_name, props = split_device_spec(args.device)
    device = ctx.registry.create(type_name, props)
    return serve_device(device, args.vfio_user, pm=ctx.pm)


def _configure_bench(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="the benchmark (omit to list them)")
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, metavar="...",
                        help="the benchmark's own options (e.g. --json)")


@command("bench", help="run a benchmark a plugin provides (pcidev bench NAME [--json])",
         configure=_configure_bench)
def _bench(args: argparse.Namespace, ctx: CliContext) -> int | None:
    """Benchmarks are registry components of kind ``bench``: ``run(argv) -> exit status``.

    A plugin registers one with ``registry.add_component("bench", "nvme", run)``;
    ``run`` gets the arguments after the name and parses them itself.
    """
    entries = ctx.registry.components(BENCH_KIND)
    if args.name is None:
        if not entries:
            print("no benchmarks available")
        for entry in entries:
            doc = (getattr(entry.obj, "__doc__", None) or "").strip().splitlines()
            print(f"{entry.name:12s} {doc[0] if doc else ''}".rstrip())
        return 0
    run = ctx.registry.component(BENCH_KIND, args.name)
    return run(list(args.bench_args))


# Commands defined in other modules register themselves on import.
from pcidev import vmstate_commands  # noqa: E402,F401  (pcidev vmstate dump|schema)

# -- main -----------------------------------------------------------------------------


def _early_options(argv: Sequence[str]) -> argparse.Namespace:
    """Parse the options needed before plugins load (``-p``, ``--version``).

    Only the global part of the command line is looked at: everything from the
    command name on belongs to the command (``pcidev bench nvme -p 2`` must not
    block a plugin).
    """
    head: list[str] = []
    for token in argv:
        if token == "--" or (token in COMMANDS and (not head or head[-1] != "-p")):
            break
        head.append(token)
    early = _Parser(prog=PROG, add_help=False, allow_abbrev=False)
    early.add_argument("--version", action="store_true")
    early.add_argument("-p", action="append", default=[], dest="plugin_specs")
    namespace, _rest = early.parse_known_args(head)
    return namespace


def _plugin_selection(specs: Sequence[str]) -> tuple[list[str], list[tuple[str, object]]]:
    blocked: list[str] = []
    extra: list[tuple[str, object]] = []
    for spec in specs:
        if spec.startswith("no:"):
            name = spec[3:]
            if not name:
                raise UsageError("-p no: needs a plugin name, e.g. -p no:nvme")
            blocked.append(name)
            continue
        if not spec or spec.startswith("-"):
            raise UsageError(f"-p expects no:NAME or a module name, got {spec!r}")
        try:
            module = importlib.import_module(spec)
        except Exception as exc:
            raise PluginError(
                f"plugin module {spec!r} (from -p) failed to import: {type(exc).__name__}: {exc}"
            ) from exc
        extra.append((spec, module))
    return blocked, extra


def build_parser(pm: PcidevPluginManager) -> argparse.ArgumentParser:
    """Build the full argument parser, including every command and plugin option.

    :param pm: the loaded plugin manager (plugins add options through it).
    :returns: the parser.
    :raises PluginError: if a plugin's ``pcidev_add_options`` fails.
    """
    parser = _Parser(
        prog=PROG,
        description="Emulated PCIe devices as Python plugins.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument(
        "-p",
        action="append",
        default=[],
        dest="plugin_specs",
        metavar="no:NAME|MODULE",
        help="block the plugin NAME (no:NAME) or load MODULE as an extra plugin; repeatable",
    )
    group = parser.add_argument_group("plugin options")
    add_plugin_options(pm, group)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS.values():
        sub = subparsers.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        if cmd.configure is not None:
            cmd.configure(sub)
    return parser


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``pcidev`` command line.

    :param argv: the arguments (without the program name); ``sys.argv[1:]`` if ``None``.
    :returns: the exit status: 0 on success, 1 on a runtime or plugin error,
        2 on a usage error.
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        early = _early_options(args_list)
        if early.version:
            print(f"{PROG} {__version__}")
            return 0
        blocked, extra = _plugin_selection(early.plugin_specs)
        pm = make_plugin_manager(blocked=blocked, plugins=extra)
        parser = build_parser(pm)
        args = parser.parse_args(args_list)
        result = COMMANDS[args.command].run(args, CliContext(pm))
        sys.stdout.flush()  # a closed pipe shows up here, inside the error handling
        return 0 if result is None else int(result)
    except UsageError as exc:
        print(f"{PROG}: error: {_one_line(str(exc))} (see '{PROG} --help')", file=sys.stderr)
        return 2
    except PcidevError as exc:
        print(f"{PROG}: error: {_one_line(str(exc))}", file=sys.stderr)
        return 1
    except SystemExit as exc:  # --help, or a command calling sys.exit()
        code = exc.code
        if code is None or isinstance(code, int):
            return code or 0
        print(f"{PROG}: {_one_line(str(code))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (``pcidev ... | head``): stop quietly, as Unix tools do;
        # point stdout at /dev/null so the interpreter's final flush does not fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141
    except Exception as exc:
        print(f"{PROG}: internal error: {type(exc).__name__}: {_one_line(str(exc))}",
              file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover - python -m pcidev.cli
    # Run the imported module's main, not this __main__ copy: commands that other
    # modules register (vmstate, bench) register into ``pcidev.cli``.
    from pcidev.cli import main as _main

    sys.exit(_main())
