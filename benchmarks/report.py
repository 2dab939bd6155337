"""The suite's output: one row per (suite, op, implementation, mode, dtype, shape), a progress bar (stderr), a
terminal table (stdout), a CSV, a markdown summary and PNG plots.

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
memory (MiB = 2^20 bytes; one call after the warm-up, see benchmarks/measure.py)
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
"""

from __future__ import annotations

import csv
import math
import sys
from collections import OrderedDict
from pathlib import Path

from . import ceilings, implementations
from .fused_linear import NAME as FUSED_LINEAR
from .objective import pairs_and_length
from .skew_divergence import batch_shape

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
PREFERRED = ("triton", "cpu", "torch")  # "ours" in the headline: the first of these that ran
COLORS = {"naive": "tab:red", "naive_compiled": "tab:orange", "torch": "tab:blue", "cpu": "tab:green",
          "triton": "tab:purple", "liger": "tab:brown", "liger_kl": "tab:pink"}
SHORT_DTYPE = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}


# --- progress ----------------------------------------------------------------------------------------------

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


# --- rows --------------------------------------------------------------------------------------------------

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


def _round(value, digits=3):
    if value is None or value == "":
        return ""
    if value == 0:
        return 0
    return round(value, max(digits - 1 - int(math.floor(math.log10(abs(value)))), 0))


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
    row.update(repeats=len(times), warmup_s=_round(result["warmup_s"]), median_ms=_round(median, 4),
               min_ms=_round(times[0], 4), max_ms=_round(times[-1], 4),
               loss="" if result["loss"] is None else f"{result['loss']:.7g}", load_avg_1m=result.get("load_avg_1m", ""))
    work = suite.work(shape, result["mode"])
    seconds = median / 1e3
    if "bytes" in work:
        row["min_traffic_GB"] = _round(work["bytes"] / 1e9, 4)
        row["GB_per_s"] = _round(work["bytes"] / seconds / 1e9)
        ceiling = context.get("ceiling_copy_GBps")
        if ceiling:
            row["pct_of_ceiling"] = _round(100 * row["GB_per_s"] / ceiling)
    if "flops" in work:
        row["TFLOP"] = _round(work["flops"] / 1e12, 4)
        row["TFLOP_per_s"] = _round(work["flops"] / seconds / 1e12)
        ceiling = context.get(f"ceiling_matmul_{SHORT_DTYPE.get(shape['dtype'], shape['dtype'])}_TFLOPs")
        if ceiling:
            row["pct_of_ceiling"] = _round(100 * row["TFLOP_per_s"] / ceiling)
    if "tokens" in work:
        row["tokens_per_s"] = _round(work["tokens"] / seconds)
    if row["device"] == "cpu":
        row["exp_passes"] = _round(ceilings.exp_passes(median, context, row))
    increase = max(result["peak_bytes"] - result["before_bytes"], 0)
    row.update(
        inputs_MiB=_round(result["input_bytes"] / MiB, 4), output_MiB=_round(result["output_bytes"] / MiB, 4),
        baseline_MiB=_round(result["baseline_bytes"] / MiB, 4), op_increase_MiB=_round(increase / MiB, 4),
        beyond_output_MiB=_round((increase - result["output_bytes"]) / MiB, 4),
        peak_MiB=_round(result["peak_bytes"] / MiB, 4),
    )
    return row


def case_key(row: dict) -> tuple:
    return (row["suite"], row["op"], row["mode"], row["dtype"]) + tuple(row[k] for k in SHAPE_KEYS)


def add_ratios(rows: list) -> None:
    """The ratio columns, against every baseline that ran on the same case."""
    by_case = {}
    for row in rows:
        if row["status"] == "ok":
            by_case.setdefault(case_key(row), {})[row["impl"]] = row
    for row in rows:
        if row["status"] != "ok":
            continue
        peers = by_case[case_key(row)]
        for baseline in implementations.BASELINES:
            other = peers.get(baseline)
            if other is None:
                continue
            row[f"speedup_vs_{baseline}"] = _round(other["median_ms"] / row["median_ms"])
            row[f"memory_ratio_vs_{baseline}"] = _round(
                max(other["op_increase_MiB"], 1.0) / max(row["op_increase_MiB"], 1.0))
        naive = peers.get("naive")
        if naive is not None and not row["impl"].startswith("liger") and row["loss"] and naive["loss"]:
            reference = float(naive["loss"])
            row["loss_rel_diff_vs_naive"] = f"{abs(float(row['loss']) - reference) / max(abs(reference), 1e-30):.1e}"


