"""Distilling the student by one method through the reference trainer, with held-out points along the way.

Methods (all on the same pairs file, from the same initial student, with the same steps, learning rate,
batch size and seed; `distillm2_kernels.trainer.objectives` computes them):

- `distillm2` (trainer loss `distillm2`, preset `distillm2`): SKL (α = 0.1) on the teacher's responses +
  SRKL (α = 0.1, mixture detached) on the student's — the released DistiLLM-2 code;
- `kd` (loss `kd`): forward KL(p ‖ q) on the teacher's responses only (SKL at α = 0) — plain KD on teacher
  outputs;
- `skl` (loss `skl`): SKL (α = 0.1) on the teacher's responses only — DistiLLM-2 without its SRKL half.

The held-out curve comes from the trainer's own resume path: a run of `steps` optimizer steps spans
`ceil(steps / steps_per_epoch)` epochs over the pairs; the trainer is called with `stop_at_epoch=e` for a few
epochs `e` spread over the run (each call ends with the student saved to `<run>/final`, which is evaluated),
then once more to the end, each call resuming from the previous one's checkpoint. The trainer's resume is
exact (same batches, random streams, optimizer, schedule and curriculum: the final weights with and without the
stops were checked bit-identical here), so the curve costs a few reloads and checkpoints and does not change
the training run.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

__all__ = ["METHODS", "DistilSettings", "CurvePoint", "DistilResult", "distil"]

# method -> (trainer loss, objective preset)
METHODS: Dict[str, Tuple[str, str]] = {
    "distillm2": ("distillm2", "distillm2"),
    "kd": ("kd", "distillm2"),
    "skl": ("skl", "distillm2"),
}


@dataclass(frozen=True)
class DistilSettings:
    steps: int
    lr: float
    batch_size: int
    seed: int
    use_lora: bool = False
    warmup_ratio: float = 0.1
    max_length: int = 64
    eval_points: int = 4  # held-out evaluations during the run, the last one at the end
    backend: str = "auto"


@dataclass
class CurvePoint:
    step: int
    accuracy: float
    nll: float


@dataclass
class DistilResult:
    method: str
    final_dir: Path
    metrics_csv: Path
    steps: int
    train_seconds: float  # wall time of the trainer calls (checkpoints and reloads of the curve included)
    eval_seconds: float  # held-out evaluations along the way
    curve: List[CurvePoint] = field(default_factory=list)


def _stop_epochs(total_epochs: int, points: int) -> List[Optional[int]]:
    """Epochs after which to stop and evaluate, spread over the run; None (run to the end) last."""
    stops = sorted({max(1, round(k * total_epochs / points)) for k in range(1, points)} - {total_epochs})
    return [*stops, None]


def distil(
    method: str,
    *,
    teacher_dir: Path,
    student_dir: Path,
    pairs_path: Path,
    num_pairs: int,
    output_dir: Path,
    settings: DistilSettings,
    evaluate_model: Callable[[Path], Tuple[float, float]],
    progress: bool = True,
) -> DistilResult:
    """Train a copy of the student at `student_dir` by `method` into `output_dir` (removed first); evaluate
    `evaluate_model(final_dir) -> (accuracy, nll)` at `settings.eval_points` points."""
    from ..trainer.training import TrainConfig, train

    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    loss, preset = METHODS[method]
    output_dir = Path(output_dir)
    if output_dir.exists():
        shutil.rmtree(output_dir)  # a fresh run: `resume` below must only see this run's checkpoints
    steps_per_epoch = math.ceil(num_pairs / settings.batch_size)
    total_epochs = math.ceil(settings.steps / steps_per_epoch)
    result = DistilResult(method, output_dir / "final", output_dir / "metrics.csv", 0, 0.0, 0.0)
    for stop in _stop_epochs(total_epochs, max(1, settings.eval_points)):
        config = TrainConfig(
            teacher=str(teacher_dir), student=str(student_dir), data=str(pairs_path), output=str(output_dir),
            preset=preset, loss=loss, max_steps=settings.steps, lr=settings.lr, batch_size=settings.batch_size,
            grad_accum=1, max_length=settings.max_length, use_lora=settings.use_lora, seed=settings.seed,
            warmup_ratio=settings.warmup_ratio, save_steps=None, save_total_limit=1, logging_steps=1,
            backend=settings.backend, progress=progress, stop_at_epoch=stop, resume=True,
        )
        started = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # the trainer's "resuming from ..." is progress, not results
            trained = train(config)
        result.train_seconds += time.perf_counter() - started
        started = time.perf_counter()
        accuracy, nll = evaluate_model(trained.final_dir)
        result.eval_seconds += time.perf_counter() - started
        result.curve.append(CurvePoint(trained.global_step, accuracy, nll))
        result.steps = trained.global_step
    return result
