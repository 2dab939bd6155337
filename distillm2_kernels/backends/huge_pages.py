"""Transparent huge pages for the CPU backends' `[N, V]` outputs.

A freshly allocated `[N, V]` gradient is memory nothing has touched yet: the kernel's first write faults in
every 4 KiB page, and the operating system zeroes each one. At N = 2048, V = 32000 bf16 (131 MB) that cost
about 30 ms on a 2-core EPYC, more than the kernel's own arithmetic takes for the gradient; with 2 MiB pages the
same first write cost about 9 ms (`empty` then `fill_`, 2 threads).

Where Linux's transparent huge pages are in `madvise` mode (`/sys/kernel/mm/transparent_hugepage/enabled`, the
default of many distributions), memory gets them only when asked. `empty_rows` asks: `madvise(MADV_HUGEPAGE)`
on the 2 MiB-aligned part of a large allocation before anything writes it, as torch does for every allocation
when `THP_MEM_ALLOC_ENABLE=1` is set before it starts. In `always` mode this changes nothing, in `never` mode
neither; off Linux it is not called. It changes no value, only how the pages are mapped.
`DISTILLM2_KERNELS_HUGE_PAGES=0` turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from typing import Optional, Sequence

import torch

HUGE_PAGE_BYTES = 2 << 20
# below this an allocation is left alone (torch's own threshold for THP_MEM_ALLOC_ENABLE is 2 MiB; an advised
# range needs a whole 2 MiB-aligned page inside the allocation)
MIN_ADVISED_BYTES = 2 * HUGE_PAGE_BYTES
_MADV_HUGEPAGE = 14  # linux/mman.h, the same on every architecture


def enabled() -> bool:
    """Whether large CPU outputs are advised (Linux, and DISTILLM2_KERNELS_HUGE_PAGES is not "0")."""
    return sys.platform.startswith("linux") and os.environ.get("DISTILLM2_KERNELS_HUGE_PAGES", "1") != "0"


@functools.lru_cache(maxsize=1)
def _madvise():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def advised_range(tensor: torch.Tensor) -> Optional[tuple[int, int]]:
    """(start, length) in bytes of the whole 2 MiB pages inside `tensor`'s storage, None when there is none or the
    storage is below MIN_ADVISED_BYTES."""
    nbytes = tensor.untyped_storage().nbytes()
    if nbytes < MIN_ADVISED_BYTES:
        return None
    begin = tensor.untyped_storage().data_ptr()
    start = -(-begin // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    end = (begin + nbytes) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    return (start, end - start) if end > start else None


def advise(tensor: torch.Tensor) -> bool:
    """Asks for huge pages over the 2 MiB-aligned part of a CPU tensor's storage; True when the system call was
    made and succeeded. Call it before the tensor is first written: pages already touched keep their size."""
    if tensor.device.type != "cpu" or not enabled():
        return False
    span = advised_range(tensor)
    madvise = _madvise()
    if span is None or madvise is None:
        return False
    return madvise(span[0], span[1], _MADV_HUGEPAGE) == 0


def empty_rows(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """`torch.empty(shape, dtype=dtype, device=device)`, advised for huge pages when it is a large CPU tensor."""
    out = torch.empty(tuple(shape), dtype=dtype, device=device)
    advise(out)
    return out
