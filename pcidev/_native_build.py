# SPDX-License-Identifier: MIT
"""cffi build script for :mod:`pcidev._native` (API mode, compiled at install time).

``setup.py`` names this file in ``cffi_modules``, so ``pip install .`` and
``pip install -e .`` compile the extension. Running the file directly
(``python pcidev/_native_build.py``) compiles it in place, which is handy while
editing the C source.

The C functions take a base pointer (a ``ffi.from_buffer`` of the caller's buffer)
plus a byte offset; :mod:`pcidev.native` bounds- and alignment-checks every
argument before calling them, so none of them validates anything itself.
Multi-byte values are little-endian in memory whatever the host's byte order.

The two CRCs of NVMe end-to-end data protection (the Guard of protection information)
are table driven (slice-by-8); their tables are computed here at build time (:func:`crc_tables`)
and compiled in as constants:

* ``pcidev_crc16_t10dif``: CRC-16/T10-DIF (polynomial 0x8BB7, not reflected, initial
  value 0, no final XOR), the 16-bit Guard;
* ``pcidev_crc64_nvme``: CRC-64/NVME (polynomial 0xAD93D23594C93659, reflected, initial
  value and final XOR all ones), the 64-bit Guard. The function takes and returns the
  finished value (it inverts on entry and exit), so a CRC over two pieces is
  ``crc64(piece2, crc64(piece1, 0))``.
"""

from __future__ import annotations

from cffi import FFI

CDEF = """
uint32_t pcidev_load32(const uint8_t *base, size_t off);
uint64_t pcidev_load64(const uint8_t *base, size_t off);
void pcidev_store32(uint8_t *base, size_t off, uint32_t value);
void pcidev_store64(uint8_t *base, size_t off, uint64_t value);
void pcidev_fence(void);
void pcidev_memmove(uint8_t *dst, size_t dst_off, const uint8_t *src, size_t src_off, size_t n);
void pcidev_memset(uint8_t *dst, size_t off, int byte, size_t n);
uint16_t pcidev_crc16_t10dif(uint16_t crc, const uint8_t *buf, size_t n);
uint64_t pcidev_crc64_nvme(uint64_t crc, const uint8_t *buf, size_t n);
"""

#: CRC-16/T10-DIF generator polynomial (MSB first)
CRC16_T10DIF_POLY = 0x8BB7
#: CRC-64/NVME generator polynomial (normal form; the table uses its reflection)
CRC64_NVME_POLY = 0xAD93D23594C93659


def _reflect(value: int, bits: int) -> int:
    return int(f"{value:0{bits}b}"[::-1], 2)


def crc_tables() -> tuple[list[list[int]], list[list[int]]]:
    """Slice-by-8 tables of CRC-16/T10-DIF (MSB first) and CRC-64/NVME (reflected):
    ``t[0]`` is the classic byte table, ``t[k]`` the effect of a byte followed by ``k``
    zero bytes."""
    t16 = [[0] * 256 for _ in range(8)]
    for i in range(256):
        c = i << 8
        for _ in range(8):
            c = ((c << 1) ^ CRC16_T10DIF_POLY) if c & 0x8000 else c << 1
        t16[0][i] = c & 0xFFFF
    for k in range(1, 8):
        for i in range(256):
            v = t16[k - 1][i]
            t16[k][i] = ((v << 8) & 0xFFFF) ^ t16[0][v >> 8]
    rpoly = _reflect(CRC64_NVME_POLY, 64)
    t64 = [[0] * 256 for _ in range(8)]
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ rpoly if c & 1 else c >> 1
        t64[0][i] = c
    for k in range(1, 8):
        for i in range(256):
            v = t64[k - 1][i]
            t64[k][i] = (v >> 8) ^ t64[0][v & 0xFF]
    return t16, t64


def _rows(values: list[int], fmt: str, per: int) -> str:
    return ",\n    ".join(", ".join(fmt.format(v) for v in values[i:i + per]) for i in range(0, len(values), per))


