"""The trainer under the sharded engines of examples/accelerate/: FSDP2 (fsdp.yaml) and DeepSpeed ZeRO-3
(deepspeed_zero3.yaml), each on 2 CPU processes with gloo collectives through tests/multiprocess_driver.py
(which makes accelerate set the engine up as on GPUs), against one plain process on the same pairs. DDP is
tested in test_training.py.

Each engine trains, in one `accelerate launch`:
- LoRA for 2 epochs of 2 steps, as two calls: the first stops after epoch 1
  (`stop_at_epoch`), the second continues it with `resume=True` from the engine's sharded checkpoint;
- full fine-tuning for 2 steps (FSDP2), or its refusal (ZeRO-3 gathers the lm_head read-only).
Every step's metrics equal those of one process (LoRA: 2 micro-batches of 1 pair per step; full: 1 batch of 2
pairs), the gradient norm included, which is > 1 here so the clip at 1 acts; a checkpoint is written at every
step; `final/` loads with `from_pretrained` and holds the weights of the one-process run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

from distillm2_kernels.trainer.metrics_log import read_metrics  # noqa: E402
from distillm2_kernels.trainer.pairing import pair_row  # noqa: E402
from distillm2_kernels.trainer.training import TrainConfig, train  # noqa: E402
from tiny_models import PROMPTS  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

REPOSITORY = Path(__file__).resolve().parents[1]
CONFIGS = REPOSITORY / "examples" / "accelerate"
DRIVER = Path(__file__).resolve().parent / "multiprocess_driver.py"
RESPONSES = [("5", "4?"), ("Blue, like the sky.", "red"), ("Hi!", "hello there"), ("1 2 3 4", "one two")]
FULL_UNDER_ZERO3 = "not supported under DeepSpeed ZeRO-3"
# The processes' all-reduced (or reduce-scattered) gradients are sums in another order than one process's
# accumulation, so the metrics agree to float32 rounding (as in the DDP test). AdamW moves a weight by about
# the learning rate per step whatever the gradient's size, which magnifies that rounding for the smallest
# gradients: the weights agree to WEIGHTS_LR_FRACTION of the learning rate per step, but for a weight whose
# gradient is within rounding of 0 the sign of Adam's step m/√v can differ, by up to 2·lr per step (Adam's
# step is at most about lr). So every weight must lie within that bound, and at most WEIGHTS_LOOSE_SHARE of
# a tensor's weights beyond the tight one (a gradient not reduced, or reduced twice, moves most of them).
METRICS_RTOL = 1e-5
WEIGHTS_LR_FRACTION = 1e-3
WEIGHTS_LOOSE_SHARE = 0.01


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config_file: Path, runs: list[dict], timeout: int = 300) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file <config_file>` on 2 processes of the driver, running `runs` in turn."""
    launcher = Path(sys.executable).parent / "accelerate"
    command = [str(launcher), "launch"] if launcher.exists() else [sys.executable, "-m", "accelerate.commands.launch"]
    command += ["--config_file", str(config_file), "--num_processes", "2", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--main_process_port", str(_free_port()), str(DRIVER), json.dumps(runs)]
    env = {name: value for name, value in os.environ.items() if not name.startswith("ACCELERATE_")}
    env.update(DISTILLM2_PRETEND_GPUS="1", ACCELERATE_TORCH_DEVICE="cpu", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPOSITORY), os.environ.get("PYTHONPATH", "")]))
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=REPOSITORY)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()  # the launcher passes SIGTERM on to the processes it started (each in its own session)
        try:
            stdout, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        pytest.fail(f"the processes did not finish in {timeout} s (a deadlock?):\n{(stdout + stderr)[-6000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _succeeded(process: subprocess.CompletedProcess) -> str:
    output = process.stdout + process.stderr
    assert process.returncode == 0, output[-6000:]
    return output


def _logged(rows: list[dict]) -> list[dict]:
    """The metrics of each step as numbers (the timings and empty columns left out)."""
    return [{k: float(v) for k, v in r.items() if v != "" and k not in ("tokens_per_s", "elapsed_s")} for r in rows]


def _runs(tiny_models, tmp_path: Path) -> tuple[dict, dict]:
    teacher, student = tiny_models("llama")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(pair_row(PROMPTS[i], *RESPONSES[i])) + "\n" for i in range(len(RESPONSES))))
    common = dict(teacher=str(teacher), student=str(student), data=str(data), warmup_ratio=0.0, lr=1e-2,
                  save_steps=1, progress=False)
    return (dict(common, lora_dropout=0.0, epochs=2),
            dict(common, use_lora=False, loss="skl", max_steps=2))


def _final_weights_of(folder: Path) -> dict:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def _final_weights(output: Path) -> dict:
    return _final_weights_of(output / "final")


