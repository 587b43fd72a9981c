"""Keep freed host memory in the process, so that a CPU training step does not page-fault its buffers back in.

glibc's malloc serves every large block (above its mmap threshold, at most 32 MiB) with a fresh `mmap` and
returns it to the kernel on free. A CPU training step allocates and frees the same large tensors every step
(activations, gradients, DeepSpeed's flat gradient buffers: about 1 GB each for violet-v2), so each step
touches hundreds of thousands of new pages, and the kernel zeroes every one of them. With mmap off and the
top of the heap kept (trimmed only beyond 2 GiB free), freed blocks are reused as they are.

Measured (`violet-ds bench train --keep_host_memory '[false,true]'`, violet-v2, batch 1, fp32, 2 threads, one
machine, means of 2 interleaved rounds): 2 x 224: step 4.53 -> 3.78 s, page faults per step 662k -> 45k, peak
RSS 7.28 -> 8.01 GB; 4 x 224: 7.73 -> 7.09 s, 9.19 -> 9.89 GB. The cost is that memory freed after the peak
stays with the process. Each rank of a CPU run asks for it (`engine.keep_host_memory`, in
`commands.run.setup_world`); data-loader workers forked from a rank inherit it.
"""

from __future__ import annotations

import ctypes
import platform
import resource
from typing import Optional

# mallopt(3) parameter numbers (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 2**31 - 1
"""free memory at the top of the heap beyond this is returned to the kernel (mallopt takes an int)"""

_applied: Optional[str] = None


def keep_freed_memory() -> str:
    """Turn glibc's mmap for large blocks off and its heap trimming (nearly) off, for this process and the
    processes it forks. Returns what was done, for the run log. Idempotent; a no-op off glibc."""
    global _applied
    if _applied is not None:
        return _applied
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        _applied = f"unchanged (the C library is not glibc: {platform.system()} {platform.libc_ver()[0] or '?'})"
        return _applied
    libc = ctypes.CDLL("libc.so.6")
    ok_mmap = libc.mallopt(M_MMAP_MAX, 0)
    ok_trim = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    if not (ok_mmap and ok_trim):
        _applied = f"unchanged (glibc mallopt refused: mmap_max={ok_mmap}, trim_threshold={ok_trim})"
        return _applied
    _applied = "glibc malloc keeps freed memory (large blocks from the heap, trimmed beyond 2 GiB free)"
    return _applied


def describe() -> str:
    """What this process's malloc does with freed memory, for the run log."""
    return _applied or "the C library's default (large blocks are returned to the kernel on free)"


def minor_page_faults() -> int:
    """Minor page faults of this process so far (each is a page the kernel had to map, zeroed, on first touch)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
