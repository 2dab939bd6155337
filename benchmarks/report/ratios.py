"""The ratio columns (against each baseline on the same case) and the headline that sums them up."""

from __future__ import annotations

from collections import OrderedDict

from .. import implementations
from .numbers import significant, span
from .schema import MODE_ORDER, SHORT_DTYPE, SUITE_ORDER, case_key

PREFERRED = ("triton", "cpu", "torch")  # "ours" in the headline: the first of these that ran


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
            row[f"speedup_vs_{baseline}"] = significant(other["median_ms"] / row["median_ms"])
            row[f"memory_ratio_vs_{baseline}"] = significant(
                max(other["op_increase_MiB"], 1.0) / max(row["op_increase_MiB"], 1.0))
        naive = peers.get("naive")
        if naive is not None and not row["impl"].startswith("liger") and row["loss"] and naive["loss"]:
            reference = float(naive["loss"])
            row["loss_rel_diff_vs_naive"] = f"{abs(float(row['loss']) - reference) / max(abs(reference), 1e-30):.1e}"


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
                parts.append(f"vs {baseline}: speed-up {span(speed)}, memory ÷ {span(memory)}")
        if parts:
            ops = sorted({r["op"] for r in mine})
            lines.append(f"{suite_name} {mode} {SHORT_DTYPE.get(dtype, dtype)} ({', '.join(ops)}, {len(mine)} rows): "
                         f"`{ours}` " + "; ".join(parts))
    return lines
