"""Migration of virtio-rng: the transport's layer section (status, features, queues,
in-flight heads, vectors), requests in flight carried and served on the destination, in
process (pcidev.testing.roundtrip) and between processes over the device link, and
refusals naming what differs."""

from __future__ import annotations

import time

import attrs
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pcidev.errors import VMStateError
from pcidev.host import Machine
from pcidev.migration import load_device, load_device_stream, save_device, save_device_stream
from pcidev.testing import plugged, probe, roundtrip
from pcidev.transport.link.process import DeviceProcess
from pcidev.vmstate import dump_stream_json
from pcidev.vmstate.errors import ConfigMismatchError, StateError
from pcidev_virtio import spec
from pcidev_virtio.device import VirtioPciDevice
from pcidev_virtio.rng import VirtioRng
from pcidev_virtio.spec import VirtioId
from pcidev_virtio.testing.driver import VirtioDriver

#: one 64-byte request per 0.2 s: requests wait in flight
SLOW = {"max_bytes": 64, "period": 0.2}


@pytest.fixture
def opened(machine):
    """Devices to close before the machine's memory goes (their requests pin it)."""
    devices = []
    yield devices
    for dev in devices:
        dev.close()


def _busy_rng(machine, props=SLOW, nreq=4, opened=None):
    dev = VirtioRng(props)
    if opened is not None:
        opened.append(dev)
    pdev = plugged(machine, dev)
    drv = VirtioDriver(machine, pdev)
    drv.init()
    q = drv.queues[0]
    old = q.avail_idx
    for _ in range(nreq):
        q.add(in_lens=[64])
    q.kick(old_idx=old)
    return pdev, drv, q


def test_in_process_roundtrip_with_requests_in_flight(machine, opened):
    pdev, drv, q = _busy_rng(machine, opened=opened)
    src = pdev.device
    state = src.get_layer_state()
    assert state.status == spec.Status.ACKNOWLEDGE | spec.Status.DRIVER | spec.Status.FEATURES_OK | \
        spec.Status.DRIVER_OK
    assert state.driver_features == spec.TRANSPORT_FEATURES
    assert len(state.queues[0].inflight) >= 2 and state.queues[0].msix_vector == 1
    assert state.config_msix_vector == 0
    dest = roundtrip(pdev)  # compares config space, the layer's and the device's state
    opened.append(dest)
    assert dest is not src and pdev.device is dest
    done = q.wait(4, timeout=5)
    assert sorted(c.written for c in done) == [64] * 4
    assert all(len(set(c.data)) > 4 for c in done)
    assert dest.served == 4 * 64 and dest.get_layer_state().queues[0].inflight == ()
    assert q.request(in_lens=[16], timeout=5).written == 16
    dest.close()


def test_the_stream_has_the_transport_layer_section(machine, opened):
    pdev, _drv, _q = _busy_rng(machine, opened=opened)
    dev = pdev.device
    dev.quiesce()
    stream, _fds = save_device_stream(dev)
    sections = dump_stream_json(stream)["sections"]
    assert [s["name"] for s in sections] == ["pcidev/function", "virtio-pci", "virtio-rng"]
    fp = dump_stream_json(stream)["fingerprint"]
    assert fp["virtio.device_id"] == 4 and fp["virtio.queue_sizes"] == [256]
    dev.resume()
    dev.close()


class TwoQueueRng(VirtioRng):
    QUEUE_SIZES = (256, 256)


class BlockLike(VirtioRng):
    VIRTIO_DEVICE_ID = VirtioId.BLOCK


@pytest.mark.parametrize("make, item", [(lambda: TwoQueueRng(SLOW), "virtio.queue_sizes"),
                                        (lambda: BlockLike(SLOW), "virtio.device_id"),
                                        (lambda: VirtioRng(), "virtio-rng.max_bytes")])
def test_a_destination_configured_differently_refuses_naming_the_item(machine, opened, make, item):
    pdev, _drv, _q = _busy_rng(machine, opened=opened)
    src = pdev.device
    src.quiesce()
    stream, fds = save_device_stream(src)
    dest = make()
    with pytest.raises(ConfigMismatchError, match=item):
        load_device_stream(dest, stream, fds)
    dest.close()
    src.resume()
    src.close()


def test_an_inconsistent_layer_state_is_refused_before_anything_is_applied(machine, opened):
    pdev, _drv, _q = _busy_rng(machine, opened=opened)
    src = pdev.device
    good = src.get_layer_state()
    dest = VirtioRng(SLOW)
    dest.realize()
    bad_queue = attrs.evolve(good.queues[0], inflight=good.queues[0].inflight[:1])
    for state, path in ((attrs.evolve(good, queues=(bad_queue,)), "queues[0].inflight"),
                        (attrs.evolve(good, config_msix_vector=7), "config_msix_vector"),
                        (attrs.evolve(good, driver_features=1 << 34), "driver_features"),
                        (attrs.evolve(good, queues=good.queues * 2), "queues")):
        with pytest.raises(StateError) as info:
            dest.check_layer_state(state)
        assert info.value.path == path
    assert dest.status == 0
    dest.close()
    src.close()