# --- tables --------------------------------------------------------------------------------------------------

def _metric_column(suite_name: str) -> tuple:
    if suite_name == FUSED_LINEAR:
        return "TFLOP_per_s", "TFLOP/s"
    if suite_name == "training_step":
        return "tokens_per_s", "tokens/s"
    return "GB_per_s", "GB/s"


def _fmt(value, digits=3) -> str:
    if value == "" or value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:.0f}"
    return str(value)


def table(rows: list, suite_name: str) -> tuple:
    """(header, body rows, skipped notes) of one suite's table."""
    metric, metric_label = _metric_column(suite_name)
    show_h = suite_name in (FUSED_LINEAR, "training_step")
    header = ["op", "mode", "dtype", "N", "V"] + (["H"] if show_h else []) + [
        "impl", "median ms", "spread", metric_label, "% ceil", "exp-passes", "op +MiB", "peak MiB",
        "× naive", "× compiled", "× liger", "mem ÷ naive"]
    body, skipped, failures = [], OrderedDict(), []
    for row in rows:
        if row["suite"] != suite_name:
            continue
        if row["status"] == "skipped":
            skipped.setdefault((row["impl"], row["note"]), 0)
            skipped[(row["impl"], row["note"])] += 1
            continue
        cells = [row["op"], row["mode"], SHORT_DTYPE.get(row["dtype"], row["dtype"]), str(row["N"]), str(row["V"])]
        if show_h:
            cells.append(f"{row['H']}/{row['H_teacher']}")
        cells.append(row["impl"])
        if row["status"] != "ok":
            cells += [row["status"]] + [""] * 10
            failures.append(f"{row['status']}: {row['impl']} {row['op']} {row['mode']} {cells[2]} N={row['N']} "
                            f"V={row['V']}: {row['note']}")
        else:
            spread = (row["max_ms"] - row["min_ms"]) / row["median_ms"] * 100 if row["median_ms"] else 0
            liger = row["speedup_vs_liger"] or row["speedup_vs_liger_kl"]
            cells += [_fmt(row["median_ms"], 4), f"±{spread / 2:.0f}%", _fmt(row[metric]), _fmt(row["pct_of_ceiling"], 2),
                      _fmt(row["exp_passes"]), _fmt(row["op_increase_MiB"], 4), _fmt(row["peak_MiB"], 4), _fmt(row["speedup_vs_naive"]),
                      _fmt(row["speedup_vs_naive_compiled"]), _fmt(liger), _fmt(row["memory_ratio_vs_naive"])]
        body.append(cells)
    notes = [f"skipped: {impl} ({count} rows): {note}" for (impl, note), count in skipped.items()]
    compile_times = [row["warmup_s"] for row in rows if row["suite"] == suite_name and row["status"] == "ok"
                     and row["impl"] == "naive_compiled" and row["mode"] == MODE_ORDER[0]]
    if compile_times:
        notes.append(f"naive_compiled: first call per shape (torch.compile included; column warmup_s) "
                     f"{_span(compile_times, ' s')}")
    return header, body, notes + failures


def print_header(context: dict, args, repeats: int, warmup: int) -> None:
    import os

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


# --- headline --------------------------------------------------------------------------------------------------

def _span(values: list, suffix: str = "×") -> str:
    values = [v for v in values if v != ""]
    if not values:
        return ""
    low, high = min(values), max(values)
    return f"{_fmt(low)}{suffix}" if _fmt(low) == _fmt(high) else f"{_fmt(low)}–{_fmt(high)}{suffix}"


