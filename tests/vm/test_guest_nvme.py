"""Linux's nvme driver, nvme-cli and fio against pcidev's NVMe controller, served over
vfio-user to QEMU (TCG) by ``pcidev serve --vfio-user``."""

from __future__ import annotations

import os
import re
import time

import vm_guest

NVME = "nvme,ns=mem:size=64M"


def lines(text: str) -> set[str]:
    return {ln.strip() for ln in text.splitlines()}


def fio_result(text: str) -> dict[str, float]:
    """From fio's normal output (the first job's): ``err``, ``read_iops``, ``write_iops``,
    ``ios`` (all I/Os issued, from ``issued rwts: total=``) and ``clat_max_ms`` (the largest
    completion latency of any direction)."""
    out: dict[str, float] = {}
    m = re.search(r"err=\s*(\d+)", text)
    if m:
        out["err"] = int(m.group(1))
    for kind in ("read", "write"):
        m = re.search(rf"\b{kind}: IOPS=([\d.]+)(k?)", text)
        if m:
            out[f"{kind}_iops"] = float(m.group(1)) * (1000 if m.group(2) else 1)
    m = re.search(r"issued rwts: total=([\d,]+)", text)
    if m:
        out["ios"] = sum(int(n) for n in m.group(1).split(",") if n)
    scale = {"nsec": 1e-6, "usec": 1e-3, "msec": 1.0}
    maxima = [float(v) * (1000 if k else 1) * scale[unit]
              for unit, v, k in re.findall(r"\bclat \((nsec|usec|msec)\): min=\s*[\d.]+k?, max=\s*([\d.]+)(k?)", text)]
    if maxima:
        out["clat_max_ms"] = max(maxima)
    return out


def _record(name: str, data: dict) -> None:
    vm_guest.record(name, data)


def test_driver_binds_and_nvme_cli_works(boot):
    r = boot("""
lspci -nn
test -b /dev/nvme0n1 && echo HAVE-NVME0N1
nvme id-ctrl /dev/nvme0 && echo ID-CTRL-OK
nvme id-ns /dev/nvme0n1 && echo ID-NS-OK
nvme list && echo LIST-OK
nvme smart-log /dev/nvme0 && echo SMART-OK
nvme get-feature /dev/nvme0 -f 7 && echo FEATURE-OK
grep nvme0q /proc/interrupts
dmesg | grep -i nvme
""", [NVME])
    assert r.ok, r.console[-4000:]
    got = lines(r.output)
    for marker in ("HAVE-NVME0N1", "ID-CTRL-OK", "ID-NS-OK", "LIST-OK", "SMART-OK", "FEATURE-OK"):
        assert marker in got, f"{marker} missing:\n{r.output[-4000:]}"
    assert re.search(r"^mn\s+:\s+pcidev NVMe Ctrl", r.output, re.M)
    assert re.search(r"/dev/nvme0n1\s.*pcidev NVMe Ctrl", r.output)
    assert "critical_warning" in r.output
    assert "[1b36:0010]" in r.output  # enumerated with the controller's IDs
    assert re.search(r"PCI-MSIX.*nvme0q1", r.output)  # an I/O queue interrupt fired
    assert not re.search(r"^\[.*nvme.*timeout", r.output, re.M | re.I)


def test_fio_randwrite_verify_iodepth16(boot):
    r = boot("""
fio --name=verify --filename=/dev/nvme0n1 --size=48M --rw=randwrite --bs=4k --iodepth=16 --direct=1 \
    --ioengine=io_uring --verify=crc32c --verify_fatal=1 && echo FIO-OK
dmesg | grep -i 'nvme.*timeout'; true
""", [NVME])
    assert r.ok, r.console[-4000:]
    assert "FIO-OK" in lines(r.output), r.output[-4000:]
    res = fio_result(r.output)
    assert res.get("err") == 0, r.output[-3000:]
    assert res.get("write_iops", 0) > 0 and res.get("read_iops", 0) > 0
    assert not re.search(r"^\[.*nvme.*timeout", r.output, re.M | re.I)  # no I/O timed out
    _record("pcidev randwrite verify qd16", res)


