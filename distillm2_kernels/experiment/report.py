"""The experiment's outputs: per-seed rows, the summary over seeds with a paired comparison, the printed
table, `results.csv`, `summary.csv`, `results.md` and `results.png` (means with error bars).

Statistics, per arm and metric over the seeds: the mean and the sample standard deviation (n − 1); against
`distillm2`, the mean of the per-seed differences (arm − distillm2, the same seed fixing teacher, initial
student, data and evaluation samples), how many seeds the arm is ahead, and the two-sided p-value of an
exact sign-flip permutation test of the paired differences (all 2ⁿ sign patterns; with 5 seeds the smallest
possible p is 2/32 = 0.0625, so no single metric can be "significant at 5 %" with 5 seeds).
"""

from __future__ import annotations

import csv
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .evaluate import METRICS

__all__ = ["SeedRow", "Summary", "summarise", "paired_permutation_p", "format_table", "write_csv",
           "write_summary_csv", "write_markdown", "plot_summary"]

PERCENT = {"valid_0.8", "valid_1.0", "greedy", "coverage"}
BASELINE = "distillm2"


@dataclass
class SeedRow:
    seed: int
    model: str  # "teacher", "student (before)" or an arm
    steps: int
    seconds: float
    metrics: Dict[str, float]  # METRICS keys, plus letters_error / adjacent_error


@dataclass
class Summary:
    model: str
    metric: str
    n: int
    mean: float
    std: float
    diff_mean: Optional[float] = None  # vs distillm2, paired by seed
    diff_std: Optional[float] = None
    ahead: Optional[int] = None  # seeds where the arm beats distillm2 (ties not counted)
    p_value: Optional[float] = None


def _mean_std(values: Sequence[float]) -> tuple:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return mean, std


def paired_permutation_p(differences: Sequence[float]) -> float:
    """Two-sided exact sign-flip p-value of the mean of paired `differences` (1.0 when all are 0)."""
    observed = abs(sum(differences))
    if observed == 0:
        return 1.0
    patterns = list(itertools.product((1, -1), repeat=len(differences)))
    extreme = sum(abs(sum(s * d for s, d in zip(signs, differences))) >= observed - 1e-12 for signs in patterns)
    return extreme / len(patterns)


def summarise(rows: Sequence[SeedRow], metrics: Sequence[str] = tuple(METRICS)) -> List[Summary]:
    """One `Summary` per model and metric, models in first-seen order."""
    models = list(dict.fromkeys(r.model for r in rows))
    by = {(r.model, r.seed): r for r in rows}
    seeds = sorted({r.seed for r in rows})
    out = []
    for model in models:
        for metric in metrics:
            present = [s for s in seeds if (model, s) in by]
            mean, std = _mean_std([by[model, s].metrics[metric] for s in present])
            summary = Summary(model, metric, len(present), mean, std)
            paired = [s for s in present if (BASELINE, s) in by]
            if model not in (BASELINE, "teacher", "student (before)") and paired:
                diffs = [by[model, s].metrics[metric] - by[BASELINE, s].metrics[metric] for s in paired]
                summary.diff_mean, summary.diff_std = _mean_std(diffs)
                summary.ahead = sum(d > 0 for d in diffs)
                summary.p_value = paired_permutation_p(diffs)
            out.append(summary)
    return out


def _value(metric: str, value: float) -> str:
    return f"{100 * value:.1f}" if metric in PERCENT else f"{value:.2f}"


def _cell(s: Summary) -> str:
    if s.n < 2:
        return _value(s.metric, s.mean)
    return f"{_value(s.metric, s.mean)} ± {_value(s.metric, s.std)}"


def _diff_cell(s: Summary) -> str:
    if s.diff_mean is None:
        return ""
    scale = 100 if s.metric in PERCENT else 1
    text = f"{scale * s.diff_mean:+.1f}" if s.metric in PERCENT else f"{s.diff_mean:+.2f}"
    return f"{text} ({s.ahead}/{s.n}, p={s.p_value:.2f})" if s.n > 1 else text


def _grid(summaries: Sequence[Summary]) -> Dict[str, Dict[str, Summary]]:
    grid: Dict[str, Dict[str, Summary]] = {}
    for s in summaries:
        grid.setdefault(s.model, {})[s.metric] = s
    return grid


def format_table(summaries: Sequence[Summary]) -> str:
    """Fixed-width text: mean ± std per model and metric (percentages for the fractions)."""
    grid = _grid(summaries)
    metrics = list(METRICS)
    header = ["model", *metrics]
    lines = [[model, *(_cell(cells[m]) for m in metrics)] for model, cells in grid.items()]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]

    def fmt(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, lines)])


