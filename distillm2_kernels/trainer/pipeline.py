"""The paper's batched on-policy loop: regenerate the student's responses at the start of every epoch.

    run_pipeline(PipelineConfig(prompts="prompts.jsonl", teacher="T/", student="S/", output="run/", epochs=3))

1. The teacher's responses are generated once: `<output>/teacher.jsonl`.
2. For each epoch e = 0 … E−1: the current student (the initial one for e = 0, else `<output>/train/final`,
   saved at the end of epoch e−1) generates `<output>/epoch-<e>/student.jsonl` (seed `seed + e`, so each
   epoch draws new samples); `pair` joins them with the teacher's into `<output>/epoch-<e>/pairs.jsonl`;
   `train` runs epoch e on them in `<output>/train` (`epochs=E`, `stop_at_epoch=e+1`, resuming the
   optimizer, the learning-rate schedule — which spans all E epochs — and the curriculum from epoch e−1).
   With `score_top_k=K` (`--score-top-k K`) the teacher first scores the epoch's pairs into
   `<output>/epoch-<e>/teacher-cache` (`scoring.score`, top-K; the teacher is loaded for scoring only and freed
   before training, on vLLM in its own process), and the epoch trains on that cache with no teacher model
   (`TrainConfig.teacher_cache`).

Every stage skips work that is already done, so rerunning the same command continues an interrupted pipeline
(generation resumes row by row, training from its latest checkpoint). To train further, use a new output
folder: the schedule's length is fixed by the first run.

Processes: by default training runs in this process, and so does generation on transformers; a vLLM
generation runs as a separate `python -m distillm2_kernels.trainer generate ...` process, since vLLM gives its
GPU memory (`gpu_memory_utilization` of the whole GPU, which it needs free at startup) back only reliably when
its process ends. With `launcher` (e.g. `["accelerate", "launch",
"--config_file", "zero3.yaml"]`, or the command line's `--launcher "accelerate launch ..."`), each training
epoch runs as `<launcher> -m distillm2_kernels.trainer train ...` and each generation as a separate
`python -m distillm2_kernels.trainer generate ...` process, so that vLLM's GPU memory is released before
training starts. Do not start the pipeline itself under `accelerate launch`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Optional, Sequence

from .arguments import SET_BY_PIPELINE, generation_arguments, training_arguments
from .generation import generate, select_engine
from .jsonl import check_writable_folder
from .pairing import pair
from .scoring import score
from .training import TrainConfig, read_final_state, restore_final, train

__all__ = ["PipelineConfig", "PipelineResult", "run_pipeline"]


@dataclass
class PipelineConfig:
    prompts: str  # prompts file (JSON Lines with `prompt`, or one prompt per line)
    teacher: str  # local model folders
    student: str
    output: str  # pipeline folder (layout in the module docstring)
    epochs: int = 3
    n: Optional[int] = None  # use the first n prompts
    max_prompt_tokens: Optional[int] = None  # longer prompts keep their last tokens (default: from the model)
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 1024
    seed: int = 42  # generation seeds (teacher: seed, student at epoch e: seed + e) and the training seed
    engine: str = "auto"
    generation_batch_size: Optional[int] = None
    dtype: Optional[str] = None  # the generating models' dtype (default: bf16 on GPU, else float32)
    max_model_len: Optional[int] = None  # the generating models' context length (default: the model's)
    gpu_memory_utilization: Optional[float] = None  # vLLM settings, see `generate`
    tensor_parallel_size: Optional[int] = None
    engine_args: Optional[dict] = None
    train: dict = field(default_factory=dict)  # further TrainConfig options: preset, loss, lr, batch_size, ...
    launcher: Optional[Sequence[str]] = None  # run training (and generation) in subprocesses, see above
    progress: bool = True
    score_top_k: Optional[int] = None  # score each epoch's pairs (top-K) and train on the cache, see above

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        reserved = set(SET_BY_PIPELINE) & set(self.train)
        if reserved:
            raise ValueError(f"train options {sorted(reserved)} are set by the pipeline itself")
        if self.score_top_k is not None and self.score_top_k < 1:
            raise ValueError(f"score_top_k must be >= 1, got {self.score_top_k}")
        if self.score_top_k is None and self.train.get("teacher_tail", "renormalize") != "renormalize":
            raise ValueError("teacher_tail applies to a teacher cache: set score_top_k (--score-top-k) too")


@dataclass
class PipelineResult:
    output_dir: Path
    final_dir: Path  # the trained student after the last epoch
    metrics_csv: Path
    epochs_completed: int


def _generation_options(config: PipelineConfig, seed: int) -> dict:
    return dict(n=config.n, temperature=config.temperature, top_p=config.top_p, max_new_tokens=config.max_new_tokens,
                seed=seed, engine=config.engine, batch_size=config.generation_batch_size,
                max_prompt_tokens=config.max_prompt_tokens, dtype=config.dtype, max_model_len=config.max_model_len,
                gpu_memory_utilization=config.gpu_memory_utilization,
                tensor_parallel_size=config.tensor_parallel_size, engine_args=config.engine_args)


def _module_command(subcommand: str) -> list[str]:
    return [sys.executable, "-m", "distillm2_kernels.trainer", subcommand]


def _run(command: list[str]) -> None:
    print("+ " + " ".join(command), flush=True)
    subprocess.run(command, check=True)


def _generate(config: PipelineConfig, model: Path, output: Path, seed: int) -> None:
    options = _generation_options(config, seed)
    if config.launcher is None and select_engine(config.engine) == "hf":
        generate(model, config.prompts, output, progress=config.progress, **options)
        return
    # vLLM (or a launcher): in its own process, which gives the GPU memory back when it ends
    _run(_module_command("generate") + ["--model", str(model), "--prompts", str(config.prompts), "--output",
                                        str(output)] + generation_arguments(options, config.progress))


def _score(config: PipelineConfig, pairs: Path, cache: Path) -> None:
    """Score an epoch's pairs with the teacher into `cache`, as training will tokenize them."""
    train = {**{f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}, **config.train}
    options = dict(top_k=config.score_top_k, batch_size=train["batch_size"], max_length=train["max_length"],
                   with_rejected=train["loss"] in ("distillm2", "srkl"),
                   engine=config.engine, dtype=config.dtype, engine_args=config.engine_args)
    if config.launcher is None and select_engine(config.engine) == "hf":
        score(config.teacher, pairs, cache, progress=config.progress, **options)
        return
    argv = ["--teacher", str(config.teacher), "--data", str(pairs), "--output", str(cache), "--top-k",
            str(options["top_k"]), "--batch-size", str(options["batch_size"]), "--max-length",
            str(options["max_length"]), "--engine", config.engine]
    argv += [] if options["with_rejected"] else ["--chosen-only"]
    argv += ["--dtype", config.dtype] if config.dtype else []
    argv += ["--engine-args", json.dumps(config.engine_args)] if config.engine_args else []
    _run(_module_command("score") + argv + ([] if config.progress else ["--no-progress"]))


