"""`results.md`: the run's context, the headline, the implementations, the suites' tables and plots, and how
to read them."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from .. import implementations
from .ratios import headline
from .schema import SHORT_DTYPE, SUITE_ORDER
from .tables import table


def write_markdown(rows: list, path: Path, context: dict, command: str, plots: dict, elapsed_s: float) -> Path:
    lines = [
        f"# distillm2_kernels benchmarks: {context['device_name']}",
        "",
        f"Command (from the repository root): `{command}`; {elapsed_s / 60:.1f} minutes. Raw rows: "
        f"[`{Path(path).with_suffix('.csv').name}`]({Path(path).with_suffix('.csv').name}) (the columns are "
        "described in `benchmarks/report/schema.py`).",
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
