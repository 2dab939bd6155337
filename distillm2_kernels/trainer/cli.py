"""The `distillm2` command (also `python -m distillm2_kernels.trainer`): generate, pair, score, train, pipeline.

    distillm2 generate --model PATH --prompts FILE --output FILE.jsonl [--n N] [--temperature 0.8]
                       [--top-p 0.95] [--max-new-tokens 1024] [--seed 42] [--engine auto|vllm|hf]
                       [--max-prompt-tokens N] [--generation-batch-size B] [--dtype D] [--max-model-len L]
                       [--gpu-memory-utilization F] [--tensor-parallel-size T] [--engine-args JSON]
    distillm2 pair     --teacher T.jsonl --student S.jsonl --output PAIRS.jsonl [--strict]
    distillm2 score    --teacher PATH --data PAIRS.jsonl --output CACHE/ [--top-k 32] [--batch-size 8]
                       [--max-length 1024] [--chosen-only] [--engine auto|vllm|hf] [--dtype D] [--engine-args JSON]
    distillm2 train    --teacher PATH --student PATH --data PAIRS.jsonl --output DIR [options of TrainConfig]
                       (or --teacher-cache CACHE/ in place of --teacher: no teacher model is loaded)
    distillm2 pipeline --prompts FILE --teacher PATH --student PATH --output DIR [--epochs 3]
                       [generation options] [training options] [--launcher "accelerate launch ..."]
                       [--score-top-k K]

`distillm2 <command> --help` lists every option. Errors in the input (a malformed data file, a missing
folder, an impossible option or combination of options: a `ValueError` or `FileNotFoundError`) are printed
as one line, naming the file and the line where there is one, with exit status 2; so is an output that
cannot be written (a read-only folder, a path under a file), checked before any model is loaded. A failure
of the machine while writing (an `OSError`: a full disk, which says "No space left on device") is one line
too, with exit status 1.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Optional, Sequence

from .arguments import (
    PIPELINE_EXCLUDED,
    json_object,
    add_generation_options,
    add_training_options,
    train_config,
    training_options,
)
from .generation import ENGINES, generate
from .pairing import pair
from .pipeline import PipelineConfig, run_pipeline
from .scoring import DEFAULT_PAIRS_PER_SHARD, DEFAULT_TOP_K, score
from .training import train

__all__ = ["main", "build_parser"]

PROMPTS_HELP = ("prompts file: *.jsonl / *.json: JSON Lines with a 'prompt' field; any other name: plain text, "
                "one prompt per line")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distillm2", description="DistiLLM-2 reference trainer (distillm2_kernels)")
    commands = parser.add_subparsers(dest="command", required=True)

    g = commands.add_parser("generate", help="sample one response per prompt with the chat template")
    g.add_argument("--model", required=True, help="local model folder")
    g.add_argument("--prompts", required=True, help=PROMPTS_HELP)
    g.add_argument("--output", required=True, help="JSON Lines output (resumed when interrupted)")
    add_generation_options(g)
    g.add_argument("--seed", type=int, default=42, help="sampling seed (default 42)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")

    p = commands.add_parser("pair", help="join teacher and student responses into training pairs")
    p.add_argument("--teacher", required=True, help="the teacher's responses (JSON Lines from generate)")
    p.add_argument("--student", required=True, help="the student's responses (JSON Lines from generate)")
    p.add_argument("--output", required=True, help="pairs file (JSON Lines)")
    p.add_argument("--strict", action="store_true", help="fail when a prompt is missing on either side")

    s = commands.add_parser("score", help="store the teacher's top-K log-probabilities over every response token")
    s.add_argument("--teacher", required=True, help="local folder of the teacher model")
    s.add_argument("--data", required=True, help="pairs file (JSON Lines: prompt, chosen, rejected)")
    s.add_argument("--output", required=True, help="cache folder (resumed when interrupted)")
    s.add_argument("--top-k", type=int, default=DEFAULT_TOP_K,
                   help=f"K: the top-K tokens and the label (K+1 entries) per position (default {DEFAULT_TOP_K})")
    s.add_argument("--batch-size", type=int, default=8, help="pairs per teacher forward (default 8)")
    s.add_argument("--max-length", type=int, default=1024,
                   help="tokens per sequence, as `train --max-length` (default 1024; must be train's)")
    s.add_argument("--chosen-only", action="store_true",
                   help="score the teacher's responses only (enough for --loss skl / kd)")
    s.add_argument("--pairs-per-shard", type=int, default=DEFAULT_PAIRS_PER_SHARD,
                   help=f"pairs per shard file, the unit of resumption (default {DEFAULT_PAIRS_PER_SHARD})")
    s.add_argument("--engine", choices=ENGINES, default="auto",
                   help="auto = vLLM when installed and a GPU is present, else transformers (default)")
    s.add_argument("--dtype", default=None,
                   help="dtype of the teacher, e.g. bfloat16 (default: bf16 on GPU, else float32; vLLM's auto)")
    s.add_argument("--engine-args", type=json_object, default=None,
                   help="vLLM: further vllm.LLM keyword arguments as a JSON object")
    s.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")

    t = commands.add_parser("train", help="train the student with the DistiLLM-2 objective")
    t.add_argument("--teacher", default=None, help="local folder of the teacher model (or --teacher-cache)")
    t.add_argument("--student", required=True, help="local folder of the student model")
    t.add_argument("--data", required=True, help="pairs file (JSON Lines: prompt, chosen, rejected)")
    t.add_argument("--output", required=True, help="run folder: checkpoints, metrics.csv, final/")
    add_training_options(t)

    q = commands.add_parser("pipeline", help="batched on-policy loop: regenerate student responses every epoch")
    q.add_argument("--prompts", required=True, help=PROMPTS_HELP)
    q.add_argument("--teacher", required=True, help="local folder of the teacher model")
    q.add_argument("--student", required=True, help="local folder of the initial student model")
    q.add_argument("--output", required=True, help="pipeline folder (rerun the command to continue it)")
    q.add_argument("--epochs", type=int, default=3, help="epochs, each on fresh student responses (default 3)")
    q.add_argument("--seed", type=int, default=42, help="generation and training seed (default 42)")
    q.add_argument("--launcher", default=None,
                   help="run training under this launcher in a subprocess, e.g. \"accelerate launch "
                        "--config_file zero3.yaml\" (generation then runs in its own process too)")
    q.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    q.add_argument("--score-top-k", type=int, default=None,
                   help="score each epoch's pairs with the teacher (top-K, `distillm2 score`) into "
                        "epoch-<e>/teacher-cache and train on the cache, with no teacher model in training")
    add_generation_options(q)
    add_training_options(q, exclude=PIPELINE_EXCLUDED)
    return parser


def _run(args: argparse.Namespace) -> None:
    if args.command == "generate":
        result = generate(
            args.model, args.prompts, args.output, n=args.n, temperature=args.temperature, top_p=args.top_p,
            max_new_tokens=args.max_new_tokens, seed=args.seed, engine=args.engine,
            batch_size=args.generation_batch_size, dtype=args.dtype, max_prompt_tokens=args.max_prompt_tokens,
            max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization,
            tensor_parallel_size=args.tensor_parallel_size, engine_args=args.engine_args, progress=args.progress,
        )
        print(f"{result.num_rows} responses in {result.output_path} ({result.num_generated} generated now, "
              f"{result.num_reused} from an earlier run)")
    elif args.command == "pair":
        report = pair(args.teacher, args.student, args.output, strict=args.strict)
        print(report.summary())
    elif args.command == "score":
        result = score(
            args.teacher, args.data, args.output, top_k=args.top_k, batch_size=args.batch_size,
            max_length=args.max_length, with_rejected=not args.chosen_only, engine=args.engine, dtype=args.dtype,
            pairs_per_shard=args.pairs_per_shard, engine_args=args.engine_args, progress=args.progress,
        )
        print(f"{result.num_pairs} pairs in {result.output_dir} ({result.num_scored} scored now, "
              f"{result.num_reused} from an earlier run); {result.tokens} tokens in {result.seconds:.1f} s, "
              f"{result.tokens_per_s:.0f} tokens/s")
    elif args.command == "train":
        result = train(train_config(args))
        from accelerate import PartialState

        if PartialState().is_main_process:
            print(f"step {result.global_step}/{result.total_steps}; model: {result.final_dir}; "
                  f"metrics: {result.metrics_csv}")
    else:
        training = training_options(args, exclude=PIPELINE_EXCLUDED)
        result = run_pipeline(PipelineConfig(
            prompts=args.prompts, teacher=args.teacher, student=args.student, output=args.output, epochs=args.epochs,
            n=args.n, temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
            seed=args.seed, engine=args.engine, generation_batch_size=args.generation_batch_size,
            max_prompt_tokens=args.max_prompt_tokens, dtype=args.dtype, max_model_len=args.max_model_len,
            gpu_memory_utilization=args.gpu_memory_utilization, tensor_parallel_size=args.tensor_parallel_size,
            engine_args=args.engine_args, train=training,
            launcher=shlex.split(args.launcher) if args.launcher else None, progress=args.progress,
            score_top_k=args.score_top_k,
        ))
        print(f"{result.epochs_completed} epoch(s) done; model: {result.final_dir}; metrics: {result.metrics_csv}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `distillm2`; returns the exit status (2 for bad input, reported on one line)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _run(args)
    except (ValueError, FileNotFoundError) as error:  # DataError is a ValueError
        print(f"distillm2 {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the machine, not the input: a full disk, an I/O error
        print(f"distillm2 {args.command}: error: {error}", file=sys.stderr)
        return 1
    return 0
