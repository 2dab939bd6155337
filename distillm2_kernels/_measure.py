"""Timing and peak-memory helpers shared by the demo and the benchmarks.

Peak resident memory on the CPU is measured in a fresh process per variant (a high-water mark only rises,
so variants measured in one process would hide each other). The child builds its inputs, resets the
kernel's high-water mark (`reset_peak_rss`: the heap is trimmed first, then `/proc/self/clear_refs`), reads
the resident size, runs the op once and reads `VmHWM`: its increase over that resident size is the op's own
peak. (`ru_maxrss` would not do for a child: Linux carries it over from the parent across fork and exec.)
Linux only: the resident figures come from /proc.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import resource
import statistics
import time
from typing import Callable


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> tuple[float, float]:
    """(median, spread = max − min) wall-clock seconds of `fn()` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), max(times) - min(times)


def resident_bytes() -> int:
    """This process's current resident set size in bytes (from /proc/self/statm)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Resets this process's peak resident size (VmHWM, what ru_maxrss reports) to the current one.

    Freed heap memory is handed back first (glibc `malloc_trim(0)`), so that an op cannot reuse set-up
    garbage unseen; read `resident_bytes()` after this call as the op's starting point. Returns False where
    /proc/self/clear_refs cannot be written (not Linux >= 4.0, or not permitted): the peak then still
    includes everything before."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """This process's peak resident size in bytes since start or the last `reset_peak_rss()` (VmHWM).

    Falls back to ru_maxrss (never reset, and inherited across fork and exec) where /proc has no VmHWM."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _child(setup: Callable, run: Callable, args: tuple, connection) -> None:
    try:
        state = setup(*args)
        if not reset_peak_rss():
            raise RuntimeError("cannot reset the peak resident size: /proc/self/clear_refs is not writable")
        before = resident_bytes()
        run(state)
        connection.send((before, peak_rss_bytes(), None))
    except Exception as error:  # report instead of hanging the parent
        connection.send((0, 0, repr(error)))
    finally:
        connection.close()


def peak_rss_in_subprocess(setup: Callable, run: Callable, *args) -> tuple[int, int]:
    """(op's own increase, absolute peak) in bytes of `run(setup(*args))` in a fresh process.

    `setup` and `run` must be module-level functions (they are pickled into a spawned process)."""
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(setup, run, args, child))
    process.start()
    child.close()
    before, after, error = parent.recv()
    process.join()
    if error is not None:
        raise RuntimeError(f"the measured process failed: {error}")
    return after - before, after