def test_two_namespaces(boot):
    r = boot("""
nvme list
test -b /dev/nvme0n1 && test -b /dev/nvme0n2 && echo TWO-NS
nvme id-ns /dev/nvme0 -n 2 | grep -E '^nsze'
nvme id-ns /dev/nvme0 -n 1 | grep -E '^nsze'
fio --name=verify2 --filename=/dev/nvme0n2 --size=24M --rw=randwrite --bs=4k --iodepth=16 --direct=1 \
    --ioengine=io_uring --verify=crc32c --verify_fatal=1 && echo FIO-OK
""", ["nvme,ns=mem:size=64M,ns=mem:size=32M"])
    assert r.ok, r.console[-4000:]
    got = lines(r.output)
    assert "TWO-NS" in got and "FIO-OK" in got, r.output[-4000:]
    # NSID 2 is 32 MiB, NSID 1 64 MiB, in 512-byte blocks (Linux may name them in either order)
    assert re.findall(r"^nsze\s+:\s+(0x[0-9a-f]+)", r.output, re.M) == ["0x10000", "0x20000"]
    assert fio_result(r.output).get("err") == 0


def test_two_controllers_two_servers(boot):
    r = boot("""
test -b /dev/nvme0n1 && test -b /dev/nvme1n1 && echo TWO-CTRL
nvme list
for d in /dev/nvme0n1 /dev/nvme1n1; do
  fio --name=v --filename=$d --size=8M --rw=randwrite --bs=4k --iodepth=8 --direct=1 --ioengine=io_uring \
      --verify=crc32c --verify_fatal=1 >/tmp/fio.out 2>&1 && echo FIO-OK-$d || cat /tmp/fio.out
done
""", ["nvme,serial=pcidevA,ns=mem:size=16M", "nvme,serial=pcidevB,ns=mem:size=16M"])
    assert r.ok, r.console[-4000:]
    got = lines(r.output)
    assert {"TWO-CTRL", "FIO-OK-/dev/nvme0n1", "FIO-OK-/dev/nvme1n1"} <= got, r.output[-4000:]
    assert "pcidevA" in r.output and "pcidevB" in r.output


RANDREAD_QD32 = """
echo FIO-START
fio --name=randread --filename=/dev/nvme0n1 --size=48M --rw=randread --bs=4k --iodepth=32 --direct=1 \
    --ioengine=io_uring --time_based --runtime=15 >/tmp/fio.out 2>&1; rc=$?
echo FIO-END
cat /tmp/fio.out
test $rc = 0 && echo FIO-OK
"""


def _randread(boot, devices=(), **kw) -> dict[str, float]:
    """Run fio 4 KiB randread QD32 for 15 s; with a pcidev device, the server's CPU per I/O."""
    r = boot(RANDREAD_QD32, devices, markers=dict.fromkeys(("FIO-START", "FIO-END")), **kw)
    assert r.ok, r.console[-4000:]
    assert "FIO-OK" in lines(r.output), r.output[-4000:]
    res = fio_result(r.output)
    assert res.get("err") == 0 and res.get("read_iops", 0) > 0 and res.get("ios", 0) > 0, r.output[-3000:]
    wall = r.mark("FIO-END").t - r.mark("FIO-START").t
    res["seconds"] = round(wall, 2)
    if devices:
        cpu = r.cpu_between("FIO-START", "FIO-END")
        res["server_cpu_s"] = round(cpu, 2)
        res["server_cpu_share"] = round(cpu / wall, 3)
        res["server_cpu_us_per_io"] = round(cpu * 1e6 / res["ios"], 1)
    return res


