"""Linux's nvme driver, nvme-cli and fio against pcidev's NVMe controller, served over
vfio-user to QEMU (TCG) by ``pcidev serve --vfio-user``."""

from __future__ import annotations

import json
import re

import vm_guest

NVME = "nvme,ns=mem:size=64M"


def lines(text: str) -> set[str]:
    return {ln.strip() for ln in text.splitlines()}


def fio_result(text: str) -> dict[str, float]:
    """``{"err": n, "read_iops": x, "write_iops": y}`` from fio's normal output."""
    out: dict[str, float] = {}
    m = re.search(r"err=\s*(\d+)", text)
    if m:
        out["err"] = int(m.group(1))
    for kind in ("read", "write"):
        m = re.search(rf"\b{kind}: IOPS=([\d.]+)(k?)", text)
        if m:
            out[f"{kind}_iops"] = float(m.group(1)) * (1000 if m.group(2) else 1)
    return out


def _record(name: str, data: dict) -> None:
    path = vm_guest.ROOT / "vm" / "results.json"
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        results = {}
    results[name] = data
    path.write_text(json.dumps(results, indent=1, sort_keys=True))


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


def test_fio_randread_iodepth32_measure(boot):
    r = boot("""
fio --name=randread --filename=/dev/nvme0n1 --size=48M --rw=randread --bs=4k --iodepth=32 --direct=1 \
    --ioengine=io_uring --time_based --runtime=10 && echo FIO-OK
""", [NVME])
    assert r.ok, r.console[-4000:]
    assert "FIO-OK" in lines(r.output)
    res = fio_result(r.output)
    assert res.get("err") == 0 and res.get("read_iops", 0) > 0
    _record("pcidev randread qd32 10s", res)
    print(f"randread qd32: {res}")


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
