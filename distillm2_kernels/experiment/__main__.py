"""`python -m distillm2_kernels.experiment [--quick] [--seeds N | --seed S ...] [--output DIR] ...`: see `run.py`."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

from .distil import ARMS
from .run import LR_GRID, QUICK, TUNE_SEED, ExperimentConfig, run_experiment, tune_learning_rates


def _lr_override(text: str) -> tuple:
    arm, _, value = text.partition("=")
    if arm not in ARMS or not value:
        raise argparse.ArgumentTypeError(f"expected ARM=LR with ARM one of {sorted(ARMS)}, got {text!r}")
    return arm, float(value)


def build_parser() -> argparse.ArgumentParser:
    default = ExperimentConfig()
    parser = argparse.ArgumentParser(
        prog="python -m distillm2_kernels.experiment",
        description="A miniature distillation experiment: per seed, a teacher and a smaller student trained from "
        "scratch on arranging letters with no two equal letters adjacent (many valid answers per prompt, checked "
        "exactly), then the student distilled by six arms (distillm2, paper, skl, srkl, kd, distillm2-onpolicy) "
        "with the same optimizer steps and pairs; prints mean ± std over the seeds of sample validity, greedy "
        "validity, the teacher's log-probability of the student's samples and coverage, with a paired comparison "
        "against distillm2, and writes results.csv, summary.csv, results.md and results.png.",
    )
    parser.add_argument("--output", type=Path, default=default.output, help="output folder (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a smoke run of toy sizes (the numbers mean nothing)")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=int, metavar="N", help=f"run seeds 0 … N−1 (default {len(default.seeds)})")
    seeds.add_argument("--seed", type=int, nargs="+", metavar="S", help="run these seeds")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), help="default: all six")
    parser.add_argument("--lr", type=_lr_override, action="append", default=[], metavar="ARM=LR",
                        help="an arm's learning rate (default: the committed sweep's, see run.DEFAULT_LRS)")
    parser.add_argument("--tune-lr", action="store_true",
                        help=f"first choose each arm's learning rate from {list(LR_GRID)} on seed {TUNE_SEED} "
                        "(validation prompts), then run the seeds with them")
    parser.add_argument("--teacher-steps", type=int, help=f"default {default.teacher_steps}")
    parser.add_argument("--student-steps", type=int, help=f"default {default.student_steps}")
    parser.add_argument("--num-prompts", type=int, help=f"distillation prompts (default {default.num_prompts})")
    parser.add_argument("--distil-epochs", type=int, help=f"epochs over the pairs (default {default.distil_epochs})")
    parser.add_argument("--distil-batch-size", type=int,
                        help=f"pairs per step (default {default.distil_batch_size})")
    parser.add_argument("--eval-samples", type=int, help=f"samples per held-out prompt (default {default.eval_samples})")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: these models are too small to gain from more, and one "
                        "thread keeps the float rounding independent of the machine's core count)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> ExperimentConfig:
    """The experiment's configuration from the command line (`--tune-lr` and `--threads` are `main`'s)."""
    return config_from(build_parser().parse_args(argv))


def config_from(args: argparse.Namespace) -> ExperimentConfig:
    default = ExperimentConfig()
    config = replace(default, **QUICK) if args.quick else default
    seeds = args.seed if args.seed else (range(args.seeds) if args.seeds else None)
    overrides = {
        "output": args.output, "seeds": tuple(seeds) if seeds else None, "teacher_steps": args.teacher_steps,
        "student_steps": args.student_steps, "num_prompts": args.num_prompts, "distil_epochs": args.distil_epochs,
        "distil_batch_size": args.distil_batch_size, "eval_samples": args.eval_samples,
        "arms": tuple(args.arms) if args.arms else None,
    }
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    if args.lr:
        config = replace(config, lrs=tuple({**dict(config.lrs), **dict(args.lr)}.items()))
    if args.no_progress:
        config = replace(config, progress=False)
    return config


def main(argv: Optional[Sequence[str]] = None) -> int:
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars for models of a few kB
    args = build_parser().parse_args(argv)
    config = config_from(args)
    torch.set_num_threads(args.threads)
    if args.tune_lr:
        grid = LR_GRID[1:] if config.teacher_steps < 100 else LR_GRID  # --quick: a grid of two
        config = replace(config, lrs=tuple({**dict(config.lrs), **tune_learning_rates(config, grid)}.items()))
    run_experiment(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