def test_fio_randread_iodepth32_measure(boot):
    """Measure fio 4 KiB randread QD32, 15 s, in the guest: pcidev over vfio-user with a ``mem`` and
    with a ``file`` namespace (a 48M image), and QEMU's built-in nvme, in one session. Reports
    the serving process's CPU per guest I/O (utime+stime between the guest's FIO-START and
    FIO-END lines over fio's issued I/Os), IOPS and the ratio to QEMU's nvme. Measured, never
    asserted: the machine is shared and TCG-bound."""
    vm = vm_guest.ROOT / "vm"
    img, state = vm / "measure-ns1.img", vm / "measure-nvme.state"
    with open(img, "wb") as f:  # written, so reads hit data in the page cache, not holes
        for _ in range(48):
            f.write(os.urandom(1 << 20))
    try:
        results = {
            "mem": _randread(boot, [NVME]),
            "file": _randread(boot, [f"nvme,state_file={state},ns=file:path={img},size=48M"]),
            "qemu-nvme": _randread(boot, builtin_nvme="128M"),
        }
    finally:
        for p in (img, state):
            p.unlink(missing_ok=True)
    qemu_iops = results["qemu-nvme"]["read_iops"]
    for kind in ("mem", "file"):
        results[kind]["vs_qemu_nvme"] = round(results[kind]["read_iops"] / qemu_iops, 3)
        _record(f"pcidev randread qd32 15s {kind}", results[kind])
    _record("qemu nvme randread qd32 15s", results["qemu-nvme"])
    for kind, res in results.items():
        print(f"randread 4k qd32 15s {kind}: {res}")


def test_controller_reset_function_reset_and_format(boot):
    """``nvme reset`` (CC.EN cycle), a PCI function reset through sysfs (FLR as a forwarded
    config write), then data written and read back, and Format NVM: no previous user data
    reads back after a format, with or without a secure erase."""
    r = boot("""
nvme reset /dev/nvme0 && echo RESET-OK
sleep 1
echo 1 > /sys/class/nvme/nvme0/device/reset && echo FLR-OK
sleep 2
dd if=/dev/urandom of=/tmp/x bs=4k count=16 2>/dev/null
dd if=/tmp/x of=/dev/nvme0n1 bs=4k oflag=direct 2>/dev/null
dd if=/dev/nvme0n1 of=/tmp/y bs=4k count=16 iflag=direct 2>/dev/null
cmp /tmp/x /tmp/y && echo DATA-OK
nvme format /dev/nvme0n1 -f && echo FORMAT-OK
dd if=/dev/nvme0n1 of=/tmp/w bs=4k count=16 iflag=direct 2>/dev/null
cmp /tmp/w /dev/zero 2>&1 | grep -q EOF && echo FORMATTED-ZERO
dd if=/tmp/x of=/dev/nvme0n1 bs=4k oflag=direct 2>/dev/null
nvme format /dev/nvme0n1 -f --ses=1 && echo ERASE-OK
dd if=/dev/nvme0n1 of=/tmp/z bs=4k count=16 iflag=direct 2>/dev/null
cmp /tmp/z /dev/zero 2>&1 | grep -q EOF && echo ERASED
""", [NVME])
    assert r.ok, r.console[-4000:]
    got = lines(r.output)
    expected = {"RESET-OK", "FLR-OK", "DATA-OK", "FORMAT-OK", "FORMATTED-ZERO", "ERASE-OK", "ERASED"}
    assert expected <= got, r.output[-4000:]
    assert not re.search(r"^\[.*nvme.*(timeout|failed|removing)", r.output, re.M | re.I)


def test_intx_when_the_guest_disables_msi(boot):
    """``pci=nomsi``: the nvme driver falls back to INTx; QEMU asserts the line from the
    INTx eventfd, auto-masks it and unmasks with SET_IRQS on the next BAR access."""
    r = boot("""
fio --name=verify --filename=/dev/nvme0n1 --size=8M --rw=randwrite --bs=4k --iodepth=16 --direct=1 \
    --ioengine=io_uring --verify=crc32c --verify_fatal=1 && echo FIO-OK
grep nvme0q /proc/interrupts
""", [NVME], kernel_args="pci=nomsi")
    assert r.ok, r.console[-4000:]
    assert "FIO-OK" in lines(r.output) and fio_result(r.output).get("err") == 0, r.output[-3000:]
    m = re.search(r"^\s*\d+:\s+(\d+)\s+IO-APIC.*nvme0q0", r.output, re.M)
    assert m and int(m.group(1)) > 100, r.output[-2000:]
    assert "MSI" not in m.group(0)


