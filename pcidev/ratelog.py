"""Rate-limited warnings for what a guest or a peer can repeat forever.

A guest can hit an unassigned register, send a malformed request or ring a bad doorbell
millions of times a second; each is worth a warning, but an unbounded log is itself a
denial of service. :class:`RateLimitedLog` lets at most ``burst`` lines through per
``period`` seconds and then says how many it suppressed::

    from pcidev.ratelog import RateLimitedLog

    class MyDevice(PciDevice):
        def describe(self):
            self.guest_error = RateLimitedLog(self.log)
            ...
        def _bad_request(self, why):
            self.guest_error("%s: request refused: %s", self.name, why)
"""

from __future__ import annotations

import logging
import threading
import time

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """At most ``burst`` warnings per ``period`` seconds; the next window's first line
    reports how many were suppressed. Safe to call from several threads.

    :param logger: where the lines go.
    :param burst: lines let through per window.
    :param period: window length in seconds.
    :param level: the logging level of the lines.
    :ivar suppressed: lines dropped in the current window.
    """

    def __init__(self, logger: logging.Logger, burst: int = 10, period: float = 5.0, *,
                 level: int = logging.WARNING) -> None:
        self.logger = logger
        self.burst = burst
        self.period = period
        self.level = level
        self._lock = threading.Lock()
        self._window = -period
        self._count = 0
        self.suppressed = 0

    def __call__(self, msg: str, *args: object) -> None:
        """Log ``msg % args`` unless this window's burst is used up.

        :param msg: a %-format string, as for :meth:`logging.Logger.warning`.
        :param args: its arguments.
        """
        with self._lock:
            now = time.monotonic()
            if now - self._window > self.period:
                dropped, self.suppressed = self.suppressed, 0
                self._window, self._count = now, 0
                if dropped:
                    self.logger.log(self.level, "%d similar messages suppressed", dropped)
            if self._count >= self.burst:
                self.suppressed += 1
                return
            self._count += 1
        self.logger.log(self.level, msg, *args)
