"""Checkpoints that resume a run exactly: `<output>/checkpoint-<step>/`.

A checkpoint is `accelerator.save_state` (optimizer, lr scheduler, the RNG states of every process, the
accumulation counter, the objective's curriculum state as a registered object, and the student's trainable
weights — the LoRA/DoRA adapter only, or every weight when fully fine-tuning), plus `trainer_state.json`
(global step, epoch, optimizer steps done in the epoch, the schedule's length, the number of pairs the batch
plan was made for and the data file's SHA-256) and, for a LoRA run, the adapter in peft's format under `adapter/` (loadable with
`PeftModel.from_pretrained`). It is written to a temporary folder and renamed when complete, so a run
killed while saving leaves the previous checkpoints intact; `latest_checkpoint` only sees complete ones.
Under DeepSpeed and FSDP `save_state` writes their own (sharded) formats.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

__all__ = ["TrainerState", "checkpoints", "latest_checkpoint", "save_checkpoint", "register_trainable_weight_hooks"]

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
# fields of the run that a resumed run must share (a different value would change the data order or the math)
RESUME_INVARIANTS = (
    "epochs", "max_steps", "loss", "preset", "use_lora", "lora_r", "lora_alpha", "lora_dropout", "dora", "batch_size", "grad_accum",
    "seed", "max_length", "lr", "warmup_ratio", "weight_decay", "max_grad_norm",
)


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
        changed = {k: (self.run.get(k), v) for k, v in run.items() if self.run.get(k) != v}
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
    accelerator.save_state(str(temporary))
    if accelerator.is_main_process:
        sharded = accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
        if peft_model is not None and not sharded:
            peft_model.save_pretrained(temporary / "adapter")
        state.save(temporary)  # last: marks the checkpoint complete
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        temporary.rename(final)
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
