"""The PNG plots: per op, dtype and fixed dimensions, time, throughput and memory against V (and N); a bar
chart per training-step shape. Needs matplotlib (none are drawn without it)."""

from __future__ import annotations

import sys
from collections import OrderedDict
from pathlib import Path

from .. import implementations
from .schema import MODE_ORDER, SHAPE_KEYS, SHORT_DTYPE, throughput_column

COLORS = {"naive": "tab:red", "naive_compiled": "tab:orange", "torch": "tab:blue", "cpu": "tab:green",
          "triton": "tab:purple", "liger": "tab:brown", "liger_kl": "tab:pink"}


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
    metric, metric_label = throughput_column(suite_name)
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
