"""The command-line options of `train`, `generate` and `pipeline`, both ways: config -> argv and argv -> config.

`cli` builds the parsers from these; `pipeline` turns a config back into the `train` and `generate` command
lines it runs under a launcher. Which `TrainConfig` fields the pipeline sets itself is said here, once.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import MISSING, fields
from typing import Sequence

from ..backends import BACKENDS
from .generation import ENGINES
from .objectives import LOSSES
from ..sparse_teacher import TEACHER_TAILS
from .training import TrainConfig

__all__ = [
    "TRAINING_OPTIONS",
    "TRAINING_PATHS",
    "SET_BY_PIPELINE",
    "SHARED_WITH_PIPELINE",
    "PIPELINE_EXCLUDED",
    "add_training_options",
    "add_generation_options",
    "training_arguments",
    "generation_arguments",
    "training_options",
    "train_config",
    "json_object",
]

# TrainConfig options of `train` and `pipeline`: field -> (argparse keyword arguments). Booleans are
# `--x/--no-x` switches.
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
    "teacher_cache": dict(help="train on the teacher cache `distillm2 score` wrote in this folder instead of a "
                               "teacher model (none is loaded; give --teacher-cache or --teacher)"),
    "teacher_tail": dict(choices=list(TEACHER_TAILS),
                         help="with --teacher-cache: renormalize = the teacher restricted to its cached tokens "
                              "(default); uniform = the cached tail mass spread over the other tokens"),
}
TRAINING_PATHS = ("teacher", "student", "data", "output")  # the required options of `train`
# What the pipeline sets for each epoch's training: the paths and these. Its `train` options may not hold them.
SET_BY_PIPELINE = TRAINING_PATHS + ("epochs", "max_steps", "resume", "stop_at_epoch", "teacher_cache")
# The `pipeline` command's own options that training takes too (as defaults of its `train` options).
SHARED_WITH_PIPELINE = ("seed", "progress")
# The TRAINING_OPTIONS that the `pipeline` command leaves out of its training group.
PIPELINE_EXCLUDED = tuple(name for name in TRAINING_OPTIONS if name in SET_BY_PIPELINE + SHARED_WITH_PIPELINE)
ZERO_MEANS_NONE = ("save_steps", "max_grad_norm")  # options whose default is not None: 0 on the command line
GENERATION_FLAGS = {  # `generate(...)` keyword -> its `distillm2 generate` option
    "n": "--n", "temperature": "--temperature", "top_p": "--top-p", "max_new_tokens": "--max-new-tokens",
    "seed": "--seed", "engine": "--engine", "batch_size": "--generation-batch-size",
    "max_prompt_tokens": "--max-prompt-tokens", "dtype": "--dtype", "max_model_len": "--max-model-len",
    "gpu_memory_utilization": "--gpu-memory-utilization", "tensor_parallel_size": "--tensor-parallel-size",
    "engine_args": "--engine-args",
}


def _flag(name: str) -> str:
    return "--" + TRAINING_OPTIONS[name].get("flag", name).replace("_", "-")


def add_training_options(parser: argparse.ArgumentParser, exclude: Sequence[str] = ()) -> None:
    """The TrainConfig options (but `exclude`) as a "training" group, with TrainConfig's defaults."""
    defaults = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
    group = parser.add_argument_group("training")
    for name, spec in TRAINING_OPTIONS.items():
        if name in exclude:
            continue
        spec = {k: v for k, v in spec.items() if k != "flag"}
        if isinstance(defaults[name], bool):
            spec["action"] = argparse.BooleanOptionalAction
        group.add_argument(_flag(name), dest=name, default=defaults[name], **spec)


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    """The sampling options of `generate` and `pipeline` (not `--seed`, whose help differs) as a group."""
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
    group.add_argument("--engine-args", type=json_object, default=None,
                       help="vLLM: further vllm.LLM keyword arguments as a JSON object, e.g. '{\"enforce_eager\": true}'")


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not a JSON object: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"not a JSON object: {text}")
    return value


def training_arguments(config: TrainConfig) -> list[str]:
    """The `distillm2 train` arguments that reproduce `config`."""
    argv = []
    for name in TRAINING_PATHS:
        if getattr(config, name) is not None:  # the teacher is None with a teacher cache
            argv += ["--" + name, getattr(config, name)]
    for name in TRAINING_OPTIONS:
        value = getattr(config, name)
        if isinstance(value, bool):
            argv.append(_flag(name) if value else "--no-" + _flag(name)[2:])
        elif value is not None:
            argv += [_flag(name), str(value)]
        elif name in ZERO_MEANS_NONE:
            argv += [_flag(name), "0"]
    return argv


def generation_arguments(options: dict, progress: bool = True) -> list[str]:
    """The `distillm2 generate` options for `generate(...)` keyword arguments."""
    argv = []
    for name, flag in GENERATION_FLAGS.items():
        if options.get(name) is not None:
            value = options[name]
            argv += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    return argv + ([] if progress else ["--no-progress"])


def training_options(args: argparse.Namespace, exclude: Sequence[str] = ()) -> dict:
    """The parsed TrainConfig options (but `exclude`) as TrainConfig keyword arguments (0 -> None where due)."""
    options = {name: getattr(args, name) for name in TRAINING_OPTIONS if name not in exclude}
    for name in ZERO_MEANS_NONE:
        if options.get(name) == 0:
            options[name] = None
    return options


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of a parsed `distillm2 train` command line."""
    paths = {name: getattr(args, name) for name in TRAINING_PATHS}
    return TrainConfig(**paths, **training_options(args))
