"""The rows of a benchmark run: one per (suite, op, implementation, mode, dtype, shape), as in the CSV.

The columns (CSV; the tables show a subset):

context, the same on every row
  date, commit            UTC start of the run; `git rev-parse --short HEAD` (+"-dirty"), "unknown" outside git
  library                 distillm2_kernels.__version__
  device, device_name     "cpu" / "cuda"; the CPU model, cores and torch threads, or the GPU's name, memory, sm_XY
  torch, cuda, triton, liger_kernel, cpu_kernels   versions; the C++ backend's instruction set
  threads                 torch.get_num_threads() in the workers
  ceiling_copy_GBps       measured copy bandwidth (2 × bytes / time of a large copy)
  ceiling_matmul_{bf16,fp32}_TFLOPs   measured matmul throughput (2n³ / time)
  ceiling_exp_ns_per_entry   CPU: ns per entry of a float32 torch.exp pass (benchmarks/ceilings.py)
case
  suite, op, impl, mode   mode: fwd, fwd+bwd, or step (training_step)
  dtype, N, V, H, H_teacher, B, T, layers   N tokens (training_step: 2·B·T), V vocabulary, H hidden sizes,
                          B sequences (objective, training_step: pairs), T tokens per sequence
  alpha                   0.1; 0 for Liger (which computes KL, our skew divergences at α = 0)
  status, note            ok / skipped / oom / error, and why (Liger rows: the loss check against ours at α = 0)
time
  repeats, warmup_s       timed calls; wall time of the first call (compile and autotuning included)
  median_ms, min_ms, max_ms   over the timed calls (CUDA events on CUDA, wall clock on the CPU)
  loss                    the loss of the first call (the same inputs for every implementation)
throughput
  min_traffic_GB, GB_per_s   logits ops: the minimum bytes (read both logits; fwd+bwd also writes the gradient)
                          and that over the median time
  TFLOP, TFLOP_per_s      fused-linear: the minimum GEMM work (benchmarks/fused_linear.py) over the median time
  tokens_per_s            training_step: 2·B·T over the median step time
  pct_of_ceiling          GB_per_s / ceiling_copy_GBps, or TFLOP_per_s / the dtype's ceiling_matmul, in %
  exp_passes              CPU rows with N and V: median time in units of one torch.exp pass over a float32 [N, V]
                          tensor, measured in the same run (ceiling_exp_ns_per_entry)
memory (MiB = 2^20 bytes; one call after the warm-up, see distillm2_kernels/measure.py)
  inputs_MiB, output_MiB  the case's inputs (models and batch for training_step); its gradients (fwd+bwd)
  baseline_MiB            the worker's memory before the inputs were built (CPU resident set; CUDA allocated)
  op_increase_MiB         the op's own peak: peak during the call minus memory just before it (gradients included)
  beyond_output_MiB       op_increase_MiB − output_MiB: what the op needs besides its result
  peak_MiB                the absolute peak during the call (CPU: the worker's peak resident set, which includes
                          baseline and inputs; CUDA: max_memory_allocated)
  load_avg_1m             the machine's 1-minute load average at the end of the case (other processes)
ratios, against each baseline on the same suite, op, mode, dtype and shape
  speedup_vs_<b>          b's median time / this row's
  memory_ratio_vs_<b>     b's op_increase_MiB / this row's (increases under 1 MiB counted as 1 MiB)
  loss_rel_diff_vs_naive  |loss − naive's loss| / |naive's loss| (not for Liger, which computes KL at α = 0)

`make_row` turns a worker's result into a row (without the ratio columns: `ratios.add_ratios`); `write_csv` and
`read_csv` store and load them.
"""

from __future__ import annotations

import csv
from pathlib import Path

from .. import ceilings, implementations
from ..fused_linear import NAME as FUSED_LINEAR
from ..objective import pairs_and_length
from ..skew_divergence import batch_shape
from .numbers import significant

MiB = 2**20
CONTEXT_COLUMNS = [
    "date", "commit", "library", "device", "device_name", "torch", "cuda", "triton", "liger_kernel", "cpu_kernels",
    "threads", "ceiling_copy_GBps", "ceiling_matmul_bf16_TFLOPs", "ceiling_matmul_fp32_TFLOPs",
    "ceiling_exp_ns_per_entry",
]
CASE_COLUMNS = ["suite", "op", "impl", "mode", "dtype", "N", "V", "H", "H_teacher", "B", "T", "layers", "alpha",
                "status", "note"]
METRIC_COLUMNS = [
    "repeats", "warmup_s", "median_ms", "min_ms", "max_ms", "loss", "min_traffic_GB", "GB_per_s", "TFLOP",
    "TFLOP_per_s", "tokens_per_s", "pct_of_ceiling", "exp_passes", "inputs_MiB", "output_MiB", "baseline_MiB",
    "op_increase_MiB", "beyond_output_MiB", "peak_MiB", "load_avg_1m",
]
RATIO_COLUMNS = ([f"speedup_vs_{b}" for b in implementations.BASELINES]
                 + [f"memory_ratio_vs_{b}" for b in implementations.BASELINES] + ["loss_rel_diff_vs_naive"])
