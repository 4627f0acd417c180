"""The virtio-pci modern transport as Linux's virtio_pci_modern sees it: identity, the
vendor capabilities and BAR layout, feature negotiation, the status state machine, reset,
queue configuration, MSI-X vectors, INTx through the ISR, DEVICE_NEEDS_RESET, the PCI
configuration access window, and hostile register accesses."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pcidev.host import PCI_IRQ_INTX, Machine
from pcidev.pci import ids
from pcidev.testing import plugged, probe
from pcidev_virtio import spec
from pcidev_virtio.device import NOTIFY_MULTIPLIER, NOTIFY_OFFSET, VIRTIO_BAR
from pcidev_virtio.errors import DriverError, VirtqueueError
from pcidev_virtio.rng import VirtioRng
from pcidev_virtio.testing.driver import VirtioDriver

C = spec.CommonCfg
S = spec.Status


def test_identity_is_a_modern_virtio_device(rng):
    pdev, _drv = rng
    assert (pdev.vendor, pdev.device_id) == (0x1AF4, 0x1040 + 4)
    assert pdev.config_read8(ids.REVISION_ID) == 1
    assert pdev.config_read16(ids.SUBSYSTEM_VENDOR_ID) == 0x1AF4
    assert pdev.config_read16(ids.SUBSYSTEM_ID) >= 0x40
    assert pdev.config_read8(ids.INTERRUPT_PIN) == 1


def test_capabilities_and_bar_layout_are_what_linux_maps(rng):
    pdev, drv = rng
    bars = pdev.size_bars()
    assert bars[VIRTIO_BAR] == (0x4000, "mem64")
    assert bars[1] == (0x1000, "mem32")  # MSI-X table and PBA
    assert 0 not in bars and 2 not in bars  # no legacy I/O BAR
    vendor = [pos for pos, cap_id in pdev.capabilities() if cap_id == ids.CapId.VNDR]
    assert all(pos % 4 == 0 for pos in vendor)
    by_type = {pdev.config_read8(pos + 3): pos for pos in vendor}
    assert set(by_type) == {spec.CfgType.COMMON, spec.CfgType.NOTIFY, spec.CfgType.ISR, spec.CfgType.PCI}
    lengths = {t: pdev.config_read8(pos + 2) for t, pos in by_type.items()}
    assert lengths == {spec.CfgType.COMMON: 16, spec.CfgType.NOTIFY: 20, spec.CfgType.ISR: 16, spec.CfgType.PCI: 20}
    common = drv.caps[spec.CfgType.COMMON]
    assert (common.bar, common.offset, common.length) == (VIRTIO_BAR, 0, 56)
    notify = drv.caps[spec.CfgType.NOTIFY]
    assert (notify.offset, notify.length, drv.notify_multiplier) == (NOTIFY_OFFSET, 4, NOTIFY_MULTIPLIER)
    assert drv.caps[spec.CfgType.ISR].length == 1
    assert pdev.find_capability(ids.CapId.MSIX) and pdev.find_capability(ids.CapId.EXP)
    assert (pdev.config_read16(pdev.find_capability(ids.CapId.MSIX) + 2) & 0x7FF) + 1 == 2  # config + 1 queue


def test_feature_windows_and_negotiation(rng):
    _pdev, drv = rng
    drv.reset()
    offered = drv.read_device_features()
    assert offered >> spec.Feature.VERSION_1 & 1
    assert offered >> spec.Feature.RING_EVENT_IDX & 1 and offered >> spec.Feature.RING_INDIRECT_DESC & 1
    assert not offered >> spec.Feature.NOTIF_CONFIG_DATA & 1 and not offered >> spec.Feature.RING_PACKED & 1
    drv.write_common(C.DEVICE_FEATURE_SELECT, 4, 7)
    assert drv.read_common(C.DEVICE_FEATURE, 4) == 0  # windows past bit 63 hold nothing
    drv.set_status(S.ACKNOWLEDGE | S.DRIVER)
    drv.write_driver_features(1 << spec.Feature.VERSION_1)
    drv.write_common(C.DRIVER_FEATURE_SELECT, 4, 1)
    assert drv.read_common(C.DRIVER_FEATURE, 4) == 1
    drv.set_status(S.FEATURES_OK)
    assert drv.status & S.FEATURES_OK
    drv.write_common(C.DRIVER_FEATURE, 4, 0)  # too late: features are fixed
    assert drv.read_common(C.DRIVER_FEATURE, 4) == 1


@pytest.mark.parametrize("features", [0, (1 << spec.Feature.VERSION_1) | (1 << spec.Feature.RING_PACKED),
                                      (1 << spec.Feature.VERSION_1) | (1 << 63)])
def test_features_ok_is_refused_without_version_1_or_with_features_not_offered(rng, features):
    _pdev, drv = rng
    drv.reset()
    drv.set_status(S.ACKNOWLEDGE | S.DRIVER)
    drv.write_driver_features(features)
    drv.set_status(S.FEATURES_OK)
    assert not drv.status & S.FEATURES_OK
    drv.set_status(S.DRIVER_OK)  # not taken without FEATURES_OK
    assert not drv.status & S.DRIVER_OK


def test_init_and_a_request(rng):
    pdev, drv = rng
    negotiated = drv.init()
    assert drv.status == S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK
    assert negotiated == spec.TRANSPORT_FEATURES
    done = drv.queues[0].request(in_lens=[64, 16])
    assert done.written == 80 and len(set(done.data)) > 8
    assert pdev.irq_count(1) == 1  # queue 0 on vector 1


def test_reset_reads_back_zero_and_forgets_the_queues(rng):
    pdev, drv = rng
    drv.init()
    drv.queues[0].request(in_lens=[8])
    drv.write_common(C.DEVICE_STATUS, 1, 0)
    assert drv.status == 0
    drv.write_common(C.QUEUE_SELECT, 2, 0)
    assert drv.read_common(C.QUEUE_ENABLE, 2) == 0
    assert drv.read_common(C.QUEUE_SIZE, 2) == 256
    assert drv.read_common(C.QUEUE_MSIX_VECTOR, 2) == spec.NO_VECTOR
    assert drv.read_common(C.CONFIG_MSIX_VECTOR, 2) == spec.NO_VECTOR
    drv.init()  # and it comes up again
    assert drv.queues[0].request(in_lens=[8]).written == 8


def test_flr_resets_the_virtio_device(rng):
    pdev, drv = rng
    drv.init()
    pdev.flr()
    pdev.enable_device()
    pdev.set_master()
    assert drv.status == 0


def test_queue_select_out_of_range_reads_zero_and_ignores_writes(rng):
    _pdev, drv = rng
    drv.reset()
    assert drv.read_common(C.NUM_QUEUES, 2) == 1
    drv.write_common(C.QUEUE_SELECT, 2, 5)
    assert drv.read_common(C.QUEUE_SIZE, 2) == 0
    drv.write_common(C.QUEUE_SIZE, 2, 16)
    drv.write_common(C.QUEUE_ENABLE, 2, 1)
    drv.write_common(C.QUEUE_DESC, 4, 0x1000)
    assert drv.read_common(C.QUEUE_SIZE, 2) == 0 and drv.read_common(C.QUEUE_ENABLE, 2) == 0
    assert drv.read_common(C.QUEUE_DESC, 4) == 0
    assert drv.status == 0  # nothing went wrong


def test_msix_vectors_beyond_the_table_read_back_no_vector(rng):
    _pdev, drv = rng
    drv.reset()
    drv.write_common(C.CONFIG_MSIX_VECTOR, 2, 2)  # the table has vectors 0 and 1
    assert drv.read_common(C.CONFIG_MSIX_VECTOR, 2) == spec.NO_VECTOR
    drv.write_common(C.QUEUE_SELECT, 2, 0)
    drv.write_common(C.QUEUE_MSIX_VECTOR, 2, 1)
    assert drv.read_common(C.QUEUE_MSIX_VECTOR, 2) == 1
    drv.write_common(C.QUEUE_MSIX_VECTOR, 2, 0x7FFF)
    assert drv.read_common(C.QUEUE_MSIX_VECTOR, 2) == spec.NO_VECTOR


def test_a_queue_without_a_vector_interrupts_nobody(rng):
    pdev, drv = rng
    drv.init()
    drv.write_common(C.QUEUE_SELECT, 2, 0)
    drv.write_common(C.QUEUE_MSIX_VECTOR, 2, spec.NO_VECTOR)
    q = drv.queues[0]
    q.submit(in_lens=[8])
    assert len(q.wait(1, timeout=2)) == 1  # polled
    assert pdev.irq_count(1) == 0


def test_enabling_a_queue_with_rings_outside_guest_memory_needs_reset(rng):
    _pdev, drv = rng
    drv.init(driver_ok=False)
    drv.reset()
    drv.set_status(S.ACKNOWLEDGE | S.DRIVER)
    drv.write_driver_features(1 << spec.Feature.VERSION_1)
    drv.set_status(S.FEATURES_OK)
    drv.write_common(C.QUEUE_SELECT, 2, 0)
    drv.write_common(C.QUEUE_DESC + 4, 4, 0x10)  # 64 GiB: no RAM there
    drv.write_common(C.QUEUE_ENABLE, 2, 1)
    assert drv.read_common(C.QUEUE_ENABLE, 2) == 0
    assert drv.status & S.DEVICE_NEEDS_RESET
    drv.reset()
    assert drv.status == 0


def test_a_queue_size_that_is_not_a_power_of_two_needs_reset(rng):
    _pdev, drv = rng
    drv.reset()
    drv.set_status(S.ACKNOWLEDGE | S.DRIVER)
    drv.write_driver_features(1 << spec.Feature.VERSION_1)
    drv.set_status(S.FEATURES_OK)
    drv.write_common(C.QUEUE_SIZE, 2, 100)
    drv.write_common(C.QUEUE_ENABLE, 2, 1)
    assert drv.status & S.DEVICE_NEEDS_RESET


def test_buffers_made_available_before_driver_ok_are_served_at_driver_ok(rng):
    pdev, drv = rng
    drv.init(driver_ok=False)
    q = drv.queues[0]
    q.submit(in_lens=[32])
    assert q.used_idx() == 0  # the device must not consume buffers before DRIVER_OK
    drv.set_status(S.DRIVER_OK)
    [done] = q.wait(1)
    assert done.written == 32


def test_config_change_bumps_the_generation_and_interrupts_vector_0(rng):
    pdev, drv = rng
    drv.init()
    gen = drv.read_common(C.CONFIG_GENERATION, 1)
    pdev.device.config_changed()
    assert drv.read_common(C.CONFIG_GENERATION, 1) == (gen + 1) & 0xFF
    assert pdev.wait_irq(0, 2)


def test_intx_goes_through_the_isr(machine):
    dev = VirtioRng()
    pdev = plugged(machine, dev, vectors=1)
    pdev.free_irq_vectors()
    assert pdev.alloc_irq_vectors(1, 1, PCI_IRQ_INTX) == 1
    drv = VirtioDriver(machine, pdev)
    drv.init()
    q = drv.queues[0]
    q.submit(in_lens=[16])
    assert pdev.recorder.wait_intx(True, 2)
    assert drv.read_isr() == spec.ISR_QUEUE
    assert not pdev.recorder.intx_level  # reading the ISR deasserted the line
    assert drv.read_isr() == 0
    assert q.poll()[0].written == 16
    dev.config_changed()
    assert pdev.recorder.wait_intx(True, 2)
    assert drv.read_isr() == spec.ISR_CONFIG
    dev.close()


def test_the_pci_cfg_window_reaches_the_bar(rng):
    pdev, drv = rng
    pos = drv.caps[spec.CfgType.PCI].pos
    pdev.config_write8(pos + 4, VIRTIO_BAR)
    pdev.config_write32(pos + 8, C.NUM_QUEUES)
    pdev.config_write32(pos + 12, 2)
    assert pdev.config_read32(pos + 16) & 0xFFFF == 1  # num_queues through configuration space
    pdev.config_write32(pos + 8, C.DEVICE_STATUS)
    pdev.config_write32(pos + 12, 1)
    pdev.config_write32(pos + 16, S.ACKNOWLEDGE)
    assert drv.status == S.ACKNOWLEDGE
    pdev.config_write32(pos + 8, 0x3FFF)  # misaligned for 2 bytes, or past the BAR: nothing happens
    pdev.config_write32(pos + 12, 2)
    pdev.config_read32(pos + 16)
    pdev.config_write32(pos + 8, 0x10_0000)
    pdev.config_write32(pos + 12, 4)
    pdev.config_read32(pos + 16)
    pdev.config_write8(pos + 4, 3)  # a BAR the device does not have
    pdev.config_read32(pos + 16)
    assert pdev.device.failed is None


def test_notify_of_a_queue_that_does_not_exist_is_ignored(rng):
    pdev, drv = rng
    drv.init()
    pdev.iowrite16(VIRTIO_BAR, NOTIFY_OFFSET + 4 * 9, 9)
    pdev.iowrite32(VIRTIO_BAR, NOTIFY_OFFSET + 0xFFC, 0)
    assert pdev.ioread32(VIRTIO_BAR, NOTIFY_OFFSET) == 0
    assert drv.status & S.DEVICE_NEEDS_RESET == 0


def test_64bit_address_fields_take_one_64bit_access_or_two_halves(rng):
    pdev, drv = rng
    drv.reset()
    pdev.iowrite64(VIRTIO_BAR, C.QUEUE_DRIVER, 0x1234_5678_9ABC_DEF0)
    assert pdev.ioread64(VIRTIO_BAR, C.QUEUE_DRIVER) == 0x1234_5678_9ABC_DEF0
    drv.write_common(C.QUEUE_DEVICE + 4, 4, 0xAA)
    drv.write_common(C.QUEUE_DEVICE, 4, 0xBB)
    assert pdev.ioread64(VIRTIO_BAR, C.QUEUE_DEVICE) == 0xAA_0000_00BB


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(["bar-read", "bar-write", "cfg-read", "cfg-write"]),
                              st.integers(0, 0x3FFF), st.sampled_from([1, 2, 4, 8]),
                              st.integers(0, 2**64 - 1)), max_size=60))
def test_hostile_register_accesses_never_raise_or_fail_the_device(ops):
    """Random accesses to the virtio BAR and to the capabilities' configuration space (the
    PCI cfg window included): no exception, no failed device, and after a function reset
    the device works."""
    with Machine(ram_size=8 << 20) as machine:
        dev = VirtioRng()
        pdev = plugged(machine, dev)
        for op, offset, size, value in ops:
            if op.startswith("bar"):
                offset = min(offset, 0x4000 - size)
                if op == "bar-write":
                    dev.bar_write(VIRTIO_BAR, offset, size, value & ((1 << 8 * size) - 1))
                else:
                    dev.bar_read(VIRTIO_BAR, offset, size)
            else:
                size = min(size, 4)
                offset = 0x40 + offset % (0x100 - 0x40 - size)  # the capabilities, not the header
                if op == "cfg-write":
                    dev.config_write(offset, size, value & ((1 << 8 * size) - 1))
                else:
                    dev.config_read(offset, size)
        assert dev.failed is None
        pdev.set_power_state(0)
        pdev.flr()  # a function reset brings it back whatever happened
        probe(pdev, 2)
        drv = VirtioDriver(machine, pdev)
        drv.init()
        assert drv.queues[0].request(in_lens=[4]).written == 4
        dev.close()


def test_the_driver_refuses_a_device_that_is_not_virtio(machine):
    pdev = plugged(machine, "edu")
    with pytest.raises(DriverError, match="not a modern virtio-pci device"):
        VirtioDriver(machine, pdev)
    pdev.device.close()


def _private_memory(machine, dev):
    """Give the device its own mapping of the machine's RAM, as a vfio-user server has."""
    from pcidev.dma import GuestMemory

    gm = GuestMemory()
    gm.map(0, machine.ram_size, machine.ram_fd, name="ram")
    dev.memory = gm
    return gm


