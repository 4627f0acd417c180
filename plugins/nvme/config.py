"""Configuration of an NVMe controller (:class:`NvmeConfig`).

Build one with keyword arguments, from a mapping, or from a QEMU-style
property string::

    NvmeConfig(serial="deadbeef", mdts=7, namespaces=["mem:size=64M"])
    NvmeConfig.parse("serial=deadbeef,mdts=7,max_ioqpairs=8,ns=mem:size=64M")

In the string form ``ns=`` (or ``namespace=``) may be repeated, one namespace
each, and a namespace spec keeps its own commas: after ``ns=...`` every item
whose key is not a controller property belongs to that namespace, so
``ns=file:path=/tmp/a.img,size=1G,direct=on,mdts=5`` is one namespace
(``file:path=/tmp/a.img,size=1G,direct=on``) and ``mdts=5``. A literal comma is
written ``,,`` as in QEMU.

Values are converted with cattrs (ints accept ``0x`` hex and the ``k/M/G``
suffixes, booleans accept ``on/off/yes/no/true/false/1/0``) and checked by
attrs validators; anything wrong is a :class:`~pcidev.errors.ConfigError`
that names the property.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import attrs
import cattrs

from pcidev.errors import ConfigError

__all__ = ["NvmeConfig", "parse_int", "parse_bool", "split_properties"]

_SUFFIX = {"k": 1 << 10, "K": 1 << 10, "m": 1 << 20, "M": 1 << 20, "g": 1 << 30, "G": 1 << 30,
           "t": 1 << 40, "T": 1 << 40}
_TRUE = {"on", "yes", "true", "1", "y"}
_FALSE = {"off", "no", "false", "0", "n"}


def parse_int(value: Any) -> int:
    """An int from an int or a string (decimal, ``0x`` hex, ``0o``/``0b``, optional k/M/G/T suffix).

    :raises ValueError: for anything else (booleans included).
    """
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected an integer, got {type(value).__name__}")
    text = value.strip().replace("_", "")
    mult = 1
    if text and text[-1] in _SUFFIX:
        mult = _SUFFIX[text[-1]]
        text = text[:-1]
    try:
        return int(text, 0) * mult
    except ValueError:
        raise ValueError(f"{value!r} is not an integer") from None


def parse_bool(value: Any) -> bool:
    """A bool from a bool or ``on/off/yes/no/true/false/1/0``.

    :raises ValueError: for anything else.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        low = value.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
    raise ValueError(f"{value!r} is not a boolean (use on/off)")


def _ascii(maxlen: int):
    def check(inst: Any, attr: attrs.Attribute, value: str) -> None:
        if not isinstance(value, str) or not value.isascii() or not value.isprintable():
            raise ConfigError(f"{attr.name} must be printable ASCII, got {value!r}")
        if not value.strip():
            raise ConfigError(f"{attr.name} must not be empty")
        if len(value) > maxlen:
            raise ConfigError(f"{attr.name} {value!r} is longer than {maxlen} characters")
    return check


def _between(lo: int, hi: int):
    def check(inst: Any, attr: attrs.Attribute, value: int) -> None:
        if not lo <= value <= hi:
            raise ConfigError(f"{attr.name}={value} is out of range {lo}..{hi}")
    return check


def _one_of(*choices: Any):
    def check(inst: Any, attr: attrs.Attribute, value: Any) -> None:
        if value not in choices:
            raise ConfigError(f"{attr.name}={value!r} must be one of {', '.join(map(str, choices))}")
    return check


def _namespaces(inst: Any, attr: attrs.Attribute, value: list) -> None:
    for spec in value:
        if not isinstance(spec, (str, dict)) or not spec:
            raise ConfigError(f"a namespace spec must be a non-empty string or mapping, got {spec!r}")


