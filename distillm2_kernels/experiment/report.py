"""The experiment's outputs: the printed table, `results.csv`, `results.md` and `training_curves.png`."""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

__all__ = ["Row", "format_table", "write_csv", "write_markdown", "plot_curves"]


@dataclass
class Row:
    model: str  # "teacher", "student (before)", or the distillation method
    stage: str  # "pretrained" or "distilled"
    size: str  # e.g. "4 layers x 128 hidden"
    parameters: int
    steps: int  # optimizer steps of the stage that produced the model
    accuracy: float  # held-out exact match, 0..1
    nll: float  # held-out nats per answer token
    train_seconds: float  # wall time of that stage's training


COLUMNS = ["model", "stage", "size", "parameters", "steps", "accuracy", "nll", "train_seconds"]


def _parameters(count: int) -> str:
    return f"{count / 1e6:.2f} M" if count >= 1e6 else f"{count / 1e3:.0f} k"


def format_table(rows: Sequence[Row]) -> str:
    """A fixed-width text table (accuracy in %)."""
    header = ["model", "params", "steps", "accuracy", "NLL/token", "train time"]
    lines = [
        [r.model, _parameters(r.parameters), str(r.steps), f"{100 * r.accuracy:.1f} %", f"{r.nll:.3f}",
         f"{r.train_seconds:.1f} s"]
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]

    def fmt(cells):  # the name column left-aligned, the numbers right-aligned
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *map(fmt, lines)])


def write_csv(rows: Sequence[Row], path: Path, settings: Dict[str, object]) -> Path:
    """One row per model; the run's settings repeated on every row (so the file stands alone)."""
    keys = sorted(settings)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS + keys)
        for row in rows:
            values = asdict(row)
            writer.writerow([_cell(values[c]) for c in COLUMNS] + [settings[k] for k in keys])
    return path


def _cell(value):
    return f"{value:.6g}" if isinstance(value, float) else value


def write_markdown(
    rows: Sequence[Row],
    path: Path,
    settings: Dict[str, object],
    notes: Sequence[str] = (),
    curves: Optional[Dict[str, List[tuple]]] = None,
) -> Path:
    """The table, the notes, the held-out accuracy / NLL at each evaluation point (`curves[method] =
    [(step, accuracy, nll), ...]`, when given) and the settings."""
    lines = [
        "# Miniature DistiLLM-2 experiment",
        "",
        "| model | parameters | steps | held-out accuracy | held-out NLL / answer token | training time |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {_parameters(r.parameters)} | {r.steps} | {100 * r.accuracy:.1f} % | {r.nll:.3f} | "
            f"{r.train_seconds:.1f} s |"
        )
    lines += ["", *notes]
    if curves:
        lines += ["", "Held-out accuracy / NLL during distillation:", "",
                  "| method | " + " | ".join(f"step {p[0]}" for p in next(iter(curves.values()))) + " |",
                  "| --- |" + " ---: |" * len(next(iter(curves.values())))]
        for method, points in curves.items():
            lines.append(f"| {method} | " + " | ".join(f"{100 * p[1]:.1f} % / {p[2]:.3f}" for p in points) + " |")
    lines += ["", "Settings:", ""]
    lines += [f"- `{k}`: {settings[k]}" for k in sorted(settings)]
    path.write_text("\n".join(lines) + "\n")
    return path


def plot_curves(
    path: Path,
    losses: Dict[str, List[tuple]],
    curves: Dict[str, List[tuple]],
    *,
    teacher: Optional[tuple] = None,
    title: str = "",
) -> Path:
    """Three panels: each method's training loss per step (its own objective, smoothed), and the held-out
    accuracy and NLL at the evaluation points (`curves[method] = [(step, accuracy, nll), ...]`), with the
    teacher's `(accuracy, nll)` as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (ax_loss, ax_acc, ax_nll) = plt.subplots(1, 3, figsize=(15, 4.2))
    colours = {}
    for method, points in losses.items():
        steps = [s for s, _ in points]
        values = [v for _, v in points]
        window = max(1, len(values) // 25)
        smooth = [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
                  for i in range(len(values))]
        line, = ax_loss.plot(steps, smooth, label=method)
        colours[method] = line.get_color()
    ax_loss.set(xlabel="optimizer step", ylabel="training loss (own objective)", yscale="log",
                title="training loss (moving average)")
    for method, points in curves.items():
        steps = [p[0] for p in points]
        colour = colours.get(method)
        ax_acc.plot(steps, [100 * p[1] for p in points], marker="o", label=method, color=colour)
        ax_nll.plot(steps, [p[2] for p in points], marker="o", label=method, color=colour)
    if teacher is not None:
        ax_acc.axhline(100 * teacher[0], color="grey", linestyle="--", label="teacher")
        ax_nll.axhline(teacher[1], color="grey", linestyle="--", label="teacher")
    ax_acc.set(xlabel="optimizer step", ylabel="held-out exact match (%)", title="held-out accuracy")
    ax_nll.set(xlabel="optimizer step", ylabel="nats per answer token", title="held-out NLL of the reference answers")
    for axis in (ax_loss, ax_acc, ax_nll):
        axis.grid(alpha=0.3)
        axis.legend()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
