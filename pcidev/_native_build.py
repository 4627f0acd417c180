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

``pcidev_msgpack_measure`` walks one msgpack value without building it and adds up an
estimate of what decoding it would allocate (the budget of a vmstate body,
:mod:`pcidev.vmstate.budget`); unlike the functions above it reads untrusted bytes, so it
checks every read against the buffer's length itself. :func:`pcidev.native.measure_msgpack`
documents the walk and its results; ``py_measure_msgpack`` there is the same walk in Python.
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
int pcidev_msgpack_measure(const uint8_t *buf, size_t len, const uint64_t *costs, uint64_t limit,
                           uint64_t *out);
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
/* ---- pcidev_msgpack_measure: see pcidev.native.measure_msgpack ----
   Walks one msgpack value in buf[0, len) without building it. costs[] holds the
   estimate's constants, indexed by the PCIDEV_MP_* kinds below; the estimate is charged
   value by value in stream order (a container's whole charge at its header, from its
   declared count) and the walk stops at the first problem. out[0] = the estimate so far,
   out[1] = the byte offset of the value being read when the walk stopped (len when the
   value ended; the offset of the first extra byte for trailing bytes). Every read is
   bounds-checked here: the bytes are untrusted. */
enum {
    PCIDEV_MP_INT, PCIDEV_MP_INT64, PCIDEV_MP_FLOAT,
    PCIDEV_MP_ASCII_BASE, PCIDEV_MP_ASCII_BYTE, PCIDEV_MP_STR_BASE, PCIDEV_MP_STR_BYTE,
    PCIDEV_MP_BIN_BASE, PCIDEV_MP_BIN_BYTE, PCIDEV_MP_EXT_BASE, PCIDEV_MP_EXT_BYTE,
    PCIDEV_MP_ARRAY_BASE, PCIDEV_MP_ARRAY_ITEM, PCIDEV_MP_MAP_BASE, PCIDEV_MP_MAP_ITEM,
};
/* results */
enum { PCIDEV_MP_OK, PCIDEV_MP_OVER, PCIDEV_MP_TRUNCATED, PCIDEV_MP_RESERVED, PCIDEV_MP_DEEP,
       PCIDEV_MP_TRAILING };
/* most non-empty containers open around a container (msgpack-python's own limit) */
#define PCIDEV_MP_DEPTH 1024

static int pcidev_mp_uint(const uint8_t *buf, size_t len, size_t *pos, unsigned width, uint64_t *n)
{
    uint64_t v = 0;
    unsigned i;
    if (len - *pos < width)
        return 0;
    for (i = 0; i < width; i++)
        v = (v << 8) | buf[*pos + i];
    *pos += width;
    *n = v;
    return 1;
}

