"""The ``pcidev`` command line.

Usage::

    pcidev [--version] [--log-level LEVEL] [-v]... [--debug] [-p no:NAME | -p MODULE]...
           [plugin options] COMMAND [...]

``-p no:NAME`` blocks the plugin ``NAME`` (as pytest's ``-p no:``), ``-p MODULE``
imports ``MODULE`` and registers it as an extra plugin; every command sees only
the plugins so selected (a command never builds its own plugin manager).  Plugin
options come from :func:`~pcidev.hookspecs.pcidev_add_options` and go before
the command.

Logging is configured here and nowhere else: warnings and errors by default,
``-v`` for info, ``-vv`` for debug, or ``--log-level LEVEL`` (a name such as
``debug`` or a number).  ``--debug`` prints the traceback behind an error line.

Each subcommand is one module of this package exposing a :class:`Command` named
``COMMAND`` (see ``pcidev.cli._command``); :data:`COMMAND_MODULES` lists them
explicitly.  A command returns its exit status; it reports failures by raising
:class:`~pcidev.errors.PcidevError`: :func:`main` prints one line to standard
error and exits with status 1.  Usage errors exit with status 2.  No traceback
reaches the user unless ``--debug`` asks for it.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import traceback
from collections.abc import Iterable, Sequence
from types import ModuleType
from typing import NoReturn, TextIO

from pcidev import __version__
from pcidev.cli import bench, demo, describe, fuzz, handover, plugins, serve, vmstate
from pcidev.cli._command import CliContext, Command, UsageError, command
from pcidev.errors import PcidevError, PluginSpecError, one_line
from pcidev.plugins import PcidevPluginManager, add_plugin_options, make_plugin_manager, parse_plugin_specs

__all__ = [
    "COMMANDS",
    "COMMAND_MODULES",
    "CliContext",
    "Command",
    "UsageError",
    "build_parser",
    "command",
    "commands_of",
    "configure_logging",
    "main",
]

PROG = "pcidev"

#: The modules defining the subcommands, in ``pcidev --help`` order; each has ``COMMAND``.
COMMAND_MODULES: tuple[ModuleType, ...] = (plugins, demo, serve, handover, bench, vmstate, describe, fuzz)


def commands_of(modules: Iterable[ModuleType]) -> dict[str, Command]:
    """The ``COMMAND`` of each module, by name.

    :param modules: modules exposing a :class:`Command` named ``COMMAND``.
    :returns: the commands, in the modules' order.
    :raises ValueError: two modules define the same command name.
    """
    out: dict[str, Command] = {}
    for module in modules:
        cmd = module.COMMAND
        if cmd.name in out:
            raise ValueError(f"pcidev command {cmd.name!r} is defined twice")
        out[cmd.name] = cmd
    return out


#: Every subcommand, by name (from :data:`COMMAND_MODULES`).
COMMANDS: dict[str, Command] = commands_of(COMMAND_MODULES)

_LOG_FORMAT = "%(name)s: %(levelname)s: %(message)s"
#: a numeric ``--log-level`` (ASCII digits, optionally negative; ``int()`` alone also takes ``²`` and ``1_0``)
_LEVEL_NUMBER = re.compile(r"-?[0-9]{1,9}")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _log_level(text: str | None, verbose: int) -> int:
    if text is None:
        return (logging.WARNING, logging.INFO)[verbose] if verbose < 2 else logging.DEBUG
    if _LEVEL_NUMBER.fullmatch(text.strip()):
        return int(text.strip())
    level = logging.getLevelName(text.strip().upper())
    if not isinstance(level, int) or isinstance(level, bool):
        raise UsageError(f"--log-level expects debug, info, warning, error, critical or a number, got {text!r}")
    return level


class _CliLogHandler(logging.StreamHandler[TextIO]):
    """The standard-error handler :func:`configure_logging` installs (and replaces)."""


def configure_logging(level: int) -> None:
    """Send log records of ``level`` and above to standard error (the one place pcidev does it).

    :param level: a :mod:`logging` level.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _CliLogHandler):
            root.removeHandler(handler)
    ours = _CliLogHandler(sys.stderr)
    ours.setFormatter(logging.Formatter(_LOG_FORMAT))
    root.addHandler(ours)
    root.setLevel(level)


def _global_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-p", action="append", default=[], dest="plugin_specs", metavar="no:NAME|MODULE",
                        help="block the plugin NAME (no:NAME) or load MODULE as an extra plugin; repeatable")
    parser.add_argument("--log-level", metavar="LEVEL",
                        help="log records of LEVEL and above (debug, info, warning, error; default warning)")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-v info, -vv debug)")
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback behind an error line")


def _early_options(argv: Sequence[str]) -> argparse.Namespace:
    """Parse the options needed before plugins load (``-p``, logging, ``--version``).

    Only the global part of the command line is looked at: everything from the
    command name on belongs to the command (``pcidev bench nvme -p 2`` must not
    block a plugin).
    """
    head: list[str] = []
    for token in argv:
        if token == "--" or (token in COMMANDS and (not head or head[-1] not in ("-p", "--log-level"))):
            break
        head.append(token)
    early = _Parser(prog=PROG, add_help=False, allow_abbrev=False)
    early.add_argument("--version", action="store_true")
    _global_options(early)
    namespace, _rest = early.parse_known_args(head)
    return namespace


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
    _global_options(parser)
    group = parser.add_argument_group("plugin options")
    add_plugin_options(pm, group)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS.values():
        sub = subparsers.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        if cmd.configure is not None:
            cmd.configure(sub)
    return parser


def _print_traceback(enabled: bool) -> None:
    if enabled:
        traceback.print_exc(file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``pcidev`` command line.

    :param argv: the arguments (without the program name); ``sys.argv[1:]`` if ``None``.
    :returns: the exit status: 0 on success, 1 on a runtime or plugin error,
        2 on a usage error.
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    debug = False
    try:
        early = _early_options(args_list)
        debug = early.debug
        if early.version:
            print(f"{PROG} {__version__}")
            return 0
        configure_logging(_log_level(early.log_level, early.verbose))
        blocked, extra = parse_plugin_specs(early.plugin_specs)
        pm = make_plugin_manager(blocked=blocked, plugins=extra)
        parser = build_parser(pm)
        args = parser.parse_args(args_list)
        result = COMMANDS[args.command].run(args, CliContext(pm, plugin_specs=early.plugin_specs))
        sys.stdout.flush()  # a closed pipe shows up here, inside the error handling
        return 0 if result is None else int(result)
    except (UsageError, PluginSpecError) as exc:
        print(f"{PROG}: error: {one_line(exc)} (see '{PROG} --help')", file=sys.stderr)
        return 2
    except PcidevError as exc:
        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
        _print_traceback(debug)
        return 1
    except SystemExit as exc:  # --help, or a command calling sys.exit()
        code = exc.code
        if code is None or isinstance(code, int):
            return code or 0
        print(f"{PROG}: {one_line(code)}", file=sys.stderr)
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
        print(f"{PROG}: internal error: {type(exc).__name__}: {one_line(exc)}"
              + ("" if debug else f" (run '{PROG} --debug ...' for the traceback)"), file=sys.stderr)
        _print_traceback(debug)
        return 1
