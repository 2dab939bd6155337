"""The script the multi-process tests hand to `accelerate launch`: it runs `train` once per `TrainConfig` in its
JSON argument and saves, per process, the trained student's state dict (where the process holds one) and the
adaptive α's anchors it held at every step to `<output>/rank<i>.pt`.

    accelerate launch --config_file examples/accelerate/fsdp.yaml --num_processes 2 ... \
        tests/multiprocess_driver.py '[{"teacher": ..., "output": ...}]'

Accelerate has no CPU mode for FSDP or DeepSpeed (with `use_cpu` it quietly runs DDP instead), so with
`DISTILLM2_PRETEND_GPUS=1` (and `ACCELERATE_TORCH_DEVICE=cpu`) `PartialState._prepare_backend` reports
("gloo", MULTI_GPU) as it would on GPUs with NCCL: accelerate then sets FSDP or DeepSpeed up as configured,
on CPU tensors and gloo collectives. The trainer itself is not touched. A run with `"expect_error": "text"`
must raise a ValueError whose message holds that text; the message is written to `<output>/rank<i>.error`.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType

from distillm2_kernels.trainer import training
from distillm2_kernels.trainer.objectives import TrainingObjective


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


def process_index() -> int:
    """This process's rank, once `train` has set accelerate's state up (a `PartialState()` made before the
    `Accelerator` would fix it without the launch's `use_cpu`)."""
    return PartialState().process_index


def main(runs: list[dict]) -> None:
    if os.environ.get("DISTILLM2_PRETEND_GPUS") == "1":
        pretend_gpus()
    anchors: list = []
    record_anchors(anchors)
    for options in runs:
        anchors.clear()
        expected_error = options.pop("expect_error", None)
        config = training.TrainConfig(**options)
        if expected_error is not None:
            try:
                training.train(config)
            except ValueError as error:
                if expected_error not in str(error):
                    raise
                os.makedirs(config.output, exist_ok=True)
                with open(f"{config.output}/rank{process_index()}.error", "w") as handle:
                    handle.write(str(error))
                continue
            raise AssertionError(f"train({options}) did not raise")
        result = training.train(config)
        weights = None if result.model is None else {k: v.detach().clone() for k, v in result.model.state_dict().items()}
        torch.save({"weights": weights, "anchors": list(anchors)}, f"{config.output}/rank{process_index()}.pt")


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