def write_csv(rows: Sequence[SeedRow], path: Path, settings: Dict[str, object]) -> Path:
    """One row per seed and model; the run's settings repeated on every row (so the file stands alone)."""
    extra = sorted({k for r in rows for k in r.metrics} - set(METRICS))
    keys = sorted(settings)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["seed", "model", "steps", "seconds", *METRICS, *extra, *keys])
        for r in rows:
            writer.writerow([r.seed, r.model, r.steps, f"{r.seconds:.4g}",
                             *(f"{r.metrics[m]:.6g}" if m in r.metrics else "" for m in [*METRICS, *extra]),
                             *(settings[k] for k in keys)])
    return path


def write_summary_csv(summaries: Sequence[Summary], path: Path) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model", "metric", "n", "mean", "std", "diff_vs_distillm2", "diff_std", "seeds_ahead",
                         "p_value"])
        for s in summaries:
            writer.writerow([s.model, s.metric, s.n, f"{s.mean:.6g}", f"{s.std:.6g}",
                             *("" if v is None else (f"{v:.6g}" if isinstance(v, float) else v)
                               for v in (s.diff_mean, s.diff_std, s.ahead, s.p_value))])
    return path


def write_markdown(
    summaries: Sequence[Summary], path: Path, settings: Dict[str, object], notes: Sequence[str] = (),
    per_seed: Optional[Sequence[SeedRow]] = None,
) -> Path:
    """The mean ± std table, the paired differences against distillm2, the notes, per-seed values, settings."""
    grid = _grid(summaries)
    metrics = list(METRICS)
    n = max(s.n for s in summaries)
    lines = ["# Miniature DistiLLM-2 experiment", "", f"Mean ± standard deviation over {n} seed(s).", "",
             "| model | " + " | ".join(METRICS[m][0] for m in metrics) + " |",
             "| --- |" + " ---: |" * len(metrics)]
    lines += [f"| {model} | " + " | ".join(_cell(cells[m]) for m in metrics) + " |" for model, cells in grid.items()]
    diffs = [(model, cells) for model, cells in grid.items() if cells[metrics[0]].diff_mean is not None]
    if diffs:
        lines += ["", "Paired by seed against `distillm2`: mean difference (arm − distillm2; percentage points "
                      "for the fractions), seeds where the arm is ahead, exact sign-flip p-value.", "",
                  "| arm | " + " | ".join(metrics) + " |", "| --- |" + " ---: |" * len(metrics)]
        lines += [f"| {model} | " + " | ".join(_diff_cell(cells[m]) for m in metrics) + " |" for model, cells in diffs]
    lines += ["", *notes]
    if per_seed:
        lines += ["", "Per seed (valid_0.8 / valid_1.0 / greedy in %, teacher_logp, coverage in %; steps):", "",
                  "| seed | model | " + " | ".join(metrics) + " | letters / adjacent errors (T=0.8, %) | steps |",
                  "| ---: | --- |" + " ---: |" * (len(metrics) + 2)]
        for r in per_seed:
            lines.append(f"| {r.seed} | {r.model} | " + " | ".join(_value(m, r.metrics[m]) for m in metrics)
                         + f" | {100 * r.metrics['letters_error']:.1f} / {100 * r.metrics['adjacent_error']:.1f}"
                         f" | {r.steps} |")
    lines += ["", "Settings:", ""]
    lines += [f"- `{k}`: {settings[k]}" for k in sorted(settings)]
    path.write_text("\n".join(lines) + "\n")
    return path


def plot_summary(path: Path, summaries: Sequence[Summary], rows: Sequence[SeedRow], *, title: str = "") -> Path:
    """One panel per metric: each model's mean (large dot) ± one standard deviation (error bar), and every
    seed's value (small dots beside it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = _grid(summaries)
    models = list(grid)
    metrics = list(METRICS)
    figure, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 4.6))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, metric in zip(axes, metrics):
        scale = 100 if metric in PERCENT else 1
        means = [scale * grid[m][metric].mean for m in models]
        stds = [scale * grid[m][metric].std if grid[m][metric].n > 1 else 0.0 for m in models]
        x = list(range(len(models)))
        for i, model in enumerate(models):
            colour = colours[i % len(colours)]
            seeds = [scale * r.metrics[metric] for r in rows if r.model == model]
            axis.plot([i + 0.15] * len(seeds), seeds, ".", color=colour, alpha=0.5, markersize=5)
            axis.errorbar([i], [means[i]], yerr=[stds[i]], fmt="o", color=colour, capsize=5, markersize=7)
        axis.set_xticks(x, models, rotation=40, ha="right")
        axis.set_title(METRICS[metric][0], fontsize=9)
        axis.grid(axis="y", alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
