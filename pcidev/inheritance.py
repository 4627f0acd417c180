"""Descriptors a handover's new process inherits instead of opening its own.

A handover (``pcidev handover``) starts a new process that builds the same device from
the same spec, then takes its state. A backend that opened something by path (a disk
image) must not open that path again there: since the old process opened it, the path
may have been renamed, unlinked or replaced by another file, and the guest's disk is
the file the old process holds, not whatever the path names now. So:

* the old process asks its device for :meth:`pcidev.device.PciDevice.inheritable_fds`
  (a key of the device's own choosing per descriptor, e.g. :func:`image_key`) and
  starts the new process with those descriptors;
* the new process builds the device inside :func:`inheriting`; a backend about to open
  something calls :func:`take_inherited` with the same key first and, given a
  descriptor, uses it instead of the path (it owns it: close it when done).

Outside a handover :func:`take_inherited` returns None and backends open their paths
as always. A descriptor nobody took is closed when :func:`inheriting` ends.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Iterator, Mapping

__all__ = ["image_key", "inheriting", "parse_inherit_arg", "take_inherited", "format_inherit_arg"]

log = logging.getLogger(__name__)

_INHERITED: contextvars.ContextVar[dict[str, int] | None] = contextvars.ContextVar("pcidev_inherited", default=None)


def image_key(path: str, *, read_only: bool, direct: bool = False) -> str:
    """The key of an image opened at ``path`` (made absolute) with the given mode: a
    read-only descriptor is never handed to a backend that writes, nor a buffered one
    to a backend that wants ``O_DIRECT``.

    :param path: the image path as the spec gives it (relative paths are resolved
        against the working directory, which the new process shares).
    :param read_only: opened ``O_RDONLY``.
    :param direct: opened ``O_DIRECT``.
    """
    mode = ("ro" if read_only else "rw") + ("+direct" if direct else "")
    return f"image:{mode}:{os.path.abspath(path)}"


def take_inherited(key: str) -> int | None:
    """The descriptor inherited under ``key`` (the caller owns it, close-on-exec), or
    None outside :func:`inheriting` or when the old process passed none under that key.
    Each key is handed out once.

    :param key: the key the device used in :meth:`~pcidev.device.PciDevice.inheritable_fds`.
    """
    table = _INHERITED.get()
    if table is None:
        return None
    return table.pop(key, None)


@contextlib.contextmanager
def inheriting(fds: Mapping[str, int]) -> Iterator[None]:
    """Build a device with ``fds`` (key → descriptor, owned by this context) on offer to
    :func:`take_inherited`. On exit the descriptors nobody took are closed.

    :param fds: from :func:`parse_inherit_arg`.
    """
    table = dict(fds)
    for fd in table.values():
        os.set_inheritable(fd, False)
    token = _INHERITED.set(table)
    try:
        yield
    finally:
        _INHERITED.reset(token)
        for key, fd in table.items():
            log.info("inherited descriptor %s was not used", key)
            os.close(fd)


def format_inherit_arg(key: str, fd: int) -> str:
    """The ``--inherit-fd`` argument for ``fd`` under ``key``: ``FD:KEY``."""
    return f"{fd}:{key}"


def parse_inherit_arg(values: list[str]) -> dict[str, int]:
    """Check ``--inherit-fd FD:KEY`` arguments: each FD must be an open descriptor
    (3 or more) and each key given once.

    :raises ValueError: one line naming the bad argument.
    """
    out: dict[str, int] = {}
    for value in values:
        fd_text, sep, key = value.partition(":")
        if not sep or not key or not fd_text.isdigit() or int(fd_text) < 3:
            raise ValueError(f"--inherit-fd {value!r}: expected FD:KEY with FD 3 or more")
        fd = int(fd_text)
        try:
            os.fstat(fd)
        except OSError:
            raise ValueError(f"--inherit-fd {value!r}: descriptor {fd} is not open") from None
        if key in out or fd in out.values():
            raise ValueError(f"--inherit-fd {value!r}: given twice")
        out[key] = fd
    return out