def _train(config: TrainConfig, launcher: Optional[Sequence[str]]) -> None:
    if launcher is None:
        train(config)
        return
    _run(list(launcher) + ["-m", "distillm2_kernels.trainer", "train"] + training_arguments(config))


def run_pipeline(config: PipelineConfig) -> PipelineResult:
    """Run (or continue) the batched on-policy pipeline; see the module docstring."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError(
            "run the pipeline as a single process and give the training launcher as `launcher` "
            "(e.g. --launcher 'accelerate launch --num_processes 8'), not under `accelerate launch` itself"
        )
    output = check_writable_folder(config.output, "output")
    train_dir, final_dir = output / "train", output / "train" / "final"
    restore_final(train_dir)
    teacher_responses = output / "teacher.jsonl"
    _generate(config, Path(config.teacher), teacher_responses, config.seed)

    for epoch in range(config.epochs):
        done = read_final_state(final_dir)
        if done is not None and done["epochs_completed"] > epoch:
            continue  # trained already (an earlier run of this pipeline)
        folder = output / f"epoch-{epoch}"
        student_model = Path(config.student) if epoch == 0 else final_dir
        if epoch > 0 and (done is None or done["epochs_completed"] != epoch):
            raise RuntimeError(f"{final_dir} does not hold the student after epoch {epoch - 1}: {done}")
        _generate(config, student_model, folder / "student.jsonl", config.seed + epoch)
        report = pair(teacher_responses, folder / "student.jsonl", folder / "pairs.jsonl")
        if not report.complete:
            raise RuntimeError(report.summary())
        options = {"seed": config.seed, "progress": config.progress, **config.train}
        teacher, cache = str(config.teacher), None
        if config.score_top_k is not None:
            teacher, cache = None, folder / "teacher-cache"
            _score(config, folder / "pairs.jsonl", cache)
        train_config = TrainConfig(
            teacher=teacher, student=str(config.student), data=str(folder / "pairs.jsonl"),
            output=str(train_dir), epochs=config.epochs, resume=True, stop_at_epoch=epoch + 1,
            teacher_cache=None if cache is None else str(cache), **options,
        )
        _train(train_config, config.launcher)

    done = read_final_state(final_dir)
    return PipelineResult(output, final_dir, train_dir / "metrics.csv", 0 if done is None else done["epochs_completed"])
