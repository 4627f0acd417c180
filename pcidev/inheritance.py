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
  descriptor, uses it instead of the path (it owns it: close it when done). Two backends
  on one image (the same key) each get their own duplicate.

Outside a handover :func:`take_inherited` returns None and backends open their paths
as always. A descriptor nobody took means the new device would have opened a path
instead of the old one's file (a key that changed between versions, a working
directory renamed under a relative path): :func:`inheriting` raises
:class:`~pcidev.errors.ConfigError` naming it, so the new process refuses the handover.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator, Mapping

import attrs

from pcidev.errors import ConfigError

__all__ = ["image_key", "inheriting", "parse_inherit_arg", "take_inherited", "format_inherit_arg"]



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


@attrs.define
class _Offer:
    """The descriptors on offer while a device is built, and the keys asked for."""

    fds: dict[str, int]
    taken: set[str] = attrs.Factory(set)


_INHERITED: contextvars.ContextVar[_Offer | None] = contextvars.ContextVar("pcidev_inherited", default=None)


def take_inherited(key: str) -> int | None:
    """A descriptor of the file inherited under ``key`` (a new duplicate, close-on-exec,
    owned by the caller), or None outside :func:`inheriting` or when the old process
    passed none under that key.

    :param key: the key the device used in :meth:`~pcidev.device.PciDevice.inheritable_fds`.
    :raises OSError: the descriptor cannot be duplicated (out of descriptors).
    """
    offer = _INHERITED.get()
    if offer is None or key not in offer.fds:
        return None
    fd = os.dup(offer.fds[key])
    offer.taken.add(key)
    return fd


@contextlib.contextmanager
def inheriting(fds: Mapping[str, int]) -> Iterator[None]:
    """Build a device with ``fds`` (key → descriptor, owned by this context: closed when
    it ends) on offer to :func:`take_inherited`.

    :param fds: from :func:`parse_inherit_arg`.
    :raises ConfigError: (at the end of a build that did not fail) a descriptor nobody
        took: the device opened a path where the old process held a file.
    """
    offer = _Offer(dict(fds))
    token = _INHERITED.set(offer)
    try:
        for fd in offer.fds.values():
            os.set_inheritable(fd, False)
        yield
        untaken = sorted(set(offer.fds) - offer.taken)
        if untaken:
            raise ConfigError("the device did not take the descriptor(s) the old process passed for "
                              f"{', '.join(untaken)}: it would serve another file than the old process")
    finally:
        _INHERITED.reset(token)
        close_all, offer.fds = list(offer.fds.values()), {}
        for fd in close_all:
            os.close(fd)


def format_inherit_arg(key: str, fd: int) -> str:
    """The ``--inherit-fd`` argument for ``fd`` under ``key``: ``FD:KEY``."""
    return f"{fd}:{key}"


def parse_inherit_arg(values: list[str], *, reserved: tuple[int, ...] = ()) -> dict[str, int]:
    """Check ``--inherit-fd FD:KEY`` arguments: each FD must be an open descriptor
    (3 or more, not one of ``reserved``) and each key given once.

    :param values: the arguments.
    :param reserved: descriptors that are something else (the handover channel).
    :raises ValueError: one line naming the bad argument.
    """
    out: dict[str, int] = {}
    for value in values:
        fd_text, sep, key = value.partition(":")
        if not sep or not key or not fd_text.isdigit() or int(fd_text) < 3:
            raise ValueError(f"--inherit-fd {value!r}: expected FD:KEY with FD 3 or more")
        fd = int(fd_text)
        if fd in reserved:
            raise ValueError(f"--inherit-fd {value!r}: descriptor {fd} is the handover channel")
        try:
            os.fstat(fd)
        except OSError:
            raise ValueError(f"--inherit-fd {value!r}: descriptor {fd} is not open") from None
        if key in out or fd in out.values():
            raise ValueError(f"--inherit-fd {value!r}: given twice")
        out[key] = fd
    return out