def test_a_notification_while_guest_memory_is_remapped_waits_for_the_next_map(machine):
    """QEMU's vfio-user client unmaps RAM and maps it back when the BIOS area changes;
    firmware may notify in between. That is no malformed ring: the device looks again when
    it resumes after the map."""
    dev = VirtioRng()
    pdev = plugged(machine, dev)
    gm = _private_memory(machine, dev)
    drv = VirtioDriver(machine, pdev)
    drv.init()
    q = drv.queues[0]
    dev.quiesce()
    gm.unmap(0)  # as DeviceEndpoint.dma_unmap does: quiesce, unmap, resume
    dev.resume()
    q.submit(in_lens=[32])
    assert drv.status & S.DEVICE_NEEDS_RESET == 0 and q.poll() == []
    dev.quiesce()
    gm.map(0, machine.ram_size, machine.ram_fd, name="ram")
    dev.resume()
    [done] = q.wait(1, timeout=2)
    assert done.written == 32
    dev.close()
    gm.close()


def test_requests_waiting_for_the_rate_limit_do_not_pin_guest_memory(machine):
    dev = VirtioRng("max_bytes=16,period=30")
    pdev = plugged(machine, dev)
    gm = _private_memory(machine, dev)
    drv = VirtioDriver(machine, pdev)
    drv.init()
    q = drv.queues[0]
    old = q.avail_idx
    q.add(in_lens=[16])
    q.add(in_lens=[16])
    q.kick(old_idx=old)
    assert dev.pending == 1
    dev.quiesce()
    gm.unmap(0)  # refused if a view of the waiting request were alive
    gm.map(0, machine.ram_size, machine.ram_fd, name="ram")
    dev.resume()
    dev.close()
    gm.close()


