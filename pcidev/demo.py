"""``pcidev demo``: live migration of a device between processes, through the
software host.

1. The ``edu`` example device (a DMA descriptor-ring engine with MSI-X) starts in
   its own process, served over the device link (:mod:`pcidev.transport.link`);
   its worker thread copies in small chunks, so descriptors are in flight at any
   moment.
2. An in-process software host (:class:`~pcidev.host.Machine`) plugs it and
   enumerates it the way firmware and Linux do: BAR sizing and assignment,
   capability walk, MSI-X.
3. A host thread keeps driving DMA: it posts batches of copy descriptors, rings
   the doorbell, waits for the MSI-X interrupt and checks every block with
   CRC-32C.
4. Meanwhile the device is migrated to a new process, several times: quiesced
   between two chunks, its state (config space, MSI-X table, ring registers, the
   descriptor in flight) and its guest-memory and interrupt eventfds sent over a
   UNIX socket, loaded, acknowledged and resumed there; the host follows it,
   holding its accesses during the downtime.

At the end every block is verified; the demo prints the downtime and state size
of each migration. The orchestration (processes, plugging, migrating, cleaning
up) is :func:`pcidev.testing.migrate_under_load`'s; the demo brings the DMA
workload and the printing.
"""

from __future__ import annotations

import argparse
import os
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

import crc32c

from pcidev.devices.edu import DESC, STATUS_DONE
from pcidev.errors import PcidevError
from pcidev.pci import ids
from pcidev.testing.migration import MigrationRecord, Workload, WorkloadContext, migrate_under_load

_CAP_NAMES = {int(c): c.name for c in ids.CapId}
_EXT_NAMES = {int(c): c.name for c in ids.ExtCapId}
_STATUS_CRC = struct.Struct("<II")
#: edu options of the demo's device processes: a background worker copying 8 KiB
#: per step and pausing 0.5 ms after each, so that a descriptor is in flight most
#: of the time and the workload spans the migrations
EDU_OPTIONS = {"engine": True, "chunk": 8192, "delay": 0.0005}


class _DmaWorkload(Workload):
    """The host's DMA workload: one batch of descriptors per step, one interrupt per
    batch, every block checked with CRC-32C (mismatches are counted and reported)."""

    def __init__(self, blocks: int, block_size: int, batch: int) -> None:
        self.blocks, self.block_size, self.batch = blocks, block_size, batch
        self.ring_entries = 64
        self.done = 0
        self.mismatches = 0
        self.interrupts = 0
        self.max_batch_latency = 0.0
        self.tail = 0

    def setup(self, ctx: WorkloadContext) -> None:
        m, p = ctx.machine, ctx.pdev
        self.ring = m.alloc(self.ring_entries * 32)
        p.iowrite64(0, 0x100, self.ring)
        p.iowrite32(0, 0x108, self.ring_entries)
        p.iowrite32(0, 0x114, 1)
        total = self.blocks * self.block_size
        self.src, self.dst = m.alloc(total), m.alloc(total)
        payload = os.urandom(total)
        m.write(self.src, payload)
        self.expected = [crc32c.crc32c(payload[i * self.block_size:(i + 1) * self.block_size])
                         for i in range(self.blocks)]

    def step(self, ctx: WorkloadContext) -> bool:
        m, p, bs = ctx.machine, ctx.pdev, self.block_size
        n = min(self.batch, self.blocks - self.done)
        slots = []
        for j in range(n):
            i = self.done + j
            slot = (self.tail + j) % self.ring_entries
            m.memory.write_struct(DESC, self.ring + slot * 32, self.src + i * bs, self.dst + i * bs, bs,
                                  1 if j == n - 1 else 0, 0, 0)
            slots.append(slot)
        before = p.irq_count(0)
        t0 = time.monotonic()
        self.tail = (self.tail + n) % self.ring_entries
        p.iowrite32(0, 0x10C, self.tail)
        if not p.recorder.wait(0, above=before, timeout=20.0):
            raise TimeoutError(f"no completion interrupt for blocks {self.done}..{self.done + n - 1}")
        self.max_batch_latency = max(self.max_batch_latency, time.monotonic() - t0)
        for j, slot in enumerate(slots):
            i = self.done + j
            status, crc = _STATUS_CRC.unpack(m.read(self.ring + slot * 32 + 0x18, 8))
            got = crc32c.crc32c(m.read(self.dst + i * bs, bs))
            if status != STATUS_DONE or crc != self.expected[i] or got != self.expected[i]:
                self.mismatches += 1
        self.done += n
        return self.done < self.blocks

    def verify(self, ctx: WorkloadContext) -> None:
        if self.done < self.blocks:
            raise PcidevError(f"the DMA workload stopped at block {self.done} of {self.blocks}")
        self.interrupts = ctx.pdev.irq_count(0)


