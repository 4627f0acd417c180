"""Sphinx extension: reference tables generated from the code, so they cannot drift.

Two directives:

``.. pcidev-properties:: TYPE``
    Every property of a registered device type (its ``CONFIG_CLASS``) with type, default
    and help, then the option groups nested in its values (for ``nvme``: the namespace
    options and each backend's options), exactly what ``pcidev describe TYPE`` prints
    (the same functions build both).

``.. pcidev-nvme-commands::``
    The NVMe controller's supported admin commands, I/O commands, features and log pages.
    The tables are not copied from the source: the directive plugs a controller (default
    configuration, one 1 MiB memory namespace) into the software host, brings it up with
    the plugin's test driver, reads its Commands Supported and Effects log and probes every
    feature identifier (Get Features, select "supported capabilities") and every log page
    identifier. Names come from the plugin's own constants; a supported opcode, feature or
    log page without a name here is a build warning (an error under ``-W``), so a new
    command cannot go undocumented.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

from pcidev.cli.describe import device_properties, property_groups
from pcidev.host import Machine
from pcidev.plugins import load_registry, make_plugin_manager
from pcidev.properties import ACCEPTED, PropertyInfo, Size
from pcidev.registry import DeviceRegistry
from pcidev_nvme.features import FID_NAMES
from pcidev_nvme.status import Status
from pcidev_nvme.testing.driver import NvmeDriver

log = logging.getLogger(__name__)

#: Admin command names by opcode (NVMe Base Specification 2.x, figure "Opcodes for Admin Commands").
ADMIN_NAMES = {
    0x00: "Delete I/O Submission Queue", 0x01: "Create I/O Submission Queue", 0x02: "Get Log Page",
    0x04: "Delete I/O Completion Queue", 0x05: "Create I/O Completion Queue", 0x06: "Identify",
    0x08: "Abort", 0x09: "Set Features", 0x0A: "Get Features", 0x0C: "Asynchronous Event Request",
    0x0D: "Namespace Management", 0x10: "Firmware Commit", 0x11: "Firmware Image Download",
    0x14: "Device Self-test", 0x15: "Namespace Attachment", 0x18: "Keep Alive", 0x19: "Directive Send",
    0x1A: "Directive Receive", 0x7C: "Doorbell Buffer Config",
    0x80: "Format NVM", 0x84: "Sanitize", 0x86: "Get LBA Status",
}
#: NVM command set I/O command names by opcode.
IO_NAMES = {
    0x00: "Flush", 0x01: "Write", 0x02: "Read", 0x04: "Write Uncorrectable", 0x05: "Compare", 0x08: "Write Zeroes",
    0x09: "Dataset Management", 0x0C: "Verify", 0x19: "Copy",
}
#: Log page names by log identifier.
LOG_NAMES = {
    0x01: "Error Information", 0x02: "SMART / Health Information", 0x03: "Firmware Slot Information",
    0x04: "Changed Namespace List", 0x05: "Commands Supported and Effects", 0x06: "Device Self-test",
    0x12: "Feature Identifiers Supported and Effects", 0x81: "Sanitize Status",
    0x00: "Supported Log Pages", 0x13: "NVMe-MI Commands Supported and Effects",
    0x09: "Endurance Group Information", 0x0F: "Endurance Group Event Aggregate",
    0xC0: "OCP SMART / Health Information Extended (``ocp=on``)",
}
#: Commands Supported and Effects bits shown in the tables (bit, heading).
EFFECTS = ((1, "LBCC"), (2, "NCC"), (3, "NIC"), (4, "CCC"))

#: Get Features select 3 (supported capabilities): DW0 bits.
_FID_CAP_NS = 2
_FID_CAP_CHANGEABLE = 4


def _table(header: Sequence[str], rows: Sequence[Sequence[nodes.Node | str]], widths: Sequence[int]) -> nodes.table:
    """A docutils table; a string cell becomes a paragraph, a node is used as is."""
    table = nodes.table(classes=["pcidev-generated"])
    group = nodes.tgroup(cols=len(header))
    table += group
    for width in widths:
        group += nodes.colspec(colwidth=width)

    def row_node(cells: Sequence[nodes.Node | str]) -> nodes.row:
        row = nodes.row()
        for cell in cells:
            entry = nodes.entry()
            entry += nodes.paragraph("", "", cell if isinstance(cell, nodes.Node) else nodes.Text(cell))
            row += entry
        return row

    thead = nodes.thead()
    thead += row_node(header)
    group += thead
    body = nodes.tbody()
    for cells in rows:
        body += row_node(cells)
    group += body
    return table


def _props_table(props: Sequence[PropertyInfo]) -> nodes.table:
    rows = []
    for p in props:
        key = nodes.literal(text=p.name + "".join(f" | {a}" for a in p.aliases))
        rows.append([key, p.type, p.default or "(required)", p.help])
    return _table(("Property", "Type", "Default", "Help"), rows, (18, 14, 14, 54))


def _registry() -> DeviceRegistry:
    return load_registry(make_plugin_manager())


class PropertiesDirective(SphinxDirective):
    """``.. pcidev-properties:: TYPE``: the property tables of a device type."""

    required_arguments = 1
    has_content = False

    def run(self) -> list[nodes.Node]:
        type_name = self.arguments[0]
        registry = _registry()
        out: list[nodes.Node] = []
        props = device_properties(registry, type_name)
        if not props:
            log.warning("pcidev-properties: device type %r has no properties", type_name,
                        location=self.get_location())
            return out
        out.append(nodes.paragraph("", f"Properties of {type_name} (written {type_name},KEY=VALUE,...; "
                                       "a ',' inside a value is written ',,'):"))
        out.append(_props_table(props))
        used = {p.type.split()[0] for p in props}
        for heading, group in property_groups(registry, type_name):
            out.append(nodes.rubric("", heading[:1].upper() + heading[1:]))
            out.append(_props_table(group))
            used |= {p.type.split()[0] for p in group}
        kinds = [(name, ACCEPTED[kind]) for name, kind in _kind_names() if name in used]
        if kinds:
            out.append(nodes.rubric("", "Value forms"))
            items = nodes.bullet_list()
            for name, text in kinds:
                item = nodes.list_item()
                para = nodes.paragraph()
                para += nodes.literal(text=name)
                para += nodes.Text(f": {text}")
                item += para
                items += item
            out.append(items)
        return out


def _kind_names() -> list[tuple[str, Any]]:
    return [("int", int), ("size", Size), ("bool", bool), ("float", float)]


class NvmeSupport:
    """What a default NVMe controller answers, probed through the software host.

    :ivar admin: supported admin opcode -> Commands Supported and Effects dword.
    :ivar io: supported NVM command set opcode -> effects dword.
    :ivar features: supported feature identifier -> Get Features capabilities (select 3).
    :ivar log_pages: supported log identifiers.
    """

    def __init__(self) -> None:
        registry = _registry()
        with Machine(ram_size=64 << 20) as machine:
            ctrl = registry.create("nvme", "ns=mem:size=1M")
            drv = NvmeDriver.attach(machine, ctrl, io_queues=1)
            try:
                effects = drv.get_log(0x05, 4096, nsid=0)
                words = struct.unpack("<1024I", effects)
                self.admin = {op: words[op] for op in range(256) if words[op] & 1}
                self.io = {op: words[256 + op] for op in range(256) if words[256 + op] & 1}
                self.features: dict[int, int] = {}
                for fid in range(1, 256):
                    comp = drv.admin(0x0A, cdw10=(3 << 8) | fid, nsid=0, check=False)
                    if not comp.ok and comp.code == Status.INVALID_NSID:  # a per-namespace feature
                        comp = drv.admin(0x0A, cdw10=(3 << 8) | fid, nsid=1, check=False)
                    if comp.ok:
                        self.features[fid] = comp.dw0
                self.log_pages = [lid for lid in range(256)
                                  if drv.admin(0x02, nsid=0xFFFFFFFF, cdw10=lid, length=4, check=False).ok]
            finally:
                drv.close()


def _hex(value: int) -> nodes.literal:
    return nodes.literal(text=f"{value:02X}h")


class NvmeCommandsDirective(SphinxDirective):
    """``.. pcidev-nvme-commands::``: supported commands, features and log pages."""

    has_content = False

    def _name(self, names: dict[int, str], code: int, what: str) -> str:
        name = names.get(code)
        if name is None:
            log.warning("pcidev-nvme-commands: the controller supports %s %02Xh, which has no name in "
                        "docs/_ext/pcidev_docs_nvme.py", what, code, location=self.get_location())
            return f"({what} {code:02X}h)"
        return name

    def _commands(self, supported: dict[int, int], names: dict[int, str], what: str) -> nodes.table:
        rows = []
        for op, word in sorted(supported.items()):
            effects = ", ".join(h for bit, h in EFFECTS if word & (1 << bit)) or "none"
            cse = (word >> 16) & 7
            if cse:
                effects += ", CSE " + ("namespace" if cse == 1 else "controller")
            rows.append([_hex(op), self._name(names, op, what), effects])
        return _table(("Opcode", "Command", "Effects (Commands Supported and Effects log)"), rows, (10, 40, 50))

    def run(self) -> list[nodes.Node]:
        support = NvmeSupport()
        out: list[nodes.Node] = [nodes.rubric("", "Admin commands"),
                                 self._commands(support.admin, ADMIN_NAMES, "admin opcode"),
                                 nodes.rubric("", "I/O commands (NVM command set)"),
                                 self._commands(support.io, IO_NAMES, "I/O opcode")]
        rows = []
        for fid, caps in sorted(support.features.items()):
            name = FID_NAMES.get(fid)
            if name is None:
                log.warning("pcidev-nvme-commands: feature %02Xh answers Get Features but is not in "
                            "pcidev_nvme.features.FID_NAMES", fid, location=self.get_location())
                name = f"feature {fid:02X}h"
            scope = "per namespace" if caps & _FID_CAP_NS else "controller"
            change = "yes" if caps & _FID_CAP_CHANGEABLE else "no"
            rows.append([_hex(fid), name[:1].upper() + name[1:], scope, change])
        out += [nodes.rubric("", "Features (Get Features / Set Features)"),
                _table(("FID", "Feature", "Scope", "Changeable"), rows, (10, 50, 20, 20))]
        rows = [[_hex(lid), self._name(LOG_NAMES, lid, "log page")] for lid in support.log_pages]
        out += [nodes.rubric("", "Log pages (Get Log Page)"), _table(("LID", "Log page"), rows, (10, 90))]
        return out


def setup(app: Sphinx) -> dict[str, Any]:
    """Register the directives.

    :param app: the Sphinx application.
    :returns: the extension's metadata.
    """
    app.add_directive("pcidev-properties", PropertiesDirective)
    app.add_directive("pcidev-nvme-commands", NvmeCommandsDirective)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
