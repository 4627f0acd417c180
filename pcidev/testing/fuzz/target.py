"""What a fuzz target is: :class:`FuzzTarget`, :class:`FuzzFinding`, :class:`FuzzInput`.

A target turns one input (``bytes``) into a sequence of actions against a device,
a transport or a stream, and checks its invariants after each one. It raises
:class:`FuzzFinding` when an invariant breaks (an exception escaped the device
boundary, guest memory was written outside the buffers a command named, a step
did not finish in bounded time...) and returns normally otherwise: a refusal with
the spec's error status or a typed error is the expected outcome of bad input.

Targets are registry components of kind :data:`FUZZ_TARGET_KIND`; a plugin
registers a factory (no argument, returning a :class:`FuzzTarget`) from its
``pcidev_register_devices``::

    registry.add_component("fuzz-target", "acme-mmio", AcmeMmioTarget)
"""

from __future__ import annotations

import logging
import os
import struct
import traceback
from collections.abc import Iterator
from typing import ClassVar

from pcidev.errors import PcidevError

__all__ = ["FUZZ_TARGET_KIND", "RSS_EVERY", "RSS_GROWTH_MB", "ErrorLogWatch", "FuzzFinding", "FuzzInput", "FuzzTarget",
           "RssWatch", "open_fd_count", "resident_mb"]

#: Registry component kind of fuzz targets (``pcidev fuzz TARGET``).
FUZZ_TARGET_KIND = "fuzz-target"

#: inputs between two samples of the resident set (:class:`RssWatch`)
RSS_EVERY = 1000
#: how far the resident set may grow past its first sample, in MiB (:class:`RssWatch`)
RSS_GROWTH_MB = 512.0
_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class FuzzFinding(PcidevError):
    """An invariant of a fuzz target broke on one input.

    :param invariant: the short name of the invariant (``escaped-exception``,
        ``memory-outside-buffers``, ``hang``, ``fd-leak``...); findings with the same
        invariant and ``where`` are the same bug.
    :param detail: one line saying what happened.
    :param where: where it happened (for an escaped exception: its type and the
        innermost frame of the project's code), for deduplication.
    :param trace: the formatted traceback behind it, if any.
    """

    def __init__(self, invariant: str, detail: str, *, where: str = "", trace: str = "") -> None:
        super().__init__(f"{invariant}: {detail}")
        self.invariant = invariant
        self.detail = detail
        self.where = where
        self.trace = trace

    @property
    def signature(self) -> str:
        """``invariant@where``: what identifies the bug (for deduplication)."""
        return f"{self.invariant}@{self.where}" if self.where else self.invariant

    @classmethod
    def escaped(cls, exc: BaseException, what: str) -> FuzzFinding:
        """The finding for an exception that escaped ``what`` (invariant ``escaped-exception``).

        :param exc: the exception.
        :param what: the step that let it escape.
        """
        frames = traceback.extract_tb(exc.__traceback__)
        ours = [f for f in frames if "pcidev" in f.filename]
        last = (ours or frames)[-1] if (ours or frames) else None
        where = f"{type(exc).__name__}:{os.path.basename(last.filename)}:{last.name}" if last else type(exc).__name__
        return cls("escaped-exception", f"{what}: {type(exc).__name__}: {exc}", where=where,
                   trace="".join(traceback.format_exception(exc)))


class FuzzInput:
    """Reads typed values from the fuzzer's bytes, never running out: past the end
    every value is zero (as libFuzzer's FuzzedDataProvider, in pure Python).

    :param data: the input.
    """

    def __init__(self, data: bytes) -> None:
        self.data = bytes(data)
        self.pos = 0

    @property
    def remaining(self) -> int:
        """Bytes not consumed yet."""
        return max(0, len(self.data) - self.pos)

    def take(self, n: int) -> bytes:
        """The next ``n`` bytes (zero-padded past the end)."""
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out + b"\0" * (n - len(out))

    def u8(self) -> int:
        """One unsigned byte."""
        return int(_U8.unpack(self.take(1))[0])

    def u16(self) -> int:
        """A little-endian u16."""
        return int(_U16.unpack(self.take(2))[0])

    def u32(self) -> int:
        """A little-endian u32."""
        return int(_U32.unpack(self.take(4))[0])

    def u64(self) -> int:
        """A little-endian u64."""
        return int(_U64.unpack(self.take(8))[0])

    def pick(self, choices: tuple[int, ...] | list[int]) -> int:
        """One of ``choices``, chosen by the next byte."""
        return choices[self.u8() % len(choices)]

    def blob(self, limit: int) -> bytes:
        """A length byte-pair (up to ``limit``) and that many bytes."""
        return self.take(self.u16() % (limit + 1))


