"""What a run prints: the progress bar (stderr), the header, the suites' tables and the headline (stdout)."""

from __future__ import annotations

import os
import sys

from .ratios import headline
from .schema import SUITE_ORDER
from .tables import table


class _PlainProgress:
    """The progress bar when tqdm is not installed: one line per finished row on stderr."""

    def __init__(self, total: int):
        self.total, self.done, self.description = total, 0, ""

    def set_description(self, text: str) -> None:
        self.description = text

    def update(self, n: int) -> None:
        self.done += n
        print(f"[{self.done}/{self.total}] {self.description}", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return _PlainProgress(total)
    return tqdm(total=total, file=sys.stderr, unit="row", dynamic_ncols=True)


def print_header(context: dict, args, repeats: int, warmup: int) -> None:
    load = os.getloadavg()[0]
    if context["device"] == "cpu" and load > 0.5:
        print(f"warning: the 1-minute load average is {load:.2f}: other processes share the CPU and the CPU "
              "timings will be noisy (column load_avg_1m)", file=sys.stderr)
    print(f"# distillm2_kernels {context['library']} benchmarks on {context['device_name']}")
    print(f"# torch {context['torch']}" + (f", CUDA {context['cuda']}" if context["cuda"] else "")
          + f", triton {context['triton']}, liger-kernel {context['liger_kernel']}, C++ kernels {context['cpu_kernels']}; "
          f"commit {context['commit']}, {context['date']}")
    print(f"# measured ceilings: copy {context['ceiling_copy_GBps']} GB/s, matmul bf16 "
          f"{context['ceiling_matmul_bf16_TFLOPs']} TFLOP/s, fp32 {context['ceiling_matmul_fp32_TFLOPs']} TFLOP/s; "
          f"{repeats} timed calls after {warmup} warm-up per case", flush=True)


def print_tables(rows: list) -> None:
    for suite_name in SUITE_ORDER:
        header, body, notes = table(rows, suite_name)
        if not body and not notes:
            continue
        print(f"\n## {suite_name}")
        widths = [max(len(h), *(len(c[i]) for c in body)) if body else len(h) for i, h in enumerate(header)]
        print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
        for cells in body:
            print("  ".join(c.rjust(w) for c, w in zip(cells, widths)))
        for note in notes:
            print(f"  {note}")
    lines = headline(rows)
    if lines:
        print("\n## headline")
        for line in lines:
            print(f"- {line}")
