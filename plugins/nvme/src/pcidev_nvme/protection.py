"""End-to-end data protection: protection information (PI) per logical block.

A namespace formatted with metadata may keep *protection information* in each
block's metadata (NVMe Base 2.0 and NVM Command Set 1.0, "End-to-end Data
Protection"). :class:`PiFormat` describes one namespace's setting and generates and
checks the PI of a run of blocks; the I/O command set
(:mod:`pcidev_nvme.protected_io`) calls it. Two PI formats (the LBA format's PIF, Identify
CNS 05h ELBAF):

* **16b Guard** (PIF 0, 8 bytes, big-endian like every PI field): Guard (CRC-16/T10-DIF,
  :func:`pcidev.native.crc16_t10dif`), Application Tag (16 bits), Reference Tag (32 bits);
* **64b Guard** (PIF 2, 16 bytes): Guard (CRC-64/NVME, :func:`pcidev.native.crc64_nvme`),
  Application Tag, Reference Tag (48 bits; no storage tag: STS is 0).

The PI sits in the first (DPS bit 3, ``pil=1``) or last bytes of the metadata. The
Guard covers the block's data and, when the PI is last, the metadata bytes before it.

Checks (the command's PRCHK bits, CDW12 28:26 = Guard, Application Tag, Reference Tag):

======================  ======================================================  ======
check                   fails when                                              status
======================  ======================================================  ======
Guard                   the Guard is not the CRC of the covered bytes          282h
Application Tag         ``(tag & LBATM) != (LBAT & LBATM)`` (CDW15)             283h
Reference Tag           type 1 and 2: not ILBRT + block index (CDW14, with     284h
                        CDW3 15:0 above it for 48 bits), modulo 2^32 / 2^48;
                        type 3: never checked
======================  ======================================================  ======

A block whose Application Tag is FFFFh (types 1 and 2), or whose Application Tag is FFFFh
and Reference Tag all ones (type 3), is not checked at all (the escape values).
Invalid Protection Information (181h) refuses a command before any transfer: type 1 with
the Reference Tag check and an ILBRT that is not the low bits of the SLBA, or type 3
with the Reference Tag check.

PRACT (CDW12 bit 29): on a write the controller generates the PI (Guard over the data,
Application Tag = LBAT, Reference Tag = ILBRT + index, or ILBRT for type 3); on a read
it checks as asked and, when the metadata is exactly the PI, strips it (nothing goes
to the host); with larger metadata the metadata moves as usual.

Deallocated blocks (:class:`~pcidev_nvme.metadata.MetadataStore` holes) read back with PI
all ones (DLFEAT bit 4 cleared: Guard FFFFh) -- the escape values, so reading blocks
never written passes every check, as Linux's block integrity expects.
"""

from __future__ import annotations

import logging
import threading

import attrs

from pcidev import native
from pcidev.native import crc16_t10dif, crc64_nvme
from pcidev_nvme.status import NvmeStatusError, Status

__all__ = [
    "PIF_16B",
    "PIF_64B",
    "PRINFO_PRACT",
    "PRCHK_APP",
    "PRCHK_GUARD",
    "PRCHK_REF",
    "PI_TYPES",
    "PiFormat",
    "pi_size",
    "warn_slow_crcs",
]

log = logging.getLogger(__name__)
_warned = threading.Event()

#: Protection Information Format (ELBAF bits 8:7): 16b Guard, 64b Guard
PIF_16B = 0
PIF_64B = 2

#: PI types (DPS bits 2:0)
PI_TYPES = (1, 2, 3)

#: PRINFO bits as they sit in CDW12 (PRINFO is CDW12 29:26)
PRINFO_PRACT = 1 << 29
PRCHK_GUARD = 1 << 28
PRCHK_APP = 1 << 27
PRCHK_REF = 1 << 26
_PRCHK = PRCHK_GUARD | PRCHK_APP | PRCHK_REF

_OFF_CDW12 = 48
_OFF_CDW14 = 56


def warn_slow_crcs() -> bool:
    """Log (once per process) that protection information is computed with the
    pure-Python CRCs, when the native extension is missing: each block's Guard then costs
    microseconds. :returns: whether the fallback is in use."""
    reason = native.FALLBACK_REASON
    if reason is None:
        return False
    if not _warned.is_set():
        _warned.set()
        log.warning("protection information uses the pure-Python CRCs (%s): PI I/O is slow", reason)
    return True