def test_a_chain_that_became_malformed_after_migration_needs_reset(machine, opened):
    pdev, _drv, q = _busy_rng(machine, opened=opened)
    src = pdev.device
    heads = src.queues[0].inflight()
    assert heads
    src.quiesce()
    stream, fds = save_device_stream(src)
    for head in heads:  # the descriptors now point outside guest memory
        machine.memory.write_struct(spec.DESC, q.desc + 16 * head, 1 << 40, 64, spec.VRING_DESC_F_WRITE, 0)
    dest = VirtioRng(SLOW)
    opened.append(dest)
    res = load_device_stream(dest, stream, fds)
    dest.attach(machine.memory, src.irq.sink)
    res.close()
    src.close()
    dest.resume()
    assert dest.status & spec.Status.DEVICE_NEEDS_RESET
    dest.close()


def test_virtio_rng_migrates_between_processes_with_requests_in_flight(tmp_path):
    props = {"max_bytes": 256, "period": 0.2}  # a batch of 16 x 128 bytes takes 1.4 s or more
    src = DeviceProcess("virtio-rng", f"unix:{tmp_path}/a.sock", options=props)
    d1 = DeviceProcess("virtio-rng", f"unix:{tmp_path}/b.sock", options=props, incoming=f"unix:{tmp_path}/b-in.sock")
    d2 = DeviceProcess("virtio-rng", f"unix:{tmp_path}/c.sock", options=props, incoming="tcp:127.0.0.1:0")
    procs = [src, d1, d2]
    try:
        with Machine(ram_size=32 << 20) as machine:
            src.wait_event("ready")
            pdev = machine.plug_remote(src.link, timeout=10)
            probe(pdev, 2)
            drv = VirtioDriver(machine, pdev)
            drv.init()
            q = drv.queues[0]
            d2.incoming = d2.wait_event("listening")["incoming"]
            d1.wait_event("listening")
            got = []
            for dest in (d1, d2):
                old = q.avail_idx
                for _ in range(16):  # 16 x 128 bytes: 8 periods' worth
                    q.add(in_lens=[128])
                q.kick(old_idx=old)
                time.sleep(0.05)
                report = pdev.device.migrate(dest.incoming, timeout=10)
                assert report["state_size"] < 8192
                got += q.wait(16, timeout=20)
            assert len(got) == 32 and all(c.written == 128 for c in got)
            assert len({c.data for c in got}) == 32  # random, never repeated
            assert pdev.device.info["pid"] == d2.pid
            assert q.request(in_lens=[32], timeout=5).written == 32
        # requests were in flight at each stop: fewer bytes served than asked for so far
        served = [d.wait_event("incoming")["sections"][2]["fields"]["served"] for d in (d1, d2)]
        assert 0 < served[0] < 16 * 128 and 16 * 128 <= served[1] < 32 * 128
        assert src.proc.wait(10) == 0 and src.wait_event("exit")["reason"] == "migrated"
    finally:
        for proc in procs:
            proc.stop()


def test_the_transport_alone_cannot_be_registered_without_a_device_id():
    assert VirtioPciDevice.DEVICE_ID == 0  # no virtio id: not a device type of its own
    assert VirtioRng.DEVICE_ID == 0x1044


_u16 = st.integers(0, 0xFFFF)
_u64 = st.one_of(st.integers(0, 1 << 26), st.integers(0, (1 << 64) - 1))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_garbage_layer_states_are_refused_or_served_never_crash(machine, opened, data):
    """A hostile or corrupt stream carries any values in the transport's section: the
    load refuses it (a VMStateError, the destination untouched) or applies it, and the
    device then serves or needs a reset: no other exception, no hang."""
    pdev, _drv, _q = _busy_rng(machine, opened=opened)
    src = pdev.device
    src.quiesce()
    snap = save_device(src)
    good = src.get_layer_state()
    queue = good.queues[0]
    def keep_or(value, garbage):  # each field: as saved, or garbage (both paths get exercised)
        return data.draw(st.one_of(st.just(value), garbage))

    bad_queue = attrs.evolve(
        queue, size=keep_or(queue.size, st.sampled_from([0, 1, 3, 1 << 15, 0xFFFF])),
        enabled=keep_or(queue.enabled, st.booleans()), msix_vector=keep_or(queue.msix_vector, _u16),
        desc=keep_or(queue.desc, _u64), driver=keep_or(queue.driver, _u64), device=keep_or(queue.device, _u64),
        last_avail_idx=keep_or(queue.last_avail_idx, _u16), used_idx=keep_or(queue.used_idx, _u16),
        inflight=keep_or(queue.inflight, st.lists(_u16, max_size=8).map(tuple)))
    bad = attrs.evolve(good, status=keep_or(good.status, st.integers(0, 0xFF)),
                       queue_select=keep_or(good.queue_select, _u16),
                       config_msix_vector=keep_or(good.config_msix_vector, _u16), queues=(bad_queue,))
    sections = tuple(s._replace(state=bad) if s.name == "virtio-pci" else s for s in snap.sections)
    dest = VirtioRng(SLOW)
    opened.append(dest)
    try:
        res = load_device(dest, attrs.evolve(snap, sections=sections))
    except VMStateError:
        event("refused")
        assert dest.status == 0 and dest.failed is None  # refused before anything was applied
        return
    event("applied")
    dest.attach(src.memory, src.irq.sink)  # the host's memory and interrupts, as roundtrip() does
    res.close()
    dest.resume()
    assert dest.failed is None
    if dest.running:
        dest.quiesce()  # a worker serving garbage chains stops cleanly
