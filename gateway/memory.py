"""Giving memory back to the system: what a large document or body took must not stay with the process.

glibc keeps freed memory for reuse: a freed tree of small nodes stays in the heap until trimmed, and
after a large block is freed it raises its threshold for mapping blocks separately, so the next large
bodies come from the heap and stay there too.  Fixing the threshold keeps every block of 1 MiB or more
mapped on its own (unmapped when freed); ``trim`` returns the heap's free pages after a large tree.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h
MAP_SEPARATELY_BYTES = 1024 * 1024


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"))


def map_large_blocks_separately() -> bool:
    """At a process's start: blocks of 1 MiB and more (request bodies, large strings) are mapped on their own
    and unmapped when freed.  False where the C library is not glibc (nothing changes then)."""
    mallopt = getattr(_libc(), "mallopt", None)
    return bool(mallopt is not None and mallopt(M_MMAP_THRESHOLD, MAP_SEPARATELY_BYTES))


def trim() -> None:
    """Return the heap's free memory to the system (after a large tree of small nodes was freed)."""
    malloc_trim = getattr(_libc(), "malloc_trim", None)  # glibc only
    if malloc_trim is not None:
        malloc_trim(0)