static int pcidev_msgpack_measure(const uint8_t *buf, size_t len, const uint64_t *costs, uint64_t limit,
                                  uint64_t *out)
{
    uint64_t left[PCIDEV_MP_DEPTH + 1];   /* values still to read: [0] the root, [k] the k-th open container */
    unsigned level = 0;
    uint64_t cost = 0, n = 0;
    size_t pos = 0, start = 0, i;
    int status = PCIDEV_MP_OK;
    left[0] = 1;
    for (;;) {
        uint8_t b;
        while (level > 0 && left[level] == 0)
            level--;
        if (left[level] == 0)
            break;
        left[level]--;
        start = pos;
        if (pos >= len) { status = PCIDEV_MP_TRUNCATED; goto done; }
        b = buf[pos++];
        if (b <= 0x7f || b == 0xc0 || b == 0xc2 || b == 0xc3)   /* cached ints, nil, bools */
            continue;
        if (b >= 0xe0) {                                          /* negative fixint */
            cost += costs[PCIDEV_MP_INT];
        } else if (b <= 0x8f) {                                   /* fixmap */
            n = b & 0x0f;
            goto map;
        } else if (b <= 0x9f) {                                   /* fixarray */
            n = b & 0x0f;
            goto array;
        } else if (b <= 0xbf) {                                   /* fixstr */
            n = b & 0x1f;
            goto str;
        } else {
            switch (b) {
            case 0xc1:
                status = PCIDEV_MP_RESERVED;
                goto done;
            case 0xc4: case 0xc5: case 0xc6:                      /* bin 8/16/32 */
                if (!pcidev_mp_uint(buf, len, &pos, 1u << (b - 0xc4), &n)) goto truncated;
                if (n > len - pos) goto truncated;
                cost += costs[PCIDEV_MP_BIN_BASE] + costs[PCIDEV_MP_BIN_BYTE] * n;
                pos += n;
                break;
            case 0xc7: case 0xc8: case 0xc9:                      /* ext 8/16/32 */
                if (!pcidev_mp_uint(buf, len, &pos, 1u << (b - 0xc7), &n)) goto truncated;
                goto ext;
            case 0xd4: case 0xd5: case 0xd6: case 0xd7: case 0xd8: /* fixext 1..16 */
                n = 1u << (b - 0xd4);
                goto ext;
            case 0xca: case 0xcb:                                 /* float 32/64 */
                if (len - pos < (b == 0xca ? 4u : 8u)) goto truncated;
                pos += b == 0xca ? 4 : 8;
                cost += costs[PCIDEV_MP_FLOAT];
                break;
            case 0xcc:                                            /* uint 8: cached ints */
                if (len - pos < 1) goto truncated;
                pos += 1;
                break;
            case 0xcd: case 0xce: case 0xd0: case 0xd1: case 0xd2: /* uint 16/32, int 8/16/32 */
                i = b == 0xcd ? 2 : b == 0xce ? 4 : b == 0xd0 ? 1 : b == 0xd1 ? 2 : 4;
                if (len - pos < i) goto truncated;
                pos += i;
                cost += costs[PCIDEV_MP_INT];
                break;
            case 0xcf: case 0xd3:                                 /* uint 64, int 64 */
                if (len - pos < 8) goto truncated;
                pos += 8;
                cost += costs[PCIDEV_MP_INT64];
                break;
            case 0xd9: case 0xda: case 0xdb:                      /* str 8/16/32 */
                if (!pcidev_mp_uint(buf, len, &pos, 1u << (b - 0xd9), &n)) goto truncated;
                goto str;
            case 0xdc: case 0xdd:                                 /* array 16/32 */
                if (!pcidev_mp_uint(buf, len, &pos, b == 0xdc ? 2 : 4, &n)) goto truncated;
                goto array;
            default:                                              /* 0xde, 0xdf: map 16/32 */
                if (!pcidev_mp_uint(buf, len, &pos, b == 0xde ? 2 : 4, &n)) goto truncated;
                goto map;
            }
        }
        goto charged;
    str:
        if (n > len - pos) goto truncated;
        for (i = 0; i < n && buf[pos + i] < 0x80; i++)
            ;
        if (i == n)
            cost += costs[PCIDEV_MP_ASCII_BASE] + costs[PCIDEV_MP_ASCII_BYTE] * n;
        else
            cost += costs[PCIDEV_MP_STR_BASE] + costs[PCIDEV_MP_STR_BYTE] * n;
        pos += n;
        goto charged;
    ext:
        if (len - pos < 1 || n > len - pos - 1) goto truncated;   /* the type byte, then n bytes */
        pos += 1 + n;
        cost += costs[PCIDEV_MP_EXT_BASE] + costs[PCIDEV_MP_EXT_BYTE] * n;
        goto charged;
    array:
        if (n > len - pos) goto truncated;                       /* every element takes a byte */
        cost += costs[PCIDEV_MP_ARRAY_BASE] + costs[PCIDEV_MP_ARRAY_ITEM] * n;
        goto open;
    map:
        if (n > (len - pos) / 2) goto truncated;                 /* every key and value takes a byte */
        cost += costs[PCIDEV_MP_MAP_BASE] + costs[PCIDEV_MP_MAP_ITEM] * n;
        n *= 2;
    open:
        if (cost > limit) { status = PCIDEV_MP_OVER; goto done; }
        if (level >= PCIDEV_MP_DEPTH) { status = PCIDEV_MP_DEEP; goto done; }  /* even an empty one */
        if (n > 0)
            left[++level] = n;
        continue;
    charged:
        if (cost > limit) { status = PCIDEV_MP_OVER; goto done; }
    }
    if (pos != len) {
        status = PCIDEV_MP_TRAILING;
        start = pos;
    } else {
        start = len;
    }
    goto done;
truncated:
    status = PCIDEV_MP_TRUNCATED;
done:
    out[0] = cost;
    out[1] = start;
    return status;
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("pcidev._native", SOURCE + _crc_source(), extra_compile_args=["-O2"])

if __name__ == "__main__":  # pragma: no cover - developer convenience
    import pathlib

    ffibuilder.compile(tmpdir=str(pathlib.Path(__file__).resolve().parent.parent), verbose=True)
