"""Typed exceptions raised by pcidev.

Every error pcidev raises on purpose derives from :class:`PcidevError`, so a
transport or a CLI can catch the whole family in one place and turn it into a
protocol error, a device status or a one-line message.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ChecksumError",
    "ConfigError",
    "ConfigMismatchError",
    "ConfigSpaceError",
    "ConnectionLostError",
    "DeviceFailedError",
    "DmaError",
    "HandoverDeniedError",
    "IrqError",
    "MigrationBlockedError",
    "MigrationError",
    "MmioError",
    "PcidevError",
    "PluginError",
    "PluginSpecError",
    "QuiesceTimeoutError",
    "StateError",
    "StreamError",
    "TransportError",
    "VMStateError",
    "VersionError",
    "one_line",
]


def one_line(text: object) -> str:
    """``text`` as one line, for an error message: every run of whitespace (newlines
    included) becomes one space, leading and trailing whitespace goes.

    :param text: the text (or anything, converted with ``str()``).
    :returns: the line (no newline).
    """
    return " ".join(str(text).split())


class PcidevError(Exception):
    """Base class of every error pcidev raises deliberately."""


class ConfigError(PcidevError):
    """A device, capability or BAR was described inconsistently (a programming error
    in a device model, raised at describe/realize time)."""


class ConfigSpaceError(PcidevError):
    """An access to PCI configuration space was malformed (offset or size out of range)."""


class MmioError(PcidevError):
    """A BAR access was malformed: unknown BAR, bad size, or outside the BAR."""


class DmaError(PcidevError):
    """A guest-memory access fell outside mapped memory, overflowed, or was refused.

    Devices turn it into their own error status (for NVMe: Data Transfer Error)."""


class IrqError(PcidevError):
    """An interrupt was requested that the device does not have or has not enabled."""


class PluginError(PcidevError):
    """A plugin or device registration is invalid (duplicate name, missing hook, ...)."""


class PluginSpecError(PluginError):
    """A plugin selection option (``-p no:NAME`` / ``-p MODULE``) is malformed: a usage error."""


class DeviceFailedError(PcidevError):
    """The device entered its failed state after a handler raised; it refuses work
    until reset."""


class VMStateError(PcidevError):
    """A device-state stream or state object was refused: malformed, truncated,
    corrupted, of the wrong version or configuration, or out of range.

    :param reason: what is wrong, in words.
    :param section: name of the section concerned, if any.
    :param instance_id: instance id of that section, if any.
    :param path: field path inside the section (``"sq[3].head"``), if any.

    The message names the section and the field path; the parts stay available as
    attributes.  The subclasses below tell the families apart (see
    :mod:`pcidev.vmstate.errors`).
    """

    def __init__(
        self,
        reason: str,
        *,
        section: str | None = None,
        instance_id: int | None = None,
        path: str = "",
    ) -> None:
        self.reason = reason
        self.section = section
        self.instance_id = instance_id
        self.path = path
        if section is not None:
            where = f"section {section!r}"
            if instance_id is not None:
                where += f" instance {instance_id}"
            if path:
                where += f", field {path!r}"
        elif path:
            where = f"field {path!r}"
        else:
            where = "stream"
        super().__init__(f"{where}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:  # keep the parts when the error crosses a process boundary
        return (_restore_vmstate_error,
                (type(self), self.reason, self.section, self.instance_id, self.path), self.__dict__)


def _restore_vmstate_error(cls: type[VMStateError], reason: str, section: str | None, instance_id: int | None,
                           path: str) -> VMStateError:
    err = cls.__new__(cls)
    VMStateError.__init__(err, reason, section=section, instance_id=instance_id, path=path)
    return err


class StreamError(VMStateError):
    """The stream envelope is malformed (truncated, wrong magic, unknown format
    version, trailing bytes, undecodable body or header)."""


class ChecksumError(StreamError):
    """The CRC-32C stored in the stream does not match the stream's bytes."""


class ConfigMismatchError(VMStateError):
    """The stream belongs to another device type or to a device configured
    differently.

    :ivar differences: one ``"item: stream has X, this device has Y"`` string per
        differing configuration item (empty for a device-type mismatch).
    """

    def __init__(self, reason: str, *, differences: list[str] | None = None, **where: Any) -> None:
        super().__init__(reason, **where)
        self.differences = list(differences or ())


class VersionError(VMStateError):
    """A description version in the stream is newer than the local description or
    older than its minimum version."""


class StateError(VMStateError):
    """A section's content does not match its description (type, range, presence
    marker, missing/extra field, unknown section or subsection, failed upgrade)."""


class TransportError(PcidevError):
    """A transport connection failed or carried a malformed message: bad framing,
    unexpected or truncated file descriptors, a peer that went away, or an error
    reply whose type the receiver does not know."""


class HandoverDeniedError(TransportError):
    """A handover was asked by a user other than the one the server runs as."""


class MigrationError(PcidevError):
    """A migration did not complete. The source device is running again (it keeps
    its state until the destination acknowledges), unless the message says
    otherwise."""


class ConnectionLostError(MigrationError):
    """A handover's new process may have run the device after COMMIT and then failed
    (its RUNNING came late or broken): neither process may run the device again, and
    the client's connection is lost (closed)."""


class QuiesceTimeoutError(MigrationError):
    """The device did not reach a consistent point within the quiesce budget (a backend
    request that does not complete: a stuck network server, a hung disk). The device runs
    again where it was; the requests still in flight go on and complete there later.
    The message names what waited (the namespaces, the oldest request's age)."""


class MigrationBlockedError(MigrationError):
    """The device cannot migrate now; nothing was stopped.

    :param reasons: every reason, one sentence each (all are reported together).

    :ivar reasons: the list of reasons.
    """

    def __init__(self, reasons: list[str]) -> None:
        self.reasons = list(reasons)
        super().__init__("migration blocked: " + "; ".join(self.reasons))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.reasons,))