def pi_size(pif: int) -> int:
    """Bytes of protection information in the format ``pif`` (8 or 16)."""
    return 16 if pif == PIF_64B else 8


@attrs.frozen
class PiFormat:
    """The protection setting of a namespace: PI type, where the PI sits, its format.

    :ivar pi_type: 1, 2 or 3.
    :ivar pif: :data:`PIF_16B` or :data:`PIF_64B`.
    :ivar ms: metadata bytes per block (at least the PI size).
    :ivar lba_size: data bytes per block.
    :ivar first: the PI is in the first bytes of the metadata (else the last).
    """

    pi_type: int
    pif: int
    ms: int
    lba_size: int
    first: bool

    @property
    def size(self) -> int:
        """Bytes of PI per block."""
        return pi_size(self.pif)

    @property
    def offset(self) -> int:
        """Offset of the PI in a block's metadata."""
        return 0 if self.first else self.ms - self.size

    @property
    def ref_mask(self) -> int:
        """All ones in the Reference Tag's width."""
        return 0xFFFF_FFFF_FFFF if self.pif == PIF_64B else 0xFFFF_FFFF

    @property
    def store_pattern(self) -> bytes:
        """One block's metadata mask: FFh over the PI bytes, 00h elsewhere (the store keeps
        PI complemented, so that a hole reads as all-ones PI: :mod:`pcidev_nvme.metadata`)."""
        off = self.offset
        return bytes(off) + b"\xff" * self.size + bytes(self.ms - off - self.size)

    # -- command fields ---------------------------------------------------------------

    def initial_ref(self, cdw3: int, cdw14: int) -> int:
        """The command's ILBRT / EILBRT (CDW14, and CDW3 15:0 above it for 48-bit tags)."""
        if self.pif == PIF_64B:
            return (cdw3 & 0xFFFF) << 32 | cdw14
        return cdw14

    def check_command(self, slba: int, cdw12: int, ref: int) -> None:
        """Refuse PRINFO settings the spec calls invalid (Invalid Protection Information).

        :raises NvmeStatusError: type 1 with the Reference Tag check and an ILBRT that is
            not the low bits of the SLBA; type 3 with the Reference Tag check.
        """
        if not cdw12 & PRCHK_REF:
            return
        if self.pi_type == 1 and ref != slba & self.ref_mask:
            raise NvmeStatusError(
                Status.INVALID_PROT_INFO,
                f"ILBRT {ref:#x} is not the low bits of SLBA {slba:#x} (type 1)",
                param_offset=_OFF_CDW14,
            )
        if self.pi_type == 3:
            raise NvmeStatusError(
                Status.INVALID_PROT_INFO, "type 3 protection has no Reference Tag to check",
                param_offset=_OFF_CDW12 + 3,
            )

    # -- generation and checking ------------------------------------------------------

    def _guard(self, data: memoryview, meta: memoryview, i: int) -> int:
        lbs, ms = self.lba_size, self.ms
        d = data[i * lbs:(i + 1) * lbs]
        before = self.offset if not self.first else 0
        if self.pif == PIF_64B:
            crc = crc64_nvme(d)
            if before:
                crc = crc64_nvme(meta[i * ms:i * ms + before], crc)
        else:
            crc = crc16_t10dif(d)
            if before:
                crc = crc16_t10dif(meta[i * ms:i * ms + before], crc)
        return crc

    def generate(self, data: memoryview, meta: memoryview, nblocks: int, ref: int, app: int) -> None:
        """Write the PI of ``nblocks`` blocks into ``meta`` (PRACT on a write).

        :param data: the blocks' data, ``nblocks * lba_size`` bytes.
        :param meta: their metadata, ``nblocks * ms`` bytes, writable.
        :param ref: the first block's Reference Tag (ILBRT); types 1 and 2 count up
            from it, type 3 writes it unchanged.
        :param app: the Application Tag (LBAT).
        """
        ms, off = self.ms, self.offset
        step = 0 if self.pi_type == 3 else 1
        mask = self.ref_mask
        wide = self.pif == PIF_64B
        for i in range(nblocks):
            guard = self._guard(data, meta, i)
            at = i * ms + off
            r = (ref + i * step) & mask
            if wide:
                meta[at:at + 16] = guard.to_bytes(8, "big") + app.to_bytes(2, "big") + r.to_bytes(6, "big")
            else:
                meta[at:at + 8] = guard.to_bytes(2, "big") + app.to_bytes(2, "big") + r.to_bytes(4, "big")

    def zero_blocks_metadata(self, nblocks: int, ref: int, app: int) -> bytearray:
        """The metadata of ``nblocks`` zeroed blocks whose metadata is zeroed too, with
        their PI generated (Write Zeroes with PRACT): the same as :meth:`generate` over
        zeros, built a byte column at a time instead of a block at a time.

        :param ref: the first block's Reference Tag (ILBRT).
        :param app: the Application Tag (LBAT).
        """
        ms, off, size = self.ms, self.offset, self.size
        wide = self.pif == PIF_64B
        zeros = bytes(self.lba_size)
        before = bytes(off) if not self.first else b""
        if wide:
            guard = crc64_nvme(before, crc64_nvme(zeros)) if before else crc64_nvme(zeros)
            head = guard.to_bytes(8, "big") + app.to_bytes(2, "big")
        else:
            guard = crc16_t10dif(before, crc16_t10dif(zeros)) if before else crc16_t10dif(zeros)
            head = guard.to_bytes(2, "big") + app.to_bytes(2, "big")
        rwidth = size - len(head)
        mask = self.ref_mask
        if self.pi_type == 3:
            refs = (ref & mask).to_bytes(rwidth, "big") * nblocks
        else:
            refs = b"".join(((ref + i) & mask).to_bytes(rwidth, "big") for i in range(nblocks))
        out = bytearray(nblocks * ms)
        for j, byte in enumerate(head):
            if byte:
                out[off + j::ms] = bytes((byte,)) * nblocks
        for k in range(rwidth):
            out[off + len(head) + k::ms] = refs[k::rwidth]
        return out

    def check(self, data: memoryview, meta: memoryview, nblocks: int, *, slba: int, cdw12: int,
              ref: int, app: int, app_mask: int) -> None:
        """Check the PI of ``nblocks`` blocks as the PRCHK bits of ``cdw12`` ask.

        :param data: the blocks' data.
        :param meta: their metadata.
        :param slba: the first block's LBA (for the error's LBA).
        :param cdw12: the command's CDW12 (PRCHK bits).
        :param ref: the expected initial Reference Tag (EILBRT).
        :param app: the expected Application Tag (ELBAT).
        :param app_mask: the Application Tag mask (ELBATM).
        :raises NvmeStatusError: End-to-end Guard, Application Tag or Reference Tag
            Check Error naming the first failing block's LBA.
        """
        prchk = cdw12 & _PRCHK
        if not prchk:
            return
        ms, off = self.ms, self.offset
        wide = self.pif == PIF_64B
        mask = self.ref_mask
        type3 = self.pi_type == 3
        for i in range(nblocks):
            at = i * ms + off
            if wide:
                guard = int.from_bytes(meta[at:at + 8], "big")
                tag = int.from_bytes(meta[at + 8:at + 10], "big")
                rtag = int.from_bytes(meta[at + 10:at + 16], "big")
            else:
                guard = int.from_bytes(meta[at:at + 2], "big")
                tag = int.from_bytes(meta[at + 2:at + 4], "big")
                rtag = int.from_bytes(meta[at + 4:at + 8], "big")
            if tag == 0xFFFF and (not type3 or rtag == mask):
                continue  # escape: this block's PI is not checked
            lba = slba + i
            if prchk & PRCHK_GUARD and guard != self._guard(data, meta, i):
                raise NvmeStatusError(Status.GUARD_CHECK, f"Guard check failed at LBA {lba:#x}", lba=lba)
            if prchk & PRCHK_APP and (tag ^ app) & app_mask:
                raise NvmeStatusError(
                    Status.APP_TAG_CHECK,
                    f"Application Tag {tag:#06x} at LBA {lba:#x} is not {app:#06x} (mask {app_mask:#06x})",
                    lba=lba,
                )
            if prchk & PRCHK_REF and not type3 and rtag != (ref + i) & mask:
                raise NvmeStatusError(
                    Status.REF_TAG_CHECK,
                    f"Reference Tag {rtag:#x} at LBA {lba:#x} is not {(ref + i) & mask:#x}",
                    lba=lba,
                )