COLUMNS = CONTEXT_COLUMNS + CASE_COLUMNS + METRIC_COLUMNS + RATIO_COLUMNS
SHAPE_KEYS = ("N", "V", "H", "H_teacher", "B", "T", "layers")
MODE_ORDER = ("fwd", "fwd+bwd", "step")
SUITE_ORDER = ("skew_divergence", "fused_linear", "objective", "training_step")
SHORT_DTYPE = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}


def throughput_column(suite_name: str) -> tuple:
    """(column, label) of the suite's throughput: GB/s, TFLOP/s or tokens/s."""
    if suite_name == FUSED_LINEAR:
        return "TFLOP_per_s", "TFLOP/s"
    if suite_name == "training_step":
        return "tokens_per_s", "tokens/s"
    return "GB_per_s", "GB/s"


def shape_text(shape: dict) -> str:
    parts = [f"{k}={shape[k]}" for k in SHAPE_KEYS if k in shape]
    return " ".join(parts)


def shape_columns(suite_name: str, shape: dict) -> dict:
    columns = {k: shape.get(k, "") for k in SHAPE_KEYS}
    if suite_name in ("skew_divergence", FUSED_LINEAR):
        columns["B"], columns["T"], _ = batch_shape(shape)
    elif suite_name == "objective":
        columns["B"], columns["T"] = pairs_and_length(shape)
    elif suite_name == "training_step":
        columns["N"] = 2 * shape["B"] * shape["T"]
    return columns


def make_row(context: dict, suite, shape: dict, op: str, impl: str, result: dict) -> dict:
    row = {column: "" for column in COLUMNS}
    row.update({k: context.get(k, "") for k in CONTEXT_COLUMNS})
    row.update(suite=suite.NAME, op=op, impl=impl, mode=result["mode"], dtype=shape["dtype"],
               alpha=0.0 if impl.startswith("liger") else implementations.ALPHA,
               status=result["status"], note=result.get("note", ""))
    row.update(shape_columns(suite.NAME, shape))
    if result["status"] != "ok":
        return row
    times = sorted(t * 1e3 for t in result["times_s"])
    median = times[len(times) // 2] if len(times) % 2 else (times[len(times) // 2 - 1] + times[len(times) // 2]) / 2
    row.update(repeats=len(times), warmup_s=significant(result["warmup_s"]), median_ms=significant(median, 4),
               min_ms=significant(times[0], 4), max_ms=significant(times[-1], 4),
               loss="" if result["loss"] is None else f"{result['loss']:.7g}", load_avg_1m=result.get("load_avg_1m", ""))
    work = suite.work(shape, result["mode"])
    seconds = median / 1e3
    if "bytes" in work:
        row["min_traffic_GB"] = significant(work["bytes"] / 1e9, 4)
        row["GB_per_s"] = significant(work["bytes"] / seconds / 1e9)
        ceiling = context.get("ceiling_copy_GBps")
        if ceiling:
            row["pct_of_ceiling"] = significant(100 * row["GB_per_s"] / ceiling)
    if "flops" in work:
        row["TFLOP"] = significant(work["flops"] / 1e12, 4)
        row["TFLOP_per_s"] = significant(work["flops"] / seconds / 1e12)
        ceiling = context.get(f"ceiling_matmul_{SHORT_DTYPE.get(shape['dtype'], shape['dtype'])}_TFLOPs")
        if ceiling:
            row["pct_of_ceiling"] = significant(100 * row["TFLOP_per_s"] / ceiling)
    if "tokens" in work:
        row["tokens_per_s"] = significant(work["tokens"] / seconds)
    if row["device"] == "cpu":
        row["exp_passes"] = significant(ceilings.exp_passes(median, context, row))
    increase = max(result["peak_bytes"] - result["before_bytes"], 0)
    row.update(
        inputs_MiB=significant(result["input_bytes"] / MiB, 4), output_MiB=significant(result["output_bytes"] / MiB, 4),
        baseline_MiB=significant(result["baseline_bytes"] / MiB, 4), op_increase_MiB=significant(increase / MiB, 4),
        beyond_output_MiB=significant((increase - result["output_bytes"]) / MiB, 4),
        peak_MiB=significant(result["peak_bytes"] / MiB, 4),
    )
    return row


def case_key(row: dict) -> tuple:
    return (row["suite"], row["op"], row["mode"], row["dtype"]) + tuple(row[k] for k in SHAPE_KEYS)


def _parse(value: str):
    if value == "":
        return ""
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def read_csv(path: Path) -> list:
    """Rows of an earlier run's CSV, numbers as numbers (for `--merge`)."""
    text_columns = {"date", "commit", "library", "device", "device_name", "torch", "cuda", "triton", "liger_kernel",
                    "cpu_kernels", "suite", "op", "impl", "mode", "dtype", "status", "note", "loss",
                    "loss_rel_diff_vs_naive"}
    with open(path, newline="") as handle:
        return [{column: (row.get(column, "") if column in text_columns else _parse(row.get(column, "")))
                 for column in COLUMNS} for row in csv.DictReader(handle)]


def write_csv(rows: list, path: Path) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path
