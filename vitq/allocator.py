"""The process's C allocator: keep freed memory for the next pass instead of handing it back to the OS.

A trial runs the same forward pass over and over, allocating and freeing the same large activation buffers.
glibc's default ``malloc`` maps buffers above its adaptive threshold (32 MiB at most) afresh and trims the heap's
free top back to the OS, so every pass page-faults its buffers in again: an FP eval plus a trial of a
ViT-S-sized model on 128 images took 1.8 million minor faults (7 GiB of fresh pages) each time. On the folder
model of the bench, GELU and the bias copy of ``addmm`` ran 3-10x slower on fresh pages than on reused ones.
:func:`retain_freed_memory` raises glibc's mmap and trim thresholds (``mallopt``) so freed buffers are reused:
then ~0 faults per pass after the first, 13 % less time, and a resident set at its high-water mark (+14 % on
that ViT-S, bounded) until :func:`release_freed_memory` (docs/performance.md). Elsewhere than glibc both are
no-ops that say so.
"""

from __future__ import annotations

import ctypes
import functools
import logging

__all__ = ["KEEP_BYTES", "release_freed_memory", "retain_freed_memory"]

log = logging.getLogger(__name__)

KEEP_BYTES = 1 << 30  # buffers up to 1 GiB come from the heap; up to 1 GiB of free heap top is kept
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library this process runs on (its own symbols), if it is glibc."""
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "gnu_get_libc_version") else None  # musl and macOS lack it


@functools.cache
def retain_freed_memory() -> bool:
    """Make glibc keep freed buffers (once per process). True when it took effect.

    The mmap threshold is set first: fixing the trim threshold alone turns off glibc's adaptive mmap threshold,
    which would map (and fault in) every buffer above 128 KiB afresh.
    """
    libc = _glibc()
    if libc is None:
        log.debug("allocator: not glibc; malloc left as it is")
        return False
    if not libc.mallopt(_M_MMAP_THRESHOLD, KEEP_BYTES):
        log.debug("allocator: glibc refused M_MMAP_THRESHOLD=%d; malloc left as it is", KEEP_BYTES)
        return False
    libc.mallopt(_M_TRIM_THRESHOLD, KEEP_BYTES)  # (glibc accepts any trim threshold)
    return True


def release_freed_memory() -> None:
    """Hand the freed heap back to the OS now (``malloc_trim``), e.g. before measuring the resident set."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
