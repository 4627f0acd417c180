"""``pcidev demo``: a short tour of the framework through the software host.

It plugs the ``edu`` example device into an in-process machine, enumerates it
the way firmware and Linux do (BAR sizing and assignment, capability walk,
MSI-X), then runs DMA copies through the device's descriptor ring and checks
every block with CRC-32C.
"""

from __future__ import annotations

import argparse
import os
import struct
import time

import crc32c

from pcidev.devices.edu import DESC, STATUS_DONE, EduDevice
from pcidev.host import Machine
from pcidev.pci import ids

_CAP_NAMES = {int(c): c.name for c in ids.CapId}
_EXT_NAMES = {int(c): c.name for c in ids.ExtCapId}


def run(blocks: int = 256, block_size: int = 4096, out=print) -> dict:
    """Run the demo; returns a summary dict (also used by tests)."""
    with Machine(ram_size=64 << 20) as machine:
        pdev = machine.plug(EduDevice())
        out(f"plugged {pdev.device!r} class {pdev.class_code:06x}")
        for idx, (size, kind) in pdev.size_bars().items():
            out(f"  BAR{idx}: {kind}, {size} bytes")
        pdev.enable_device()
        pdev.set_master()
        for idx, (addr, size, kind) in pdev.resources.items():
            out(f"  BAR{idx} assigned at {addr:#x}")
        caps = ", ".join(f"{_CAP_NAMES.get(c, hex(c))}@{o:#x}" for o, c in pdev.capabilities())
        ext = ", ".join(f"{_EXT_NAMES.get(c, hex(c))}@{o:#x}" for o, c, _ in pdev.ext_capabilities())
        out(f"  capabilities: {caps}; extended: {ext}")
        nvec = pdev.alloc_irq_vectors(1, 2)
        out(f"  interrupts: {pdev.device.irq.mode} with {nvec} vectors")
        pdev.iowrite32(0, 8, 10)
        out(f"  ID register: {pdev.ioread32(0, 0):#010x}, factorial register: 10! = {pdev.ioread32(0, 8)}")

        ring_entries = 64
        ring = machine.alloc(ring_entries * 32)
        pdev.iowrite64(0, 0x100, ring)
        pdev.iowrite32(0, 0x108, ring_entries)
        pdev.iowrite32(0, 0x114, 1)
        src = machine.alloc(blocks * block_size)
        dst = machine.alloc(blocks * block_size)
        payload = os.urandom(blocks * block_size)
        machine.write(src, payload)
        expected = [crc32c.crc32c(payload[i * block_size:(i + 1) * block_size]) for i in range(blocks)]
        t0 = time.perf_counter()
        tail = 0
        done = 0
        mismatches = 0
        while done < blocks:
            batch = min(ring_entries - 1, blocks - done)
            for j in range(batch):
                i = done + j
                slot = (tail + j) % ring_entries
                machine.memory.write_struct(DESC, ring + slot * 32, src + i * block_size, dst + i * block_size,
                                            block_size, 1 if j == batch - 1 else 0, 0, 0)
            before = pdev.irq_count(0)
            tail = (tail + batch) % ring_entries
            pdev.iowrite32(0, 0x10C, tail)
            if not pdev.recorder.wait(0, above=before, timeout=5.0):
                raise RuntimeError("no completion interrupt")
            for j in range(batch):
                slot = (tail - batch + j) % ring_entries
                status, crc = struct.unpack("<II", machine.read(ring + slot * 32 + 0x18, 8))
                got = crc32c.crc32c(machine.read(dst + (done + j) * block_size, block_size))
                if status != STATUS_DONE or crc != expected[done + j] or got != expected[done + j]:
                    mismatches += 1
            done += batch
        elapsed = time.perf_counter() - t0
        mb = blocks * block_size / 1e6
        out(f"DMA: {blocks} blocks of {block_size} bytes copied in {elapsed * 1e3:.1f} ms "
            f"({mb / elapsed:.0f} MB/s), {pdev.irq_count(0)} MSI-X interrupts, "
            f"{mismatches} CRC-32C mismatches")
        return {"blocks": blocks, "mismatches": mismatches, "interrupts": pdev.irq_count(0),
                "seconds": elapsed}


def main(args: argparse.Namespace | None = None) -> int:
    """Entry point of ``pcidev demo``."""
    summary = run()
    return 0 if summary["mismatches"] == 0 else 1
