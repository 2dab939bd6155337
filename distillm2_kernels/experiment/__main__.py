"""`python -m distillm2_kernels.experiment [--quick] [--output DIR] [--seed N] ...`: see `run.py`."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

from .distil import METHODS
from .run import QUICK, ExperimentConfig, run_experiment


def parse_args(argv: Optional[Sequence[str]] = None) -> ExperimentConfig:
    default = ExperimentConfig()
    parser = argparse.ArgumentParser(
        prog="python -m distillm2_kernels.experiment",
        description="A miniature distillation experiment: a teacher and a weaker student trained from scratch on "
        "multi-digit addition, then the student distilled with the DistiLLM-2 objective, plain KD and SKL alone "
        "(same budget and seed); prints held-out accuracy and NLL and writes results.csv, results.md and "
        "training_curves.png.",
    )
    parser.add_argument("--output", type=Path, default=default.output, help="output folder (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run with toy sizes")
    parser.add_argument("--seed", type=int, default=default.seed)
    parser.add_argument("--digits", type=int, help=f"operand digits (default {default.digits})")
    parser.add_argument("--teacher-steps", type=int, help=f"default {default.teacher_steps}")
    parser.add_argument("--student-steps", type=int, help=f"default {default.student_steps}")
    parser.add_argument("--num-prompts", type=int, help=f"distillation prompts (default {default.num_prompts})")
    parser.add_argument(
        "--distil-steps", type=int, help=f"optimizer steps per method (default {default.distil_steps})"
    )
    parser.add_argument("--distil-lr", type=float, help=f"default {default.distil_lr}")
    parser.add_argument("--distil-batch-size", type=int, help=f"pairs per step (default {default.distil_batch_size})")
    parser.add_argument(
        "--temperature", type=float, help=f"sampling of the distillation data (default {default.temperature})"
    )
    parser.add_argument(
        "--use-lora", action="store_true", help="LoRA/DoRA (the trainer's defaults) instead of full fine-tuning"
    )
    parser.add_argument(
        "--eval-points", type=int, help=f"held-out evaluations per method (default {default.eval_points})"
    )
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), help="default: distillm2 kd skl")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    config = replace(default, **QUICK) if args.quick else default
    overrides = {
        "output": args.output, "seed": args.seed, "digits": args.digits, "teacher_steps": args.teacher_steps,
        "student_steps": args.student_steps, "num_prompts": args.num_prompts, "distil_steps": args.distil_steps,
        "distil_lr": args.distil_lr, "distil_batch_size": args.distil_batch_size, "temperature": args.temperature,
        "eval_points": args.eval_points, "methods": tuple(args.methods) if args.methods else None,
    }
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    if args.use_lora:
        config = replace(config, use_lora=True)
    if args.no_progress:
        config = replace(config, progress=False)
    return config


def main(argv: Optional[Sequence[str]] = None) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars for models of a few hundred kB
    run_experiment(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