def headline(rows: list) -> list:
    """Per suite, mode and dtype: our default implementation on this device against each baseline, as the
    range over the shapes measured."""
    lines = []
    groups = OrderedDict()
    for row in rows:
        if row["status"] == "ok":
            groups.setdefault((row["suite"], row["mode"], row["dtype"]), []).append(row)
    for (suite_name, mode, dtype), group in sorted(groups.items(), key=lambda kv: (
            SUITE_ORDER.index(kv[0][0]), MODE_ORDER.index(kv[0][1]), kv[0][2])):
        ours = next((impl for impl in PREFERRED if any(r["impl"] == impl for r in group)), None)
        if ours is None:
            continue
        mine = [r for r in group if r["impl"] == ours]
        parts = []
        for baseline in implementations.BASELINES:
            if baseline == ours:
                continue
            speed = [r[f"speedup_vs_{baseline}"] for r in mine]
            memory = [r[f"memory_ratio_vs_{baseline}"] for r in mine]
            if any(v != "" for v in speed):
                parts.append(f"vs {baseline}: speed-up {_span(speed)}, memory ÷ {_span(memory)}")
        if parts:
            ops = sorted({r["op"] for r in mine})
            lines.append(f"{suite_name} {mode} {SHORT_DTYPE.get(dtype, dtype)} ({', '.join(ops)}, {len(mine)} rows): "
                         f"`{ours}` " + "; ".join(parts))
    return lines


# --- files ---------------------------------------------------------------------------------------------------

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


def write_markdown(rows: list, path: Path, context: dict, command: str, plots: dict, elapsed_s: float) -> Path:
    lines = [
        f"# distillm2_kernels benchmarks: {context['device_name']}",
        "",
        f"Command (from the repository root): `{command}`; {elapsed_s / 60:.1f} minutes. Raw rows: "
        f"[`{Path(path).with_suffix('.csv').name}`]({Path(path).with_suffix('.csv').name}) (the columns are "
        "described in `benchmarks/report.py`).",
        "",
        f"- date {context['date']}, commit `{context['commit']}`, distillm2_kernels {context['library']}",
        f"- torch {context['torch']}" + (f", CUDA {context['cuda']}" if context["cuda"] else "")
        + f", triton {context['triton']}, liger-kernel {context['liger_kernel']}, C++ kernels "
          f"{context['cpu_kernels']}, {context['threads']} threads",
        f"- measured ceilings: copy {context['ceiling_copy_GBps']} GB/s; matmul {context['ceiling_matmul_bf16_TFLOPs']} "
        f"TFLOP/s (bf16), {context['ceiling_matmul_fp32_TFLOPs']} TFLOP/s (fp32)"
        + (f"; float32 exp pass {context['ceiling_exp_ns_per_entry']} ns/entry (column exp_passes)"
           if context.get("ceiling_exp_ns_per_entry") else ""),
        "",
        "## Headline",
        "",
        "Our default implementation on this device against each baseline, the range over the shapes measured "
        "(time: median; memory: the op's own peak increase, gradients included).",
        "",
    ]
    lines += [f"- {line}" for line in headline(rows)] or ["- (no comparisons: too few implementations ran)"]
    lines += ["", "## Implementations", "", "| name | what |", "| --- | --- |"]
    present = [i for i in implementations.IMPLEMENTATIONS if any(r["impl"] == i for r in rows)]
    lines += [f"| `{name}` | {implementations.DESCRIPTIONS[name]} |" for name in present]
    for suite_name in SUITE_ORDER:
        header, body, notes = table(rows, suite_name)
        if not body and not notes:
            continue
        lines += ["", f"## {suite_name}", ""]
        if body:
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(c.replace("|", "/") for c in cells) + " |" for cells in body]
        lines += [""] + [f"- {note}" for note in notes]
        checks = OrderedDict()
        for row in rows:
            if row["suite"] == suite_name and row["status"] == "ok" and row["note"]:
                checks.setdefault(row["note"], []).append(f"{row['op']} {row['impl']} {SHORT_DTYPE.get(row['dtype'], row['dtype'])} N={row['N']} V={row['V']}")
        lines += [f"- {note}: {', '.join(sorted(set(where)))}" for note, where in checks.items()]
        lines += [""] + [f"![{p.stem}]({p.name})" for p in plots.get(suite_name, [])]
    lines += [
        "",
        "## How to read this",
        "",
        "- Time: median of the timed calls after the warm-up (CUDA events on CUDA, wall clock on the CPU); "
        "`spread` is ±half the range (max − min) in % of the median. `warmup_s` in the CSV holds the first "
        "call, compile time included for `naive_compiled` (inductor reuses its on-disk cache across runs, so a "
        "repeated run compiles faster).",
        "- GB/s counts the minimum traffic of the logits ops (both logits read once; fwd+bwd also writes the "
        "gradient); TFLOP/s counts the minimum GEMM work of the fused-linear ops (2·N·V·(H + H_t) forward, "
        "+ 4·N·V·H for the hidden and weight gradients). `% ceil` is that against the measured copy bandwidth or "
        "the dtype's measured matmul throughput.",
        "- `op +MiB` is the op's own peak (peak during one call minus memory just before it: the gradients "
        "it returns included); `peak MiB` the absolute peak (CUDA: `max_memory_allocated`; CPU: the worker "
        "process's peak resident set, libraries and inputs included). `mem ÷ naive` = naive's `op +MiB` / "
        "this row's (under 1 MiB counted as 1 MiB).",
        "- `× naive`, `× compiled`, `× liger`: the baseline's median time / this row's, on the same shape.",
        "- Liger rows compute KL (α = 0) where ours compute α = 0.1: the same work for our kernels, which have "
        "no special case for α = 0. Liger's logits ops take log-probabilities: their time includes the "
        "`log_softmax` of both logits.",
        "- The fused-linear ops (ours and Liger's) compute the gradients in the forward when the inputs require "
        "grad, so their `fwd` time includes the backward's GEMMs.",
    ]
    if context["device"] == "cpu":
        lines.append("- CPU timings are wall clock on a machine that may have had other load: see `load_avg_1m` in "
                     "the CSV. The Triton kernels and Liger-Kernel need a CUDA GPU and are skipped here.")
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


