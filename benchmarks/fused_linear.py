"""Benchmark: fused-linear SKL against "model logits + naive loss" and "model logits + fused_skl".

Each variant runs forward + backward of the SKL loss (reduction seqmean, the released DistiLLM-2
reduction) from the student's and teacher's last hidden states `[B, T, H]` and lm_head weights `[V, H]`
(the student's weight requires grad, as in full fine-tuning):

    naive          logits = h Wᵀ in the input dtype (teacher under no_grad), `reference.naive_skl`
    logits+fused   the same logits, `fused_skl`
    fused_linear   `fused_linear_skl` from the hidden states and weights (no full logits)

Time: median of `--repeats` runs after one warm-up, in one process. Peak memory: each variant again in a
fresh subprocess, as the peak RSS (CPU: VmHWM, which ru_maxrss reports, reset after the inputs are built and
freed heap memory is handed back, so that start-up does not count; `distillm2_kernels._measure`) or
torch.cuda.max_memory_allocated (CUDA): the absolute peak and the increase over the resident size once the
inputs exist. Writes a CSV under benchmarks/results/ (or to --out) with the device, torch version, commit
and date on every row, and prints a table.

    PYTHONPATH=. python benchmarks/fused_linear.py                      # CPU: N=4096, H=512, V=32000
    PYTHONPATH=. python benchmarks/fused_linear.py --device cuda --batch 8 --seq 1024 --hidden 4096 \\
        --vocab 128256 --dtypes bfloat16
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import distillm2_kernels as dk  # noqa: E402
from distillm2_kernels import reference  # noqa: E402
from distillm2_kernels._measure import peak_rss_bytes, reset_peak_rss, resident_bytes  # noqa: E402

VARIANTS = ("naive", "logits+fused", "fused_linear")
RESULTS = Path(__file__).resolve().parent / "results"


def make_inputs(args, dtype: torch.dtype, device: torch.device):
    g = torch.Generator(device=device).manual_seed(0)
    shape = (args.batch, args.seq)

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=g, device=device, dtype=dtype) * scale)

    inputs = {
        "student_hidden": randn(*shape, args.hidden).requires_grad_(),
        "student_weight": randn(args.vocab, args.hidden, scale=args.hidden**-0.5).requires_grad_(),
        "teacher_hidden": randn(*shape, args.teacher_hidden),
        "teacher_weight": randn(args.vocab, args.teacher_hidden, scale=args.teacher_hidden**-0.5),
    }
    labels = torch.randint(0, args.vocab, shape, generator=g, device=device)
    labels[:, : args.seq // 4] = -100  # a prompt: a quarter of every row is ignored
    inputs["labels"] = labels
    return inputs


def run_variant(variant: str, inputs) -> None:
    """One forward + backward."""
    hs, ws, ht, wt, labels = (inputs[k] for k in ("student_hidden", "student_weight", "teacher_hidden",
                                                  "teacher_weight", "labels"))
    hs.grad = ws.grad = None
    if variant == "fused_linear":
        loss = dk.fused_linear_skl(hs, ws, ht, wt, 0.1, labels=labels, reduction="seqmean")
    else:
        student_logits = hs @ ws.T
        with torch.no_grad():
            teacher_logits = ht @ wt.T
        if variant == "naive":
            loss = reference.naive_skl(student_logits, teacher_logits, labels, 0.1)
        else:
            loss = dk.fused_skl(student_logits, teacher_logits, 0.1, labels=labels, reduction="seqmean")
    loss.backward()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_variant(variant, inputs, repeats, device) -> float:
    run_variant(variant, inputs)  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        run_variant(variant, inputs)
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure_memory(args, variant: str, dtype_name: str) -> dict:
    """In this (fresh) process: peak memory of one forward + backward."""
    device = torch.device(args.device)
    # a first call on tiny inputs initialises the libraries (thread pools, kernels) outside the measurement
    tiny = argparse.Namespace(**{**vars(args), "batch": 1, "seq": 8, "vocab": 64})
    run_variant(variant, make_inputs(tiny, getattr(torch, dtype_name), device))
    inputs = make_inputs(args, getattr(torch, dtype_name), device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_variant(variant, inputs)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        if not reset_peak_rss():  # trims the heap first: the resident size below excludes set-up garbage
            print("warning: could not reset the peak RSS; the peak includes start-up", file=sys.stderr)
        before = resident_bytes()
        run_variant(variant, inputs)
        peak = peak_rss_bytes()
    return {"peak_bytes": peak, "increase_bytes": peak - before}


def memory_in_subprocess(args, variant: str, dtype_name: str) -> dict:
    command = [sys.executable, __file__, "--memory-probe", variant, "--probe-dtype", dtype_name]
    for name in ("device", "batch", "seq", "hidden", "teacher_hidden", "vocab"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "cpu"
    return f"{model} ({torch.get_num_threads()} threads)"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--teacher-hidden", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="CSV path (default benchmarks/results/fused_linear_<device>.csv)")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--probe-dtype", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.teacher_hidden = args.teacher_hidden or args.hidden

    if args.memory_probe:
        print(json.dumps(measure_memory(args, args.memory_probe, args.probe_dtype)))
        return

    device = torch.device(args.device)
    n_tokens = args.batch * args.seq
    logits_bytes = n_tokens * args.vocab * 4
    # GEMMs of fwd + bwd: student and teacher logits, grad hidden, grad weight (all variants do these four)
    flops = 2 * n_tokens * args.vocab * (args.hidden + args.teacher_hidden + 2 * args.hidden)
    meta = {
        "device": device_name(device),
        "torch": torch.__version__,
        "commit": commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "load_average_1min": round(os.getloadavg()[0], 2),  # other work on the machine skews the times
    }
    rows = []
    for dtype_name in args.dtypes.split(","):
        inputs = make_inputs(args, getattr(torch, dtype_name), device)
        for variant in args.variants.split(","):
            ms = time_variant(variant, inputs, args.repeats, device)
            memory = memory_in_subprocess(args, variant, dtype_name)
            rows.append({
                "variant": variant, "dtype": dtype_name, "N": n_tokens, "H": args.hidden,
                "H_teacher": args.teacher_hidden, "V": args.vocab, "ms": round(ms, 1),
                "gemm_tflops": round(flops / (ms * 1e-3) / 1e12, 3),
                "peak_mb": round(memory["peak_bytes"] / 2**20), "increase_mb": round(memory["increase_bytes"] / 2**20),
                "increase_per_fp32_logits": round(memory["increase_bytes"] / logits_bytes, 2),
                **meta,
            })
            print(f"{dtype_name:9s} {variant:13s} {ms:9.1f} ms  peak {rows[-1]['peak_mb']:6d} MB  "
                  f"increase {rows[-1]['increase_mb']:6d} MB", flush=True)
        del inputs

    out = Path(args.out) if args.out else RESULTS / f"fused_linear_{device.type}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"\n{meta['device']}, torch {meta['torch']}, commit {meta['commit']}, {meta['date']}")
    print(f"N={n_tokens} H={args.hidden} H_teacher={args.teacher_hidden} V={args.vocab}; one float32 [N, V] "
          f"logits tensor = {logits_bytes / 2**20:.0f} MB; GEMM work {flops / 1e12:.2f} TFLOP per fwd+bwd")
    header = f"| variant | dtype | ms | GEMM TFLOP/s | peak MB | increase MB | increase / fp32 [N,V] |"
    print(header + "\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['dtype']} | {r['ms']} | {r['gemm_tflops']} | {r['peak_mb']} | "
              f"{r['increase_mb']} | {r['increase_per_fp32_logits']} |")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
