"""Health of :class:`~pcidev_nvme.controller.NvmeController` (mixed into it): the
composite temperature and the SMART critical warning (thresholds from feature 04h,
SMART / Health asynchronous events enabled by feature 0Bh), the SMART / Health log
page, notices, and the keep alive timer (feature 0Fh: a controller that hears
nothing from the host for KATO fails with a fatal status).

The counters and the temperature themselves belong to
:class:`~pcidev_nvme.logs.SmartCounters`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from pcidev_nvme import aer as aer_mod
from pcidev_nvme.aer import AsyncEvents
from pcidev_nvme.config import NvmeConfig
from pcidev_nvme.endurance import EnduranceGroup
from pcidev_nvme.features import Features
from pcidev_nvme.interrupts import Timer
from pcidev_nvme.logs import ErrorLog, SmartCounters
from pcidev_nvme.ns_smart import NamespaceSmart
from pcidev_nvme.registers import ST_READY
from pcidev_nvme.status import DNR, Status

__all__ = ["HealthMixin"]


class HealthMixin:
    """Temperature, critical warning and keep alive (see the module docstring)."""

    _state: str
    _ka_last: float
    _ka_token: int
    timer: Timer
    cfg: NvmeConfig
    smart: SmartCounters
    ns_smart: NamespaceSmart
    features: Features
    aer: AsyncEvents
    error_log: ErrorLog
    endurance: EnduranceGroup

    if TYPE_CHECKING:  # provided by the other parts of NvmeController
        def _fatal(self, why: str) -> None: ...


    @property
    def temperature(self) -> int:
        """The composite temperature in kelvin."""
        return self.smart.temperature

    @property
    def critical_warning(self) -> int:
        """SMART critical warning: injected bits plus the temperature bit."""
        cw = self.smart.injected_warning
        t = self.smart.temperature
        if t >= self.features.temp_over or (self.features.temp_under and t <= self.features.temp_under):
            cw |= 1 << 1
        return cw

    def set_temperature(self, kelvin: int) -> None:
        """Change the composite temperature (a thermal model or test); may raise a SMART AEN."""
        if not 0 <= kelvin <= 0xFFFF:
            raise ValueError(f"temperature {kelvin} K is out of range")
        self.account_temperature()
        self.smart.set_temperature(kelvin)
        self.check_temperature()

    def inject_critical_warning(self, bits: int) -> None:
        """Set critical warning bits (0 spare, 2 reliability, 3 read-only, 4 backup failed)."""
        self.smart.inject_warning(bits)
        self.check_temperature()

    def account_temperature(self) -> None:
        """Count the time spent above the warning / critical temperature so far."""
        self.smart.account_temperature(self.cfg.warning_temp, self.cfg.critical_temp)

    def check_temperature(self) -> None:
        """Post a SMART AEN for each critical warning bit that is set, enabled in the
        Asynchronous Event Configuration and not reported yet. A bit is reported again
        only after it cleared (so enabling a bit in AEC reports a condition already there)."""
        cw = self.critical_warning
        new = self.smart.report_warnings(cw, self.features.aec if self._state == ST_READY else 0)
        self.endurance_changed()  # the endurance group's warnings (feature 18h)
        if not new:
            return
        for bit, info in ((1, aer_mod.INFO_SMART_TEMPERATURE), (0, aer_mod.INFO_SMART_SPARE),
                          (2, aer_mod.INFO_SMART_RELIABILITY), (3, aer_mod.INFO_SMART_RELIABILITY),
                          (4, aer_mod.INFO_SMART_RELIABILITY)):
            if new & (1 << bit):
                self.aer.post(aer_mod.AER_SMART, info, 0x02)

    def endurance_changed(self) -> None:
        """The endurance group's warnings or feature 18h may have changed: the controllers
        that report the group check it (this one; with SR-IOV every live controller)."""
        self.endurance.check(ready=self._state == ST_READY)

    def smart_page(self, nsid: int | None = None) -> bytes:
        """The SMART / Health Information log page (LID 02h): the controller's, or with
        ``nsid`` that namespace's (its data units and host commands; the rest is the
        controller's, :mod:`pcidev_nvme.ns_smart`)."""
        self.account_temperature()
        return self.smart.page(critical_warning=self.critical_warning, temperature=self.smart.temperature,
                               error_entries=self.error_log.count,
                               eg_warning_summary=self.endurance.critical_warning(),
                               io_counts=None if nsid is None else self.ns_smart.counters(nsid))

    def notice(self, info: int, lid: int) -> None:
        """Post a notice AEN if its AEC bit is set (8: namespace attribute, 9: firmware activation)."""
        bit = {aer_mod.INFO_NS_ATTR_CHANGED: 8, aer_mod.INFO_FW_ACTIVATION: 9}.get(info)
        if bit is not None and self.features.aec & (1 << bit):
            self.aer.post(aer_mod.AER_NOTICE, info, lid)

    def _init_health(self) -> None:
        """Keep alive: nothing heard from the host yet, no timer armed."""
        self._ka_last = time.monotonic()
        #: a keep-alive check scheduled with another token is stale
        self._ka_token = 0

    def keep_alive(self, now: float | None = None) -> None:
        """The host was heard from (a Keep Alive or any admin command), at ``now``
        (``time.monotonic()``; default: now)."""
        self._ka_last = time.monotonic() if now is None else now

    def keep_alive_stop(self) -> None:
        """Forget any keep-alive check that is scheduled (a reset, a quiesce, a restore)."""
        self._ka_token += 1

    def keep_alive_restart(self) -> None:
        """Count from now and re-arm the check if Keep Alive is on (a resume)."""
        self._ka_last = time.monotonic()
        if self.features.kato_ms:
            self.keep_alive_changed()

    def keep_alive_changed(self) -> None:
        """Feature 0Fh changed: restart the keep alive timer."""
        self._ka_last = time.monotonic()
        self._ka_token += 1
        kato = self.features.kato_ms
        if kato:
            self.timer.schedule(kato / 1000.0, self._keep_alive_check, self._ka_token)

    def _keep_alive_check(self, token: int) -> None:
        kato = self.features.kato_ms
        if not kato or token != self._ka_token or self._state != ST_READY:
            return
        left = self._ka_last + kato / 1000.0 - time.monotonic()
        if left > 0:
            self.timer.schedule(left, self._keep_alive_check, token)
            return
        self.error_log.add(sqid=0xFFFF, cid=0xFFFF, status_field=Status.KA_TIMEOUT_EXPIRED | DNR)
        self._fatal("keep alive timeout expired")
