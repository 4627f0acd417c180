"""Issue 10's NVMe features as a Linux guest uses them (QEMU TCG, ``pcidev serve --vfio-user``):
the block layer's integrity path on a protection-information namespace, and nvme-cli's
sanitize, device-self-test, get-lba-status, write-uncor, sanitize-log and self-test-log.

Not here: Linux putting its submission queues in the Controller Memory Buffer
(``nvme.use_cmb_sqes``). The guest kernel is Debian's, built without ``CONFIG_PCI_P2PDMA``,
so its nvme driver cannot register a CMB ("failed to register the CMB"); the CMB is tested
through pcidev's own driver and a vfio-user client that maps BAR2
(tests/plugins/nvme/test_cmb.py). The test below checks that Linux meets the CMB's
registers without harm.
"""

from __future__ import annotations

import re

from test_guest_nvme import fio_result, lines


def test_fio_verify_on_a_pi_type1_namespace(boot):
    """512-byte blocks with 8 bytes of metadata holding T10 PI type 1 (``lbaf=2,pi=1``): Linux
    registers a T10-DIF-TYPE1-CRC integrity profile, generates the guard and reference tags on
    every write and checks them on every read (the controller checks them too: PRCHK), and
    fio's crc32c verify passes."""
    r = boot("""
cat /sys/block/nvme0n1/integrity/format
echo PROT=$(cat /sys/block/nvme0n1/integrity/protection_interval_bytes 2>/dev/null)
nvme id-ns /dev/nvme0n1 | grep -E '^(flbas|mc|dpc|dps|lbaf  2)'
fio --name=pi --filename=/dev/nvme0n1 --size=32M --rw=randwrite --bs=4k --iodepth=16 --direct=1 \
    --ioengine=io_uring --verify=crc32c --verify_fatal=1 >/tmp/fio.out 2>&1; rc=$?
cat /tmp/fio.out
dmesg | grep -iE 'nvme|integrity|guard|protection' | tail -20
echo NVME-ERRORS=$(dmesg | grep -ciE 'nvme.*(timeout|reset|abort|guard|ref.*tag|I/O error)')
test $rc = 0 && echo FIO-OK
""", ["nvme,ns=mem:size=64M,lbaf=2,pi=1"])
    assert r.ok, r.console[-4000:]
    got = lines(r.output)
    assert "T10-DIF-TYPE1-CRC" in got, r.output[-3000:]
    assert "FIO-OK" in got and "NVME-ERRORS=0" in got, r.output[-4000:]
    assert re.search(r"^dps\s+:\s+0x1\b", r.output, re.M), r.output[-3000:]
    assert fio_result(r.output).get("err") == 0


def test_nvme_cli_get_lba_status_and_write_uncor(boot):
    """Get LBA Status (allocated ranges; the tracked uncorrectable ones) and Write Uncorrectable:
    the kernel's read of a marked block fails, a rewrite clears it."""
    r = boot("""
dd if=/dev/urandom of=/dev/nvme0n1 bs=4k count=16 oflag=direct 2>/dev/null && echo DD-OK
nvme get-lba-status /dev/nvme0 -n 1 -s 0 -m 255 -a 2 -l 0 && echo GLS-OK
nvme write-uncor /dev/nvme0n1 -n 1 -s 8 -c 7 && echo WU-OK
dd if=/dev/nvme0n1 of=/dev/null bs=4k skip=1 count=1 iflag=direct 2>/dev/null && echo UREAD-OK || echo UREAD-FAILED
nvme get-lba-status /dev/nvme0 -n 1 -s 0 -m 255 -a 0x11 -l 0 && echo GLS2-OK
dd if=/dev/zero of=/dev/nvme0n1 bs=4k seek=1 count=1 oflag=direct 2>/dev/null
dd if=/dev/nvme0n1 of=/dev/null bs=4k skip=1 count=1 iflag=direct 2>/dev/null && echo REREAD-OK
echo NVME-ERRORS=$(dmesg | grep -ciE 'nvme.*(timeout|reset)')
""", ["nvme,ns=mem:size=16M"])
    assert r.ok, r.console[-4000:]
    got = lines(r.output)
    for marker in ("DD-OK", "GLS-OK", "WU-OK", "UREAD-FAILED", "GLS2-OK", "REREAD-OK", "NVME-ERRORS=0"):
        assert marker in got, f"{marker} missing:\n{r.output[-5000:]}"


