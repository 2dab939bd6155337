"""The script the multi-process tests hand to `accelerate launch`: it runs `train` once per `TrainConfig` in its
JSON argument and saves, per process, the trained student's state dict (where the process holds one) and the
adaptive α's anchors it held at every step to `<output>/rank<i>.pt`.

    accelerate launch --config_file examples/accelerate/fsdp.yaml --num_processes 2 ... \
        tests/multiprocess_driver.py '[{"teacher": ..., "output": ...}]'

Accelerate has no CPU mode for FSDP or DeepSpeed (with `use_cpu` it quietly runs DDP instead), so with
`DISTILLM2_PRETEND_GPUS=1` (and `ACCELERATE_TORCH_DEVICE=cpu`) `PartialState._prepare_backend` reports
("gloo", MULTI_GPU) as it would on GPUs with NCCL: accelerate then sets FSDP or DeepSpeed up as configured,
on CPU tensors and gloo collectives. The trainer itself is not touched. `DISTILLM2_KILL_AFTER_STEP=k` ends
every process (exit status 3) right after the checkpoint of step k is written, as a killed run would stop.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType

from distillm2_kernels.trainer import checkpoint, training
from distillm2_kernels.trainer.objectives import TrainingObjective

KILLED_EXIT_STATUS = 3


def pretend_gpus() -> None:
    """GPU collectives on the CPU: accelerate's backend choice answers ("gloo", MULTI_GPU) in a launched process."""
    real = PartialState._prepare_backend

    def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        if int(os.environ.get("LOCAL_RANK", -1)) == -1:
            return real(self, cpu, sagemaker_dp, backend)
        return "gloo", DistributedType.MULTI_GPU

    PartialState._prepare_backend = prepare_backend


def record_anchors(anchors: list) -> None:
    """Append the α anchors this process holds to `anchors` at every optimizer step."""
    real_step = TrainingObjective.step

    def step(self):
        state = self.curriculum.state
        anchors.append(None if state.anchor_t is None else [state.anchor_t.item(), state.anchor_s.item()])
        real_step(self)

    TrainingObjective.step = step


def kill_after_step(step: int) -> None:
    """Stop the process once the checkpoint of `step` is complete on every process."""
    real_save = checkpoint.save_checkpoint

    def save(accelerator, output, state, *args, **kwargs):
        folder = real_save(accelerator, output, state, *args, **kwargs)
        if state.global_step == step:
            sys.stdout.flush()
            os._exit(KILLED_EXIT_STATUS)
        return folder

    training.save_checkpoint = save


def main(runs: list[dict]) -> None:
    if os.environ.get("DISTILLM2_PRETEND_GPUS") == "1":
        pretend_gpus()
    if os.environ.get("DISTILLM2_KILL_AFTER_STEP"):
        kill_after_step(int(os.environ["DISTILLM2_KILL_AFTER_STEP"]))
    anchors: list = []
    record_anchors(anchors)
    for options in runs:
        anchors.clear()
        config = training.TrainConfig(**options)
        result = training.train(config)
        weights = None if result.model is None else {k: v.detach().clone() for k, v in result.model.state_dict().items()}
        torch.save({"weights": weights, "anchors": list(anchors)},
                   f"{config.output}/rank{PartialState().process_index}.pt")


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
