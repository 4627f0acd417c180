"""PciDevice's transport hooks (batch, poll_work, set_polling): no-ops by default, so a
transport may call them on any device; a device type overrides them."""

from __future__ import annotations

from pcidev.bar import RegisterMap
from pcidev.device import PciDevice
from pcidev.host import Machine


class Plain(PciDevice):
    TYPE_NAME = "plainhooks"

    def describe(self) -> None:
        self.add_mem_bar(0, 4096, RegisterMap(4096))


class Counting(Plain):
    TYPE_NAME = "countinghooks"

    def __init__(self) -> None:
        super().__init__()
        self.polling: list[bool] = []

    def poll_work(self) -> bool:
        return bool(self.polling and self.polling[-1])

    def set_polling(self, active: bool) -> None:
        self.polling.append(active)


def test_default_hooks_do_nothing_and_nest():
    with Machine() as m:
        dev = Plain()
        host = m.plug(dev)
        host.enable_device()
        with dev.batch():
            with dev.batch():
                host.iowrite32(0, 0, 0x1234)  # accesses go on as usual inside
            assert host.ioread32(0, 0) == 0
        assert dev.poll_work() is False
        assert dev.set_polling(True) is None
        assert dev.poll_work() is False
        dev.set_polling(False)


def test_a_device_type_overrides_them():
    with Machine() as m:
        dev = Counting()
        m.plug(dev)
        assert dev.poll_work() is False
        dev.set_polling(True)
        assert dev.poll_work() is True
        dev.set_polling(False)
        assert dev.polling == [True, False] and dev.poll_work() is False
