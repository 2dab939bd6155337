"""Timing and peak-memory helpers shared by the demo and the benchmarks.

Peak resident memory on the CPU is measured in a fresh process per variant (a high-water mark only rises,
so variants measured in one process would hide each other). The child builds its inputs, resets the
kernel's high-water mark (`/proc/self/clear_refs`), runs the op once and reads `VmHWM`: its increase over
the resident size before the op is the op's own peak. (`ru_maxrss` would not do: Linux carries it over
from the parent across fork and exec.)
"""

from __future__ import annotations

import ctypes
import multiprocessing
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


def _status_bytes(field: str) -> int:
    """A `/proc/self/status` memory field (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} (peak memory is measured on Linux only)")


def _reset_peak_rss() -> None:
    try:  # hand freed heap memory back first, so the op cannot reuse set-up garbage unseen
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current resident size


def _child(setup: Callable, run: Callable, args: tuple, connection) -> None:
    try:
        state = setup(*args)
        _reset_peak_rss()
        before = _status_bytes("VmRSS")
        run(state)
        connection.send((before, _status_bytes("VmHWM"), None))
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
