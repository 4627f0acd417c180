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
ffibuilder.set_source("pcidev._native", SOURCE, extra_compile_args=["-O2"])

if __name__ == "__main__":  # pragma: no cover - developer convenience
    import pathlib

    ffibuilder.compile(tmpdir=str(pathlib.Path(__file__).resolve().parent.parent), verbose=True)