class FuzzTarget:
    """One fuzz target: subclass it, set :attr:`name` and :attr:`summary`, implement
    :meth:`run` and :meth:`seeds`.

    The engines call :meth:`setup` once per process, then :meth:`run` once per input
    (keep it well under a second), then :meth:`close`. A target keeps what is
    expensive to build (a controller, a machine) between inputs only if :meth:`run`
    puts it back into a known state first, so that an input replays the same way
    alone (the regression corpus replays one file at a time).
    """

    #: The name ``pcidev fuzz NAME`` runs it by.
    name: ClassVar[str] = ""
    #: One line for ``pcidev fuzz --list``.
    summary: ClassVar[str] = ""
    #: The invariants checked, one short phrase each (for ``--list`` and the docs).
    invariants: ClassVar[tuple[str, ...]] = ()
    #: The packages or modules (each with its submodules) whose coverage guides this target
    #: under atheris; an entry starting with ``-`` takes a module (and its submodules) out
    #: again. The rest runs uninstrumented, at full speed. Empty (the default): pcidev and
    #: every plugin package.
    instrument: ClassVar[tuple[str, ...]] = ()

    def setup(self) -> None:
        """Build what every input shares (called once before the first :meth:`run`)."""

    def run(self, data: bytes) -> None:
        """Run one input.

        :param data: the fuzzer's bytes.
        :raises FuzzFinding: an invariant broke.
        """
        raise NotImplementedError

    def seeds(self) -> Iterator[bytes]:
        """Valid inputs to start the corpus from (each exercises a normal path)."""
        return iter(())

    def close(self) -> None:
        """Release what :meth:`setup` built."""


def open_fd_count() -> int:
    """The number of file descriptors this process has open (Linux ``/proc/self/fd``)."""
    return len(os.listdir("/proc/self/fd")) - 1  # less the directory's own


class ErrorLogWatch(logging.Handler):
    """Collects log records that carry a traceback (``exc_info``): an exception a
    server caught at its outermost level and logged is still an escaped exception.

    Use as a context manager; ``records`` holds what was seen.
    """

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[0] is not None:
            self.records.append(record)

    def __enter__(self) -> ErrorLogWatch:
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger().removeHandler(self)

    def check(self, what: str) -> None:
        """Raise the finding for the first record with a traceback, if any.

        :param what: the step being checked.
        :raises FuzzFinding: invariant ``logged-traceback``.
        """
        if not self.records:
            return
        rec = self.records[0]
        self.records.clear()
        exc = rec.exc_info[1] if rec.exc_info else None
        if isinstance(exc, BaseException):
            found = FuzzFinding.escaped(exc, what)
            raise FuzzFinding("logged-traceback", f"{what}: {rec.name}: {rec.getMessage()}: {found.detail}",
                              where=found.where, trace=found.trace)
        raise FuzzFinding("logged-traceback", f"{what}: {rec.name}: {rec.getMessage()}", where=rec.name)


def resident_mb() -> float:
    """This process's resident set in MiB (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


class RssWatch:
    """The memory-growth invariant: the engines call :meth:`tick` after every input; every
    ``every`` inputs it samples the resident set, and once it has grown more than
    ``growth_mb`` past the first sample (taken after ``every`` inputs of warm-up) it
    raises ``memory-growth``. Sampled: the input it is raised on is not necessarily the
    cause, only the one at which the growth was seen (the finding says so); the baseline
    then moves up so that one leak is reported once per ``growth_mb``.

    :param every: inputs between two samples (default ``RSS_EVERY``, 1000).
    :param growth_mb: growth allowed past the first sample (default ``RSS_GROWTH_MB``, 512).
    """

    def __init__(self, every: int = RSS_EVERY, growth_mb: float = RSS_GROWTH_MB) -> None:
        self.every = max(1, every)
        self.growth_mb = growth_mb
        self.count = 0
        self.baseline: float | None = None

    def tick(self) -> None:
        """Count one input; sample and check every ``every`` inputs.

        :raises FuzzFinding: invariant ``memory-growth``.
        """
        self.count += 1
        if self.count % self.every:
            return
        rss = resident_mb()
        if self.baseline is None:
            self.baseline = rss
            return
        if rss - self.baseline > self.growth_mb:
            grown, self.baseline = rss - self.baseline, rss
            raise FuzzFinding("memory-growth", f"the resident set grew {grown:.0f} MiB (to {rss:.0f} MiB) within "
                              f"{self.count} inputs (sampled every {self.every}: this input is where it was "
                              "seen, not necessarily its cause)", where="rss")