def _check_against_one_process(output: Path, options: dict, one_process: dict, tmp_path: Path) -> None:
    """Metrics, checkpoints and final/ of the 2-process run in `output` against one process with `one_process`."""
    single = train(TrainConfig(**dict(options, output=str(tmp_path / f"single-{output.name}"), **one_process)))
    rows, single_rows = _logged(read_metrics(output / "metrics.csv")), _logged(read_metrics(single.metrics_csv))
    assert [r["step"] for r in rows] == [float(k) for k in range(1, single.total_steps + 1)]
    for row, single_row in zip(rows, single_rows, strict=True):
        assert row.keys() == single_row.keys()
        assert single_row["grad_norm"] > 1  # so the clip at 1 acts
        for key in row:
            assert row[key] == pytest.approx(single_row[key], rel=METRICS_RTOL), (output.name, row["step"], key)
    assert sorted(p.name for p in output.glob("checkpoint-*")) == [f"checkpoint-{k}" for k in range(1, single.total_steps + 1)]

    rank0, rank1 = torch.load(output / "rank0.pt"), torch.load(output / "rank1.pt")
    assert rank1["weights"] is None  # sharded engines gather the trained student on the main process only
    final, expected = _final_weights(output), _final_weights(single.output_dir)
    assert final.keys() == expected.keys() == rank0["weights"].keys()
    for name in final:
        assert torch.equal(final[name], rank0["weights"][name]), name
        step_bound = options["lr"] * single.total_steps
        difference = (final[name].double() - expected[name].double()).abs()
        assert difference.max() <= 2 * step_bound, (name, difference.max().item())
        loose = (difference > WEIGHTS_LR_FRACTION * step_bound).double().mean().item()
        assert loose <= WEIGHTS_LOOSE_SHARE, (name, loose, difference.max().item())
    assert not torch.equal(final["model.layers.0.self_attn.q_proj.weight"],
                           _final_weights_of(Path(options["student"]))["model.layers.0.self_attn.q_proj.weight"])


def _lora_in_two_calls(lora: dict, output: Path) -> list[dict]:
    return [dict(lora, output=str(output), batch_size=1, stop_at_epoch=1),
            dict(lora, output=str(output), batch_size=1, resume=True)]


def test_fsdp2_trains_lora_and_every_weight_as_one_process_and_resumes(tiny_models, tmp_path):
    """fsdp.yaml as written (2 processes, no mixed precision). Before the fix the clip got the parameters
    from before `prepare` (FSDP2 swaps in DTensors): LoRA's gradient norm was logged as 0.0, unclipped, and
    full fine-tuning failed at the clip on a mix of Tensors and DTensors."""
    lora, full = _runs(tiny_models, tmp_path)
    output = _succeeded(launch(CONFIGS / "fsdp.yaml", _lora_in_two_calls(lora, tmp_path / "fsdp2-lora")
                               + [dict(full, output=str(tmp_path / "fsdp2-full"), batch_size=1)]))
    assert "resuming from" in output and "checkpoint-2 (step 2 of 4)" in output
    _check_against_one_process(tmp_path / "fsdp2-lora", lora, dict(batch_size=1, grad_accum=2), tmp_path)
    _check_against_one_process(tmp_path / "fsdp2-full", full, dict(batch_size=2), tmp_path)


def test_fsdp1_is_refused_with_the_reason_before_training(tiny_models, tmp_path):
    """FSDP version 1 leaves the lm_head weight a flat shard after the forward on torch 2.13 (before the fix:
    "the student's lm_head has 0 rows" at step 1); it is refused up front, naming fsdp_version: 2."""
    lora, _ = _runs(tiny_models, tmp_path)
    text = (CONFIGS / "fsdp.yaml").read_text()
    assert "fsdp_version: 2\n" in text
    config = tmp_path / "fsdp1.yaml"
    config.write_text(text.replace("fsdp_version: 2\n", "fsdp_version: 1\n"))
    output = tmp_path / "fsdp1"
    _succeeded(launch(config, [dict(lora, output=str(output), max_steps=1,
                                    expect_error="FSDP version 1 is not supported")]))
    for rank in (0, 1):
        assert "fsdp_version: 2" in (output / f"rank{rank}.error").read_text()
    assert not (output / "metrics.csv").exists()


def test_deepspeed_zero3_trains_lora_as_one_process_resumes_and_saves_final(tiny_models, tmp_path):
    """deepspeed_zero3.yaml as written (2 processes, no mixed precision), deepspeed installed (make test
    installs it from requirements-test.txt). Before the fixes: `gradient_accumulation_steps: auto` in the file
    stopped `Accelerator()`; then the lm_heads, partitioned at load, showed 0 rows; then `prepare` lacked
    `train_micro_batch_size_per_gpu`; then the final save deadlocked (the main process's fresh copy of the
    student was partitioned at load, a collective the other process never joined)."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install -r requirements-test.txt)")
    lora, full = _runs(tiny_models, tmp_path)
    output = _succeeded(launch(CONFIGS / "deepspeed_zero3.yaml", _lora_in_two_calls(lora, tmp_path / "zero3-lora")
                               + [dict(full, output=str(tmp_path / "zero3-full"), expect_error=FULL_UNDER_ZERO3)]))
    assert "resuming from" in output and "checkpoint-2 (step 2 of 4)" in output
    _check_against_one_process(tmp_path / "zero3-lora", lora, dict(batch_size=1, grad_accum=2), tmp_path)
    assert FULL_UNDER_ZERO3 in (tmp_path / "zero3-full" / "rank0.error").read_text()
