"""Keep freed host memory in the process, so that training on a CPU does not page-fault on every step.

glibc's allocator returns the free top of its heap to the kernel once it exceeds a trim threshold, and serves
blocks above an mmap threshold with their own mappings, unmapped when freed. By default both thresholds follow
the largest block freed so far. A CPU training step allocates temporaries of several MiB, of a size that changes
with the dynamic ray count, and frees them before the next step; so the heap is trimmed and grown again, and the
kernel maps, faults in and zeroes the same pages step after step.

``keep_freed_host_memory()`` fixes the mmap threshold at glibc's ceiling (32 MiB on 64-bit systems; blocks above
it still get their own mapping, returned when freed) and trims the heap only past 2 GiB of free top (mallopt's
largest value), so freed pages are reused. The process then holds its heap's high-water mark, which default glibc
reaches too, until it exits. Other C libraries
(musl, macOS, Windows) are left as they are. Calls after the first do nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform
import sys

M_TRIM_THRESHOLD = -1  # free bytes at the heap's top before glibc returns them to the kernel
M_MMAP_THRESHOLD = -3  # blocks at least this large get their own mmap, unmapped when freed
MMAP_THRESHOLD_MAX = 32 * 2 ** 20  # glibc's ceiling for it on 64-bit systems
TRIM_THRESHOLD_MAX = 2 ** 31 - 1  # mallopt takes a C int: the largest trim threshold it can be given

_result: str | None = None


def keep_freed_host_memory() -> str:
    """Ask glibc to keep freed memory for reuse; returns one line for the log saying what was done."""
    global _result
    if _result is None:
        _result = _configure()
    return _result


def _configure() -> str:
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return "Host memory: the C library's own policy (not glibc)"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        done = (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1
                and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_MAX) == 1)
    except (OSError, AttributeError):
        done = False
    if not done:
        return "Host memory: glibc's default policy (mallopt refused the change)"
    return "Host memory: freed blocks kept for reuse between steps (glibc mallopt)"