def test_fio_mixed_sizes_trim_and_libaio(boot):
    """Block sizes 512 B..512 KiB (PRP lists, MDTS splits) with crc32c verify at iodepth 32,
    random trims (Dataset Management), and libaio randrw with md5 verify."""
    r = boot("""
fio --name=mix --filename=/dev/nvme0n1 --size=48M --rw=randwrite --bsrange=512-512k --iodepth=32 --direct=1 \
    --ioengine=io_uring --verify=crc32c --verify_fatal=1 && echo MIX-OK
fio --name=trim --filename=/dev/nvme0n1 --size=16M --rw=randtrim --bs=64k --iodepth=8 --direct=1 \
    --ioengine=io_uring --number_ios=200 && echo TRIM-OK
fio --name=lib --filename=/dev/nvme0n1 --size=16M --rw=randrw --bs=4k --iodepth=8 --direct=1 \
    --ioengine=libaio --verify=md5 --verify_fatal=1 && echo LIBAIO-OK
""", [NVME])
    assert r.ok, r.console[-4000:]
    assert {"MIX-OK", "TRIM-OK", "LIBAIO-OK"} <= lines(r.output), r.output[-4000:]
    assert re.findall(r"err=\s*(\d+)", r.output) == ["0", "0", "0"]
    assert not re.search(r"^\[.*nvme.*timeout", r.output, re.M | re.I)


def test_markers_during_and_nvme_args_in_a_real_run(boot):
    """The harness itself under a real guest: ``nvme_args`` reach ``insmod nvme.ko``
    (io_queue_depth=2: one command in flight per I/O queue, every completion fills its CQ),
    a ``during`` thread samples the server's CPU while fio runs with crc32c verify between
    the FIO-START and FIO-END marks, and reports the (unchanged) serving PID."""

    def during(host):
        start = host.wait_mark("FIO-START", 180)
        samples = []
        while start is not None and not host.seen("FIO-END") and not host.done.is_set():
            host.set_pid(0, host.pid(0))
            samples.append((time.monotonic(), host.cpu()[0]))
            time.sleep(0.5)
        return samples

    r = boot("""
echo QD=$(cat /sys/module/nvme/parameters/io_queue_depth)
echo FIO-START
fio --name=v --filename=/dev/nvme0n1 --size=16M --rw=randwrite --bs=4k --iodepth=16 --direct=1 \
    --ioengine=io_uring --verify=crc32c --verify_backlog=256 --verify_fatal=1 --time_based --runtime=8 \
    >/tmp/fio.out 2>&1; rc=$?
echo FIO-END
cat /tmp/fio.out
test $rc = 0 && echo FIO-OK
""", [NVME], nvme_args="io_queue_depth=2", markers=dict.fromkeys(("FIO-START", "FIO-END")), during=during)
    assert r.ok, r.console[-4000:]
    got = lines(r.output)
    assert {"QD=2", "FIO-OK"} <= got, r.output[-3000:]
    assert fio_result(r.output).get("err") == 0
    assert [m.name for m in r.marks] == ["FIO-START", "FIO-END"]
    assert r.mark("FIO-END").t - r.mark("FIO-START").t >= 8
    assert r.pids == [r.pids[0][:1]]  # nobody reported another server
    samples = r.during_result
    assert len(samples) >= 10, samples
    cpus = [c for _, c in samples]
    assert all(c is not None for c in cpus) and cpus == sorted(cpus)  # CPU time only grows
    assert r.cpu_between("FIO-START", "FIO-END") > 0
    assert r.mark("FIO-START").cpu[0] <= cpus[0] and cpus[-1] <= r.mark("FIO-END").cpu[0]
