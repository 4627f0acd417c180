"""The error classes of :mod:`pcidev.vmstate` (defined in :mod:`pcidev.errors`, re-exported here).

Every refusal is a :class:`~pcidev.errors.VMStateError`; the subclasses below let a
caller (or a test) tell the families apart:

* :class:`StreamError` — the envelope is bad: truncated, wrong magic, unknown
  format version, trailing bytes, undecodable body, malformed header;
* :class:`ChecksumError` — the stream's CRC-32C does not match its bytes;
* :class:`ConfigMismatchError` — the stream was saved by a different device type or
  a differently configured device;
* :class:`VersionError` — a description's version in the stream is too new or too
  old for the local description;
* :class:`StateError` — a section's content is bad: wrong type, out of range, missing
  or extra field, bad presence marker, unknown section or subsection, duplicate
  section, a failed upgrade step, or (on save) a state object that does not match
  its description.

A state *description* that is itself inconsistent (a programming error in a device
model) raises :class:`~pcidev.errors.ConfigError` instead, at decoration or first use.
"""

from __future__ import annotations

from pcidev.errors import (
    ChecksumError,
    ConfigMismatchError,
    StateError,
    StreamError,
    VersionError,
    VMStateError,
)

__all__ = [
    "VMStateError",
    "StreamError",
    "ChecksumError",
    "ConfigMismatchError",
    "VersionError",
    "StateError",
]


class _Fail(Exception):
    """Internal: raised by the generated codecs, carries the error class and a
    reversed field path; turned into a public error at section level."""

    __slots__ = ("reason", "path", "kind")

    def __init__(self, reason: str, kind: type[VMStateError] = StateError) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind
        #: Path components innermost first: field names (str) and indices (int).
        self.path: list[str | int] = []


def render_path(components: list[str | int]) -> str:
    """Render path components (outermost first) as ``a.b[3].c``.

    :param components: field names and array indices.
    :returns: the dotted path.
    """
    out: list[str] = []
    for comp in components:
        if isinstance(comp, int):
            out.append(f"[{comp}]")
        elif out:
            out.append("." + comp)
        else:
            out.append(comp)
    return "".join(out)