def test_nvme_cli_device_self_test_and_sanitize(boot):
    """A short device self-test (2 s: nvme-cli's ``--wait`` needs to see it in progress once;
    then its log) and a block-erase sanitize whose
    progress the guest polls in the Sanitize Status log until it completes."""
    r = boot("""
dd if=/dev/urandom of=/dev/nvme0n1 bs=4k count=16 oflag=direct 2>/dev/null
nvme device-self-test /dev/nvme0 -n 0xffffffff -s 1 -w && echo DST-OK
nvme self-test-log /dev/nvme0 && echo DST-LOG-OK
nvme sanitize /dev/nvme0 -a 2 && echo SAN-STARTED
for i in $(seq 120); do
  nvme sanitize-log /dev/nvme0 -o json >/tmp/s 2>/dev/null; grep -qE 'sprog.: *65535' /tmp/s && break; sleep 0.5
done
nvme sanitize-log /dev/nvme0 && echo SAN-LOG-OK
cmp -n 65536 /dev/nvme0n1 /dev/zero && echo ERASED
echo NVME-ERRORS=$(dmesg | grep -ciE 'nvme.*(timeout|reset)')
""", ["nvme,ns=mem:size=16M,sanitize_rate=8M"], timeout=600)
    assert r.ok, r.console[-4000:]
    got = lines(r.output)
    for marker in ("DST-OK", "DST-LOG-OK", "SAN-STARTED", "SAN-LOG-OK", "ERASED", "NVME-ERRORS=0"):
        assert marker in got, f"{marker} missing:\n{r.output[-5000:]}"


def test_linux_meets_a_cmb_without_harm(boot):
    """A controller with a CMB: the guest driver reads CMBLOC/CMBSZ, cannot register it (no
    P2PDMA in Debian's kernel) and goes on without it; I/O verifies."""
    r = boot("""
dmesg | grep -i cmb
fio --name=v --filename=/dev/nvme0n1 --size=16M --rw=randwrite --bs=4k --iodepth=8 --direct=1 \
    --ioengine=io_uring --verify=crc32c --verify_fatal=1 >/tmp/fio.out 2>&1 && echo FIO-OK || cat /tmp/fio.out
""", ["nvme,ns=mem:size=32M,cmb_size=16"])
    assert r.ok, r.console[-4000:]
    assert "FIO-OK" in lines(r.output), r.output[-3000:]
    # it read a non-zero CMBSZ after setting CMBMSC.CRE, then found no P2PDMA to register it with
    assert "failed to register the CMB" in r.output, r.output[-3000:]


def test_linux_puts_its_submission_queues_in_the_cmb(boot):
    """With trixie-backports' kernel (``CONFIG_PCI_P2PDMA``), Linux's nvme driver registers the
    CMB as P2P memory and, ``use_cmb_sqes`` being its default, allocates its I/O submission
    queues from it: the P2P pool's free space shrinks by their size; fio verifies every block
    written through SQs in the CMB."""
    r = boot("""
uname -r
dmesg | grep -i cmb
d=/sys/bus/pci/devices
echo P2P-SIZE=$(cat $d/*/p2pmem/size 2>/dev/null) P2P-FREE=$(cat $d/*/p2pmem/available 2>/dev/null)
echo CMB-SQES=$(cat /sys/module/nvme/parameters/use_cmb_sqes)
fio --name=v --filename=/dev/nvme0n1 --size=16M --rw=randwrite --bs=4k --iodepth=16 --direct=1 \
    --ioengine=io_uring --verify=crc32c --verify_fatal=1 >/tmp/fio.out 2>&1 && echo FIO-OK || cat /tmp/fio.out
echo NVME-ERRORS=$(dmesg | grep -ciE 'nvme.*(timeout|reset|failed)')
""", ["nvme,ns=mem:size=32M,cmb_size=16"], kernel="p2p")
    assert r.ok, r.console[-4000:]
    got = lines(r.output)
    assert {"FIO-OK", "NVME-ERRORS=0", "CMB-SQES=Y"} <= got, r.output[-4000:]
    m = re.search(r"^P2P-SIZE=(\d+) P2P-FREE=(\d+)$", r.output, re.M)
    assert m, r.output[-3000:]
    size, free = int(m.group(1)), int(m.group(2))
    assert size == 16 << 20 and free < size, (size, free)  # the SQs took their share
