"""The C++ CPU kernels in exp-passes: `python -m benchmarks.cpu_passes [--N 2048,256 --V 32000,151936]`.

Times each backend function of `backends/cpu_backend.py` on bf16 logits (the suite's inputs: student 3·randn,
teacher 3·randn + student/2, α = 0.1, T = 1, every row counted) and, interleaved with it (one exp pass before each
timed call, so that a shared machine's load drifts alike for both), one `torch.exp` over a float32 [N, V] tensor
into a preallocated output. Reported per (N, V, loss, kernel): the median ms of each, and their ratio, the
kernel's time in exp-passes (docs/design.md §7). Kernels: `statistics` (skew_statistics), `forward`
(skew_forward), `backward` (skew_backward from the forward's statistics, an incoming gradient of 1/N per row),
`forward+backward` (the sum of the two: `reduction="none"`, or a Function without the next one),
`forward_and_grad` (skew_forward_and_grad with a per-row scale of 1/N: a scalar reduction's forward and
backward in one call, where the backend has it). N, V pairs are zipped. Pure wall clock, in-process: unlike
the suite (`python -m benchmarks`), no worker processes and no memory columns.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from distillm2_kernels.backends import cpu_backend, prepare_rows

from . import environment

LOSSES = {"skl": (False, False), "srkl": (True, False), "srkl_detach": (True, True)}
COLUMNS = ["date", "commit", "device_name", "cpu_kernels", "threads", "N", "V", "dtype", "loss", "kernel", "repeats",
           "median_ms", "exp_pass_ms", "exp_passes", "load_avg_1m"]


def interleaved(run, repeats: int, exp_pass) -> tuple:
    """(median ms of run, median ms of exp_pass), each call timed alone, one exp pass before each run."""
    run()
    exp_pass()
    runs, passes = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        exp_pass()
        passes.append(time.perf_counter() - start)
        start = time.perf_counter()
        run()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs) * 1e3, statistics.median(passes) * 1e3


def measure(num_rows: int, vocab: int, dtype: torch.dtype, repeats: int, context: dict) -> list:
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(num_rows, vocab, generator=gen, dtype=dtype).mul_(3)
    teacher = torch.randn(num_rows, vocab, generator=gen, dtype=dtype).mul_(3).add_(student, alpha=0.5)
    exp_in = torch.randn(num_rows, vocab, generator=gen)
    exp_out = torch.empty_like(exp_in)

    def exp_pass() -> None:
        torch.exp(exp_in, out=exp_out)

    rows = prepare_rows(student, teacher, 0.1, None, -100, 1.0)
    scale = torch.full((num_rows,), 1.0 / num_rows)
    results = []
    for loss, (reverse, detach) in LOSSES.items():
        stats = cpu_backend.skew_forward(rows, reverse, detach)[1]
        kernels = {
            "statistics": lambda: cpu_backend.skew_statistics(rows),
            "forward": lambda: cpu_backend.skew_forward(rows, reverse, detach),
            "backward": lambda: cpu_backend.skew_backward(rows, reverse, detach, stats, scale),
        }
        if hasattr(cpu_backend, "skew_forward_and_grad"):
            kernels["forward_and_grad"] = lambda: cpu_backend.skew_forward_and_grad(rows, reverse, detach, scale)
        timed = {name: interleaved(run, repeats, exp_pass) for name, run in kernels.items()}
        timed["forward+backward"] = (timed["forward"][0] + timed["backward"][0],
                                     (timed["forward"][1] + timed["backward"][1]) / 2)
        for kernel, (median_ms, exp_ms) in timed.items():
            results.append({**context, "N": num_rows, "V": vocab, "dtype": str(dtype).replace("torch.", ""),
                            "loss": loss, "kernel": kernel, "repeats": repeats, "median_ms": round(median_ms, 2),
                            "exp_pass_ms": round(exp_ms, 2), "exp_passes": round(median_ms / exp_ms, 2),
                            "load_avg_1m": round(os.getloadavg()[0], 2)})
            print(f"N={num_rows} V={vocab} {loss:11s} {kernel:16s} {median_ms:9.1f} ms  exp pass {exp_ms:7.1f} ms  "
                  f"{median_ms / exp_ms:5.2f} exp-passes", flush=True)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--N", default="2048,256", help="token counts, zipped with --V")
    parser.add_argument("--V", default="32000,151936", help="vocabulary sizes, zipped with --N")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="CSV to write (appended to when it exists)")
    args = parser.parse_args(argv)
    if cpu_backend.unavailable_reason() is not None:
        print(f"the C++ CPU backend is unavailable: {cpu_backend.unavailable_reason()}", file=sys.stderr)
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    context = {"date": environment.utc_now(), "commit": environment.commit(), "device_name": environment.cpu_name(),
               "cpu_kernels": cpu_backend.kernel_isa(), "threads": torch.get_num_threads()}
    print(f"# {context['device_name']}, {context['threads']} threads, C++ kernels {context['cpu_kernels']}, "
          f"commit {context['commit']}, {context['date']}", flush=True)
    results = []
    for num_rows, vocab in zip((int(n) for n in args.N.split(",")), (int(v) for v in args.V.split(","))):
        results += measure(num_rows, vocab, getattr(torch, args.dtype), args.repeats, context)
    if args.out is not None:
        new_file = not args.out.exists()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            if new_file:
                writer.writeheader()
            writer.writerows(results)
        print(f"# wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
