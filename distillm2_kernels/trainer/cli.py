"""The `distillm2` command (also `python -m distillm2_kernels.trainer`): generate, pair, train, pipeline.

    distillm2 generate --model PATH --prompts FILE --output FILE.jsonl [--n N] [--temperature 0.8]
                       [--top-p 0.95] [--max-new-tokens 1024] [--seed 42] [--engine auto|vllm|hf]
                       [--max-prompt-tokens N] [--generation-batch-size B] [--dtype D] [--max-model-len L]
                       [--gpu-memory-utilization F] [--tensor-parallel-size T] [--engine-args JSON]
    distillm2 pair     --teacher T.jsonl --student S.jsonl --output PAIRS.jsonl [--strict]
    distillm2 train    --teacher PATH --student PATH --data PAIRS.jsonl --output DIR [options of TrainConfig]
    distillm2 pipeline --prompts FILE --teacher PATH --student PATH --output DIR [--epochs 3]
                       [generation options] [training options] [--launcher "accelerate launch ..."]

`distillm2 <command> --help` lists every option. Errors in the input (a malformed data file, a missing
folder, an impossible option or combination of options: a `ValueError` or `FileNotFoundError`) are printed
as one line, naming the file and the line where there is one, with exit status 2; so is an output that
cannot be written (a read-only folder, a path under a file), checked before any model is loaded. A failure
of the machine while writing (an `OSError`: a full disk, which says "No space left on device") is one line
too, with exit status 1.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import MISSING, fields
from typing import Optional, Sequence

from .generation import ENGINES, generate
from .objectives import LOSSES
from .pairing import pair
from .pipeline import PipelineConfig, run_pipeline
from .training import BACKENDS, TrainConfig, train

__all__ = ["main", "build_parser", "training_arguments", "generation_arguments"]

# TrainConfig options of `train` and `pipeline`: field -> (argparse keyword arguments). Booleans are
# `--x/--no-x` switches. The four paths are required options of `train`, set by `pipeline` itself.
TRAINING_OPTIONS = {
    "preset": dict(choices=["distillm2", "paper", "distillm"],
                   help="objective preset: distillm2 = the released code (default), paper = Algorithm 1's α/β "
                        "curriculum, distillm = DistiLLM v1 conventions"),
    "loss": dict(choices=list(LOSSES), help="distillm2 = SKL(teacher responses) + SRKL(student responses) "
                                            "(default); skl = SKL on the teacher responses only; kd = forward KL"),
    "epochs": dict(type=int, help="epochs (default 1)"),
    "max_steps": dict(type=int, help="optimizer steps; overrides --epochs"),
    "lr": dict(type=float, help="peak learning rate, cosine schedule (default 5e-5)"),
    "batch_size": dict(type=int, help="pairs per micro-batch per process (default 8)"),
    "grad_accum": dict(type=int, help="micro-batches per optimizer step (default 1)"),
    "max_length": dict(type=int, help="tokens per sequence, prompt + response + EOS (default 1024)"),
    "lora_r": dict(type=int, help="LoRA rank (default 16)"),
    "lora_alpha": dict(type=int, help="LoRA alpha (default 128)"),
    "lora_dropout": dict(type=float, help="LoRA dropout (default 0.05)"),
    "dora": dict(help="DoRA, weight-decomposed LoRA (default on, as the paper)"),
    "use_lora": dict(flag="lora", help="train a LoRA adapter (default); --no-lora fine-tunes every weight"),
    "bf16": dict(help="bfloat16 weights (teacher; student base under LoRA) and autocast (default off)"),
    "resume": dict(help="continue from the latest checkpoint in --output (default off)"),
    "seed": dict(type=int, help="seed of the data order, LoRA init and dropout (default 42)"),
    "warmup_ratio": dict(type=float, help="linear warmup over this fraction of the steps (default 0.1)"),
    "save_steps": dict(type=int, help="checkpoint every N steps, besides each epoch's end; 0: only at those "
                                      "(default 500)"),
    "logging_steps": dict(type=int, help="metrics CSV row every N steps (default 1)"),
    "backend": dict(choices=list(BACKENDS), help="fused kernels' backend (default auto)"),
    "progress": dict(help="progress bars (default on)"),
    "weight_decay": dict(type=float, help="AdamW weight decay (default 0)"),
    "max_grad_norm": dict(type=float, help="gradient clipping norm, 0 for none (default 1.0)"),
    "gradient_checkpointing": dict(help="recompute activations in the backward (default off)"),
    "stop_at_epoch": dict(type=int, help="end this call once this many epochs are complete"),
    "save_total_limit": dict(type=int, help="keep only the newest N checkpoints"),
}
PIPELINE_EXCLUDED = ("epochs", "max_steps", "resume", "stop_at_epoch", "seed", "progress")
PROMPTS_HELP = ("prompts file: *.jsonl / *.json: JSON Lines with a 'prompt' field; any other name: plain text, "
                "one prompt per line")
ZERO_MEANS_NONE = ("save_steps", "max_grad_norm")  # options whose default is not None: 0 on the command line


def _flag(name: str) -> str:
    return "--" + TRAINING_OPTIONS[name].get("flag", name).replace("_", "-")


def _add_training_options(parser: argparse.ArgumentParser, exclude: Sequence[str] = ()) -> None:
    defaults = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
    group = parser.add_argument_group("training")
    for name, spec in TRAINING_OPTIONS.items():
        if name in exclude:
            continue
        spec = {k: v for k, v in spec.items() if k != "flag"}
        if isinstance(defaults[name], bool):
            spec["action"] = argparse.BooleanOptionalAction
        group.add_argument(_flag(name), dest=name, default=defaults[name], **spec)


def training_arguments(config: TrainConfig) -> list[str]:
    """The `distillm2 train` arguments that reproduce `config`."""
    argv = ["--teacher", config.teacher, "--student", config.student, "--data", config.data, "--output", config.output]
    for name in TRAINING_OPTIONS:
        value = getattr(config, name)
        if isinstance(value, bool):
            argv.append(_flag(name) if value else "--no-" + _flag(name)[2:])
        elif value is not None:
            argv += [_flag(name), str(value)]
        elif name in ZERO_MEANS_NONE:
            argv += [_flag(name), "0"]
    return argv


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation")
    group.add_argument("--n", type=int, default=None, help="use only the first N prompts (default: all)")
    group.add_argument("--temperature", type=float, default=0.8, help="sampling temperature, 0 = greedy (default 0.8)")
    group.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (default 0.95)")
    group.add_argument("--max-new-tokens", type=int, default=1024, help="response length limit (default 1024)")
    group.add_argument("--engine", choices=ENGINES, default="auto",
                       help="auto = vLLM when installed and a GPU is present, else transformers (default)")
    group.add_argument("--max-prompt-tokens", type=int, default=None,
                       help="longer prompts keep their last tokens (default: the model's context length minus "
                            "--max-new-tokens)")
    group.add_argument("--generation-batch-size", type=int, default=None,
                       help="prompts per engine call and per saved chunk (default 8 on transformers, 1024 on vLLM)")
    group.add_argument("--dtype", default=None,
                       help="dtype of the generating model, e.g. bfloat16 (default: bf16 on GPU, else float32)")
    group.add_argument("--max-model-len", type=int, default=None,
                       help="context length of the generating model, on both engines (default: the model's)")
    group.add_argument("--gpu-memory-utilization", type=float, default=None,
                       help="vLLM: the fraction of the GPU it reserves, which must be free (vLLM's default 0.92)")
    group.add_argument("--tensor-parallel-size", type=int, default=None,
                       help="vLLM: GPUs one model is split over (default 1)")
    group.add_argument("--engine-args", type=_json_object, default=None,
                       help="vLLM: further vllm.LLM keyword arguments as a JSON object, e.g. '{\"enforce_eager\": true}'")


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not a JSON object: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"not a JSON object: {text}")
    return value


def generation_arguments(options: dict, progress: bool = True) -> list[str]:
    """The `distillm2 generate` options for `generate(...)` keyword arguments."""
    argv = []
    for name, flag in (("n", "--n"), ("temperature", "--temperature"), ("top_p", "--top-p"),
                       ("max_new_tokens", "--max-new-tokens"), ("seed", "--seed"), ("engine", "--engine"),
                       ("batch_size", "--generation-batch-size"), ("max_prompt_tokens", "--max-prompt-tokens"),
                       ("dtype", "--dtype"), ("max_model_len", "--max-model-len"),
                       ("gpu_memory_utilization", "--gpu-memory-utilization"),
                       ("tensor_parallel_size", "--tensor-parallel-size"), ("engine_args", "--engine-args")):
        if options.get(name) is not None:
            value = options[name]
            argv += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    return argv + ([] if progress else ["--no-progress"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distillm2", description="DistiLLM-2 reference trainer (distillm2_kernels)")
    commands = parser.add_subparsers(dest="command", required=True)

    g = commands.add_parser("generate", help="sample one response per prompt with the chat template")
    g.add_argument("--model", required=True, help="local model folder")
    g.add_argument("--prompts", required=True, help=PROMPTS_HELP)
    g.add_argument("--output", required=True, help="JSON Lines output (resumed when interrupted)")
    _add_generation_options(g)
    g.add_argument("--seed", type=int, default=42, help="sampling seed (default 42)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")

    p = commands.add_parser("pair", help="join teacher and student responses into training pairs")
    p.add_argument("--teacher", required=True, help="the teacher's responses (JSON Lines from generate)")
    p.add_argument("--student", required=True, help="the student's responses (JSON Lines from generate)")
    p.add_argument("--output", required=True, help="pairs file (JSON Lines)")
    p.add_argument("--strict", action="store_true", help="fail when a prompt is missing on either side")

    t = commands.add_parser("train", help="train the student with the DistiLLM-2 objective")
    t.add_argument("--teacher", required=True, help="local folder of the teacher model")
    t.add_argument("--student", required=True, help="local folder of the student model")
    t.add_argument("--data", required=True, help="pairs file (JSON Lines: prompt, chosen, rejected)")
    t.add_argument("--output", required=True, help="run folder: checkpoints, metrics.csv, final/")
    _add_training_options(t)

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
    _add_generation_options(q)
    _add_training_options(q, exclude=PIPELINE_EXCLUDED)
    return parser


def _training_options(args: argparse.Namespace, exclude: Sequence[str] = ()) -> dict:
    options = {name: getattr(args, name) for name in TRAINING_OPTIONS if name not in exclude}
    for name in ZERO_MEANS_NONE:
        if options.get(name) == 0:
            options[name] = None
    return options


def _train_config(args: argparse.Namespace) -> TrainConfig:
    options = _training_options(args)
    return TrainConfig(teacher=args.teacher, student=args.student, data=args.data, output=args.output, **options)


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
    elif args.command == "train":
        result = train(_train_config(args))
        from accelerate import PartialState

        if PartialState().is_main_process:
            print(f"step {result.global_step}/{result.total_steps}; model: {result.final_dir}; "
                  f"metrics: {result.metrics_csv}")
    else:
        training = _training_options(args, exclude=PIPELINE_EXCLUDED)
        result = run_pipeline(PipelineConfig(
            prompts=args.prompts, teacher=args.teacher, student=args.student, output=args.output, epochs=args.epochs,
            n=args.n, temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
            seed=args.seed, engine=args.engine, generation_batch_size=args.generation_batch_size,
            max_prompt_tokens=args.max_prompt_tokens, dtype=args.dtype, max_model_len=args.max_model_len,
            gpu_memory_utilization=args.gpu_memory_utilization, tensor_parallel_size=args.tensor_parallel_size,
            engine_args=args.engine_args, train=training,
            launcher=shlex.split(args.launcher) if args.launcher else None, progress=args.progress,
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