def _plot_groups(rows: list, xkey: str) -> OrderedDict:
    fixed = [k for k in ("N", "V", "H", "H_teacher") if k != xkey]
    groups = OrderedDict()
    for row in rows:
        if row["status"] == "ok" and row["suite"] != "training_step":
            groups.setdefault((row["suite"], row["op"], row["dtype"]) + tuple(row[k] for k in fixed), []).append(row)
    return OrderedDict((key, group) for key, group in groups.items() if len({r[xkey] for r in group}) >= 2)


def _plot_sweep(plt, group: list, xkey: str, path: Path, title: str) -> None:
    import matplotlib.ticker
    suite_name = group[0]["suite"]
    metric, metric_label = _metric_column(suite_name)
    modes = [m for m in MODE_ORDER if any(r["mode"] == m for r in group)]
    xticks = sorted({r[xkey] for r in group})
    figure, axes = plt.subplots(len(modes), 4, figsize=(21, 4.2 * len(modes)), squeeze=False)
    for i, mode in enumerate(modes):
        ax_time, ax_rate, ax_increase, ax_peak = axes[i]
        for impl in implementations.IMPLEMENTATIONS:
            points = sorted((r for r in group if r["mode"] == mode and r["impl"] == impl), key=lambda r: r[xkey])
            if not points:
                continue
            style = dict(marker="o", label=impl, color=COLORS.get(impl))
            xs = [r[xkey] for r in points]
            median = [r["median_ms"] for r in points]
            ax_time.errorbar(xs, median, yerr=[[m - r["min_ms"] for m, r in zip(median, points)],
                                               [r["max_ms"] - m for m, r in zip(median, points)]], capsize=3, **style)
            ax_rate.plot(xs, [r[metric] for r in points], **style)
            ax_increase.plot(xs, [max(r["op_increase_MiB"], 0.01) for r in points], **style)
            ax_peak.plot(xs, [r["peak_MiB"] for r in points], **style)
        ceiling_key = "ceiling_copy_GBps" if metric == "GB_per_s" else \
            f"ceiling_matmul_{SHORT_DTYPE.get(group[0]['dtype'], group[0]['dtype'])}_TFLOPs"
        ceiling = group[0].get(ceiling_key)
        if ceiling:
            ax_rate.axhline(ceiling, linestyle="--", color="gray", label="measured ceiling")
        ax_time.set(ylabel=f"{mode}: median ms (bars: min–max)")
        ax_rate.set(ylabel=f"{mode}: {metric_label}")
        ax_increase.set(ylabel=f"{mode}: op's own memory increase, MiB")
        ax_peak.set(ylabel=f"{mode}: absolute peak memory, MiB")
        for ax in (ax_time, ax_rate, ax_increase, ax_peak):
            ax.set(xscale="log", yscale="log", xlabel=xkey)
            ax.set_xticks(xticks, [str(x) for x in xticks])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def _plot_training(plt, group: list, path: Path, title: str) -> None:
    group = sorted(group, key=lambda r: implementations.IMPLEMENTATIONS.index(r["impl"]))
    names = [r["impl"] for r in group]
    colors = [COLORS.get(n) for n in names]
    figure, (ax_rate, ax_memory) = plt.subplots(1, 2, figsize=(11, 4))
    ax_rate.bar(names, [r["tokens_per_s"] for r in group], color=colors)
    ax_rate.set(ylabel="tokens / s (median step)")
    x = range(len(group))
    ax_memory.bar([i - 0.2 for i in x], [r["op_increase_MiB"] for r in group], width=0.4, color=colors,
                  label="step's own increase")
    ax_memory.bar([i + 0.2 for i in x], [r["peak_MiB"] for r in group], width=0.4, color=colors, alpha=0.45,
                  label="absolute peak")
    ax_memory.set_xticks(list(x), names)
    ax_memory.set(ylabel="MiB")
    ax_memory.legend(fontsize=8)
    for ax in (ax_rate, ax_memory):
        ax.grid(True, axis="y", alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def write_plots(rows: list, out: Path) -> dict:
    """PNG plots, {suite: [paths]}: per op, dtype and fixed dimensions, time, throughput and memory against V
    (and against N where N varies), one line per implementation; a bar chart per training-step shape."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return {}
    written = {}
    device = rows[0]["device_name"] if rows else ""
    for xkey in ("V", "N"):
        for key, group in _plot_groups(rows, xkey).items():
            suite_name, op, dtype = key[:3]
            first = group[0]
            fixed = {k: first[k] for k in ("N", "V", "H", "H_teacher") if k != xkey and first[k] != ""}
            if fixed.get("H_teacher") == fixed.get("H"):
                fixed.pop("H_teacher", None)
            fixed_text = "_".join(f"{k}{v}" for k, v in fixed.items())
            path = out / f"{op}_{SHORT_DTYPE.get(dtype, dtype)}_{fixed_text}_vs_{xkey}.png"
            title = f"{op} ({suite_name}), {dtype}, {', '.join(f'{k}={v}' for k, v in fixed.items())}: against {xkey}\n{device}"
            _plot_sweep(plt, group, xkey, path, title)
            written.setdefault(suite_name, []).append(path)
    steps = OrderedDict()
    for row in rows:
        if row["suite"] == "training_step" and row["status"] == "ok":
            steps.setdefault(tuple(row[k] for k in SHAPE_KEYS) + (row["dtype"],), []).append(row)
    for group in steps.values():
        r = group[0]
        path = out / f"{r['op']}_{SHORT_DTYPE.get(r['dtype'], r['dtype'])}_V{r['V']}_H{r['H']}_B{r['B']}_T{r['T']}.png"
        title = (f"one DistiLLM-2 training step: Llama V={r['V']}, H={r['H']} (teacher {r['H_teacher']}), "
                 f"{r['layers']} layers, {r['B']} pairs × T={r['T']}, {r['dtype']}\n{device}")
        _plot_training(plt, group, path, title)
        written.setdefault("training_step", []).append(path)
    return written


def write_all(rows: list, out: Path, context: dict, command: str, plots: bool = True, elapsed_s: float = 0.0) -> list:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = write_csv(rows, out / "results.csv")
    plot_paths = write_plots(rows, out) if plots else {}
    md_path = write_markdown(rows, out / "results.md", context, command, plot_paths, elapsed_s)
    count = sum(len(paths) for paths in plot_paths.values())
    return [csv_path, md_path] + ([f"{count} plots in {out}"] if count else [])
