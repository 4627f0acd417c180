"""``pcidev plugins``: the loaded plugins and the device types they register."""

from __future__ import annotations

import argparse
import json
from typing import TypedDict

from pcidev.cli._command import CliContext, command

__all__ = ["COMMAND"]


class _PluginRow(TypedDict):
    """One loaded plugin, as ``pcidev plugins --json`` prints it."""

    name: str
    distribution: str | None
    version: str | None
    device_types: list[str]
    components: list[str]


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


@command("plugins", help="list loaded plugins and the device types they register", configure=_configure)
def COMMAND(args: argparse.Namespace, ctx: CliContext) -> int:
    """List the plugins (``--json`` for machine-readable output)."""
    registry = ctx.registry
    pm = ctx.pm
    rows: list[_PluginRow] = []
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
            # the last column is not padded
            cells = [cell.ljust(width) for cell, width in zip(line, widths, strict=False)]
            print("  ".join([*cells, line[3]]).rstrip())
    if blocked:
        print(f"blocked: {', '.join(blocked)}")
    return 0
