"""Exercisers of the multi-bit and numeric Identify and CAP fields, for
``test_identify_truth.py`` (``test_every_numeric_field_holds``): a limit the controller
reports is exactly the limit it enforces (at the limit works, one more is refused with the
spec's status), a capability field's every value does what it says.

Each exerciser takes the test environment (:class:`_helpers.Env`; on a secondary
controller it also has ``primary_drv``, the primary's driver) and uses namespace 1 (a
plain one, no metadata) unless it walks every namespace.

:data:`NUMERIC_EXERCISERS` maps a field name to its exerciser: extend it at the end.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable

from _helpers import Env

from pcidev_nvme.controller import NvmeVirtualFunction
from pcidev_nvme.status import Status
from pcidev_nvme.testing.driver import IoQueue, NvmeCommandError, NvmeDriver, NvmeDriverError

__all__ = ["NUMERIC_EXERCISERS", "NumericExerciser", "pi_read_ok", "controllers_present"]

NumericExerciser = Callable[[Env], None]

READ, WRITE, COMPARE, WRITE_ZEROES, DSM, VERIFY, COPY = 0x02, 0x01, 0x05, 0x08, 0x09, 0x0C, 0x19
SANITIZE, SELF_TEST, AER, NS_MGMT = 0x84, 0x14, 0x0C, 0x0D
PAGE = 4096


def _u16(b: bytes, off: int) -> int:
    return int(struct.unpack_from("<H", b, off)[0])


def _u32(b: bytes, off: int) -> int:
    return int(struct.unpack_from("<I", b, off)[0])


def _u64(b: bytes, off: int) -> int:
    return int(struct.unpack_from("<Q", b, off)[0])


def _idc(drv: NvmeDriver) -> bytes:
    return drv.identify(0x01)


def _code(exc: NvmeDriverError) -> int:
    assert isinstance(exc, NvmeCommandError), exc
    return exc.status


def _wait(cond: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(0.005)


def controllers_present(env: Env) -> int:
    """Controllers in the NVM subsystem as they actually are: the primary and the secondary
    controllers its Secondary Controller List (CNS 15h) names, or one."""
    primary = getattr(env, "primary_drv", None) or env.drv
    if not _u16(_idc(primary), 256) >> 7 & 1:  # no Virtualization Management: one controller
        assert not isinstance(env.drv.device, NvmeVirtualFunction)
        return 1
    return 1 + primary.identify(0x15)[0]  # NUMID


def pi_read_ok(drv: NvmeDriver, nsid: int, slba: int, nlb: int) -> bytes:
    """Read ``nlb`` blocks of ``nsid`` with every protection check its PI type allows
    (deallocated blocks: the checks are off); returns the data (without metadata)."""
    info = drv.namespaces[nsid]
    lbs, ms = info.lba_size, info.ms
    checks = 0 if not info.pi else (7 if info.pi != 3 else 6)
    if info.extended:
        comp, buf, _m = drv.io_md(READ, nsid, slba, nlb, data_len=nlb * (lbs + ms), prinfo=checks, ref=slba)
        assert comp.ok, hex(comp.status)
        return b"".join(buf[i * (lbs + ms):i * (lbs + ms) + lbs] for i in range(nlb))
    comp, data, _m = drv.io_md(READ, nsid, slba, nlb, data_len=nlb * lbs, meta_len=nlb * ms, prinfo=checks,
                               ref=slba)
    assert comp.ok, hex(comp.status)
    return data


# -- SANICAP ------------------------------------------------------------------------------------
def _sanitize_finished(drv: NvmeDriver) -> dict[str, int]:
    _wait(lambda: drv.sanitize_log()["sstat"] & 7 != 2, what="sanitize")
    return drv.sanitize_log()


def _sanicap(env: Env) -> None:
    """CES (0) / BES (1) / OWS (2): each advertised action sanitizes every namespace (they
    read zeroes afterwards, with every PI check passing); an unadvertised or reserved one
    is refused with Invalid Field (and every action while the Persistent Memory Region is
    enabled, with Sanitize Prohibited While PMR is Enabled). NDI (29) clear: No-Deallocate After Sanitize is
    accepted. NODMMAS (31:30) = 01b: the media is not modified after such a sanitize (it
    reads what the operation wrote, and stays so) and the log reports no
    "with No-Deallocate Media Modification" times."""
    drv = env.drv
    sanicap = _u32(_idc(drv), 328)
    if not sanicap & 7:  # no Sanitize (a secondary controller): the opcode is not there
        assert drv.admin(SANITIZE, cdw10=2, check=False).code == Status.INVALID_OPCODE
        return
    for sanact in (0, 5, 6, 7):  # reserved
        assert drv.sanitize(sanact, check=False).code == Status.INVALID_FIELD, sanact
    if drv.read64(0) >> 56 & 1:  # CAP.PMRS: no sanitize while the PMR is enabled
        drv.write32(0xE04, 1)  # PMRCTL.EN
        assert drv.sanitize(2, check=False).code == Status.PMR_SAN_PROHIBITED
        drv.write32(0xE04, 0)
    bs = drv.lba_size(1)
    for bit, sanact in ((1, 2), (2, 3), (0, 4)):  # BES block erase, OWS overwrite, CES crypto erase
        if not sanicap >> bit & 1:
            assert drv.sanitize(sanact, check=False).code == Status.INVALID_FIELD, sanact
            continue
        drv.write(1, 0, b"\x5a" * bs)
        drv.sanitize(sanact, owpass=1, ovrpat=0x0BADCAFE)
        log = _sanitize_finished(drv)
        assert log["sstat"] & 7 == 1 and log["sstat"] >> 8 & 1, log  # success, Global Data Erased
        for nsid in drv.namespaces:  # every namespace, and its PI (a deallocated block: no checks)
            assert pi_read_ok(drv, nsid, 0, 1) == bytes(drv.lba_size(nsid)), (sanact, nsid)
    ndi, nodmmas = sanicap >> 29 & 1, sanicap >> 30 & 3
    assert nodmmas != 3, "NODMMAS 11b is reserved"
    if ndi:
        assert drv.sanitize(3, owpass=1, ndas=True, check=False).code == Status.INVALID_FIELD
        return
    drv.write(1, 0, b"\x5a" * bs)
    drv.sanitize(3, owpass=1, ovrpat=0x11223344, ndas=True)  # overwrite, no deallocation
    log = _sanitize_finished(drv)
    assert log["sstat"] & 7 == 1, log
    pattern = struct.pack("<I", 0x11223344) * (bs // 4)
    assert drv.read(1, 0, 1) == pattern  # what the last pass wrote, still allocated
    if nodmmas == 1:  # not additionally modified after the operation completed
        time.sleep(0.05)
        assert drv.read(1, 0, 1) == pattern
        assert (log["etond"], log["etbend"], log["etcend"]) == (0xFFFFFFFF,) * 3, log


# -- FNA, FUSES -------------------------------------------------------------------------------------------
def _fna(env: Env) -> None:
    """FNA bit 0 (format of all namespaces) clear: formatting namespace 1 leaves the others'
    format alone; bit 1 (secure erase of all namespaces) clear: a user data erase (SES 1)
    of namespace 1 erases it alone; bit 2 clear: a cryptographic erase (SES 2) is refused
    with Invalid Field."""
    drv = env.drv
    idc = _idc(drv)
    if not _u16(idc, 256) >> 1 & 1:  # no Format NVM (a secondary controller)
        assert drv.admin(0x80, nsid=1, check=False).code == Status.INVALID_OPCODE
        return
    fna = idc[524]
    bs = drv.lba_size(1)
    others = sorted(n for n in drv.namespaces if n != 1)
    flbas = {n: drv.identify(0x00, nsid=n)[26] for n in others}
    kept = {}
    for n in others:
        lbs = drv.lba_size(n)
        data = os.urandom(lbs)
        info = drv.namespaces[n]
        if info.extended and info.ms:
            host = data if info.pi and info.ms in (8, 16) else data + bytes(info.ms)
            assert drv.io_md(WRITE, n, 100, 1, data=host, prinfo=8 if info.pi else 0, ref=100)[0].ok
        else:
            assert drv.io_md(WRITE, n, 100, 1, data=data, meta=bytes(info.ms), prinfo=8 if info.pi else 0,
                             ref=100)[0].ok
        kept[n] = pi_read_ok(drv, n, 100, 1)
    comp = drv.admin(0x80, nsid=1, cdw10=2 << 9, check=False)
    assert (comp.code == Status.INVALID_FIELD) == (not fna >> 2 & 1), hex(comp.status)
    drv.write(1, 0, b"\x61" * bs)
    drv.admin(0x80, nsid=1, cdw10=1 | 1 << 9)  # LBA format 1, user data erase
    drv.scan_namespaces()
    assert drv.read(1, 0, 1) == bytes(4096)
    drv.admin(0x80, nsid=1, cdw10=0)
    drv.scan_namespaces()
    if not fna & 1:
        assert {n: drv.identify(0x00, nsid=n)[26] for n in others} == flbas
    if not fna >> 1 & 1:
        assert {n: pi_read_ok(drv, n, 100, 1) for n in others} == kept


def _fuses(env: Env) -> None:
    """FUSES bit 0 (Compare and Write) clear: a fused Compare or Write, and a fused admin
    command, are refused with Invalid Field."""
    drv = env.drv
    fuses = _u16(_idc(drv), 522)
    assert fuses & ~1 == 0
    if fuses & 1:
        raise AssertionError("FUSES bit 0 set: exercise Compare and Write here")
    bs = drv.lba_size(1)
    buf = drv.machine.alloc(PAGE, PAGE)
    try:
        for op, fuse in ((COMPARE, 1), (WRITE, 2)):
            comp = drv.io(1, op, nsid=1, flags=fuse, buf=buf, length=bs, check=False)
            assert comp.code == Status.INVALID_FIELD, (op, hex(comp.status))
    finally:
        drv.machine.free(buf)
    assert drv.admin(0x06, cdw10=1, length=4096, flags=1, check=False).code == Status.INVALID_FIELD


# -- DSTO, EDSTT --------------------------------------------------------------------------------
def _self_test_running(drv: NvmeDriver) -> bool:
    return drv.self_test_log()[0] & 0xF != 0


def _dsto(env: Env) -> None:
    """DSTO bit 0: one self-test in the NVM subsystem at a time (a second one on this
    controller, for another namespace, or on another controller of the subsystem, is
    refused with Device Self-test In Progress); clear: one per controller (another
    controller of the subsystem may run its own meanwhile)."""
    drv = env.drv
    idc = _idc(drv)
    if not _u16(idc, 256) >> 4 & 1:
        return  # (no Device Self-test: the opcode walk checks it is refused)
    dsto = idc[318]
    drv.device_self_test(1, nsid=0xFFFFFFFF)  # short: 2 s
    try:
        assert drv.device_self_test(1, check=False).code == Status.SELF_TEST_IN_PROGRESS
        assert drv.device_self_test(2, nsid=1, check=False).code == Status.SELF_TEST_IN_PROGRESS
        primary = getattr(env, "primary_drv", None)
        if primary is not None:  # another controller of the subsystem
            other = primary.device_self_test(1, nsid=0, check=False)
            if dsto & 1:
                assert other.code == Status.SELF_TEST_IN_PROGRESS, "DSTO: one self-test in the subsystem"
            else:
                assert other.ok, hex(other.status)
                primary.device_self_test(0xF)
    finally:
        drv.device_self_test(0xF)  # abort
    assert not _self_test_running(drv)


def _edstt(env: Env) -> None:
    """EDSTT: an extended self-test of every namespace completes (result 0h) within EDSTT
    minutes (the controller's durations scaled by its self-test time scale)."""
    drv = env.drv
    idc = _idc(drv)
    if not _u16(idc, 256) >> 4 & 1:
        return
    edstt = _u16(idc, 316)
    assert edstt >= 1
    st = drv.device.selftest
    st.time_scale = 1.0 / (edstt * 60)  # EDSTT minutes are a second
    start = time.monotonic()
    drv.device_self_test(2, nsid=0xFFFFFFFF)
    _wait(lambda: not _self_test_running(drv), timeout=edstt * 60 * st.time_scale + 10, what="extended self-test")
    took = time.monotonic() - start
    assert took <= edstt * 60 * st.time_scale + 1.5, (took, edstt)  # (slack for a loaded machine)
    entry = drv.self_test_log()[4:32]
    assert entry[0] == (2 << 4) | 0, entry.hex()  # extended, completed without error


# -- MDTS -----------------------------------------------------------------------------------------
def _mdts(env: Env) -> None:
    """MDTS: a Read, a Write and a Get Log Page of exactly MDTS (in CAP.MPSMIN pages) work;
    one page more is refused with Invalid Field."""
    drv = env.drv
    mdts = _idc(drv)[77]
    if not mdts:
        return
    limit = (PAGE << (drv.read64(0) >> 48 & 0xF)) << mdts
    bs = drv.lba_size(1)
    nlb = limit // bs
    buf = drv.machine.alloc(limit + PAGE, PAGE)
    try:
        data = os.urandom(limit)
        drv.mem.write(buf, data)
        drv.io(1, WRITE, nsid=1, cdw12=nlb - 1, buf=buf, length=limit)
        drv.mem.write(buf, bytes(limit))
        drv.io(1, READ, nsid=1, cdw12=nlb - 1, buf=buf, length=limit)
        assert drv.mem.read(buf, limit) == data
        more = nlb + PAGE // bs
        for op in (READ, WRITE):
            comp = drv.io(1, op, nsid=1, cdw12=more - 1, buf=buf, length=limit + PAGE, check=False)
            assert comp.code == Status.INVALID_FIELD, (op, hex(comp.status))
        for length, ok in ((limit, True), (limit + PAGE, False)):  # an admin command's transfer too
            numd = length // 4 - 1
            comp = drv.admin(0x02, nsid=0xFFFFFFFF, cdw10=(numd & 0xFFFF) << 16 | 0x05, cdw11=numd >> 16,
                             buf=buf, length=length, check=False)
            assert comp.ok if ok else comp.code == Status.INVALID_FIELD, (length, hex(comp.status))
    finally:
        drv.machine.free(buf)


# -- Copy limits ----------------------------------------------------------------------------------
def _copy(drv: NvmeDriver, ranges: list[tuple[int, int]], sdlba: int) -> int:
    """Copy (format 0) of ``ranges`` ((slba, nlb) each) to ``sdlba``; returns the status."""
    blob = b"".join(struct.pack("<8xQH14x", slba, nlb - 1) for slba, nlb in ranges)
    buf = drv.machine.alloc(max(len(blob), PAGE), PAGE)
    try:
        drv.mem.write(buf, blob)
        comp = drv.io(1, COPY, nsid=1, cdw10=sdlba, cdw12=len(ranges) - 1, buf=buf, length=len(blob),
                      check=False)
        return comp.code
    finally:
        drv.machine.free(buf)


def _copy_limits(env: Env) -> None:
    """MSSRL / MCL / MSRC (Identify Namespace): a source range of MSSRL blocks, MCL blocks
    in all and MSRC+1 ranges each work (the data arrives); one block or range more is
    refused with Command Size Limit Exceeded."""
    drv = env.drv
    if not _u16(_idc(drv), 520) >> 8 & 1:
        return
    idns = drv.identify(0x00, nsid=1)
    mssrl, mcl, msrc = _u16(idns, 74), _u32(idns, 76), idns[80]
    assert mssrl and mcl and mssrl <= mcl
    bs = drv.lba_size(1)
    src = os.urandom(mcl * bs)
    for off in range(0, mcl, 256):
        drv.write(1, off, src[off * bs:(off + min(256, mcl - off)) * bs])
    dst = 8192
    assert _copy(drv, [(0, mssrl)], dst) == 0
    assert drv.read(1, dst, mssrl) == src[:mssrl * bs]
    assert _copy(drv, [(0, mssrl + 1)], dst) == Status.CMD_SIZE_LIMIT_EXCEEDED
    full = [(s, min(mssrl, mcl - s)) for s in range(0, mcl, mssrl)]
    if len(full) <= msrc + 1:
        assert _copy(drv, full, dst) == 0
        assert drv.read(1, dst, mcl) == src
        if len(full) <= msrc:
            assert _copy(drv, [*full, (mcl, 1)], dst) == Status.CMD_SIZE_LIMIT_EXCEEDED
    ones = [(i, 1) for i in range(msrc + 1)]
    assert _copy(drv, ones, dst) == 0
    assert drv.read(1, dst, msrc + 1) == src[:(msrc + 1) * bs]
    if msrc < 255:
        assert _copy(drv, [*ones, (msrc + 1, 1)], dst) == Status.CMD_SIZE_LIMIT_EXCEEDED


# -- DMRL / DMRSL / DMSL, WZSL, VSL (Identify Controller, CNS 06h CSI 0) --------------------------------
def _dsm(drv: NvmeDriver, ranges: list[tuple[int, int]]) -> int:
    blob = b"".join(struct.pack("<IIQ", 0, nlb, slba) for slba, nlb in ranges)
    buf = drv.machine.alloc(max(len(blob), PAGE), PAGE)
    try:
        drv.mem.write(buf, blob)
        return drv.io(1, DSM, nsid=1, cdw10=len(ranges) - 1, cdw11=1 << 2, buf=buf, length=len(blob),
                      check=False).code
    finally:
        drv.machine.free(buf)


def _dataset_management_limits(env: Env) -> None:
    """DMRL / DMRSL / DMSL: Dataset Management (deallocate) with DMRL ranges (0: the
    command's 256), a range of DMRSL blocks (0: the whole namespace) and DMSL blocks in all
    (0: the whole namespace) works and deallocates; one more is refused (Invalid Field)."""
    drv = env.drv
    if not _u16(_idc(drv), 520) >> 2 & 1:
        return
    nvm = drv.identify(0x06, csi=0)
    dmrl, dmrsl, dmsl = nvm[3], _u32(nvm, 4), _u64(nvm, 8)
    bs = drv.lba_size(1)
    nsze = drv.namespaces[1].nsze
    nranges = dmrl or 256
    drv.write(1, 0, b"\x77" * bs * nranges)
    assert _dsm(drv, [(i, 1) for i in range(nranges)]) == 0
    assert drv.read(1, 0, nranges) == bytes(bs * nranges)
    if dmrl and dmrl < 256:
        assert _dsm(drv, [(i, 1) for i in range(dmrl + 1)]) == Status.INVALID_FIELD
    size = min(dmrsl or nsze, nsze)
    drv.write(1, size - 1, b"\x77" * bs)
    assert _dsm(drv, [(0, size)]) == 0
    assert drv.read(1, size - 1, 1) == bytes(bs)
    if dmrsl and dmrsl < nsze:
        assert _dsm(drv, [(0, dmrsl + 1)]) == Status.INVALID_FIELD
    total = min(dmsl or nsze, nsze)
    half = total // 2
    assert _dsm(drv, [(0, half), (half, total - half)]) == 0
    if dmsl and dmsl < nsze:
        assert _dsm(drv, [(0, half), (half, total - half + 1)]) == Status.INVALID_FIELD


def _size_limit(drv: NvmeDriver, value: int) -> int | None:
    """A WZSL / VSL value in logical blocks of namespace 1 (None: no limit)."""
    if not value:
        return None
    return ((PAGE << (drv.read64(0) >> 48 & 0xF)) << value) // drv.lba_size(1)


def _wzsl(env: Env) -> None:
    """WZSL: a Write Zeroes of the limit (0: of the whole namespace, up to the command's
    65536 blocks) works and zeroes; one block more is refused with Invalid Field."""
    drv = env.drv
    if not _u16(_idc(drv), 520) >> 3 & 1:
        return
    limit = _size_limit(drv, drv.identify(0x06, csi=0)[1])
    nlb = min(limit or 65536, drv.namespaces[1].nsze)
    bs = drv.lba_size(1)
    drv.write(1, nlb - 1, b"\x33" * bs)
    drv.io(1, WRITE_ZEROES, nsid=1, cdw12=nlb - 1)
    assert drv.read(1, nlb - 1, 1) == bytes(bs)
    if limit is not None and limit < drv.namespaces[1].nsze:
        assert drv.io(1, WRITE_ZEROES, nsid=1, cdw12=limit, check=False).code == Status.INVALID_FIELD


def _vsl(env: Env) -> None:
    """VSL: a Verify of the limit (0: of the whole namespace, up to 65536 blocks) works; one
    block more is refused with Invalid Field."""
    drv = env.drv
    if not _u16(_idc(drv), 520) >> 7 & 1:
        return
    limit = _size_limit(drv, drv.identify(0x06, csi=0)[0])
    nlb = min(limit or 65536, drv.namespaces[1].nsze)
    drv.io(1, VERIFY, nsid=1, cdw12=nlb - 1)
    if limit is not None and limit < drv.namespaces[1].nsze:
        assert drv.io(1, VERIFY, nsid=1, cdw12=limit, check=False).code == Status.INVALID_FIELD


# -- ONCS bit 4: Save and Select ------------------------------------------------------------------------------
def _save_select(env: Env) -> None:
    """ONCS bit 4: for every feature of the Feature Identifiers Supported log, Get Features
    SEL=11b (supported capabilities) agrees with what Set Features does: a saveable one
    takes SV and returns it as the saved value (SEL=10b), another refuses SV with Feature
    Identifier Not Saveable and its saved value is the default; a changeable one takes its
    current value back; a namespace-specific one answers per namespace."""
    drv = env.drv
    if not _u16(_idc(drv), 520) >> 4 & 1:
        assert drv.admin(0x0A, cdw10=3 << 8 | 0x06, check=False).code == Status.INVALID_FIELD
        return
    log = drv.get_log(0x12, 1024)
    fids = [fid for fid in range(256) if _u32(log, 4 * fid) & 1]
    assert fids
    for fid in fids:
        # a feature of endurance-group scope (FSP bit 23) names its group in CDW11 15:0
        group = 1 if _u32(log, 4 * fid) >> 23 & 1 else 0
        caps = drv.get_features(fid, sel=3, nsid=1, cdw11=group).dw0
        assert caps & ~7 == 0, (fid, caps)
        nsid = 1 if caps & 2 else 0
        assert bool(_u32(log, 4 * fid) >> 20 & 1) == bool(caps & 2), f"feature {fid:#x}: scope vs SEL=11b"
        length = {0x0E: 8, 0x16: 512}.get(fid, 0)
        cur = drv.get_features(fid, nsid=nsid, length=length, cdw11=group)
        dflt = drv.get_features(fid, sel=1, nsid=nsid, length=length, cdw11=group)
        saved = drv.get_features(fid, sel=2, nsid=nsid, length=length, cdw11=group)
        value = cur.dw0
        if fid == 0x07:  # Number of Queues: DW0 is the allocation, CDW11 the request
            value = (drv.io_queue_count - 1) << 16 | (drv.io_queue_count - 1)
        data = cur.tag if length else None
        if fid == 0x0E:
            data = (int.from_bytes(cur.tag[:6], "little")).to_bytes(8, "little")
        comp = drv.admin(0x09, nsid=nsid, cdw10=1 << 31 | fid, cdw11=value, data=data, check=False)
        if caps & 1:
            assert comp.ok, f"feature {fid:#x} saveable but SV refused: {comp.status:#x}"
            assert drv.get_features(fid, sel=2, nsid=nsid, length=length, cdw11=group).dw0 == cur.dw0
        else:
            assert comp.code == Status.FEATURE_NOT_SAVEABLE, f"feature {fid:#x}: {comp.status:#x}"
            assert (saved.dw0, saved.tag) == (dflt.dw0, dflt.tag), f"feature {fid:#x}: saved != default"
        comp = drv.admin(0x09, nsid=nsid, cdw10=fid, cdw11=value, data=data, check=False)
        if fid == 0x07:  # Number of Queues: changeable, but not once I/O queues exist
            assert comp.code == Status.CMD_SEQ_ERROR, f"feature 07h after the queues: {comp.status:#x}"
        elif caps & 4:
            assert comp.ok, f"feature {fid:#x} changeable but Set refused: {comp.status:#x}"
        else:
            assert comp.code == Status.FEATURE_NOT_CHANGEABLE, f"feature {fid:#x}: {comp.status:#x}"


# -- AERL, ELPE, NPSS, KAS ------------------------------------------------------------------------------------
def _aerl(env: Env) -> None:
    """AERL: AERL+1 Asynchronous Event Requests stay outstanding; one more completes at
    once with Asynchronous Event Request Limit Exceeded."""
    drv = env.drv
    aerl = _idc(drv)[259]
    drv.aer_auto_rearm = False
    for _ in range(aerl + 1):
        drv.arm_aer()
    time.sleep(0.02)
    assert drv.poll(0) == [], "an AER within the limit completed"
    comp = drv.admin(AER, check=False)
    assert comp.code == Status.AER_LIMIT, hex(comp.status)
    assert drv.poll(0) == []


def _elpe(env: Env) -> None:
    """ELPE: the Error Information log keeps ELPE+1 entries, the newest first (error
    counts descending by one); entries past them read as zero."""
    drv = env.drv
    entries = _idc(drv)[262] + 1
    for _ in range(entries + 2):
        assert drv.admin(0x7F, check=False).code == Status.INVALID_OPCODE
    page = drv.get_log(0x01, 64 * (entries + 1))
    counts = [_u64(page, 64 * i) for i in range(entries + 1)]
    newest = counts[0]
    assert newest >= entries + 2
    assert counts[:entries] == list(range(newest, newest - entries, -1)), counts
    assert page[64 * entries:] == bytes(64)


def _npss(env: Env) -> None:
    """NPSS: power states 0..NPSS are selectable (Power Management, feature 02h) and
    described; NPSS+1 is refused with Invalid Field."""
    drv = env.drv
    idc = _idc(drv)
    npss = idc[263]
    for ps in range(npss + 1):
        assert _u16(idc, 2048 + 32 * ps) != 0 or idc[2048 + 32 * ps + 3] & 1, f"power state {ps} undescribed"
        drv.set_features(0x02, ps)
        assert drv.get_features(0x02).dw0 & 0x1F == ps
    assert drv.admin(0x09, cdw10=0x02, cdw11=npss + 1, check=False).code == Status.INVALID_FIELD
    assert idc[2048 + 32 * (npss + 1):2048 + 32 * (npss + 2)] == bytes(32)
    drv.set_features(0x02, 0)


def _kas(env: Env) -> None:
    """KAS: the Keep Alive Timer (feature 0Fh) is kept in KAS units of 100 ms (a value in
    between is rounded up), and Keep Alive (18h) works; 0 disables it. With KATO set, Keep
    Alive commands within it keep the controller up; without them it fails (CSTS.CFS, an
    Error Information entry Keep Alive Timer Expired) soon after KATO."""
    drv = env.drv
    kas = _u16(_idc(drv), 320)
    if not kas:
        assert drv.admin(0x18, check=False).code == Status.INVALID_OPCODE
        return
    unit = 100 * kas
    drv.set_features(0x0F, 3 * unit)
    assert drv.get_features(0x0F).dw0 == 3 * unit
    drv.set_features(0x0F, 3 * unit + 1)
    assert drv.get_features(0x0F).dw0 == 4 * unit
    drv.admin(0x18)
    drv.set_features(0x0F, 0)
    assert drv.get_features(0x0F).dw0 == 0
    # the timer runs: Keep Alive within KATO keeps the controller up, silence fails it
    kato = 5 * unit
    drv.set_features(0x0F, kato)
    for _ in range(4):
        time.sleep(unit / 2000)
        drv.admin(0x18)
    assert not drv.csts & 2, "failed although Keep Alive came within KATO"
    before = drv.device.error_log.count
    _wait(lambda: bool(drv.csts & 2), timeout=kato / 1000 + 2 * unit / 1000 + 1.0, what="keep alive expiry")
    entry = drv.device.error_log.entries()[0]
    assert drv.device.error_log.count == before + 1 and entry["status"] & 0x7FF == Status.KA_TIMEOUT_EXPIRED
    drv.restart()
    assert drv.get_features(0x0F).dw0 == 0  # (a controller reset: the default, off)


# -- SQES / CQES, MAXCMD, NN / MNAN, CMIC / NMIC ------------------------------------------------------------
def _enable_raw(drv: NvmeDriver, cc: int) -> int:
    """Set the admin queues up and write ``cc`` (EN set); returns CSTS once RDY or CFS is set."""
    drv.disable()
    admin = IoQueue(drv, 0, drv.admin_depth, drv.admin_depth, 0)
    drv.queues[0] = admin
    drv.write32(0x24, (drv.admin_depth - 1) << 16 | (drv.admin_depth - 1))  # AQA
    for off, addr in ((0x28, admin.sq_base), (0x30, admin.cq_base)):  # ASQ, ACQ
        drv.write32(off, addr & 0xFFFFFFFF)
        drv.write32(off + 4, addr >> 32)
    drv.write32(0x14, cc | 1)
    _wait(lambda: bool(drv.csts & 3), timeout=5.0, what="CSTS.RDY or CFS")
    return drv.csts


def _sqes_cqes(env: Env) -> None:
    """SQES / CQES: CC.IOSQES and CC.IOCQES in the advertised ranges work (every queue of
    the driver uses them); a value outside leaves no usable I/O queue: the enable fails
    (CSTS.CFS) or Create I/O Submission / Completion Queue is refused (Invalid Queue Size)."""
    drv = env.drv
    idc = _idc(drv)
    sqes, cqes = idc[512], idc[513]
    assert (sqes & 0xF, sqes >> 4, cqes & 0xF, cqes >> 4) == (6, 6, 4, 4)  # (the driver's 64 and 16 bytes)
    good = drv.read32(0x14) & ~1
    try:
        for shift, lo, hi in ((16, sqes & 0xF, sqes >> 4), (20, cqes & 0xF, cqes >> 4)):
            for bad in (lo - 1, hi + 1):
                csts = _enable_raw(drv, (good & ~(0xF << shift)) | bad << shift)
                if csts & 2:
                    continue  # refused at enable
                assert drv.admin(0x06, cdw10=1, length=4096).ok  # (the admin queue works)
                try:
                    drv.create_io_queue_pair(1, 16)
                except NvmeDriverError as exc:
                    assert _code(exc) == Status.QUEUE_SIZE, (shift, bad)
                else:
                    raise AssertionError(f"an I/O queue was created with CC bits {shift}+ = {bad}")
    finally:
        drv.restart()
    bs = drv.lba_size(1)
    drv.write(1, 6, b"\x44" * bs)
    assert drv.read(1, 6, 1) == b"\x44" * bs


def _maxcmd(env: Env) -> None:
    """MAXCMD 0 (not reported on PCIe: no limit beyond the queues): a full I/O submission
    queue's worth of commands outstanding at once all complete."""
    drv = env.drv
    assert _u16(_idc(drv), 514) == 0
    q = drv.queues[1]
    n = min(q.sq_size - 1, 128)
    buf = drv.machine.alloc(PAGE, PAGE)
    try:
        for i in range(n):
            drv.submit_rw(1, READ, nsid=1, slba=i, nlb=1, buf=buf, ring=False)
        drv.ring(1)
        got = drv.reap(1, min_completions=n)
        assert len(got) == n and all(c.ok for c in got)
    finally:
        drv.machine.free(buf)


def _nn_mnan(env: Env) -> None:
    """NN: NSIDs 1..NN are valid (Identify Namespace of an unused one is zeroes), NN+1 is
    refused with Invalid Namespace; Namespace Management gives a new namespace an NSID up
    to NN. MNAN 0: no other limit."""
    drv = env.drv
    idc = _idc(drv)
    nn, mnan = _u32(idc, 516), _u32(idc, 540)
    assert nn >= max(drv.namespaces) and mnan <= nn
    unused = max(n for n in range(1, nn + 1) if n not in drv.namespaces)
    assert drv.identify(0x00, nsid=unused) == bytes(4096)
    comp = drv.admin(0x06, nsid=nn + 1, cdw10=0x00, length=4096, check=False)
    assert comp.code == Status.INVALID_NSID, hex(comp.status)
    assert all(n <= nn for n in struct.unpack("<1024I", drv.identify(0x02)) if n)
    if _u16(idc, 256) >> 3 & 1:  # Namespace Management
        data = struct.pack("<QQ", 256, 256).ljust(4096, b"\0")
        nsid = drv.admin(NS_MGMT, cdw10=0, data=data).dw0
        try:
            assert 1 <= nsid <= nn and nsid not in drv.namespaces
        finally:
            drv.admin(NS_MGMT, nsid=nsid, cdw10=1)


def _cmic_nmic(env: Env) -> None:
    """CMIC bit 1 is set exactly when the subsystem has two or more controllers, and the
    controller list (CNS 13h) names exactly the controllers there are; bit 2 exactly on an
    SR-IOV virtual function; NMIC bit 0 of each namespace only in a subsystem of two or
    more controllers."""
    drv = env.drv
    idc = _idc(drv)
    cmic = idc[76]
    present = controllers_present(env)
    ids = drv.identify(0x13)
    listed = set(struct.unpack_from(f"<{_u16(ids, 0)}H", ids, 2))
    assert len(listed) == present, (listed, present)
    assert _u16(idc, 78) in listed
    assert bool(cmic >> 1 & 1) == (present >= 2)
    assert bool(cmic >> 2 & 1) == isinstance(drv.device, NvmeVirtualFunction)
    assert cmic & ~7 == 0 and not cmic & 1  # one port
    for nsid in drv.namespaces:
        nmic = drv.identify(0x00, nsid=nsid)[30]
        assert not nmic & 1 or present >= 2, nsid


# -- CAP -----------------------------------------------------------------------------------------------
def _mqes(env: Env) -> None:
    """CAP.MQES: an I/O queue pair of MQES+1 entries works; MQES+2 is refused (Invalid
    Queue Size)."""
    drv = env.drv
    mqes = drv.read64(0) & 0xFFFF
    drv.delete_io_queue_pair(1)
    try:
        drv.create_io_queue_pair(1, mqes + 1)
        bs = drv.lba_size(1)
        drv.write(1, 3, b"\x21" * bs)
        assert drv.read(1, 3, 1) == b"\x21" * bs
        drv.delete_io_queue_pair(1)
        if mqes < 0xFFFF:
            try:
                drv.create_io_queue_pair(1, mqes + 2)
            except NvmeDriverError as exc:
                assert _code(exc) == Status.QUEUE_SIZE
            else:
                raise AssertionError("a queue of MQES+2 entries was created")
    finally:
        if 1 in drv.queues:
            drv.delete_io_queue_pair(1)
        drv.create_io_queue_pair(1, drv.io_depth)


def _dstrd(env: Env) -> None:
    """CAP.DSTRD: SQ y's tail doorbell is at 1000h + 2y * (4 << DSTRD), its CQ's head
    doorbell one stride on: a command rung there completes."""
    drv = env.drv
    stride = 4 << (drv.read64(0) >> 32 & 0xF)
    q = drv.queues[1]
    assert (q.sq_db, q.cq_db) == (0x1000 + 2 * stride, 0x1000 + 3 * stride)
    buf = drv.machine.alloc(PAGE, PAGE)
    try:
        cid = drv.submit_rw(1, READ, nsid=1, slba=0, nlb=1, buf=buf, ring=False)
        drv.write32(0x1000 + 2 * 1 * stride, q.sq_tail)
        q.rung_tail = q.sq_tail
        assert drv.wait_for(1, cid).ok
    finally:
        drv.machine.free(buf)


def _to(env: Env) -> None:
    """CAP.TO: CSTS.RDY follows CC.EN within TO (500 ms units), both ways."""
    drv = env.drv
    to = (drv.read64(0) >> 24 & 0xFF) * 0.5
    assert to > 0
    start = time.monotonic()
    drv.disable()
    assert time.monotonic() - start <= to
    start = time.monotonic()
    drv.enable()
    assert time.monotonic() - start <= to
    drv.restart()


def _mps(env: Env) -> None:
    """CAP.MPSMIN / MPSMAX: CC.MPS = MPSMIN works; below or above the range the enable
    fails (CSTS.CFS)."""
    drv = env.drv
    cap = drv.read64(0)
    mpsmin, mpsmax = cap >> 48 & 0xF, cap >> 52 & 0xF
    try:
        for bad in (mpsmax + 1, mpsmin - 1):
            if not 0 <= bad <= 0xF:
                continue
            drv.disable()
            try:
                drv.enable(mps=bad)
            except NvmeDriverError:
                assert drv.csts & 2, "the enable failed without CSTS.CFS"
            else:
                raise AssertionError(f"CC.MPS {bad} outside {mpsmin}..{mpsmax} was accepted")
        drv.disable()
        drv.enable(mps=mpsmin)
    finally:
        drv.restart()
    bs = drv.lba_size(1)
    drv.write(1, 5, b"\x19" * bs)
    assert drv.read(1, 5, 1) == b"\x19" * bs


def _css(env: Env) -> None:
    """CAP.CSS: CC.CSS = 000b works when bit 0 (NVM) is set, 110b when bit 6 (I/O command
    sets), 111b when bit 7 (admin only); the other values fail the enable (CSTS.CFS)."""
    drv = env.drv
    css = drv.read64(0) >> 37 & 0xFF
    try:
        for value in range(8):
            supported = {0: css & 1, 6: css >> 6 & 1, 7: css >> 7 & 1}.get(value, 0)
            drv.disable()
            try:
                drv.enable(css=value)
            except NvmeDriverError:
                assert not supported, f"CC.CSS {value:#05b} advertised but refused"
                assert drv.csts & 2
            else:
                assert supported, f"CC.CSS {value:#05b} not advertised but accepted"
    finally:
        drv.restart()


def _cqr(env: Env) -> None:
    """CAP.CQR: I/O queues must be physically contiguous: a Create I/O Completion or
    Submission Queue with PC clear is refused with Invalid Field."""
    drv = env.drv
    if not drv.read64(0) >> 16 & 1:
        return
    drv.delete_io_queue_pair(1)
    mem = drv.machine.alloc(2 * PAGE, PAGE)
    try:
        comp = drv.admin(0x05, prp1=mem, cdw10=15 << 16 | 1, cdw11=2, check=False)  # CQ 1, PC clear
        assert comp.code == Status.INVALID_FIELD, hex(comp.status)
        drv.admin(0x05, prp1=mem, cdw10=15 << 16 | 1, cdw11=1)  # CQ 1, contiguous, no interrupts
        comp = drv.admin(0x01, prp1=mem + PAGE, cdw10=15 << 16 | 1, cdw11=1 << 16, check=False)  # SQ 1, PC clear
        assert comp.code == Status.INVALID_FIELD, hex(comp.status)
        drv.admin(0x04, cdw10=1)
    finally:
        drv.machine.free(mem)
        drv.create_io_queue_pair(1, drv.io_depth)


def _ams(env: Env) -> None:
    """CAP.AMS: round robin always; weighted round robin (CC.AMS 001b) and vendor specific
    (111b) only when advertised, else the enable fails (CSTS.CFS)."""
    drv = env.drv
    ams = drv.read64(0) >> 17 & 3
    good = drv.read32(0x14) & ~1
    try:
        for value, bit in ((1, 0), (7, 1), (2, None), (3, None)):
            csts = _enable_raw(drv, (good & ~(7 << 11)) | value << 11)
            accepted = not csts & 2
            assert accepted == (bit is not None and bool(ams >> bit & 1)), (value, hex(csts))
    finally:
        drv.restart()


def _nssrs(env: Env) -> None:
    """CAP.NSSRS: an NVM Subsystem Reset resets every controller of the subsystem. On a
    secondary controller NSSRS is clear (NSSR is the primary's), and the primary's reset
    resets it too: CC cleared, not ready (its CSTS.NSSRO stays clear: the field is valid only
    with CAP.NSSRS); enabled again, its data is intact."""
    drv = env.drv
    primary = getattr(env, "primary_drv", None)
    nssrs = drv.read64(0) >> 36 & 1
    if primary is None:
        assert nssrs == (not isinstance(drv.device, NvmeVirtualFunction))
        return  # (the bit walk resets a controller of its own)
    assert not nssrs
    bs = drv.lba_size(1)
    data = os.urandom(4 * bs)
    drv.write(1, 20, data)
    drv.write32(0x20, 0x4E564D65)  # reserved here: ignored
    assert drv.csts & 1 and not drv.csts & 1 << 4
    primary.subsystem_reset()
    assert primary.csts & (1 << 4 | 1) == 1 << 4 and primary.read32(0x14) == 0, hex(primary.csts)
    assert drv.csts & (1 << 4 | 1) == 0 and drv.read32(0x14) == 0, hex(drv.csts)
    for d in (primary, drv):
        d.write32(0x1C, 1 << 4)
        d.restart()
    assert drv.read(1, 20, 4) == data and primary.read(1, 20, 4) == data


def _sgls_fields(env: Env) -> None:
    """SGLS bits 1:0 = 01b (no alignment or granularity requirement): an SGL Data Block at
    an odd address works; bit 18 clear (SGL length larger than the data not supported): an
    SGL longer, or shorter, than the transfer is refused with Data SGL Length Invalid."""
    drv = env.drv
    sgls = _u32(_idc(drv), 536)
    if sgls & 3 != 1:
        return
    bs = drv.lba_size(1)
    data = os.urandom(bs)
    drv.write(1, 7, data)
    buf = drv.machine.alloc(3 * PAGE, PAGE)
    try:
        assert drv.io(1, READ, nsid=1, cdw10=7, buf=buf + 1, length=bs, sgl=True).ok
        assert drv.mem.read(buf + 1, bs) == data
        longer = drv.io(1, READ, nsid=1, cdw10=7, buf=buf, length=2 * bs, sgl=True, check=False)
        assert longer.ok if sgls >> 18 & 1 else longer.code == Status.DATA_SGL_LEN_INVALID, hex(longer.status)
        shorter = drv.io(1, READ, nsid=1, cdw10=7, cdw12=1, buf=buf, length=bs, sgl=True, check=False)
        assert shorter.code == Status.DATA_SGL_LEN_INVALID, hex(shorter.status)
    finally:
        drv.machine.free(buf)


def _acl(env: Env) -> None:
    """ACL: ACL+1 Aborts may be outstanding; each completes at once here, so even ACL+3
    submitted in one doorbell write all complete (not aborted: nothing to abort) and the
    limit (Abort Command Limit Exceeded) is never hit."""
    drv = env.drv
    acl = _idc(drv)[258]
    cids = [drv.submit(0, 0x08, cdw10=(900 + i) << 16 | 1, ring=False) for i in range(acl + 3)]
    drv.ring(0)
    comps = [drv.wait_for(0, cid) for cid in cids]
    assert all(c.ok and c.dw0 & 1 for c in comps), [hex(c.status) for c in comps]


def _rtd3e(env: Env) -> None:
    """RTD3E: a normal shutdown (CC.SHN 01b) completes (CSTS.SHST 10b) within RTD3E
    microseconds; RTD3R 0 (not reported). The controller comes back when enabled again."""
    drv = env.drv
    rtd3r, rtd3e = struct.unpack_from("<II", _idc(drv), 84)
    assert rtd3r == 0 and rtd3e > 0
    bs = drv.lba_size(1)
    data = os.urandom(bs)
    drv.write(1, 9, data)
    start = time.monotonic()
    drv.shutdown()
    assert time.monotonic() - start <= rtd3e / 1e6
    drv.restart()
    assert drv.read(1, 9, 1) == data


def _unvmcap(env: Env) -> None:
    """TNVMCAP / UNVMCAP: the unallocated capacity is the total less what the namespaces
    take; a namespace created by Namespace Management takes its size from it, and gives
    it back when deleted."""
    drv = env.drv
    idc = _idc(drv)
    tnvmcap, unvmcap = (int.from_bytes(idc[o:o + 16], "little") for o in (280, 296))
    assert unvmcap <= tnvmcap
    if not _u16(idc, 256) >> 3 & 1:  # no Namespace Management (a secondary controller)
        return
    blocks = 2048
    nsid = drv.admin(NS_MGMT, cdw10=0, data=struct.pack("<QQ", blocks, blocks).ljust(4096, b"\0")).dw0
    try:
        after = int.from_bytes(_idc(drv)[296:312], "little")
        assert after == unvmcap - blocks * 512, (unvmcap, after)
    finally:
        drv.admin(NS_MGMT, nsid=nsid, cdw10=1)
    assert int.from_bytes(_idc(drv)[296:312], "little") == unvmcap


#: field -> exerciser (test_identify_truth.test_every_numeric_field_holds); extend at the end
NUMERIC_EXERCISERS: dict[str, NumericExerciser] = {
    "sanicap": _sanicap, "fna": _fna, "fuses": _fuses,
    "dsto": _dsto, "edstt": _edstt,
    "mdts": _mdts,
    "mssrl/mcl/msrc": _copy_limits,
    "dmrl/dmrsl/dmsl": _dataset_management_limits, "wzsl": _wzsl, "vsl": _vsl,
    "oncs.save": _save_select,
    "sgls.fields": _sgls_fields, "acl": _acl,
    "rtd3e": _rtd3e, "tnvmcap/unvmcap": _unvmcap,
    "aerl": _aerl, "elpe": _elpe, "npss": _npss, "kas": _kas,
    "sqes/cqes": _sqes_cqes, "maxcmd": _maxcmd, "nn/mnan": _nn_mnan, "cmic/nmic": _cmic_nmic,
    "cap.nssrs": _nssrs, "cap.mqes": _mqes, "cap.cqr": _cqr, "cap.ams": _ams, "cap.dstrd": _dstrd,
    "cap.to": _to, "cap.mps": _mps, "cap.css": _css,
}
