"""Checkpoints that resume a run exactly: `<output>/checkpoint-<step>/`.

A checkpoint is `accelerator.save_state` (optimizer, lr scheduler, the RNG states of every process, the
accumulation counter, the objective's curriculum state as a registered object, and the student's trainable
weights — the LoRA/DoRA adapter only, or every weight when fully fine-tuning), plus `trainer_state.json`
(global step, epoch, optimizer steps done in the epoch, the schedule's length, the number of pairs the batch
plan was made for and the data file's SHA-256) and, for a LoRA run, the adapter in peft's format under `adapter/` (loadable with
`PeftModel.from_pretrained`). It is written to a temporary folder, listed with every file's size in
`checkpoint_files.json`, made durable (every file and folder fsynced) and only then renamed into place, so a
run killed or a disk filled while saving leaves the previous checkpoints intact; `checkpoints` only sees
renamed ones. Before resuming, `usable_checkpoint` checks the newest one against its list (every file there,
with its size) and loads its small pickles (RNG states, curriculum state), which accelerate would otherwise
skip with a message at info level only; a damaged checkpoint is renamed to `checkpoint-<step>.damaged` and
the previous complete one is used, with a warning that names the bad file. A failure while writing says
"No space left on device" when the disk is full (torch's own message does not).
Under DeepSpeed and FSDP `save_state` writes their own (sharded) formats.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from .jsonl import fsync_directory

__all__ = [
    "TrainerState", "checkpoints", "latest_checkpoint", "usable_checkpoint", "checkpoint_problem", "save_checkpoint",
    "register_trainable_weight_hooks", "fsync_tree", "explain_write_error", "remove_stale_temporaries",
]

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "checkpoint_files.json"  # {relative path: size in bytes} of every other file
DAMAGED_SUFFIX = ".damaged"
FULL_DISK_BYTES = 1 << 20  # a write that failed with less than this free on its file system: a full disk
# fields of the run that a resumed run must share (a different value would change the data order or the math)
RESUME_INVARIANTS = (
    "epochs", "max_steps", "loss", "preset", "use_lora", "lora_r", "lora_alpha", "lora_dropout", "dora", "batch_size", "grad_accum",
    "seed", "max_length", "lr", "warmup_ratio", "weight_decay", "max_grad_norm", "teacher_source", "teacher_tail",
)
# what a checkpoint written before an invariant existed ran with (so that it still resumes when that is unchanged)
INVARIANT_DEFAULTS = {"teacher_source": "model", "teacher_tail": "renormalize"}


@dataclass
class TrainerState:
    """Where a run stands; the data position is (epoch, optimizer steps done in it) under a fixed batch plan."""

    total_steps: int
    num_epochs: int
    global_step: int = 0
    epoch: int = 0  # the epoch being trained = epochs completed
    step_in_epoch: int = 0
    world_size: int = 1
    data_file: str = ""
    data_sha256: str = ""
    run: dict = field(default_factory=dict)  # RESUME_INVARIANTS of the run
    num_examples: Optional[int] = None  # pairs per epoch that the batch plan and the schedule were made for

    def save(self, folder: Path) -> None:
        (folder / STATE_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> "TrainerState":
        return cls(**json.loads((folder / STATE_FILE).read_text()))

    def check_resumable(
        self, folder: Path, run: dict, world_size: int, data_file: str, data_sha256: str, num_examples: int
    ) -> None:
        """ValueError naming what differs between the checkpoint's run and this one. Another data file is
        accepted at an epoch boundary only, and only with as many pairs (the schedule's steps per epoch)."""
        saved = {**INVARIANT_DEFAULTS, **self.run}
        changed = {k: (saved.get(k), v) for k, v in run.items() if saved.get(k) != v}
        if world_size != self.world_size:
            changed["number of processes"] = (self.world_size, world_size)
        if self.num_examples is not None and num_examples != self.num_examples:
            changed["pairs in the data file"] = (self.num_examples, num_examples)
        if changed:
            listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise ValueError(f"cannot resume from {folder}: the run's settings changed ({listed})")
        if self.step_in_epoch and data_sha256 != self.data_sha256:
            raise ValueError(
                f"cannot resume from {folder} in the middle of epoch {self.epoch}: the data file changed "
                f"({self.data_file} -> {data_file}); a new data file is accepted at an epoch boundary only"
            )


def checkpoints(output: Path) -> list[Path]:
    """The complete checkpoints in `output`, oldest first."""
    found = []
    for folder in Path(output).glob(f"{PREFIX}*"):
        suffix = folder.name[len(PREFIX):]
        if folder.is_dir() and suffix.isdigit() and (folder / STATE_FILE).is_file():
            found.append((int(suffix), folder))
    return [folder for _, folder in sorted(found)]


def latest_checkpoint(output: Path) -> Optional[Path]:
    found = checkpoints(output)
    return found[-1] if found else None


def fsync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then every folder from the deepest up (so that their entries are
    durable too)."""
    folders = []
    for root, _, files in os.walk(folder):
        folders.append(root)
        for name in files:
            descriptor = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
    for root in reversed(folders):
        fsync_directory(Path(root))


def _files(folder: Path) -> dict[str, int]:
    return {
        path.relative_to(folder).as_posix(): path.stat().st_size
        for path in sorted(folder.rglob("*")) if path.is_file() and path.name != MANIFEST_FILE
    }


def checkpoint_problem(folder: Path) -> Optional[str]:
    """What is wrong with a checkpoint (naming the file), or None when it is complete: every file of its list
    present with its size, its trainer state readable, the RNG state of each of its processes and the
    curriculum state loadable. A checkpoint without a list (an older version) is checked for the latter."""
    from accelerate.utils import load

    manifest = folder / MANIFEST_FILE
    if manifest.is_file():
        try:
            expected = json.loads(manifest.read_text())
        except (ValueError, UnicodeDecodeError):
            return f"{manifest} is not readable"
        for name, size in expected.items():
            path = folder / name
            if not path.is_file():
                return f"{path} is missing"
            if path.stat().st_size != size:
                return f"{path} holds {path.stat().st_size} bytes, {size} were written"
    try:
        world_size = TrainerState.load(folder).world_size
    except (OSError, ValueError, TypeError) as error:
        return f"{folder / STATE_FILE} is not readable ({error})"
    pickles = [folder / f"random_states_{rank}.pkl" for rank in range(world_size)]
    pickles += sorted(folder.glob("custom_checkpoint_*.pkl"))
    for path in pickles:
        if not path.is_file():
            return f"{path} is missing"
        try:
            load(str(path), weights_only=False)
        except Exception as error:  # anything unpickling can raise: the file is damaged
            return f"{path} does not load ({type(error).__name__}: {error})"
    return None


def usable_checkpoint(output: Path) -> tuple[Optional[Path], list[tuple[Path, str]]]:
    """The newest complete checkpoint in `output` (None when none is), and the (checkpoint, problem) of every
    newer damaged one (see `checkpoint_problem`)."""
    damaged = []
    for folder in reversed(checkpoints(output)):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, damaged
        damaged.append((folder, problem))
    return None, damaged


def set_damaged_aside(folder: Path) -> Path:
    """Rename a damaged checkpoint out of the way (kept for inspection; `checkpoints` no longer lists it)."""
    target = folder.with_name(folder.name + DAMAGED_SUFFIX)
    if target.exists():
        shutil.rmtree(target)
    folder.rename(target)
    return target


def explain_write_error(error: BaseException, what: str, folder: Path) -> Optional[OSError]:
    """An OSError that says what failed, and "No space left on device" when the disk is full (torch's writer
    reports that as `RuntimeError: ... unexpected pos ...`, safetensors as its own error), or None when
    `error` is not a failed write (an interruption, a bug)."""
    if not isinstance(error, Exception):
        return None
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    code = getattr(error, "errno", None)
    writer_failed = isinstance(error, (OSError, RuntimeError))
    if code == errno.ENOSPC or "No space left on device" in str(error) or (
        writer_failed and free is not None and free < FULL_DISK_BYTES
    ):
        return OSError(errno.ENOSPC, f"{what} failed: No space left on device ({free} bytes free in {folder}; "
                                     f"the write failed with: {error})")
    if isinstance(error, OSError):
        return OSError(code, f"{what} failed: {error}")
    return None


def remove_stale_temporaries(output: Path) -> list[Path]:
    """Delete what a run killed while saving leaves in `output` (`.checkpoint-<step>.tmp`, `.final.tmp`,
    `.metrics.csv.tmp`; `.final.old` once `final` is back in place). Returns what was removed."""
    output = Path(output)
    removed = []
    candidates = list(output.glob(f".{PREFIX}*.tmp")) + [output / ".final.tmp", output / ".metrics.csv.tmp"]
    if (output / "final").is_dir():
        candidates.append(output / ".final.old")
    for path in candidates:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(path)
    return removed


def save_checkpoint(
    accelerator, output: Path, state: TrainerState, peft_model=None, total_limit: Optional[int] = None
) -> Path:
    """Write `<output>/checkpoint-<global step>` (see the module docstring) from every process."""
    from accelerate.utils import DistributedType

    final = Path(output) / f"{PREFIX}{state.global_step}"
    temporary = Path(output) / f".{final.name}.tmp"
    if accelerator.is_main_process and temporary.exists():
        shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(temporary))
        if accelerator.is_main_process:
            sharded = accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
            if peft_model is not None and not sharded:
                peft_model.save_pretrained(temporary / "adapter")
            state.save(temporary)
    except BaseException as error:
        explained = explain_write_error(error, f"writing checkpoint {final}", Path(output))
        shutil.rmtree(temporary, ignore_errors=True)  # frees the space the partial checkpoint took
        if explained is not None:
            raise explained from error
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        try:
            (temporary / MANIFEST_FILE).write_text(json.dumps(_files(temporary), indent=1) + "\n")
            fsync_tree(temporary)
        except BaseException as error:
            explained = explain_write_error(error, f"writing checkpoint {final}", Path(output))
            shutil.rmtree(temporary, ignore_errors=True)
            if explained is not None:
                raise explained from error
            raise
        if final.exists():
            shutil.rmtree(final)
        temporary.rename(final)
        fsync_directory(Path(output))
        if total_limit:
            for old in checkpoints(output)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _trainable_names(model) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def register_trainable_weight_hooks(accelerator) -> None:
    """Make `save_state` store only the trainable weights (the adapter of a LoRA run, not the frozen base
    model), and `load_state` load them back, checking that every trainable weight is there."""

    def save_trainable(models, weights, output_dir):
        for i, (model, state_dict) in enumerate(zip(models, weights)):
            names = _trainable_names(model)
            weights[i] = {name: tensor for name, tensor in state_dict.items() if name in names}

    def load_trainable(models, input_dir):
        from safetensors.torch import load_file

        for i, model in enumerate(models):
            path = Path(input_dir) / (f"model_{i}.safetensors" if i else "model.safetensors")
            if not path.is_file():
                return  # not the plain format (DeepSpeed, FSDP, or a .bin checkpoint): accelerate loads it
            state_dict = load_file(str(path))
            missing = _trainable_names(model) - state_dict.keys()
            unexpected = state_dict.keys() - dict(model.named_parameters()).keys()
            if missing or unexpected:
                raise ValueError(
                    f"{path} does not hold this model's trainable weights (missing {sorted(missing)[:5]}, "
                    f"unexpected {sorted(unexpected)[:5]}): was it written by a run with other LoRA settings?"
                )
            model.load_state_dict(state_dict, strict=False)
        models.clear()  # loaded here: accelerate must not load them again (strictly)

    accelerator.register_save_state_pre_hook(save_trainable)
    accelerator.register_load_state_pre_hook(load_trainable)