def _crc_source() -> str:
    t16, t64 = crc_tables()
    tables16 = ",\n".join("  {" + _rows(t, "0x{:04x}", 8) + "}" for t in t16)
    tables64 = ",\n".join("  {" + _rows(t, "0x{:016x}ULL", 4) + "}" for t in t64)
    return f"""
static const uint16_t pcidev_crc16_table[8][256] = {{
{tables16}
}};

static const uint64_t pcidev_crc64_table[8][256] = {{
{tables64}
}};

/* CRC-16/T10-DIF over n bytes, continuing from crc (0 to start); slice-by-8. */
static uint16_t pcidev_crc16_t10dif(uint16_t crc, const uint8_t *buf, size_t n)
{{
    const uint16_t (*t)[256] = pcidev_crc16_table;
    while (n >= 8) {{
        crc = (uint16_t)(t[7][buf[0] ^ (crc >> 8)] ^ t[6][buf[1] ^ (crc & 0xff)] ^ t[5][buf[2]] ^
                         t[4][buf[3]] ^ t[3][buf[4]] ^ t[2][buf[5]] ^ t[1][buf[6]] ^ t[0][buf[7]]);
        buf += 8;
        n -= 8;
    }}
    while (n--)
        crc = (uint16_t)((crc << 8) ^ t[0][((crc >> 8) ^ *buf++) & 0xff]);
    return crc;
}}

/* CRC-64/NVME over n bytes, continuing from the finished value crc (0 to start); slice-by-8. */
static uint64_t pcidev_crc64_nvme(uint64_t crc, const uint8_t *buf, size_t n)
{{
    const uint64_t (*t)[256] = pcidev_crc64_table;
    crc = ~crc;
    while (n >= 8) {{
        uint64_t v = crc ^ ((uint64_t)buf[0] | (uint64_t)buf[1] << 8 | (uint64_t)buf[2] << 16 |
                            (uint64_t)buf[3] << 24 | (uint64_t)buf[4] << 32 | (uint64_t)buf[5] << 40 |
                            (uint64_t)buf[6] << 48 | (uint64_t)buf[7] << 56);
        crc = t[7][v & 0xff] ^ t[6][(v >> 8) & 0xff] ^ t[5][(v >> 16) & 0xff] ^ t[4][(v >> 24) & 0xff] ^
              t[3][(v >> 32) & 0xff] ^ t[2][(v >> 40) & 0xff] ^ t[1][(v >> 48) & 0xff] ^ t[0][v >> 56];
        buf += 8;
        n -= 8;
    }}
    while (n--)
        crc = (crc >> 8) ^ t[0][(crc ^ *buf++) & 0xff];
    return ~crc;
}}
"""

SOURCE = r"""
#include <stdint.h>
#include <string.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#  define PCIDEV_LE32(v) __builtin_bswap32(v)
#  define PCIDEV_LE64(v) __builtin_bswap64(v)
#else
#  define PCIDEV_LE32(v) (v)
#  define PCIDEV_LE64(v) (v)
#endif

/* One aligned load with acquire ordering: later loads and stores of this
   thread are not reordered before it. */
static uint32_t pcidev_load32(const uint8_t *base, size_t off)
{
    uint32_t v = __atomic_load_n((const uint32_t *)(base + off), __ATOMIC_ACQUIRE);
    return PCIDEV_LE32(v);
}

static uint64_t pcidev_load64(const uint8_t *base, size_t off)
{
    uint64_t v = __atomic_load_n((const uint64_t *)(base + off), __ATOMIC_ACQUIRE);
    return PCIDEV_LE64(v);
}

/* One aligned store with release ordering: earlier loads and stores of this
   thread are visible before it. */
static void pcidev_store32(uint8_t *base, size_t off, uint32_t value)
{
    __atomic_store_n((uint32_t *)(base + off), PCIDEV_LE32(value), __ATOMIC_RELEASE);
}

static void pcidev_store64(uint8_t *base, size_t off, uint64_t value)
{
    __atomic_store_n((uint64_t *)(base + off), PCIDEV_LE64(value), __ATOMIC_RELEASE);
}

static void pcidev_fence(void)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

static void pcidev_memmove(uint8_t *dst, size_t dst_off, const uint8_t *src,
                           size_t src_off, size_t n)
{
    memmove(dst + dst_off, src + src_off, n);
}

static void pcidev_memset(uint8_t *dst, size_t off, int byte, size_t n)
{
    memset(dst + off, byte, n);
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("pcidev._native", SOURCE + _crc_source(), extra_compile_args=["-O2"])

if __name__ == "__main__":  # pragma: no cover - developer convenience
    import pathlib

    ffibuilder.compile(tmpdir=str(pathlib.Path(__file__).resolve().parent.parent), verbose=True)
