"""Linux's own virtio drivers against pcidev's virtio devices: ``virtio_pci`` (built into the
guest kernel) binds to a virtio-rng and a virtio-blk, each served over vfio-user to QEMU (TCG)
by its own ``pcidev serve --vfio-user``; ``virtio-rng`` and ``virtio_blk`` are modules the
initramfs loads. The guest reads ``/dev/hwrng`` and runs fio with crc32c verification on
``/dev/vda``."""

from __future__ import annotations

import hashlib
import os
import re

from test_guest_nvme import fio_result, lines

RNG = "virtio-rng"
BLK = "virtio-blk,size=64M,serial=pcidev-vblk0"


def test_virtio_rng_and_blk_bind_and_work(boot):
    r = boot("""
lspci -nn
cat /sys/class/misc/hw_random/rng_available
echo CURRENT=$(cat /sys/class/misc/hw_random/rng_current)
dd if=/dev/hwrng of=/tmp/r bs=4096 count=1 iflag=fullblock 2>/dev/null
echo RNG-BYTES=$(wc -c </tmp/r) RNG-NONZERO=$(tr -d '\\000' </tmp/r | wc -c)
echo RNG-DISTINCT=$(od -An -v -tx1 /tmp/r | tr -s ' ' '\\n' | sort -u | wc -l)
test -b /dev/vda && echo HAVE-VDA
echo SECTORS=$(cat /sys/block/vda/size) SERIAL=$(cat /sys/block/vda/serial)
echo CACHE=$(cat /sys/block/vda/queue/write_cache)
echo DISCARD=$(cat /sys/block/vda/queue/discard_max_bytes)
echo WZ=$(cat /sys/block/vda/queue/write_zeroes_max_bytes)
dd if=/dev/urandom of=/tmp/x bs=4k count=16 2>/dev/null
dd if=/tmp/x of=/dev/vda bs=4k seek=3 oflag=direct 2>/dev/null
dd if=/dev/vda of=/tmp/y bs=4k skip=3 count=16 iflag=direct 2>/dev/null
cmp /tmp/x /tmp/y && echo DATA-OK
grep -i virtio /proc/interrupts
dmesg | grep -i -E 'virtio|vda'
""", [RNG, BLK])
    assert r.ok, r.console[-4000:]
    got = lines(r.output)
    assert "[1af4:1044]" in r.output and "[1af4:1042]" in r.output, r.output[-3000:]
    assert re.search(r"^CURRENT=virtio_rng(\.\d+)?$", r.output, re.M), r.output[-3000:]
    m = re.search(r"RNG-BYTES=(\d+) RNG-NONZERO=(\d+)", r.output)
    assert m and int(m.group(1)) == 4096 and int(m.group(2)) > 3900, r.output[-3000:]
    m = re.search(r"RNG-DISTINCT=(\d+)", r.output)
    assert m and int(m.group(1)) > 250  # 4 KiB of random bytes take nearly every value
    assert "HAVE-VDA" in got and "DATA-OK" in got, r.output[-3000:]
    assert f"SECTORS={64 << 11} SERIAL=pcidev-vblk0" in got, r.output[-3000:]
    assert "CACHE=write back" in got
    assert re.search(r"^DISCARD=[1-9]\d*$", r.output, re.M) and re.search(r"^WZ=[1-9]\d*$", r.output, re.M)
    assert re.search(r"PCI-MSIX.*virtio\d+-req\.0", r.output), r.output[-3000:]
    assert not re.search(r"^\[.*(virtio|vda).*(timeout|error|fail)", r.output, re.M | re.I)


def test_fio_crc32c_verify_on_virtio_blk(boot):
    r = boot("""
fio --name=verify --filename=/dev/vda --size=48M --rw=randwrite --bs=4k --iodepth=16 --direct=1 \
    --ioengine=io_uring --verify=crc32c --verify_fatal=1 && echo FIO-OK
fio --name=mix --filename=/dev/vda --size=16M --rw=randwrite --bsrange=512-256k --iodepth=8 --direct=1 \
    --ioengine=libaio --verify=crc32c --verify_fatal=1 && echo MIX-OK
fio --name=trim --filename=/dev/vda --size=16M --rw=randtrim --bs=64k --iodepth=4 --direct=1 \
    --ioengine=io_uring --number_ios=100 && echo TRIM-OK
dmesg | grep -i -E 'virtio|vda'; true
""", [BLK], timeout=480)
    assert r.ok, r.console[-4000:]
    got = lines(r.output)
    assert {"FIO-OK", "MIX-OK", "TRIM-OK"} <= got, r.output[-4000:]
    assert re.findall(r"err=\s*(\d+)", r.output) == ["0", "0", "0"], r.output[-3000:]
    res = fio_result(r.output)
    assert res.get("write_iops", 0) > 0 and res.get("read_iops", 0) > 0
    assert not re.search(r"^\[.*(virtio|vda).*(timeout|error|fail)", r.output, re.M | re.I)


def test_read_only_image_4k_blocks_and_multiqueue(boot, vm_root, request):
    """A read-only image with 4 KiB blocks and two request queues (Linux takes one per
    CPU: one here): the guest sees the image's exact bytes, cannot write, and switches the
    cache mode through ``cache_type`` (the writeback byte of config space)."""
    img = vm_root / "vm" / f"{request.node.name[:40]}.img"
    content = os.urandom(4 << 20)
    img.write_bytes(content)
    try:
        r = boot("""
echo RO=$(cat /sys/block/vda/ro) LBS=$(cat /sys/block/vda/queue/logical_block_size)
echo PBS=$(cat /sys/block/vda/queue/physical_block_size)
echo SUM=$(md5sum </dev/vda)
dd if=/dev/zero of=/dev/vda bs=4k count=1 oflag=direct 2>/dev/null || echo WRITE-REFUSED
echo "write through" > /sys/block/vda/cache_type
echo CACHE=$(cat /sys/block/vda/cache_type)
echo SUM2=$(md5sum </dev/vda)
dmesg | grep -i -E 'virtio|vda'
""", [f"virtio-blk,file={img},readonly=on,logical_block_size=4k,num_queues=2"])
    finally:
        img.unlink()
    assert r.ok, r.console[-4000:]
    got = lines(r.output)
    want = hashlib.md5(content).hexdigest()
    assert {"RO=1 LBS=4096", "PBS=4096", f"SUM={want} -", "WRITE-REFUSED", "CACHE=write through",
            f"SUM2={want} -"} <= got, r.output[-3000:]