@attrs.define(kw_only=True)
class NvmeConfig:
    """Properties of one NVMe controller.

    :param serial: Identify SN (up to 20 ASCII characters); also names the state file.
        None (the default) lets the controller choose one: derived from the image
        paths when a namespace is file-backed (stable across restarts), else
        random (unique per controller, so two controllers never share a
        subsystem NQN or namespace identifiers).
    :param model: Identify MN (up to 40).
    :param firmware: revision of the firmware in slot 1 (Identify FR, up to 8).
    :param vendor_id: PCI vendor id (1b36 as QEMU's nvme, which Linux binds by class).
    :param device_id: PCI device id.
    :param subsystem_vendor_id: PCI subsystem vendor id.
    :param subsystem_id: PCI subsystem id.
    :param mdts: Maximum Data Transfer Size as a power of two in units of 4 KiB (0 = unlimited).
    :param max_ioqpairs: I/O submission/completion queue pairs the controller offers (1..1024).
    :param msix_vectors: MSI-X table size (>= 1; at least max_ioqpairs + 1 to give every CQ a vector).
    :param msix_bar: BAR holding the MSI-X table and PBA: 0 (after the doorbells) or 4 (as QEMU).
    :param mqes: CAP.MQES, the largest queue size minus one (1..65535).
    :param aerl: Asynchronous Event Request Limit, 0's based (outstanding AERs - 1).
    :param elpe: Error Log Page Entries, 0's based (entries kept - 1).
    :param max_namespaces: Identify NN: highest NSID the controller supports.
    :param namespaces: namespace specs, NSID 1, 2, ... in order (``"mem:size=64M"``, ...).
    :param state_dir: where the persistent state file (SMART counters, firmware
        slots) lives; default: the directory of the first file-backed namespace,
        else no persistence.
    :param state_file: explicit path of the state file (overrides ``state_dir``).
    :param capacity: total NVM capacity (TNVMCAP) in bytes available to Namespace Management.
    :param ns_create: backend spec for namespaces created by Namespace Management
        (``"mem"``, ``"null"``, or ``"file"``: an image file in the state directory).
    :param temperature: initial composite temperature in kelvin.
    :param warning_temp: WCTEMP, kelvin.
    :param critical_temp: CCTEMP, kelvin.
    :param fw_slots: firmware slots (1..7); slot 1 is read-only.
    :param dbbuf: support Doorbell Buffer Config (shadow doorbells).
    :param cntlid: controller identifier.
    """

    serial: str | None = attrs.field(default=None, validator=attrs.validators.optional(_ascii(20)))
    model: str = attrs.field(default="pcidev NVMe Ctrl", validator=_ascii(40))
    firmware: str = attrs.field(default="1.0", validator=_ascii(8))
    vendor_id: int = attrs.field(default=0x1B36, validator=_between(0, 0xFFFE))
    device_id: int = attrs.field(default=0x0010, validator=_between(0, 0xFFFF))
    subsystem_vendor_id: int = attrs.field(default=0x1AF4, validator=_between(0, 0xFFFF))
    subsystem_id: int = attrs.field(default=0x1100, validator=_between(0, 0xFFFF))
    mdts: int = attrs.field(default=7, validator=_between(0, 20))
    max_ioqpairs: int = attrs.field(default=64, validator=_between(1, 1024))
    msix_vectors: int = attrs.field(default=65, validator=_between(1, 2048))
    msix_bar: int = attrs.field(default=0, validator=_one_of(0, 4))
    mqes: int = attrs.field(default=0x7FF, validator=_between(1, 0xFFFF))
    aerl: int = attrs.field(default=3, validator=_between(0, 255))
    elpe: int = attrs.field(default=63, validator=_between(0, 255))
    max_namespaces: int = attrs.field(default=256, validator=_between(1, 1024))
    namespaces: list = attrs.field(factory=list, validator=_namespaces)
    state_dir: str | None = None
    state_file: str | None = None
    capacity: int = attrs.field(default=1 << 40, validator=_between(0, (1 << 64) - 1))
    ns_create: str = attrs.field(default="mem", validator=_one_of("mem", "null", "file"))
    temperature: int = attrs.field(default=323, validator=_between(0, 0xFFFF))
    warning_temp: int = attrs.field(default=343, validator=_between(0, 0xFFFF))
    critical_temp: int = attrs.field(default=373, validator=_between(0, 0xFFFF))
    fw_slots: int = attrs.field(default=3, validator=_between(1, 7))
    dbbuf: bool = True
    cntlid: int = attrs.field(default=0, validator=_between(0, 0xFFEF))

    def __attrs_post_init__(self) -> None:
        if len(self.namespaces) > self.max_namespaces:
            raise ConfigError(f"nvme: {len(self.namespaces)} namespaces exceed max_namespaces={self.max_namespaces}")

    # -- construction helpers ----------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NvmeConfig:
        """Structure a mapping (strings allowed for every value) into a config.

        :raises ConfigError: for an unknown key or a bad value.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"nvme: configuration must be a mapping, got {type(data).__name__}")
        names = {a.name for a in attrs.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"nvme: unknown propert{'ies' if len(unknown) > 1 else 'y'} "
                              f"{', '.join(unknown)} (known: {', '.join(sorted(names))})")
        try:
            return _converter.structure(dict(data), cls)
        except ConfigError:
            raise
        except cattrs.BaseValidationError as exc:
            raise ConfigError(f"nvme: {_describe(exc)}") from None
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"nvme: {exc}") from None

    @classmethod
    def parse(cls, text: str) -> NvmeConfig:
        """Parse a QEMU-style ``key=value,key=value`` string (see the module docstring).

        :raises ConfigError: for a malformed item, an unknown key or a bad value.
        """
        return cls.from_dict(_collect(split_properties(text), cls))

    def unstructure(self) -> dict[str, Any]:
        """A plain-dict form of the configuration (JSON-serializable)."""
        return _converter.unstructure(self)


def split_properties(text: str) -> list[tuple[str, str]]:
    """Split ``"a=1,b=x,,y"`` into ``[("a", "1"), ("b", "x,y")]`` (``,,`` is a literal comma).

    An item without ``=`` is returned with the key ``""`` and the whole item as its value.

    :raises ConfigError: if ``text`` is not a string.
    """
    if not isinstance(text, str):
        raise ConfigError(f"nvme: property string expected, got {type(text).__name__}")
    items: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == ",":
            if i + 1 < len(text) and text[i + 1] == ",":
                cur.append(",")
                i += 2
                continue
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    items.append("".join(cur))
    out = []
    for item in items:
        if item == "":
            continue
        key, sep, value = item.partition("=")
        out.append((key.strip(), value) if sep else ("", item))
    return out


_NS_KEYS = ("ns", "namespace")


def _collect(pairs: list[tuple[str, str]], cls: type) -> dict[str, Any]:
    names = {a.name for a in attrs.fields(cls)}
    data: dict[str, Any] = {}
    namespaces: list[str] = []
    in_ns = False
    for key, value in pairs:
        if key in _NS_KEYS:
            namespaces.append(value)
            in_ns = True
            continue
        if in_ns and key not in names:
            namespaces[-1] += "," + (f"{key}={value}" if key else value)
            continue
        in_ns = False
        if not key:
            raise ConfigError(f"nvme: property {value!r} has no '=value'")
        if key == "namespaces":
            raise ConfigError("nvme: give namespaces one by one with ns=SPEC")
        if key in data:
            raise ConfigError(f"nvme: property {key!r} given twice")
        data[key] = value
    if namespaces:
        data["namespaces"] = namespaces
    return data


def _describe(exc: BaseException) -> str:
    if isinstance(exc, cattrs.BaseValidationError):
        parts = []
        for sub in exc.exceptions:
            if isinstance(sub, ConfigError):
                parts.append(str(sub))
                continue
            note = ""
            notes = getattr(sub, "__notes__", None)
            if notes:
                note = str(notes[-1])
                m = re.search(r"@ attribute (\w+)", note)
                if m:
                    note = f"{m.group(1)}: "
            parts.append(note + _describe(sub))
        return "; ".join(parts)
    return str(exc)


_converter = cattrs.Converter(forbid_extra_keys=True)
_converter.register_structure_hook(int, lambda v, _t: parse_int(v))
_converter.register_structure_hook(bool, lambda v, _t: parse_bool(v))


def _str_hook(v: Any, _t: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {v!r}")
    return v


def _opt_str_hook(v: Any, _t: Any) -> str | None:
    if v is None:
        return None
    return _str_hook(v, _t)


def _ns_list_hook(v: Any, _t: Any) -> list:
    if isinstance(v, (str, dict)):
        return [v]
    if not isinstance(v, (list, tuple)):
        raise ValueError(f"namespaces must be a list, got {type(v).__name__}")
    return list(v)


_converter.register_structure_hook(str, _str_hook)
_converter.register_structure_hook(str | None, _opt_str_hook)
_converter.register_structure_hook(list, _ns_list_hook)
