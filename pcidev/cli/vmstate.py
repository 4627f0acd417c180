"""``pcidev vmstate``: look at saved device state and at state descriptions.

* ``pcidev vmstate dump FILE`` prints a saved stream as JSON (``-`` reads standard
  input). The envelope, checksum and header are fully checked; an invalid stream
  prints one line naming the problem and exits with status 1. It reads no further
  than the stream's prefix announces (and at most 1 MiB of trailing bytes), so an
  endless input such as ``/dev/zero`` is an error line, not a hang.
* ``pcidev vmstate schema DEVICE`` prints a device type's state description: the
  framework section every device has, a layer's section if its class has one
  (``LAYER_VMSTATE``), the type's own ``VMSTATE``, the features it declares migratable
  and its static blockers.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from typing import Any, BinaryIO

from pcidev.cli._command import CliContext, command
from pcidev.device import PciDevice
from pcidev.errors import PcidevError
from pcidev.migration.function_state import FUNCTION_SECTION, FunctionState
from pcidev.vmstate import dump_stream_json, schema_of
from pcidev.vmstate.stream import MAGIC, PREFIX_SIZE, TRAILER_SIZE

__all__ = ["COMMAND", "device_schema"]


def device_schema(cls: type[PciDevice]) -> dict[str, Any]:
    """The full state description of a device class (what ``pcidev vmstate schema`` prints).

    :param cls: a :class:`~pcidev.device.PciDevice` subclass.
    :returns: a JSON-ready dict.
    """
    vm = getattr(cls, "VMSTATE", None)
    layer = getattr(cls, "LAYER_VMSTATE", None)
    type_name = getattr(cls, "TYPE_NAME", "") or cls.__name__.lower()
    sections = [{"name": FUNCTION_SECTION, "instance_id": 0, "owner": "framework"}]
    if layer is not None:
        sections.append({"name": schema_of(layer)["name"], "instance_id": 0, "owner": "layer"})
    if vm is not None:
        sections.append({"name": schema_of(vm)["name"], "instance_id": 0, "owner": "device"})
    schema: dict[str, Any] = {
        "device_type": type_name,
        "sections": sections,
        "framework": schema_of(FunctionState),
        "device": schema_of(vm) if vm is not None else None,
        "framework_features": sorted(cls.FRAMEWORK_FEATURES),
        "migratable_features": sorted(cls.MIGRATABLE_FEATURES),
        "static_blockers": [] if vm is not None else [f"device type {type_name} has no vmstate description"],
    }
    if layer is not None:  # a base class's own section (PciDevice.LAYER_VMSTATE)
        schema["layer"] = schema_of(layer)
    return schema


def _configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="vmstate_command", metavar="ACTION", required=True)
    dump = sub.add_parser("dump", help="print a saved state stream as JSON")
    dump.add_argument("file", help="the stream ('-' for standard input)")
    schema = sub.add_parser("schema", help="print a device type's state description")
    schema.add_argument("device", help="a registered device type (see 'pcidev plugins')")


#: trailing bytes after the checksum that ``dump`` reads (to count them) before it stops
MAX_TRAILING = 1 << 20


def _read_upto(f: BinaryIO, n: int) -> bytes:
    parts: list[bytes] = []
    got = 0
    while got < n:
        chunk = f.read(min(n - got, 1 << 24))
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _read_stream(f: BinaryIO, name: str) -> bytes:
    """Read a stream, no further than its prefix says it goes (an endless input
    such as /dev/zero is refused after its first bytes, not read to exhaustion)."""
    data = _read_upto(f, PREFIX_SIZE + TRAILER_SIZE)
    if len(data) < PREFIX_SIZE or data[:len(MAGIC)] != MAGIC:
        return data  # too short or bad magic: the stream checks name it
    (n,) = struct.unpack_from("<I", data, PREFIX_SIZE - 4)
    data += _read_upto(f, PREFIX_SIZE + n + TRAILER_SIZE - len(data))
    extra = _read_upto(f, MAX_TRAILING + 1)
    if len(extra) > MAX_TRAILING:
        raise PcidevError(f"{name}: stream: more than {MAX_TRAILING} trailing bytes after the checksum")
    return data + extra


def _read(path: str) -> bytes:
    try:
        if path == "-":
            return _read_stream(sys.stdin.buffer, path)
        with open(path, "rb") as f:
            return _read_stream(f, path)
    except OSError as exc:
        raise PcidevError(f"cannot read {path}: {exc.strerror or exc}") from None


@command("vmstate", help="dump a saved device state (vmstate dump FILE) or a device type's "
                         "description (vmstate schema DEVICE)", configure=_configure)
def COMMAND(args: argparse.Namespace, ctx: CliContext) -> int:
    """``dump FILE`` or ``schema DEVICE``."""
    if args.vmstate_command == "dump":
        data = _read(args.file)
        try:
            doc = dump_stream_json(data)
        except PcidevError as exc:
            raise PcidevError(f"{args.file}: {exc}") from None
        print(json.dumps(doc, indent=2))
        return 0
    cls = ctx.registry.get(args.device)
    print(json.dumps(device_schema(cls), indent=2))
    return 0
