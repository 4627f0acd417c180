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

Values follow pcidev's one property grammar (:mod:`pcidev.properties`: ints
and sizes accept ``0x`` hex and the binary ``k/M/G/T/P`` and ``KiB..PiB``
suffixes, booleans ``on/off/yes/no/true/false/y/n/1/0``) and are checked by
attrs validators; anything wrong is a :class:`~pcidev.errors.ConfigError`
that names the property. ``pcidev describe nvme`` lists every property with
its type, default and help text (the ``help`` metadata of the fields below).
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import attrs

from pcidev.errors import ConfigError, PcidevError
from pcidev.properties import PropertyError, Size, collect_pairs, converter, structure_config
from pcidev_nvme.atomicity import controller_problem
from pcidev_nvme.backends import BUILTIN_BACKEND_CONFIGS
from pcidev_nvme.namespace import NamespaceOptions, parse_spec

__all__ = ["NamespaceSpec", "NvmeConfig", "default_serial", "property_groups", "DEFAULT_MEM_CREATE_LIMIT"]

T = TypeVar("T")
_I = TypeVar("_I", bound=int)

#: a namespace as configured: a spec string (``mem:size=64M``) or a mapping of its options
NamespaceSpec = str | dict[str, Any]


#: an attrs validator of a field of type T
_Validator = Callable[[Any, "attrs.Attribute[T]", T], None]


def _ascii(maxlen: int) -> _Validator[str]:
    def check(inst: Any, attr: attrs.Attribute[str], value: str) -> None:
        if not isinstance(value, str) or not value.isascii() or not value.isprintable():
            raise ConfigError(f"{attr.name} must be printable ASCII, got {value!r}")
        if not value.strip():
            raise ConfigError(f"{attr.name} must not be empty")
        if len(value) > maxlen:
            raise ConfigError(f"{attr.name} {value!r} is longer than {maxlen} characters")
    return check


def _between(lo: int, hi: int) -> _Validator[_I]:
    def check(inst: Any, attr: attrs.Attribute[_I], value: _I) -> None:
        if not lo <= value <= hi:
            raise ConfigError(f"{attr.name}={value} is out of range {lo}..{hi}")
    return check


#: the SMART critical warning bits ``smart_critical_warning`` may set (bit 1, the
#: temperature, follows the composite temperature; bits 7:6 are reserved)
WARNING_BITS = 0x3D

#: the default ``mem_create_limit``: 4 GiB. A ``mem`` namespace is a memfd, sparse until
#: written, so what the guest writes into the namespaces it creates with Namespace
#: Management is host memory it commits: this bounds it to what a laptop holds (TNVMCAP,
#: ``capacity``, stays 1 TiB: ``file`` and ``null`` namespaces cost no memory).
DEFAULT_MEM_CREATE_LIMIT = 4 << 30


def _warning_bits(inst: Any, attr: attrs.Attribute[int], value: int) -> None:
    if not 0 <= value <= 0xFF:
        raise ConfigError(f"{attr.name}={value} is out of range 0..0xff")
    if value & ~WARNING_BITS:
        raise ConfigError(f"{attr.name}={value:#x}: bits {value & ~WARNING_BITS:#x} cannot be set (allowed: "
                          f"{WARNING_BITS:#x}; bit 1, the temperature, follows temperature=)")


def _one_of(*choices: T) -> _Validator[T]:
    def check(inst: Any, attr: attrs.Attribute[T], value: T) -> None:
        if value not in choices:
            raise ConfigError(f"{attr.name}={value!r} must be one of {', '.join(map(str, choices))}")
    return check


def _namespaces(inst: Any, attr: attrs.Attribute[list[NamespaceSpec]], value: list[NamespaceSpec]) -> None:
    for spec in value:
        if not isinstance(spec, (str, dict)) or not spec:
            raise ConfigError(f"a namespace spec must be a non-empty string or mapping, got {spec!r}")


