"""The suite's output, one concept per module:

- `schema`    the rows and their columns (described there), the CSV
- `numbers`   rounding for the CSV, number formats for the tables
- `ratios`    the ratio columns against each baseline, and the headline
- `tables`    one suite's table, as the console and the markdown show it
- `console`   the progress bar, the header, the tables and the headline on the terminal
- `markdown`  `results.md`
- `plots`     the PNG plots

`write_all` writes a run's files: `results.csv`, the plots and `results.md`.
"""

from __future__ import annotations

from pathlib import Path

from .markdown import write_markdown
from .plots import write_plots
from .schema import write_csv


def write_all(rows: list, out: Path, context: dict, command: str, plots: bool = True, elapsed_s: float = 0.0) -> list:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = write_csv(rows, out / "results.csv")
    plot_paths = write_plots(rows, out) if plots else {}
    md_path = write_markdown(rows, out / "results.md", context, command, plot_paths, elapsed_s)
    count = sum(len(paths) for paths in plot_paths.values())
    return [csv_path, md_path] + ([f"{count} plots in {out}"] if count else [])
