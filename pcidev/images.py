"""Disk images a device backend creates.

:func:`create_image` makes a sparse image atomically: under a hidden name in the same
directory, sized, then hard-linked into place (a link never replaces an entry). So
nothing at the path is ever overwritten, and processes started together with the same
``file=...,size=...`` (the source and destinations of a migration) all open one
complete file: the first creates it, the others find it there.
"""

from __future__ import annotations

import os

from pcidev.errors import ConfigError

__all__ = ["create_image"]


def create_image(path: str, size: int) -> int | None:
    """Create the image ``path``, sparse with ``size`` bytes, atomically.

    :param path: where the image goes (its directory must exist).
    :param size: its size in bytes.
    :returns: its descriptor (read-write, close-on-exec), or None when something
        appeared at ``path`` meanwhile (the caller opens that instead, as any existing
        image).
    :raises ConfigError: the directory does not take the file.
    """
    hidden = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.{os.urandom(4).hex()}.new")
    try:
        fd = os.open(hidden, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise ConfigError(f"cannot create image {path}: {exc.strerror}") from exc
    try:
        os.ftruncate(fd, size)
        os.link(hidden, path)
    except FileExistsError:
        os.close(fd)
        return None
    except OSError as exc:
        os.close(fd)
        raise ConfigError(f"cannot create image {path}: {exc.strerror}") from exc
    finally:
        try:
            os.unlink(hidden)
        except OSError:
            pass
    return fd