def property_groups() -> list[tuple[str, type]]:
    """The option classes inside a namespace spec, for ``pcidev describe nvme``.

    :returns: ``(heading, attrs class)`` pairs: the namespace options
        (``pcidev_nvme.namespace.NamespaceOptions``), then the options of each
        built-in backend (:data:`~pcidev_nvme.backends.BUILTIN_BACKEND_CONFIGS`).
    """
    groups: list[tuple[str, type]] = [("namespace options (ns=KIND:...,OPTION=VALUE)", NamespaceOptions)]
    for name, cls in sorted(BUILTIN_BACKEND_CONFIGS.items()):
        groups.append((f"{name} backend options (ns={name}:OPTION=VALUE,...)", cls))
    return groups


def _option_names(cls: type) -> str:
    return "/".join(str(f.metadata.get("key", f.name)) for f in attrs.fields(cls))


def _namespace_help() -> str:
    """The help of ``ns=``: the grammar and every option, from the option classes."""
    backends = "; ".join(f"{name}: {_option_names(cls)}" for name, cls in sorted(BUILTIN_BACKEND_CONFIGS.items()))
    return (f"a namespace, repeatable (NSID 1, 2, ...): KIND:OPTION=VALUE,... such as mem:size=64M or "
            f"file:path=IMG,size=1G,readonly=on; backend options: {backends}; "
            f"namespace options: {_option_names(NamespaceOptions)}")


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
    :param mem_create_limit: most bytes of ``mem`` namespaces Namespace Management holds at
        once (created and not deleted; default :data:`DEFAULT_MEM_CREATE_LIMIT`, 4 GiB): the
        host memory a guest can commit by creating namespaces and writing them. A create past
        it completes with Namespace Insufficient Capacity; a migration stream whose created
        ``mem`` namespaces exceed the destination's limit is refused.
    :param ns_create: backend spec for namespaces created by Namespace Management
        (``"mem"``, ``"null"``, or ``"file"``: an image file in the state directory).
    :param temperature: initial composite temperature in kelvin.
    :param warning_temp: WCTEMP, kelvin.
    :param critical_temp: CCTEMP, kelvin.
    :param fw_slots: firmware slots (1..7); slot 1 is read-only.
    :param dbbuf: support Doorbell Buffer Config (shadow doorbells).
    :param cntlid: controller identifier.
    :param cmb_size: Controller Memory Buffer size in MiB (0: none): BAR2, see ``pcidev_nvme.cmb``.
    :param legacy_cmb: the CMB behaves as before NVMe 1.4 (QEMU's ``legacy-cmb=on``): CMBLOC
        and CMBSZ always report it, and it is at BAR2's address without CMBMSC (CAP.CMBS clear).
    :param pmr: file backing a Persistent Memory Region (None: none): BAR4, see ``pcidev_nvme.pmr``.
    :param pmr_size: size of the PMR (a power of two, at least 4 KiB); a missing file is
        created at this size, an existing one must have it.
    :param sanitize_rate: bytes per second a sanitize alters (0: no limit).
    :param selftest_speedup: divides the device self-test durations.
    :param ocp: offer the OCP Datacenter NVMe SSD "SMART / Health Information Extended"
        log page (LID C0h), as QEMU's ``ocp=on``; see ``pcidev_nvme.logs.ocp_smart_page``.
    :param sriov_max_vfs: SR-IOV: TotalVFs, each VF a secondary controller (0: no SR-IOV);
        see ``pcidev_nvme.virtualization`` for the resource properties below.
    :param sriov_vq_flexible: flexible queue resources (a VF's admin queue counts as one)
        shared by the secondary controllers and the primary; the primary keeps
        ``max_ioqpairs - sriov_vq_flexible`` private I/O queue pairs.
    :param sriov_vi_flexible: flexible interrupt (MSI-X vector) resources; the primary keeps
        ``msix_vectors - sriov_vi_flexible`` private vectors.
    :param sriov_max_vq_per_vf: most queue resources one secondary controller may be given
        (0: ``sriov_vq_flexible / sriov_max_vfs``).
    :param sriov_max_vi_per_vf: most interrupt resources one secondary controller may be
        given (0: ``sriov_vi_flexible / sriov_max_vfs``).
    :param awun: Identify AWUN, the atomic write unit of every namespace in normal
        operation, logical blocks, 0's based (QEMU ``atomic.awun``; see ``pcidev_nvme.atomicity``).
    :param awupf: Identify AWUPF, the power-fail atomic write unit (<= awun; ``atomic.awupf``).
    :param atomic_dn: the default of Write Atomicity Normal DN (feature 0Ah; ``atomic.dn``):
        set, only AWUPF / NAWUPF apply.
    :param smart_critical_warning: SMART critical warning bits set at start (QEMU's
        ``smart_critical_warning``): 0 spare below threshold, 2 reliability degraded, 3
        read-only, 4 volatile memory backup failed, 5 persistent memory region read-only
        (bit 1, the temperature, follows ``temperature``); as
        ``NvmeController.inject_critical_warning`` does later.
    :param aer_max_queued: most asynchronous events kept while no Asynchronous Event
        Request is outstanding (QEMU's ``aer_max_queued``; 1..256, the migration stream's bound).
    :param vsl: Verify Size Limit (Identify CNS 06h VSL, QEMU's ``vsl``): a Verify of more
        than 2^vsl minimum memory pages (4 KiB) of data fails with Invalid Field in
        Command; 0 (default): no limit.
    :param backends: namespace backends by name (``DeviceRegistry.create`` fills it with the
        registry's ``nvme-backend`` components); None for the built-ins. Not a property.
    """

    serial: str | None = attrs.field(default=None, validator=attrs.validators.optional(_ascii(20)), metadata={
        "help": "Identify SN, up to 20 ASCII characters (default: derived from the image paths, else random)"})
    model: str = attrs.field(default="pcidev NVMe Ctrl", validator=_ascii(40), metadata={
        "help": "Identify MN, up to 40 ASCII characters"})
    firmware: str = attrs.field(default="1.0", validator=_ascii(8), metadata={
        "help": "firmware revision in slot 1 (Identify FR, up to 8 characters)"})
    vendor_id: int = attrs.field(default=0x1B36, validator=_between(0, 0xFFFE), metadata={"hex": True,
        "help": "PCI vendor id"})
    device_id: int = attrs.field(default=0x0010, validator=_between(0, 0xFFFF), metadata={"hex": True,
        "help": "PCI device id"})
    subsystem_vendor_id: int = attrs.field(default=0x1AF4, validator=_between(0, 0xFFFF), metadata={"hex": True,
        "help": "PCI subsystem vendor id"})
    subsystem_id: int = attrs.field(default=0x1100, validator=_between(0, 0xFFFF), metadata={"hex": True,
        "help": "PCI subsystem id"})
    mdts: int = attrs.field(default=7, validator=_between(0, 20), metadata={
        "help": "Maximum Data Transfer Size, a power of two in 4 KiB units (0 = unlimited)"})
    max_ioqpairs: int = attrs.field(default=64, validator=_between(1, 1024), metadata={
        "help": "I/O submission/completion queue pairs offered (1..1024)"})
    msix_vectors: int = attrs.field(default=65, validator=_between(1, 2048), metadata={
        "help": "MSI-X table size (max_ioqpairs + 1 gives every CQ a vector)"})
    msix_bar: int = attrs.field(default=0, validator=_one_of(0, 4), metadata={
        "help": "BAR of the MSI-X table and PBA: 0 (after the doorbells) or 4 (as QEMU)"})
    mqes: int = attrs.field(default=0x7FF, validator=_between(1, 0xFFFF), metadata={"hex": True,
        "help": "CAP.MQES: largest queue size minus one"})
    aerl: int = attrs.field(default=3, validator=_between(0, 255), metadata={
        "help": "Asynchronous Event Request Limit, 0's based"})
    elpe: int = attrs.field(default=63, validator=_between(0, 255), metadata={
        "help": "Error Log Page Entries, 0's based"})
    max_namespaces: int = attrs.field(default=256, validator=_between(1, 1024), metadata={
        "help": "Identify NN: highest NSID supported"})
    namespaces: list[NamespaceSpec] = attrs.field(factory=list, validator=_namespaces, metadata={
        "key": "ns", "aliases": ("namespace",),
        "help": _namespace_help()})
    state_dir: str | None = attrs.field(default=None, metadata={
        "help": "directory of the persistent state file (default: the first file namespace's directory)"})
    state_file: str | None = attrs.field(default=None, metadata={
        "help": "path of the persistent state file (overrides state_dir)"})
    capacity: Size = attrs.field(default=Size(1 << 40), validator=_between(0, (1 << 64) - 1), metadata={
        "help": "total NVM capacity (TNVMCAP) for Namespace Management"})
    mem_create_limit: Size = attrs.field(default=Size(DEFAULT_MEM_CREATE_LIMIT),
                                         validator=_between(0, (1 << 64) - 1), metadata={
        "help": "most bytes of mem namespaces Namespace Management holds at once (host memory a guest "
                "can fill)"})
    ns_create: str = attrs.field(default="mem", validator=_one_of("mem", "null", "file"), metadata={
        "help": "backend of namespaces created by Namespace Management: mem, null or file"})
    temperature: int = attrs.field(default=323, validator=_between(0, 0xFFFF), metadata={
        "help": "initial composite temperature, kelvin"})
    warning_temp: int = attrs.field(default=343, validator=_between(0, 0xFFFF), metadata={
        "help": "WCTEMP, kelvin"})
    critical_temp: int = attrs.field(default=373, validator=_between(0, 0xFFFF), metadata={
        "help": "CCTEMP, kelvin"})
    fw_slots: int = attrs.field(default=3, validator=_between(1, 7), metadata={
        "help": "firmware slots (1..7; slot 1 is read-only)"})
    dbbuf: bool = attrs.field(default=True, metadata={
        "help": "support Doorbell Buffer Config (shadow doorbells)"})
    cntlid: int = attrs.field(default=0, validator=_between(0, 0xFFEF), metadata={
        "help": "controller identifier"})
    cmb_size: int = attrs.field(default=0, validator=_between(0, 4096), metadata={
        "help": "Controller Memory Buffer size in MiB (0 = none): BAR2, SQs and data in the CMB"})
    legacy_cmb: bool = attrs.field(default=False, metadata={
        "key": "legacy_cmb", "aliases": ("legacy-cmb",),
        "help": "the CMB as before NVMe 1.4: CMBLOC/CMBSZ always valid, the CMB at BAR2's address "
                "without CMBMSC (CAP.CMBS clear); for kernels older than 5.x's CMBMSC support"})
    pmr: str | None = attrs.field(default=None, metadata={
        "help": "file backing a Persistent Memory Region (BAR4; created at pmr_size if missing, "
                "never resized)"})
    pmr_size: Size = attrs.field(default=Size(1 << 20), validator=_between(4096, 1 << 40), metadata={
        "help": "Persistent Memory Region size (a power of two)"})
    sanitize_rate: Size = attrs.field(default=Size(0), validator=_between(0, (1 << 64) - 1), metadata={
        "help": "bytes per second a sanitize operation alters (0: as fast as the backends go; "
                "a low rate makes its progress visible)"})
    selftest_speedup: int = attrs.field(default=1, validator=_between(1, 1_000_000), metadata={
        "help": "divides the device self-test durations (short: 2 s, extended: EDSTT minutes), for tests"})
    ocp: bool = attrs.field(default=False, metadata={
        "help": "offer the OCP SMART / Health Information Extended log page (LID C0h)"})
    sriov_max_vfs: int = attrs.field(default=0, validator=_between(0, 127), metadata={
        "help": "SR-IOV TotalVFs, each VF a secondary controller (0: no SR-IOV)"})
    sriov_vq_flexible: int = attrs.field(default=0, validator=_between(0, 0xFFFF), metadata={
        "help": "SR-IOV flexible queue resources (a VF's admin queue counts as one)"})
    sriov_vi_flexible: int = attrs.field(default=0, validator=_between(0, 0xFFFF), metadata={
        "help": "SR-IOV flexible interrupt (MSI-X vector) resources"})
    sriov_max_vq_per_vf: int = attrs.field(default=0, validator=_between(0, 0xFFFF), metadata={
        "help": "most queue resources one secondary controller takes (0: vq_flexible / max_vfs)"})
    sriov_max_vi_per_vf: int = attrs.field(default=0, validator=_between(0, 0xFFFF), metadata={
        "help": "most interrupt resources one secondary controller takes (0: vi_flexible / max_vfs)"})
    awun: int = attrs.field(default=0, validator=_between(0, 0xFFFF), metadata={
        "key": "atomic.awun", "aliases": ("awun",),
        "help": "AWUN: atomic write unit of every namespace, logical blocks, 0's based (0: single blocks)"})
    awupf: int = attrs.field(default=0, validator=_between(0, 0xFFFF), metadata={
        "key": "atomic.awupf", "aliases": ("awupf",),
        "help": "AWUPF: power-fail atomic write unit, logical blocks, 0's based (<= awun)"})
    atomic_dn: bool = attrs.field(default=False, metadata={
        "key": "atomic.dn", "aliases": ("atomic_dn",),
        "help": "default of Write Atomicity Normal DN (feature 0Ah): on, only AWUPF/NAWUPF apply"})
    smart_critical_warning: int = attrs.field(default=0, validator=_warning_bits, metadata={"hex": True,
        "help": "SMART critical warning bits set at start: 0 spare, 2 reliability, 3 read-only, "
                "4 backup failed, 5 PMR read-only (bit 1 follows temperature)"})
    aer_max_queued: int = attrs.field(default=64, validator=_between(1, 256), metadata={
        "help": "most asynchronous events kept while no AER command is outstanding (1..256)"})
    vsl: int = attrs.field(default=0, validator=_between(0, 255), metadata={
        "help": "Verify Size Limit: at most 2^vsl 4 KiB pages per Verify (0 = no limit)"})
    #: the namespace backends by name, filled by ``DeviceRegistry.create`` from the
    #: registry's ``nvme-backend`` components (None: the built-in backends). Not a property.
    backends: Mapping[str, Any] | None = attrs.field(default=None, eq=False, repr=False, metadata={
        "component": "nvme-backend"})

    def __attrs_post_init__(self) -> None:
        if self.pmr is not None:
            if not self.pmr:
                raise ConfigError("nvme: pmr= needs a file path")
            if self.msix_bar == 4:
                raise ConfigError("nvme: pmr= puts the Persistent Memory Region in BAR4, where msix_bar=4 puts "
                                  "the MSI-X table: use msix_bar=0 with a PMR")
            if self.pmr_size & (self.pmr_size - 1):
                raise ConfigError(f"nvme: pmr_size={int(self.pmr_size)} is not a power of two")
        if self.legacy_cmb and not self.cmb_size:
            raise ConfigError("nvme: legacy_cmb=on needs a CMB (cmb_size=N MiB)")
        problem = controller_problem(self.awun, self.awupf)
        if problem is not None:
            raise ConfigError(f"nvme: {problem}")
        if len(self.namespaces) > self.max_namespaces:
            raise ConfigError(f"nvme: {len(self.namespaces)} namespaces exceed max_namespaces={self.max_namespaces}")

    @property
    def serial_number(self) -> str:
        """``serial`` of a config made by :meth:`coerce` (which always fills it in).

        :raises ConfigError: for a config that did not go through :meth:`coerce`.
        """
        if self.serial is None:
            raise ConfigError("nvme: the configuration has no serial number (use NvmeConfig.coerce)")
        return self.serial

    # -- construction helpers ----------------------------------------------------------
    @classmethod
    def coerce(cls, config: NvmeConfig | Mapping[str, Any] | str | None) -> NvmeConfig:
        """The configuration of a controller built from ``config``, with a serial number.

        :param config: a config, a mapping (:meth:`from_dict`), a property string
            (:meth:`parse`) or None (the defaults).
        :returns: the config, ``serial`` filled in (:func:`default_serial`) when not given.
        :raises ConfigError: anything else, or a bad value.
        """
        if config is None:
            cfg = cls()
        elif isinstance(config, cls):
            cfg = config
        elif isinstance(config, str):
            cfg = cls.parse(config)
        elif isinstance(config, Mapping):
            cfg = cls.from_dict(config)
        else:
            raise ConfigError(f"nvme: configuration must be NvmeConfig, dict or str, not {type(config).__name__}")
        if cfg.msix_vectors < 1:
            raise ConfigError("nvme: at least one MSI-X vector is needed")
        return cfg if cfg.serial is not None else attrs.evolve(cfg, serial=default_serial(cfg))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NvmeConfig:
        """Structure a mapping (strings allowed for every value) into a config.

        :raises ConfigError: for an unknown key or a bad value.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"nvme: configuration must be a mapping, got {type(data).__name__}")
        return structure_config(cls, data, what="nvme")

    @classmethod
    def parse(cls, text: str) -> NvmeConfig:
        """Parse a QEMU-style ``key=value,key=value`` string (see the module docstring).

        :raises ConfigError: for a malformed item, an unknown key or a bad value.
        """
        if not isinstance(text, str):
            raise ConfigError(f"nvme: property string expected, got {type(text).__name__}")
        return structure_config(cls, text, what="nvme")

    @classmethod
    def collect_properties(cls, pairs: list[tuple[str, str]]) -> dict[str, Any]:
        """Group the pairs of :func:`~pcidev.properties.split_properties`: ``ns=`` takes
        the items after it that are not controller properties (see the module docstring).

        :raises ConfigError: a malformed item, a repeated key, or namespace options
            written after ``ns=KIND,`` instead of ``ns=KIND:``.
        """
        return _collect(pairs, cls)

    @classmethod
    def property_groups(cls) -> list[tuple[str, type]]:
        """The option classes of a namespace spec (:func:`property_groups`), for ``describe``."""
        return property_groups()

    def unstructure(self) -> dict[str, Any]:
        """A plain-dict form of the properties (JSON-serializable; without ``backends``)."""
        data: dict[str, Any] = converter.unstructure(self)
        data.pop("backends", None)
        return data


def _spellings(field: attrs.Attribute[Any]) -> tuple[str, ...]:
    """The keys a user types for ``field``: its ``key`` (default: the name) and ``aliases``."""
    return (str(field.metadata.get("key", field.name)), *field.metadata.get("aliases", ()))


def _collect(pairs: list[tuple[str, str]], cls: type) -> dict[str, Any]:
    fields = [f for f in attrs.fields(cls) if f.init and "component" not in f.metadata]
    ns_field = attrs.fields_dict(cls)["namespaces"]
    ns_keys = _spellings(ns_field)
    keys = {key for f in fields for key in _spellings(f)}
    # Group: ns=KIND:... swallows the items after it that are not controller properties
    # (a namespace spec keeps its own commas; a literal one is ',,' again inside it).
    grouped: list[tuple[str, str]] = []
    in_ns = False
    for key, value in pairs:
        item = f"{key}={value}" if key else value
        if key in ns_keys:
            grouped.append((key, value.replace(",", ",,")))
            in_ns = True
        elif in_ns and key not in keys:
            ns_key, spec = grouped[-1]
            if ":" not in spec:
                raise PropertyError(
                    f"{item!r} after {ns_key}={spec} is not a controller property; "
                    f"namespace options follow a ':' after the backend name: "
                    f"{ns_key}={spec}:{item}", name=key or value)
            grouped[-1] = (ns_key, spec + "," + item.replace(",", ",,"))
        else:
            in_ns = False
            if key == ns_field.name and key not in keys:
                raise PropertyError(f"give namespaces one by one with {ns_keys[0]}=SPEC", name=key)
            grouped.append((key, value))
    # The rest is the framework's grammar: missing '=value', repeated keys, lists.
    return collect_pairs(cls, grouped)


def default_serial(cfg: NvmeConfig) -> str:
    """A serial number for a controller configured without one (``serial`` not given).

    Derived from the absolute paths of its file-backed namespace images (and the
    state location) when it has any, so it survives restarts with the images;
    random otherwise, so two controllers never share a serial (Linux refuses a
    second controller with the same subsystem NQN).
    """
    paths = []
    for spec in cfg.namespaces:
        try:
            _kind, options = parse_spec(spec)
        except PcidevError:
            continue
        path = options.get("path")
        if isinstance(path, str) and path:
            paths.append(os.path.abspath(path))
    if paths:
        key = "\0".join([*paths, str(cfg.state_dir or ""), str(cfg.state_file or "")])
        return "PD" + hashlib.sha256(key.encode()).hexdigest()[:18].upper()
    return "PD" + secrets.token_hex(9).upper()
