"""One suite's table (header, rows of cells, notes), as the console and the markdown show it."""

from __future__ import annotations

from collections import OrderedDict

from .numbers import format_number, span
from .schema import FUSED_LINEAR, MODE_ORDER, SHORT_DTYPE, throughput_column


def table(rows: list, suite_name: str) -> tuple:
    """(header, body rows, skipped notes) of one suite's table."""
    metric, metric_label = throughput_column(suite_name)
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
            cells += [format_number(row["median_ms"], 4), f"±{spread / 2:.0f}%", format_number(row[metric]), format_number(row["pct_of_ceiling"], 2),
                      format_number(row["exp_passes"]), format_number(row["op_increase_MiB"], 4), format_number(row["peak_MiB"], 4), format_number(row["speedup_vs_naive"]),
                      format_number(row["speedup_vs_naive_compiled"]), format_number(liger), format_number(row["memory_ratio_vs_naive"])]
        body.append(cells)
    notes = [f"skipped: {impl} ({count} rows): {note}" for (impl, note), count in skipped.items()]
    compile_times = [row["warmup_s"] for row in rows if row["suite"] == suite_name and row["status"] == "ok"
                     and row["impl"] == "naive_compiled" and row["mode"] == MODE_ORDER[0]]
    if compile_times:
        notes.append(f"naive_compiled: first call per shape (torch.compile included; column warmup_s) "
                     f"{span(compile_times, ' s')}")
    return header, body, notes + failures