@settings(max_examples=150, deadline=None)
@given(desc_table=st.binary(min_size=16 * 8, max_size=16 * 8), avail=st.binary(min_size=4 + 2 * 8 + 2,
                                                                              max_size=4 + 2 * 8 + 2),
       indirect=st.booleans())
def test_a_device_fed_garbage_rings_serves_or_needs_reset_and_recovers(desc_table, avail, indirect):
    """The whole path (notification, pop, fill, push, flush, interrupt) on random ring
    contents: no exception, no failed device, nothing left pinned, and a reset recovers."""
    with Machine(ram_size=8 << 20) as machine:
        dev = VirtioRng()
        pdev = plugged(machine, dev)
        gm = _private_memory(machine, dev)
        drv = VirtioDriver(machine, pdev)
        drv.init(queue_sizes=[8])
        q = drv.queues[0]
        machine.write(q.desc, desc_table)
        machine.write(q.avail, avail)
        drv.notify(q)
        assert dev.failed is None
        status = drv.status
        assert status & S.DRIVER_OK
        dev.quiesce()
        gm.unmap(0)  # no view of guest memory is alive
        gm.map(0, machine.ram_size, machine.ram_fd, name="ram")
        dev.resume()
        drv.init()
        assert drv.queues[0].request(in_lens=[8], indirect=indirect).written == 8
        dev.close()
        gm.close()


def test_a_queue_enabled_while_bus_mastering_is_off_is_accepted(rng):
    """Regression (virtio-guest fuzz finding): enabling a well-configured queue with Bus
    Master Enable clear set DEVICE_NEEDS_RESET, because the rings were checked through the
    DMA guard instead of against the guest's memory map."""
    pdev, drv = rng
    pdev.clear_master()
    drv.init()
    assert drv.status == spec.Status.ACKNOWLEDGE | spec.Status.DRIVER | spec.Status.FEATURES_OK | \
        spec.Status.DRIVER_OK
    pdev.set_master()
    assert drv.queues[0].request(in_lens=[8]).written == 8


def test_a_dma_refusal_while_bus_mastering_is_off_waits(rng):
    pdev, drv = rng
    drv.init()
    dev = pdev.device
    pdev.clear_master()
    assert dev.queue_error(dev.queues[0], VirtqueueError("bus mastering is disabled", queue=0))
    assert not drv.status & spec.Status.DEVICE_NEEDS_RESET
