"""Live migration between real processes while the software host keeps driving the
device: edu (DMA engine + MSI-X) moved mid-operation, every block verified with
CRC-32C; the source resumes whenever the destination fails."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import crc32c
import pytest

from pcidev.devices.edu import DESC, STATUS_DONE, EduDevice
from pcidev.errors import MigrationBlockedError, MigrationError, PcidevError
from pcidev.host import Machine
from pcidev.migration import migrate_in
from pcidev.transport.address import listen
from pcidev.transport.link.process import DeviceProcess, property_string, spawn
from pcidev.transport.link.process import main as process_main
from pcidev.transport.link.protocol import (
    FLAG_ERROR,
    HEADER,
    MAGIC,
    STATUS,
    decode_body,
    encode_body,
    error_from_reply,
    read_message,
    send_message,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
#: slow enough that a batch of 16 x 64 KiB descriptors takes ~50 ms
EDU = {"engine": True, "chunk": 8192, "delay": 0.0004}
BLOCK = 65536


class Workload(threading.Thread):
    """The host keeps posting batches of copy descriptors and checks each block."""

    def __init__(self, machine, pdev, batches, batch=16):
        super().__init__(daemon=True)
        self.machine, self.pdev, self.batches, self.batch = machine, pdev, batches, batch
        m = machine
        self.ring = m.alloc(64 * 32)
        pdev.iowrite64(0, 0x100, self.ring)
        pdev.iowrite32(0, 0x108, 64)
        pdev.iowrite32(0, 0x114, 1)
        total = batches * batch * BLOCK
        self.src, self.dst = m.alloc(total), m.alloc(total)
        self.payload = os.urandom(total)
        m.write(self.src, self.payload)
        self.posted = threading.Semaphore(0)
        self.verified = 0
        self.mismatches = 0
        self.error = None

    def run(self):
        try:
            tail = 0
            for b in range(self.batches):
                slots = []
                for j in range(self.batch):
                    i = b * self.batch + j
                    slot = (tail + j) % 64
                    self.machine.memory.write_struct(DESC, self.ring + 32 * slot, self.src + i * BLOCK,
                                                     self.dst + i * BLOCK, BLOCK, int(j == self.batch - 1), 0, 0)
                    slots.append((i, slot))
                before = self.pdev.irq_count(0)
                tail = (tail + self.batch) % 64
                self.pdev.iowrite32(0, 0x10C, tail)
                self.posted.release()
                if not self.pdev.recorder.wait(0, above=before, timeout=20):
                    raise TimeoutError(f"batch {b}: no interrupt")
                for i, slot in slots:
                    want = crc32c.crc32c(self.payload[i * BLOCK:(i + 1) * BLOCK])
                    st, crc = struct.unpack("<II", self.machine.read(self.ring + 32 * slot + 0x18, 8))
                    got = crc32c.crc32c(self.machine.read(self.dst + i * BLOCK, BLOCK))
                    self.mismatches += (st, crc, got) != (STATUS_DONE, want, want)
                    self.verified += 1
        except BaseException as exc:
            self.error = exc


def _plugged(machine, proc):
    proc.wait_event("ready")
    p = machine.plug_remote(proc.link, timeout=10)
    p.enable_device()
    p.set_master()
    assert p.alloc_irq_vectors(1, 2) == 2
    return p


def test_edu_migrates_mid_operation_between_processes(tmp_path):
    src = DeviceProcess("edu", f"unix:{tmp_path}/a.sock", options=EDU)
    d1 = DeviceProcess("edu", f"unix:{tmp_path}/b.sock", options=EDU, incoming=f"unix:{tmp_path}/b-in.sock")
    d2 = DeviceProcess("edu", f"unix:{tmp_path}/c.sock", options=EDU, incoming="tcp:127.0.0.1:0")
    procs = [src, d1, d2]
    try:
        with Machine(ram_size=64 << 20) as machine:
            p = _plugged(machine, src)
            work = Workload(machine, p, batches=8)
            reports = []
            d2.incoming = d2.wait_event("listening")["incoming"]
            d1.wait_event("listening")
            work.start()
            for when, dest in ((2, d1), (5, d2)):
                for _ in range(when):
                    assert work.posted.acquire(timeout=20)
                reports.append(p.device.migrate(dest.incoming, timeout=10))  # right after a doorbell
            work.join(60)
            assert work.error is None, work.error
            assert (work.verified, work.mismatches) == (8 * 16, 0)
            assert p.device.info["pid"] == d2.pid
        unix, tcp = reports
        assert unix["fds"] == 4 and tcp["fds"] == 0 and tcp["deferred"]  # RAM + 2 MSI-X vectors + INTx
        for report in reports:
            assert report["state_size"] < 8192
            assert 0 < report["downtime"] < 2.0
            assert report["host_pause"] >= report["downtime"] - 0.05
        for dest in (d1, d2):
            fields = dest.wait_event("incoming")["sections"][1]["fields"]
            assert fields["ring_head"] != fields["ring_tail"]  # descriptors were pending at the stop
        assert src.proc.wait(10) == 0 and src.wait_event("exit")["reason"] == "migrated"
        assert d1.proc.wait(10) == 0
    finally:
        for proc in procs:
            proc.stop()


def _fake(mode, address):
    proc = subprocess.Popen([sys.executable, str(HERE / "fake_destination.py"), mode, address],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "listening"
    return proc


def test_source_resumes_when_the_destination_fails(tmp_path):
    src = DeviceProcess("edu", f"unix:{tmp_path}/a.sock", options=EDU)
    victim = DeviceProcess("edu", f"unix:{tmp_path}/v.sock", options=EDU, incoming=f"unix:{tmp_path}/v-in.sock")
    try:
        with Machine(ram_size=64 << 20) as machine:
            p = _plugged(machine, src)
            work = Workload(machine, p, batches=6)
            victim.wait_event("listening")
            work.start()
            assert work.posted.acquire(timeout=20)
            # a real destination process, killed before the migration
            victim.proc.kill()
            victim.proc.wait(5)
            with pytest.raises(MigrationError, match="cannot reach the destination"):
                p.device.migrate(victim.incoming, timeout=2)
            messages = {}
            for mode in ("kill", "garbage", "close", "refuse"):
                assert work.posted.acquire(timeout=20)
                fake = _fake(mode, f"unix:{tmp_path}/{mode}.sock")
                with pytest.raises(MigrationError) as info:
                    p.device.migrate(f"unix:{tmp_path}/{mode}.sock", timeout=3)
                messages[mode] = str(info.value)
                if mode == "refuse":  # (refused in the pre-flight: before anything stopped)
                    assert isinstance(info.value, MigrationBlockedError), messages[mode]
                else:
                    assert "runs again on the source" in messages[mode]
                fake.wait(10)
                assert p.device.info["pid"] == src.pid  # the host still drives the source
            assert "peer closed" in messages["kill"] and "peer closed" in messages["close"]
            assert "bad magic" in messages["garbage"]
            assert "the destination refuses: configuration: edu.max_transfer" in messages["refuse"]
            work.join(60)
            assert work.error is None, work.error
            assert (work.verified, work.mismatches) == (6 * 16, 0)
            assert p.device.status()["state"] == "running"
        assert src.proc.poll() is None  # the source never gave up its device
    finally:
        src.stop()
        victim.stop()


def test_a_wrong_device_type_refusal_reaches_the_host_every_time(tmp_path):
    """A destination of another device type refuses in the pre-flight, before anything
    stops: each of ten migrations reports the refusal reason to the host (never a broken
    pipe), and the source keeps its device and its workload (refused at the OFFER, by a
    destination without the pre-flight: test_channel.py)."""

    class Other(EduDevice):
        TYPE_NAME = "other"

    src = DeviceProcess("edu", f"unix:{tmp_path}/a.sock", options=EDU)
    listener = listen(f"unix:{tmp_path}/other-in.sock")
    refused: list[BaseException] = []

    def destination(n):
        for _ in range(n):
            conn, _ = listener.sock.accept()
            try:
                migrate_in(Other(), conn)
            except PcidevError as exc:
                refused.append(exc)
            finally:
                conn.close()  # the unread stream is left behind

    try:
        with Machine(ram_size=64 << 20) as machine:
            p = _plugged(machine, src)
            work = Workload(machine, p, batches=12)
            dest = threading.Thread(target=destination, args=(10,), daemon=True)
            dest.start()
            work.start()
            for _ in range(10):
                assert work.posted.acquire(timeout=20)
                with pytest.raises(MigrationError) as info:
                    p.device.migrate(str(listener.address), timeout=5)
                text = str(info.value)
                assert isinstance(info.value, MigrationBlockedError), text
                assert "the destination refuses: the source is a device of type 'edu', this one is 'other'" in text
                assert "Broken pipe" not in text
            dest.join(10)
            work.join(60)
            assert work.error is None, work.error
            assert (work.verified, work.mismatches) == (12 * 16, 0)
            assert p.device.status()["state"] == "running" and p.device.info["pid"] == src.pid
        assert len(refused) == 10 and all(isinstance(e, MigrationBlockedError) for e in refused)
        assert src.proc.poll() is None
    finally:
        listener.sock.close()
        src.stop()


def test_migrate_edu_example_runs(capsys):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import migrate_edu
    finally:
        sys.path.pop(0)
    assert migrate_edu.main(["--blocks", "96", "--migrations", "1"]) == 0
    out = capsys.readouterr().out
    assert "migration 1: process" in out and "0 CRC-32C mismatches" in out


# -- the property string and the plugin selection of a device process -----------------------

TOY_PLUGIN = '''
from pcidev import hookimpl
from pcidev.device import PciDevice


class ToyDevice(PciDevice):
    TYPE_NAME = "toy-child"
    VENDOR_ID, DEVICE_ID, CLASS_CODE = 0x1234, 0x11EC, 0xFF0000


@hookimpl
def pcidev_register_devices(registry):
    registry.add_device(ToyDevice)
'''


@pytest.mark.parametrize(("props", "settings", "expected"), [
    ("engine=on,", ["chunk=8k"], "engine=on,chunk=8k"),
    ("engine=on,,", [], "engine=on,,"),  # the value "on," (a literal comma)
    ("engine=on,,,", ["chunk=8k"], "engine=on,,,chunk=8k"),
    (None, ["label=a,b", "x=1"], "label=a,,b,x=1"),
    ("a=x,,y,b=2", ["c= 3"], "a=x,,y,b=2,c= 3"),
    ("", [], ""),
])
def test_property_string_keeps_props_and_settings_apart(props, settings, expected):
    assert property_string(props, settings) == expected


def test_a_trailing_comma_of_props_does_not_swallow_a_setting():
    from pcidev.devices.edu import EduDevice
    from pcidev.properties import structure_config

    cfg = structure_config(EduDevice.CONFIG_CLASS, property_string("engine=on,", ["chunk=8k"]))
    assert cfg.engine is True and cfg.chunk == 8192


@pytest.mark.parametrize(("props", "settings"), [("=5", []), (None, ["=5"]), (None, ["chunk"])])
def test_property_string_refuses_an_empty_key(props, settings):
    with pytest.raises(PcidevError):
        property_string(props, settings)


def test_the_process_honours_p_options(tmp_path, capsys):
    link = f"unix:{tmp_path}/x.sock"
    assert process_main(["--device", "edu", "--link", link, "-p", "no:builtin"]) == 1
    assert "unknown device type 'edu'" in capsys.readouterr().err
    assert process_main(["--device", "edu", "--link", link, "-p", "no:"]) == 2
    assert "-p no: needs a plugin name" in capsys.readouterr().err
    assert not (tmp_path / "x.sock").exists()


def test_a_blocked_plugin_stays_blocked_in_the_device_process(tmp_path):
    proc = DeviceProcess("edu", f"unix:{tmp_path}/edu.sock", options=EDU, plugin_specs=["no:builtin"])
    try:
        with pytest.raises(PcidevError, match="unknown device type 'edu'"):
            proc.wait_event("ready", timeout=30)
        assert proc.stop() == 1
    finally:
        proc.stop()


def test_a_p_module_plugin_is_loaded_in_the_device_process(tmp_path):
    (tmp_path / "pcidev_toy_child.py").write_text(TOY_PLUGIN)
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    proc = spawn("toy-child", f"unix:{tmp_path}/toy.sock", events=True, env=env, stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE, plugin_specs=["no:builtin", "pcidev_toy_child"])
    try:
        ready = proc.stdout.readline()
        assert '"event": "ready"' in ready, proc.stderr.read() if proc.poll() is not None else ready
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


def test_the_io_timeout_option_reaches_the_link_server(tmp_path):
    """``--io-timeout`` (``io_timeout=`` of spawn/DeviceProcess) is the server's: half a header
    is dropped with an error reply naming that deadline, and the host is served meanwhile."""
    link = f"unix:{tmp_path}/edu.sock"
    proc = DeviceProcess("edu", link, io_timeout=0.75)
    half = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        proc.wait_event("ready")
        half.connect(f"{tmp_path}/edu.sock")
        half.sendall(HEADER.pack(MAGIC, STATUS, 0, 1, 0)[:5])  # half a header, then nothing
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as host:
            host.connect(f"{tmp_path}/edu.sock")
            host.settimeout(30)
            send_message(host, STATUS, 0, 7, encode_body({}))
            _kind, flags, mid, body, _ = read_message(host, max_fds=0)
            assert (flags & FLAG_ERROR, mid) == (0, 7)
            assert decode_body(body, "reply")["state"] == "running"
        half.settimeout(30)
        _kind, flags, _mid, body, _ = read_message(half, max_fds=0)
        assert flags & FLAG_ERROR
        assert "overall deadline of 0.75 s" in str(error_from_reply(body))
    finally:
        half.close()
        proc.stop()


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "1e9", "soon"])
def test_a_bad_io_timeout_is_a_usage_error(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as info:
        process_main(["--device", "edu", "--link", f"unix:{tmp_path}/x.sock", "--io-timeout", value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("python -m pcidev.transport.link.process: error: argument --io-timeout: ")
    assert "Traceback" not in err
    assert not (tmp_path / "x.sock").exists()
