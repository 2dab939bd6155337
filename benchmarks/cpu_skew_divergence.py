"""CPU benchmark: fwd+bwd of SKL and SRKL for the "cpu" (C++) and "torch" backends and the naive DistiLLM-2 code.

    python benchmarks/cpu_skew_divergence.py [--repeats 5] [--quick]

Each variant (op × implementation × dtype × shape) runs in its own subprocess, so that its peak resident memory
is its own: the process imports torch and the library and runs the variant once on a tiny input (one-time
initialisation; then the resident size is the baseline), builds the inputs in place (bf16/fp32 logits [B, T, V]), resets
the peak resident size (VmHWM, the quantity ru_maxrss reports, via /proc/self/clear_refs after handing freed heap
memory back with malloc_trim, so the inputs' set-up temporaries are not counted; `distillm2_kernels._measure`),
runs fwd+bwd once (warm-up; this run sets the peak), then times `--repeats` more runs and reports the median.
The loss is the released trainer's reduction ("seqmean" over labels, none ignored); the gradient lands in
`student.grad`, reset before each run.

Memory columns (MB): baseline = resident after imports; inputs / grad = the logits' and gradient's bytes;
peak = ru_maxrss (absolute); op increase = peak − resident after building the inputs (heap trimmed);
excess = peak − (baseline + inputs + grad), what the op needs beyond its output (the target is O(N)).
GB/s counts the minimum traffic, one read of both logits and one write of the gradient.

Prints a table and writes benchmarks/results/cpu_skew_divergence.csv, or the path given by --csv (with device,
torch version, commit and date on every row).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
from distillm2_kernels._measure import peak_rss_bytes, reset_peak_rss, resident_bytes  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SHAPES = [(8, 256, 32000), (2, 128, 151936)]  # [B, T, V]: N = 2048, V = 32000 and N = 256, V = 151936
QUICK_SHAPES = [(2, 64, 32000)]
DTYPES = ["bfloat16", "float32"]
OPS = ["skl", "srkl"]
IMPLS = ["cpu", "torch", "naive"]
ALPHA = 0.1


def loss_function(op: str, impl: str):
    """(student, teacher, labels) -> scalar loss: the naive trainer code, or a fused backend."""
    from distillm2_kernels import fused_skl, fused_srkl, reference

    if impl == "naive":
        naive = reference.naive_skl if op == "skl" else reference.naive_srkl
        return lambda student, teacher, labels: naive(student, teacher, labels, alpha=ALPHA)
    fused = fused_skl if op == "skl" else fused_srkl
    kwargs = {} if op == "skl" else {"detach_mixture": True}  # as the released trainer computes SRKL
    return lambda student, teacher, labels: fused(
        student, teacher, ALPHA, labels=labels, reduction="seqmean", backend=impl, **kwargs
    )


def _run_once(op: str, impl: str, dtype, batch: int, seq: int, vocab: int) -> None:
    import torch

    student = torch.randn((batch, seq, vocab)).to(dtype).requires_grad_(True)
    teacher = torch.randn((batch, seq, vocab)).to(dtype)
    labels = torch.zeros((batch, seq), dtype=torch.long)
    loss_function(op, impl)(student, teacher, labels).backward()


def run_variant(op: str, impl: str, dtype_name: str, batch: int, seq: int, vocab: int, repeats: int) -> dict:
    """One variant, in this (fresh) process."""
    import torch

    dtype = getattr(torch, dtype_name)
    _run_once(op, impl, dtype, 1, 2, 64)  # one-time initialisation (autograd, thread pool) is not the op's
    baseline = resident_bytes() / 2**20
    gen = torch.Generator().manual_seed(0)
    student = torch.empty((batch, seq, vocab), dtype=dtype)
    teacher = torch.empty((batch, seq, vocab), dtype=dtype)
    for b in range(batch):  # filled in place: no temporaries left in the allocator's cache
        torch.randn((seq, vocab), generator=gen, out=student[b]).mul_(3)
        torch.randn((seq, vocab), generator=gen, out=teacher[b]).mul_(3).add_(student[b], alpha=0.5)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    student.requires_grad_(True)

    def step() -> float:
        student.grad = None
        start = time.perf_counter()
        loss_function(op, impl)(student, teacher, labels).backward()
        return time.perf_counter() - start

    peak_was_reset = reset_peak_rss()  # trims the heap first: the resident size below excludes set-up garbage
    after_inputs = resident_bytes() / 2**20
    step()  # warm-up; sets the memory peak
    peak = peak_rss_bytes() / 2**20
    times = [step() for _ in range(repeats)]
    n_rows = batch * seq
    grad_mb = student.nbytes / 2**20
    inputs_mb = (student.nbytes + teacher.nbytes + labels.nbytes) / 2**20
    median = statistics.median(times)
    return {
        "op": op,
        "impl": impl,
        "dtype": dtype_name,
        "N": n_rows,
        "V": vocab,
        "threads": torch.get_num_threads(),
        "runs": repeats,
        "median_ms": round(median * 1e3, 2),
        "min_ms": round(min(times) * 1e3, 2),
        "GB_per_s": round(3 * student.nbytes / median / 1e9, 2),
        "baseline_mb": round(baseline, 1),
        "inputs_mb": round(inputs_mb, 1),
        "grad_mb": round(grad_mb, 1),
        "after_inputs_mb": round(after_inputs, 1),
        "peak_mb": round(peak, 1),
        "op_increase_mb": round(peak - after_inputs, 1),
        "excess_mb": round(peak - (baseline + inputs_mb + grad_mb), 1),
        "peak_excludes_setup": peak_was_reset,
        "load_avg_1m": round(os.getloadavg()[0], 2),  # other processes on the machine during the timed runs
    }


def _device_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(  # the results this script writes do not make the code dirty
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant after the warm-up")
    parser.add_argument("--quick", action="store_true", help="one small shape (a smoke run)")
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of cpu,torch,naive")
    parser.add_argument("--csv", type=Path, default=RESULTS / "cpu_skew_divergence.csv")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    args = parser.parse_args()

    if args.variant:
        op, impl, dtype, batch, seq, vocab = args.variant.split(",")
        print(json.dumps(run_variant(op, impl, dtype, int(batch), int(seq), int(vocab), args.repeats)))
        return

    import torch

    from distillm2_kernels.backends import cpu_backend

    context = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": _commit(),
        "device": _device_name(),
        "torch": torch.__version__,
        "kernel_isa": cpu_backend.kernel_isa() or "unavailable",
    }
    print(f"# {context['device']}, torch {context['torch']}, cpu kernels {context['kernel_isa']}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}, commit {context['commit']}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    rows = []
    for batch, seq, vocab in QUICK_SHAPES if args.quick else SHAPES:
        for dtype in DTYPES:
            for op in OPS:
                for impl in args.impls.split(","):
                    variant = f"{op},{impl},{dtype},{batch},{seq},{vocab}"
                    out = subprocess.run(
                        [sys.executable, __file__, "--variant", variant, "--repeats", str(args.repeats)],
                        env=env, capture_output=True, text=True,
                    )
                    if out.returncode != 0:
                        print(f"{variant}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
                        continue
                    row = {**context, **json.loads(out.stdout.strip().splitlines()[-1])}
                    rows.append(row)
                    print(f"{variant}: {row['median_ms']} ms, peak {row['peak_mb']} MB", file=sys.stderr)

    naive_ms = {(r["op"], r["dtype"], r["N"], r["V"]): r["median_ms"] for r in rows if r["impl"] == "naive"}
    naive_peak = {(r["op"], r["dtype"], r["N"], r["V"]): r["op_increase_mb"] for r in rows if r["impl"] == "naive"}
    for row in rows:
        key = (row["op"], row["dtype"], row["N"], row["V"])
        row["speedup_vs_naive"] = round(naive_ms[key] / row["median_ms"], 2) if key in naive_ms else ""
        row["op_increase_vs_naive"] = (
            round(naive_peak[key] / row["op_increase_mb"], 2) if key in naive_peak and row["op_increase_mb"] > 0 else ""
        )

    columns = ["op", "impl", "dtype", "N", "V", "median_ms", "speedup_vs_naive", "GB_per_s", "peak_mb",
               "op_increase_mb", "grad_mb", "excess_mb"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns} if rows else {}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row[c]).rjust(widths[c]) for c in columns))

    args.csv.parent.mkdir(parents=True, exist_ok=True)
    fieldnames = list(context) + [k for k in rows[0] if k not in context] if rows else list(context)
    with open(args.csv, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
    print(f"# load average at the end {os.getloadavg()[0]:.2f}; wrote {args.csv}")


if __name__ == "__main__":
    main()
