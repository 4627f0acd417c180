"""``pcidev describe TYPE``: every property of a device type, from its config class.

The same text is printed by ``pcidev serve --vfio-user SOCKET TYPE,help``. Each
row shows the key, the value type, the default and the help text
(``metadata={"help": ...}`` of the attrs field); the value forms follow
:mod:`pcidev.properties`.
"""

from __future__ import annotations

import argparse
import json

import attrs

from pcidev.cli._command import CliContext, command
from pcidev.properties import ACCEPTED, PropertyInfo, Size, describe_config
from pcidev.registry import DeviceRegistry

__all__ = ["COMMAND", "describe_text", "device_properties", "property_groups"]

_FORMS = (("int", int), ("size", Size), ("bool", bool), ("float", float))


def device_properties(registry: DeviceRegistry, type_name: str) -> list[PropertyInfo]:
    """The properties of a registered device type (none for a type without ``CONFIG_CLASS``).

    :param registry: the device registry.
    :param type_name: a registered device type.
    :returns: one entry per property, in declaration order.
    :raises PluginError: unknown device type.
    """
    config_cls = getattr(registry.get(type_name), "CONFIG_CLASS", None)
    return [] if config_cls is None else describe_config(config_cls)


def property_groups(registry: DeviceRegistry, type_name: str) -> list[tuple[str, list[PropertyInfo]]]:
    """The option groups nested inside a device type's property values (say the options
    of an NVMe namespace spec): what its config class's ``property_groups()`` classmethod
    returns, if it has one, as ``(heading, properties)`` pairs.

    :param registry: the device registry.
    :param type_name: a registered device type.
    :returns: the groups, in the config class's order (empty without the classmethod).
    :raises PluginError: unknown device type.
    """
    config_cls = getattr(registry.get(type_name), "CONFIG_CLASS", None)
    groups = getattr(config_cls, "property_groups", None)
    if not callable(groups):
        return []
    return [(str(heading), describe_config(cls)) for heading, cls in groups()]


def _table(props: list[PropertyInfo]) -> list[str]:
    table = [("PROPERTY", "TYPE", "DEFAULT", "HELP")]
    for p in props:
        key = p.name + "".join(f" | {a}" for a in p.aliases)
        table.append((key, p.type, p.default or "(required)", p.help))
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    lines = []
    for row in table:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]  # the last column is not padded
        lines.append(("  " + "  ".join([*cells, row[3]])).rstrip())
    return lines


def describe_text(registry: DeviceRegistry, type_name: str) -> str:
    """What ``pcidev describe TYPE`` prints.

    :param registry: the device registry.
    :param type_name: a registered device type.
    :returns: the text (several lines, no trailing newline).
    :raises PluginError: unknown device type.
    """
    entry = registry.entry(type_name)
    doc = (entry.cls.__doc__ or "").strip().splitlines()
    lines = [f"{type_name}: {doc[0]}" if doc else type_name]
    props = device_properties(registry, type_name)
    if not props:
        lines.append("no properties")
        return "\n".join(lines)
    lines.append(f"properties ({type_name},KEY=VALUE,...; a ',' inside a value is written ',,'):")
    lines.extend(_table(props))
    used = {p.type.split()[0] for p in props}
    for heading, group in property_groups(registry, type_name):
        lines.append(f"{heading}:")
        lines.extend(_table(group))
        used |= {p.type.split()[0] for p in group}
    forms = [f"  {name}: {ACCEPTED[kind]}" for name, kind in _FORMS if name in used]
    if forms:
        lines.append("values:")
        lines.extend(forms)
    return "\n".join(lines)


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("device", help="a registered device type (see 'pcidev plugins')")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


@command("describe", help="list a device type's properties with type, default and help", configure=_configure)
def COMMAND(args: argparse.Namespace, ctx: CliContext) -> int:
    """Print the properties of ``args.device``."""
    if args.json:
        props = [attrs.asdict(p) for p in device_properties(ctx.registry, args.device)]
        groups = [{"heading": heading, "properties": [attrs.asdict(p) for p in group]}
                  for heading, group in property_groups(ctx.registry, args.device)]
        print(json.dumps({"device_type": args.device, "properties": props, "groups": groups}, indent=2))
        return 0
    print(describe_text(ctx.registry, args.device))
    return 0
