"""Per-step training metrics: a CSV file (and TensorBoard scalars when `tensorboard` is installed).

Columns: step (global optimizer step, from 1), epoch (0-based), loss, skl, srkl (mean over the batch's
sequences of each sequence's token mean), alpha_t, alpha_s (mean α of the teacher- and student-response
rows), beta, lr (the learning rate of this step), grad_norm (before clipping), tokens (tokens of the step's
forward passes, all processes), tokens_per_s, elapsed_s (wall time since the run or resumption started).
Values that do not apply to the loss are left empty (srkl, alpha_s, beta with loss="skl" or "kd"; with
loss="kd" the skl column is the forward KL, SKL at α = 0). On resume the rows after the checkpoint's step, and
a last row torn by a crash, are dropped first, so the file never holds a step twice.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Optional

__all__ = ["COLUMNS", "MetricsLog", "read_metrics"]

COLUMNS = ("step", "epoch", "loss", "skl", "srkl", "alpha_t", "alpha_s", "beta", "lr", "grad_norm", "tokens",
           "tokens_per_s", "elapsed_s")


def read_metrics(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


class MetricsLog:
    def __init__(self, path: Path, *, resume_step: Optional[int] = None, enabled: bool = True,
                 tensorboard_dir: Optional[Path] = None):
        self.path = Path(path)
        self.enabled = enabled
        self._writer = None
        self._tensorboard = None
        if not enabled:
            return
        kept = []
        if resume_step is not None and self.path.exists():
            kept = [  # a row torn by a crash (fields missing) is dropped: its step may read as an earlier one
                row for row in read_metrics(self.path)
                if None not in row.values() and None not in row and int(row["step"]) <= resume_step
            ]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(kept)
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        temporary.write_text(buffer.getvalue())
        os.replace(temporary, self.path)
        self._handle = open(self.path, "a", newline="")
        self._writer = csv.DictWriter(self._handle, fieldnames=COLUMNS, lineterminator="\n")
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                pass
            else:
                self._tensorboard = SummaryWriter(str(tensorboard_dir))

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        try:
            self._writer.writerow({key: ("" if row.get(key) is None else row[key]) for key in COLUMNS})
            self._handle.flush()
        except OSError as error:  # a full disk: say which file
            raise OSError(error.errno, f"writing {self.path}: {error.strerror or error}") from error
        if self._tensorboard is not None:
            for key in COLUMNS[2:]:
                if row.get(key) is not None:
                    self._tensorboard.add_scalar(f"train/{key}", row[key], row["step"])

    def close(self) -> None:
        if self.enabled:
            self._handle.close()
            if self._tensorboard is not None:
                self._tensorboard.close()
