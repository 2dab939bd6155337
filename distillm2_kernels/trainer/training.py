"""The DistiLLM-2 training loop: LoRA (DoRA) on the student, the frozen teacher, the fused objective.

    result = train(TrainConfig(teacher="T/", student="S/", data="pairs.jsonl", output="run/"))
    AutoModelForCausalLM.from_pretrained(result.final_dir)        # the trained student

One optimizer step, on every process (`accelerate launch` for several):
1. for each of `grad_accum` micro-batches (the process's share of the step's pairs, `batching.BatchPlan`):
   one student forward over the `[R, T]` rows of the batch (the teacher's responses, then the student's;
   `data`) through the prepared module `models.HiddenStates`, which returns hidden states, not logits; one
   teacher forward under `no_grad`; the objective (`objectives.TrainingObjective`: DistiLLM-2, SKL or KD) from
   both hidden states and lm_head weights through the fused-linear ops; `accelerator.backward`;
2. gradient clipping (max norm 1), AdamW, the cosine learning-rate schedule with linear warmup over
   `warmup_ratio` of the steps, and the objective's curriculum step. Under several processes, after the first
   step the "paper" preset's α anchors (fixed by each process on its first batch) are replaced by their mean
   over the processes, so that all use, and checkpoints hold, the same ones.

Engines (`accelerate launch`): DDP, FSDP2 and DeepSpeed ZeRO-3 (LoRA only); FSDP version 1 is refused
(`models.check_engine`). The parameters clipped are those of the prepared module, and under ZeRO-3 the
micro-batch and the clipping are filled into the DeepSpeed config from these options (`models.configure_deepspeed`).

Length of the run: `max_steps` optimizer steps when given, else `epochs × steps per epoch`; the curriculum's
number of epochs E is the number the run spans. `stop_at_epoch=e` ends the call once e epochs are complete
(the schedule still spans the whole run): the batched on-policy pipeline trains one epoch per call, each on
freshly generated student responses, resuming optimizer, schedule and curriculum.

Teacher cache: with `teacher_cache` (a folder written by `scoring.score`, `distillm2 score`) no teacher model
is loaded and step 1 runs no teacher forward: each batch's `SparseTeacher` (`[R, T, K+1]`, unshifted) is read
from the memory-mapped cache and handed to the objective with `teacher_head=None` and `teacher_tail`. The
cache must have been scored from this pairs file, with a tokenizer of the student's fingerprint and chat
template, at this `max_length` (`TeacherCache.check`): that stands in for the teacher-tokenizer check.

Checkpoints (`checkpoint`) every `save_steps` steps, at the end of every epoch and at the end of the call;
`resume=True` continues from the latest one exactly where the uninterrupted run would be (same batches, same
RNG streams, same optimizer, schedule and curriculum state); with no checkpoint it starts afresh. Without
`resume` an output folder that holds checkpoints is refused (their steps would mix with the new run's).
The final student is saved to `<output>/final` for `AutoModelForCausalLM.from_pretrained` (a LoRA adapter is
merged; the adapter itself is kept in `<output>/final/adapter`), with the tokenizer. Metrics go to
`<output>/metrics.csv` (`metrics_log`).

Precision: with `bf16` (or `accelerate launch --mixed_precision bf16`) the teacher is loaded in bfloat16, the
student's base weights too when training LoRA (the adapter stays float32), and both forwards run under
bfloat16 autocast; a fully fine-tuned student keeps float32 weights. The fused loss reads the bfloat16 hidden
states and weights and accumulates in float32. Without it everything is float32.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..backends import BACKENDS
from ..hf import lm_head_inputs, lm_head_of
from ..objective import PRESETS
from ..sparse_teacher import TEACHER_TAILS, SparseTeacher
from .batching import BatchPlan
from .checkpoint import (
    RESUME_INVARIANTS,
    TrainerState,
    explain_write_error,
    fsync_directory,
    fsync_tree,
    latest_checkpoint,
    register_trainable_weight_hooks,
    remove_stale_temporaries,
    save_checkpoint,
    set_damaged_aside,
    usable_checkpoint,
)
from .data import PairBatch, collate_pairs, read_pairs, tokenize_pairs
from .jsonl import check_writable_folder, file_sha256
from .metrics_log import MetricsLog
from .models import (
    HiddenStates,
    check_same_tokenizer,
    check_engine,
    check_teacher_loading,
    configure_deepspeed,
    gathered_parameters,
    loading_unpartitioned,
    lm_head_operands,
    load_model,
    load_student,
    load_tokenizer,
    local_model_dir,
    prepare_teacher,
    save_final_model,
    shared_vocab_size,
    student_lm_head,
)
from .objectives import LOSSES, TrainingObjective
from .teacher_cache import TeacherCache

__all__ = ["TrainConfig", "TrainResult", "train", "distillation_loss", "read_final_state"]


@dataclass
class TrainConfig:
    """Every option of `distillm2 train` (the command line's `--max-steps` is `max_steps`, and so on)."""

    teacher: Optional[str]  # local folder of the teacher (from_pretrained); None with `teacher_cache`
    student: str  # local folder of the student to start from
    data: str  # pairs file (JSON Lines, see `data`)
    output: str  # run folder: checkpoints, metrics.csv, final/
    preset: str = "distillm2"  # objective preset: distillm2 (released code), paper (α/β curriculum), distillm
    loss: str = "distillm2"  # distillm2 | skl (SKL on teacher responses only) | kd (forward KL = SKL at α=0)
    epochs: int = 1
    max_steps: Optional[int] = None  # optimizer steps; overrides epochs
    lr: float = 5e-5
    batch_size: int = 8  # pairs per micro-batch per process
    grad_accum: int = 1
    max_length: int = 1024  # tokens per sequence (prompt + response + EOS)
    lora_r: int = 16
    lora_alpha: int = 128
    lora_dropout: float = 0.05
    dora: bool = True
    use_lora: bool = True  # False: fine-tune every weight of the student
    bf16: bool = False
    resume: bool = False  # continue from the latest checkpoint in `output` (a fresh start when there is none)
    seed: int = 42
    warmup_ratio: float = 0.1
    save_steps: Optional[int] = 500  # also saved at every epoch's end and at the end; None: only those
    logging_steps: int = 1
    backend: str = "auto"  # the fused kernels' backend: auto | triton | cpu | torch
    progress: bool = True
    weight_decay: float = 0.0
    max_grad_norm: Optional[float] = 1.0  # None or 0: no clipping
    gradient_checkpointing: bool = False
    stop_at_epoch: Optional[int] = None  # end this call once this many epochs are complete
    save_total_limit: Optional[int] = None  # keep only the newest checkpoints
    teacher_cache: Optional[str] = None  # a `distillm2 score` cache folder used instead of the teacher model
    teacher_tail: str = "renormalize"  # the cached teacher's tail: renormalize | uniform (see teacher_cache)

    def __post_init__(self):
        if (self.teacher is None) == (self.teacher_cache is None):
            raise ValueError("give the teacher model (teacher, --teacher) or a teacher cache (teacher_cache, "
                             "--teacher-cache), one of the two")
        if self.teacher_tail not in TEACHER_TAILS:
            raise ValueError(f"teacher_tail must be one of {TEACHER_TAILS}, got {self.teacher_tail!r}")
        if self.teacher_tail != "renormalize" and self.teacher_cache is None:
            raise ValueError("teacher_tail applies to a teacher cache (--teacher-cache) only")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        for name in ("epochs", "batch_size", "grad_accum", "max_length", "logging_steps", "lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "save_steps", "stop_at_epoch", "save_total_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must lie in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must lie in [0, 1), got {self.lora_dropout}")

    @property
    def teacher_source(self) -> str:
        """"model" or "cache": a resumed run may score a new cache (each on-policy epoch does), not switch source."""
        return "model" if self.teacher_cache is None else "cache"

    def run_invariants(self) -> dict:
        return {name: getattr(self, name) for name in RESUME_INVARIANTS}


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path  # AutoModelForCausalLM.from_pretrained(final_dir) loads the trained student
    metrics_csv: Path
    global_step: int
    total_steps: int
    epochs_completed: int
    last_checkpoint: Optional[Path]
    # the trained student in memory (a LoRA adapter merged into it); on every process under DDP, on the main
    # process only under FSDP / DeepSpeed
    model: Optional[nn.Module] = field(repr=False)

    @property
    def finished(self) -> bool:
        return self.global_step >= self.total_steps


def distillation_loss(
    student_forward: nn.Module,
    student: nn.Module,
    teacher,
    objective: TrainingObjective,
    batch: PairBatch,
    vocab_size: int,
    accelerator=None,
    autocast_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, dict]:
    """The objective of one batch: `student_forward` (the prepared `HiddenStates`, through which DDP sees the
    forward) gives the student's hidden states, `student` (the unwrapped model) its lm_head; the teacher
    (a model) runs under no_grad. No logits are built. `teacher` may instead be the batch's `SparseTeacher`
    from a teacher cache (`[R, T, K+1]`, unshifted like the hidden states): then no teacher runs and the
    objective gets it with `teacher_head=None`. With `autocast_dtype` the forwards run under autocast; the
    loss never does (the fused ops accumulate in float32 themselves)."""
    device_type = batch.input_ids.device.type
    autocast = torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    if isinstance(teacher, SparseTeacher):
        with autocast:
            hidden = student_forward(batch.input_ids, batch.attention_mask)
        student_weight = lm_head_of(student)[0]
        with gathered_parameters(accelerator, student_weight) if accelerator else contextlib.nullcontext():
            student_head = student_lm_head(student, vocab_size)
            return objective(hidden, teacher, batch.labels, batch.num_pairs, student_head, None)
    with autocast:
        hidden = student_forward(batch.input_ids, batch.attention_mask)
        with torch.no_grad():
            teacher_hidden = lm_head_inputs(teacher, batch.input_ids, attention_mask=batch.attention_mask).hidden_states
    student_weight, teacher_weight = lm_head_of(student)[0], lm_head_of(teacher)[0]
    with gathered_parameters(accelerator, student_weight, teacher_weight) if accelerator else contextlib.nullcontext():
        student_head, teacher_head = lm_head_operands(student, teacher, vocab_size)
        return objective(hidden, teacher_hidden, batch.labels, batch.num_pairs, student_head, teacher_head)


def _accumulate_gradients(
    accelerator, student_forward, student, teacher, objective, pairs, micro_batches, pad_token_id, vocab_size,
    autocast_dtype,
) -> tuple[dict, torch.Tensor]:
    """Forward and backward of one optimizer step's micro-batches (gradients accumulated, all-reduced on the
    last one); returns the step's mean loss and metrics on this process, and its number of tokens. `teacher`
    is the teacher model or a `TeacherCache`, from which each batch's `SparseTeacher` is read."""
    sums: dict[str, torch.Tensor] = {}
    tokens = torch.zeros((), device=accelerator.device)
    for indices in micro_batches:
        batch = collate_pairs(
            [pairs[i] for i in indices], pad_token_id, with_rejected=objective.uses_student_responses
        )
        batch_teacher = teacher
        if isinstance(teacher, TeacherCache):
            cached = teacher.sparse_teacher(indices, batch)
            batch_teacher = SparseTeacher(*(t.to(accelerator.device) for t in (
                cached.ids, cached.logprobs, cached.tail_logprob)))
        batch = batch.to(accelerator.device)
        with accelerator.accumulate(student_forward):
            loss, metrics = distillation_loss(
                student_forward, student, batch_teacher, objective, batch, vocab_size, accelerator, autocast_dtype
            )
            accelerator.backward(loss)
        for name, value in {"loss": loss, **metrics}.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float().to(accelerator.device) / len(micro_batches)
        tokens += batch.attention_mask.sum()
    return sums, tokens


def _metrics_row(accelerator, sums: dict, tokens: torch.Tensor, seconds: float) -> dict:
    """The step's metrics averaged over the processes, and its tokens summed over them (a collective)."""
    names = sorted(sums)
    means = accelerator.reduce(torch.stack([sums[n] for n in names]), reduction="mean")
    total_tokens = int(accelerator.reduce(tokens, reduction="sum").item())
    row = dict(zip(names, means.tolist()))
    return {**row, "tokens": total_tokens, "tokens_per_s": round(total_tokens / seconds, 1)}


def _new_state(config: TrainConfig, plan: BatchPlan, world_size: int, sha256: str) -> TrainerState:
    total = config.max_steps or config.epochs * plan.steps_per_epoch
    return TrainerState(
        total_steps=total, num_epochs=math.ceil(total / plan.steps_per_epoch), world_size=world_size,
        data_file=str(config.data), data_sha256=sha256, run=config.run_invariants(), num_examples=plan.num_examples,
    )


FINAL_STATE_FILE = "distillm2_training.json"  # in <output>/final: the step and epochs the model was saved at


def read_final_state(final_dir) -> Optional[dict]:
    """`{"global_step", "epochs_completed", "total_steps"}` of a saved final model, None when there is none."""
    path = Path(final_dir) / FINAL_STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _student_for_saving(accelerator, student_forward: nn.Module, config: TrainConfig) -> Optional[nn.Module]:
    """The trained student with whole weights. Under FSDP or DeepSpeed the processes hold shards: the full state
    dict is gathered (on the main process) into a fresh copy of the student on the CPU; None elsewhere."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return accelerator.unwrap_model(student_forward).model
    state_dict = accelerator.get_state_dict(student_forward)  # collective: every process takes part
    if not accelerator.is_main_process:
        return None
    with loading_unpartitioned(accelerator):  # else ZeRO-3 would partition it, a collective on this process only
        copy = HiddenStates(load_student(
            config.student, next(iter(state_dict.values())).dtype, use_lora=config.use_lora, lora_r=config.lora_r,
            lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, dora=config.dora,
        ))
    copy.load_state_dict(state_dict)
    return copy.model


def restore_final(output: Path) -> None:
    """Put `<output>/final` back when a run was killed between the two renames of `_save_final` (the old
    model set aside as `.final.old`, the new one not yet renamed in)."""
    final, old = Path(output) / "final", Path(output) / ".final.old"
    if not final.exists() and old.is_dir():
        old.rename(final)


def _save_final(
    accelerator, student: Optional[nn.Module], tokenizer, output: Path, state: TrainerState
) -> tuple[Path, Optional[nn.Module]]:
    """`<output>/final` from the main process, replaced as a whole: the new model is written to `.final.tmp`
    and made durable, the old one renamed to `.final.old`, the new one renamed in, the old one deleted; so
    `final` always holds a complete model (`restore_final` undoes a kill between the renames).
    Returns it and the student merged (a LoRA adapter folded in), on every process that holds one."""
    final = output / "final"
    temporary, old = output / ".final.tmp", output / ".final.old"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if temporary.exists():
            shutil.rmtree(temporary)
        try:
            student = save_final_model(student, tokenizer, temporary)
            marker = {"global_step": state.global_step, "epochs_completed": state.epoch, "total_steps": state.total_steps}
            (temporary / FINAL_STATE_FILE).write_text(json.dumps(marker) + "\n")
            fsync_tree(temporary)
        except BaseException as error:
            explained = explain_write_error(error, f"writing the final model {final}", output)
            shutil.rmtree(temporary, ignore_errors=True)
            if explained is not None:
                raise explained from error
            raise
        restore_final(output)
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            final.rename(old)
        temporary.rename(final)
        fsync_directory(output)
        if old.exists():
            shutil.rmtree(old)
    elif student is not None and hasattr(student, "merge_and_unload"):
        student = student.merge_and_unload()
    accelerator.wait_for_everyone()
    return final, student


def train(config: TrainConfig) -> TrainResult:
    """Train the student (see the module docstring); returns where everything was written."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    # `bf16` autocasts the forwards here rather than through Accelerator(mixed_precision=...), whose process-wide
    # state could not change between two train() calls in one process.
    accelerator = Accelerator(
        gradient_accumulation_steps=config.grad_accum,
        step_scheduler_with_optimizer=False,  # the schedule counts optimizer steps; it is stepped once per step
    )
    check_engine(accelerator, config.use_lora)
    configure_deepspeed(accelerator, config.batch_size, config.max_grad_norm)
    main = accelerator.is_main_process
    output = Path(config.output)
    if main:
        check_writable_folder(output, "output")
        restore_final(output)
        for path in remove_stale_temporaries(output):
            print(f"removed {path}, left by a run that was stopped while saving")
    accelerator.wait_for_everyone()
    bf16 = config.bf16 or accelerator.mixed_precision == "bf16"
    set_seed(config.seed)

    # data (after checking both model folders: reading and tokenising a large file takes a while)
    cache = None
    for role in ("student", "teacher"):
        if getattr(config, role) is not None:
            local_model_dir(getattr(config, role), role)
    tokenizer = load_tokenizer(config.student)
    need_rejected = config.loss in ("distillm2", "srkl")
    sha256 = file_sha256(config.data)
    if config.teacher_cache is not None:  # the cache's tokenizer fingerprint stands in for the teacher's tokenizer
        cache = TeacherCache(config.teacher_cache)
    else:
        check_same_tokenizer(tokenizer, config.teacher)
    examples = read_pairs(config.data, need_rejected=need_rejected)
    if cache is not None:
        cache.check(pairs_sha256=sha256, tokenizer=tokenizer, max_length=config.max_length, num_pairs=len(examples),
                    need_rejected=need_rejected)
    pairs = tokenize_pairs(examples, tokenizer, max_length=config.max_length, progress=config.progress and main)
    plan = BatchPlan(len(pairs), config.batch_size, accelerator.num_processes, config.grad_accum, config.seed)
    checkpoint = latest_checkpoint(output)
    if checkpoint is not None and not config.resume:
        raise ValueError(
            f"{output} holds checkpoints of an earlier run ({checkpoint.name}): continue it with resume=True "
            "(--resume), or train into another folder"
        )
    if checkpoint is not None:
        checkpoint, damaged = usable_checkpoint(output)
        accelerator.wait_for_everyone()  # every process has checked before the damaged ones are moved
        if damaged and checkpoint is None:
            raise ValueError(
                f"cannot resume from {output}: every checkpoint is damaged ("
                + "; ".join(problem for _, problem in damaged) + "); remove them to start afresh"
            )
        for folder, problem in damaged:
            if main:
                aside = set_damaged_aside(folder)
                print(f"warning: {folder.name} is damaged ({problem}): resuming from {checkpoint.name} instead; "
                      f"the damaged checkpoint is kept as {aside}", file=sys.stderr, flush=True)
        accelerator.wait_for_everyone()
        state = TrainerState.load(checkpoint)
        state.check_resumable(
            checkpoint, config.run_invariants(), accelerator.num_processes, str(config.data), sha256, len(pairs)
        )
        state.data_file, state.data_sha256 = str(config.data), sha256
    else:
        state = _new_state(config, plan, accelerator.num_processes, sha256)

    # models
    if cache is None:
        check_teacher_loading()
    student = load_student(
        config.student, torch.bfloat16 if bf16 and config.use_lora else torch.float32, use_lora=config.use_lora,
        lora_r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, dora=config.dora,
        gradient_checkpointing=config.gradient_checkpointing, seed=config.seed,
    )
    if cache is None:
        teacher = load_model(config.teacher, "teacher", torch.bfloat16 if bf16 else torch.float32)
        vocab_size = shared_vocab_size(student, teacher, tokenizer)
    else:
        teacher, vocab_size = cache, shared_vocab_size(student, student, tokenizer)
        if vocab_size != cache.vocab_size:
            raise ValueError(f"the teacher cache {cache.folder} covers {cache.vocab_size} tokens, the tokenizer "
                             f"{vocab_size}")
    student_forward = HiddenStates(student)
    optimizer = torch.optim.AdamW(
        [p for p in student_forward.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay
    )
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, math.ceil(config.warmup_ratio * state.total_steps), state.total_steps
    )
    objective = TrainingObjective(
        config.loss, config.preset, num_epochs=state.num_epochs, total_steps=state.total_steps, backend=config.backend,
        teacher_tail=config.teacher_tail,
    )
    student_forward, optimizer, scheduler = accelerator.prepare(student_forward, optimizer, scheduler)
    # the parameters to clip are collected from the prepared module: FSDP2 replaces them by sharded DTensors
    parameters = [p for p in student_forward.parameters() if p.requires_grad]
    if cache is None:
        teacher = prepare_teacher(accelerator, teacher)
    accelerator.register_for_checkpointing(objective)
    register_trainable_weight_hooks(accelerator)
    if checkpoint is not None:
        try:
            accelerator.load_state(str(checkpoint))
        except Exception as error:
            raise ValueError(f"cannot resume from {checkpoint}: it does not load ({type(error).__name__}: {error})") from error
        if main:
            print(f"resuming from {checkpoint} (step {state.global_step} of {state.total_steps})")
    else:
        set_seed(config.seed + accelerator.process_index)  # each process its own dropout stream
    student = accelerator.unwrap_model(student_forward).model
    peft_model = student if config.use_lora else None

    log = MetricsLog(output / "metrics.csv", resume_step=state.global_step if checkpoint else None, enabled=main,
                     tensorboard_dir=output / "tensorboard")
    stop_epoch = min(state.num_epochs, config.stop_at_epoch or state.num_epochs)
    bar = tqdm(total=state.total_steps, initial=state.global_step, desc="train", unit="step",
               disable=not (config.progress and main))
    last_checkpoint, saved_at, started = checkpoint, (state.global_step if checkpoint else None), time.perf_counter()
    student_forward.train()
    while state.global_step < state.total_steps and state.epoch < stop_epoch:
        objective.set_epoch(state.epoch)
        micro_batches = plan.micro_batches(state.epoch, accelerator.process_index, state.step_in_epoch)
        for first in range(0, len(micro_batches), plan.grad_accum):
            step_started = time.perf_counter()
            window = micro_batches[first:first + plan.grad_accum]
            sums, tokens = _accumulate_gradients(
                accelerator, student_forward, student, teacher, objective, pairs, window, tokenizer.pad_token_id,
                vocab_size, torch.bfloat16 if config.bf16 else None,
            )
            assert accelerator.sync_gradients, "an optimizer step must end an accumulation window"
            if state.global_step == 0 and accelerator.num_processes > 1:  # a fresh run's first step
                objective.share_anchors(lambda anchor: accelerator.reduce(anchor, reduction="mean"))
            grad_norm = None
            if config.max_grad_norm:
                grad_norm = accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            objective.step()
            state.global_step += 1
            state.step_in_epoch += 1
            epoch_done = state.step_in_epoch == plan.steps_per_epoch
            finished = state.global_step >= state.total_steps

            if state.global_step % config.logging_steps == 0 or finished or epoch_done:
                row = _metrics_row(accelerator, sums, tokens, time.perf_counter() - step_started)
                row.update(step=state.global_step, epoch=state.epoch, lr=lr,
                           grad_norm=None if grad_norm is None else float(grad_norm),
                           elapsed_s=round(time.perf_counter() - started, 3))
                log.log(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}")
            bar.update(1)
            if epoch_done:
                state.epoch += 1
                state.step_in_epoch = 0
            if epoch_done or finished or (config.save_steps and state.global_step % config.save_steps == 0):
                last_checkpoint = save_checkpoint(accelerator, output, state, peft_model, config.save_total_limit)
                saved_at = state.global_step
            if finished:
                break
    bar.close()
    log.close()
    if saved_at != state.global_step:
        last_checkpoint = save_checkpoint(accelerator, output, state, peft_model, config.save_total_limit)
    final_dir, model = _save_final(accelerator, _student_for_saving(accelerator, student_forward, config), tokenizer,
                                   output, state)
    return TrainResult(
        output_dir=output, final_dir=final_dir, metrics_csv=output / "metrics.csv", global_step=state.global_step,
        total_steps=state.total_steps, epochs_completed=state.epoch, last_checkpoint=last_checkpoint, model=model,
    )