def _tour(pdev: Any, out: Callable[[str], object]) -> None:
    out(f"plugged {pdev.device!r}, class {pdev.class_code:06x}")
    for idx, (size, kind) in pdev.size_bars().items():
        out(f"  BAR{idx}: {kind}, {size} bytes")
    pdev.enable_device()
    pdev.set_master()
    for idx, (addr, _size, _kind) in pdev.resources.items():
        out(f"  BAR{idx} assigned at {addr:#x}")
    caps = ", ".join(f"{_CAP_NAMES.get(c, hex(c))}@{o:#x}" for o, c in pdev.capabilities())
    ext = ", ".join(f"{_EXT_NAMES.get(c, hex(c))}@{o:#x}" for o, c, _ in pdev.ext_capabilities())
    out(f"  capabilities: {caps}; extended: {ext}")
    nvec = pdev.alloc_irq_vectors(1, 2)
    out(f"  interrupts: MSI-X with {nvec} vectors, delivered through eventfds")
    pdev.iowrite32(0, 8, 10)
    out(f"  ID register: {pdev.ioread32(0, 0):#010x}, factorial register: 10! = {pdev.ioread32(0, 8)}")


def run(blocks: int = 384, block_size: int = 65536, migrations: int = 3, *, batch: int = 16,
        options: dict[str, Any] | None = None, tcp: bool = False, out: Callable[[str], object] = print,
        plugin_specs: Sequence[str] = ()) -> dict[str, Any]:
    """Run the migration demo; returns a summary (also used by tests and the example).

    :param blocks: DMA blocks to copy and verify.
    :param block_size: bytes per block (one descriptor each).
    :param migrations: how many times the device moves to a new process.
    :param batch: descriptors per doorbell (one interrupt each batch).
    :param options: edu options (default :data:`EDU_OPTIONS`).
    :param tcp: migrate over TCP (localhost): no descriptors travel, so the host
        maps its guest RAM and installs its eventfds in each destination before it
        resumes the device there.
    :param out: where lines go.
    :param plugin_specs: ``-p`` options for the device processes (``pcidev -p ...
        demo`` passes its own), so they load the plugins the caller selected.
    :returns: ``{"blocks", "bytes", "mismatches", "interrupts", "seconds", "migrations": [reports]}``.
    """
    options = dict(EDU_OPTIONS if options is None else options)
    workload = _DmaWorkload(blocks, block_size, batch)
    reports: list[dict[str, Any]] = []
    over = "TCP (no fds: the host re-attaches RAM and eventfds)" if tcp else "UNIX sockets"

    def ready(ctx: WorkloadContext) -> None:
        out(f"device process {ctx.pid} serves edu on {ctx.link}; "
            f"{migrations} more processes wait for it")
        _tour(ctx.pdev, out)
        out(f"DMA: {blocks} blocks of {block_size} bytes, {batch} descriptors per doorbell, "
            f"CRC-32C checked per block; migrating {migrations} times meanwhile over {over}")

    def migrated(rec: MigrationRecord, ctx: WorkloadContext) -> None:
        report = dict(rec.report)
        report["inflight"] = "edu/inflight" in rec.sections[-1]["subsections"]
        report["blocks_done"] = workload.done
        reports.append(report)
        shown = f"{rec.downtime * 1e3:.1f} ms" if rec.downtime is not None else "n/a"
        out(f"migration {rec.index}: process {rec.source_pid} -> {rec.destination_pid} at block {workload.done}: "
            f"downtime {shown}, host accesses held {rec.host_pause * 1e3:.1f} ms, "
            f"state {rec.state_size} bytes + {rec.fds} fds, "
            f"descriptor in flight: {'yes' if report['inflight'] else 'no'}")

    ram = max(64 << 20, (2 * blocks * block_size + (16 << 20) + 0xFFFFF) & ~0xFFFFF)
    result = migrate_under_load(
        "edu", workload, count=migrations, iterations=-(-blocks // batch), transport="tcp" if tcp else "unix",
        properties=options, plugin_specs=plugin_specs, ram_size=ram, probe=False, migration_timeout=10.0,
        on_ready=ready, on_migration=migrated)
    elapsed = result.seconds
    mb = blocks * block_size / 1e6
    out(f"DMA: {blocks} blocks ({mb:.1f} MB) copied in {elapsed:.2f} s across {len(reports) + 1} "
        f"processes, {workload.interrupts} MSI-X interrupts, {workload.mismatches} CRC-32C mismatches")
    if reports and all(r.get("downtime") is not None for r in reports):
        downs = sorted(r["downtime"] * 1e3 for r in reports)
        out(f"downtime (device stopped on the source -> running on the destination): "
            f"min {downs[0]:.1f} ms, max {downs[-1]:.1f} ms; state {reports[0]['state_size']} "
            f"bytes per migration")
    return {"blocks": blocks, "bytes": blocks * block_size, "mismatches": workload.mismatches,
            "interrupts": workload.interrupts, "seconds": elapsed, "migrations": reports,
            "max_batch_latency": workload.max_batch_latency}


def main(args: argparse.Namespace | None = None, *, plugin_specs: Sequence[str] = ()) -> int:
    """Entry point of ``pcidev demo``: 0 if every block verified and every migration worked.

    :param args: the parsed command line (unused: the demo has no options).
    :param plugin_specs: the command line's ``-p`` options, for the device processes.
    :returns: the exit status.
    """
    summary = run(plugin_specs=plugin_specs)
    ok = summary["mismatches"] == 0 and len(summary["migrations"]) == 3
    return 0 if ok else 1
