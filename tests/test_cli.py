"""The `distillm2` command: generate → pair → train end to end on CPU, the pipeline (in-process and with a
launcher), and bad input reported on one line naming the file and the line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

from distillm2_kernels.trainer import pipeline as pipeline_module  # noqa: E402
from distillm2_kernels.trainer.arguments import (  # noqa: E402
    SET_BY_PIPELINE,
    TRAINING_OPTIONS,
    generation_arguments,
    train_config,
    training_arguments,
)
from distillm2_kernels.trainer.cli import build_parser, main  # noqa: E402
from distillm2_kernels.trainer.jsonl import read_jsonl  # noqa: E402
from distillm2_kernels.trainer.metrics_log import read_metrics  # noqa: E402
from distillm2_kernels.trainer.pipeline import PipelineConfig, run_pipeline  # noqa: E402
from distillm2_kernels.trainer.training import TrainConfig, read_final_state  # noqa: E402
from tiny_models import PROMPTS, write_prompts  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
REPOSITORY = Path(__file__).resolve().parents[1]


def _rows(path):
    return [row for _, row in read_jsonl(path)]


def _command_line() -> list[str]:
    """The installed console script when there is one, else `python -m distillm2_kernels.trainer`."""
    script = Path(sys.executable).parent / "distillm2"
    return [str(script)] if script.exists() else [sys.executable, "-m", "distillm2_kernels.trainer"]


def test_generate_pair_train_end_to_end(tiny_models, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher, student = tiny_models("llama")
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPOSITORY), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.run(
        _command_line() + ["generate", "--model", str(teacher), "--prompts", str(prompts), "--output",
                           str(tmp_path / "teacher.jsonl"), "--max-new-tokens", "8", "--no-progress"],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    assert f"{len(PROMPTS)} responses in" in process.stdout

    assert main(["generate", "--model", str(student), "--prompts", str(prompts), "--output",
                 str(tmp_path / "student.jsonl"), "--max-new-tokens", "8", "--n", "6", "--no-progress"]) == 0
    assert main(["pair", "--teacher", str(tmp_path / "teacher.jsonl"), "--student", str(tmp_path / "student.jsonl"),
                 "--output", str(tmp_path / "pairs.jsonl")]) == 0
    pairs = _rows(tmp_path / "pairs.jsonl")
    assert len(pairs) == 6 and pairs[0]["chosen"][0] == {"role": "user", "content": PROMPTS[0]}
    assert pairs[0]["chosen"][1]["content"] == _rows(tmp_path / "teacher.jsonl")[0]["response"]

    run = tmp_path / "run"
    assert main(["train", "--teacher", str(teacher), "--student", str(student), "--data", str(tmp_path / "pairs.jsonl"),
                 "--output", str(run), "--batch-size", "2", "--max-steps", "3", "--lr", "1e-3", "--save-steps", "1",
                 "--save-total-limit", "2", "--no-progress"]) == 0
    rows = read_metrics(run / "metrics.csv")
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    assert all(float(r["loss"]) > 0 and float(r["skl"]) > 0 and float(r["srkl"]) > 0 for r in rows)
    assert float(rows[1]["lr"]) == pytest.approx(1e-3)  # warmup: ceil(0.1 · 3) = 1 step
    assert (run / "checkpoint-3" / "adapter" / "adapter_config.json").is_file()
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]  # the newest 2

    trained = AutoModelForCausalLM.from_pretrained(run / "final")
    initial = AutoModelForCausalLM.from_pretrained(student)
    assert type(trained).__name__ == "LlamaForCausalLM"
    q_proj = [m.model.layers[0].self_attn.q_proj.weight for m in (trained, initial)]
    assert not torch.equal(*q_proj)
    assert torch.equal(trained.model.embed_tokens.weight, initial.model.embed_tokens.weight)  # not LoRA-adapted
    assert AutoTokenizer.from_pretrained(run / "final").chat_template is not None
    adapter = json.loads((run / "final" / "adapter" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"], adapter["use_dora"]) == (16, 128, 0.05, True)
    assert read_final_state(run / "final") == {"global_step": 3, "epochs_completed": 1, "total_steps": 3}


def test_pipeline_regenerates_student_responses_every_epoch_and_continues_when_rerun(tiny_models, tmp_path):
    teacher, student = tiny_models("qwen2")
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "pipe"
    argv = ["pipeline", "--prompts", str(prompts), "--teacher", str(teacher), "--student", str(student), "--output",
            str(out), "--epochs", "2", "--n", "4", "--max-new-tokens", "6", "--batch-size", "2", "--loss", "distillm2",
            "--preset", "paper", "--no-progress"]
    assert main(argv) == 0
    assert len(_rows(out / "teacher.jsonl")) == 4
    epoch0, epoch1 = _rows(out / "epoch-0" / "student.jsonl"), _rows(out / "epoch-1" / "student.jsonl")
    assert epoch0[0]["generation"]["model"] == str(student) and epoch0[0]["generation"]["seed"] == 42
    assert epoch1[0]["generation"]["model"] == str(out / "train" / "final") and epoch1[0]["generation"]["seed"] == 43
    pairs = _rows(out / "epoch-1" / "pairs.jsonl")
    assert [r["rejected"][1]["content"] for r in pairs] == [r["response"] for r in epoch1]
    rows = read_metrics(out / "train" / "metrics.csv")
    assert [(r["step"], r["epoch"]) for r in rows] == [("1", "0"), ("2", "0"), ("3", "1"), ("4", "1")]
    assert float(rows[1]["lr"]) > float(rows[3]["lr"]) > 0  # one cosine schedule over both epochs
    assert read_final_state(out / "train" / "final")["epochs_completed"] == 2

    modified = (out / "train" / "metrics.csv").stat().st_mtime_ns
    assert main(argv) == 0  # everything is done: nothing is generated or trained again
    assert (out / "train" / "metrics.csv").stat().st_mtime_ns == modified


def test_pipeline_with_a_launcher_runs_each_stage_as_a_command(tiny_models, tmp_path, monkeypatch):
    """With `launcher`, training runs as `<launcher> -m distillm2_kernels.trainer train ...` and generation as
    `python -m distillm2_kernels.trainer generate ...`; here the commands are run by `main` in-process."""
    teacher, student = tiny_models("llama")
    commands = []

    def run_in_process(command, check):
        commands.append(command)
        module = command.index("distillm2_kernels.trainer")
        assert command[module - 1] == "-m" and main(command[module + 1:]) == 0

    monkeypatch.setattr(pipeline_module.subprocess, "run", run_in_process)
    result = run_pipeline(PipelineConfig(
        prompts=str(write_prompts(tmp_path / "prompts.jsonl")), teacher=str(teacher), student=str(student),
        output=str(tmp_path / "pipe"), epochs=1, n=3, max_new_tokens=4, train={"batch_size": 3, "lora_r": 4},
        launcher=["accelerate", "launch", "--num_processes", "1"], progress=False,
    ))
    assert [c[:4] for c in commands] == [
        [sys.executable, "-m", "distillm2_kernels.trainer", "generate"],
        [sys.executable, "-m", "distillm2_kernels.trainer", "generate"],
        ["accelerate", "launch", "--num_processes", "1"],
    ]
    assert commands[2][4:7] == ["-m", "distillm2_kernels.trainer", "train"] and "--stop-at-epoch" in commands[2]
    assert result.epochs_completed == 1 and (result.final_dir / "config.json").is_file()
    assert json.loads((result.final_dir / "adapter" / "adapter_config.json").read_text())["r"] == 4


def test_the_default_pipeline_runs_on_one_gpu_with_vllm(tiny_models, tmp_path, monkeypatch):
    """Without a launcher, on one (simulated) GPU: vLLM reserves `gpu_memory_utilization` (0.92) of it at
    startup and gives it back only when its process ends, so each vLLM generation (teacher, student at every
    epoch) must run in its own process; the pipeline's own process never holds any of it."""
    import vllm_stand_in

    vllm = vllm_stand_in.install(monkeypatch, tmp_path / "device.json", total_gib=24)
    teacher, student = tiny_models("llama")
    result = run_pipeline(PipelineConfig(
        prompts=str(write_prompts(tmp_path / "prompts.jsonl")), teacher=str(teacher), student=str(student),
        output=str(tmp_path / "pipe"), epochs=2, n=3, max_new_tokens=4, train={"batch_size": 3, "lora_r": 4},
        progress=False,
    ))
    assert result.epochs_completed == 2
    for path in ("teacher.jsonl", "epoch-0/student.jsonl", "epoch-1/student.jsonl"):
        rows = _rows(tmp_path / "pipe" / path)
        assert len(rows) == 3 and {r["generation"]["engine"] for r in rows} == {"vllm"}
    held = vllm_stand_in.held_bytes(tmp_path / "device.json")
    assert not [key for key in held if key.startswith(f"{os.getpid()}:")]
    assert vllm.CALLS == []  # every vLLM generation ran in another process


def test_the_vllm_engine_options_reach_generate_and_the_generate_command(monkeypatch, tmp_path):
    from distillm2_kernels.trainer import cli

    options = ["--max-model-len", "128", "--gpu-memory-utilization", "0.5", "--tensor-parallel-size", "2",
               "--engine-args", '{"enforce_eager": true, "max_num_seqs": 8}']
    seen = {}
    monkeypatch.setattr(cli, "generate", lambda *args, **kwargs: seen.update(kwargs) or (_ for _ in ()).throw(
        ValueError("stop")))
    assert main(["generate", "--model", "m", "--prompts", "p", "--output", str(tmp_path / "o.jsonl"), *options]) == 2
    expected = dict(max_model_len=128, gpu_memory_utilization=0.5, tensor_parallel_size=2,
                    engine_args={"enforce_eager": True, "max_num_seqs": 8})
    assert {key: seen[key] for key in expected} == expected
    monkeypatch.setattr(cli, "run_pipeline", lambda config: seen.setdefault("config", config) and (_ for _ in ()).throw(
        ValueError("stop")))
    assert main(["pipeline", "--prompts", "p", "--teacher", "t", "--student", "s", "--output", str(tmp_path / "x"),
                 *options]) == 2
    generation = pipeline_module._generation_options(seen["config"], seed=1)
    assert {key: generation[key] for key in expected} == expected
    argv = generation_arguments(generation)
    parsed = build_parser().parse_args(["generate", "--model", "m", "--prompts", "p", "--output", "o", *argv])
    assert {key: getattr(parsed, key) for key in expected} == expected
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--model", "m", "--prompts", "p", "--output", "o", "--engine-args", "[1]"])


def test_training_arguments_reproduce_the_config():
    config = TrainConfig(teacher="t", student="s", data="d.jsonl", output="o", loss="kd", max_steps=7, dora=False,
                         use_lora=False, bf16=True, save_steps=None, max_grad_norm=0.5, stop_at_epoch=2)
    args = build_parser().parse_args(["train"] + training_arguments(config))
    assert dataclasses.asdict(train_config(args)) == dataclasses.asdict(config)
    defaults = build_parser().parse_args(["train", "--teacher", "t", "--student", "s", "--data", "d", "--output", "o"])
    paper = (defaults.dora, defaults.use_lora, defaults.lora_r, defaults.lora_alpha, defaults.lora_dropout, defaults.lr)
    assert paper == (True, True, 16, 128, 0.05, 5e-5)


def test_the_pipeline_takes_every_training_option_but_those_it_sets_itself():
    """`distillm2 pipeline` offers every training option except the ones the pipeline sets per epoch (its own
    `--epochs`, `--seed` and `--progress` stand for those of training), and `PipelineConfig(train=...)` refuses
    exactly the fields the pipeline sets."""
    parser = build_parser()
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    flags = {flag for action in commands.choices["pipeline"]._actions for flag in action.option_strings}
    for name in TRAINING_OPTIONS:
        flag = "--" + TRAINING_OPTIONS[name].get("flag", name).replace("_", "-")
        assert (flag in flags) == (name not in SET_BY_PIPELINE or name == "epochs"), name
    assert {"--seed", "--progress", "--epochs"} <= flags and "--resume" not in flags and "--max-steps" not in flags
    for name in SET_BY_PIPELINE:
        with pytest.raises(ValueError, match=name):
            PipelineConfig(prompts="p", teacher="t", student="s", output="o", train={name: 1})
    assert PipelineConfig(prompts="p", teacher="t", student="s", output="o", train={"lr": 1e-4, "seed": 3}).train


def test_bad_input_is_one_line_naming_the_file_and_the_line(tiny_models, tmp_path, capsys):
    teacher, student = tiny_models("llama")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"}\n{"prompt": oops}\n')
    assert main(["pair", "--teacher", str(bad), "--student", str(bad), "--output", str(tmp_path / "p.jsonl")]) == 2
    assert f"distillm2 pair: error: {bad}:3: not valid JSON" in capsys.readouterr().err
    assert main(["train", "--teacher", str(teacher), "--student", str(student), "--data", str(bad), "--output",
                 str(tmp_path / "run"), "--no-progress"]) == 2
    assert f"distillm2 train: error: {bad}:3: not valid JSON" in capsys.readouterr().err
    responses = tmp_path / "responses.jsonl"  # valid JSON Lines, but responses rather than pairs
    responses.write_text('{"prompt": "a", "response": "b"}\n')
    assert main(["train", "--teacher", str(teacher), "--student", str(student), "--data", str(responses),
                 "--output", str(tmp_path / "run"), "--no-progress"]) == 2
    assert f"{responses}:1: missing field 'chosen'" in capsys.readouterr().err
    assert main(["generate", "--model", str(student), "--prompts", str(bad), "--output", str(tmp_path / "g")]) == 2
    assert f"{bad}:3: not valid JSON" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "nothing"), "--prompts", str(bad), "--output", "x"]) == 2
    assert "not a local directory" in capsys.readouterr().err
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    assert main(["generate", "--model", str(student), "--prompts", str(prompts), "--output", str(tmp_path / "g"),
                 "--dtype", "bf16"]) == 2
    assert "dtype must name a torch dtype" in capsys.readouterr().err
    # a missing model folder is reported before the data is read and tokenised
    assert main(["train", "--teacher", str(tmp_path / "no-teacher"), "--student", str(student), "--data", str(bad),
                 "--output", str(tmp_path / "run"), "--no-progress"]) == 2
    assert f"teacher {tmp_path / 'no-teacher'}: not a local directory" in capsys.readouterr().err
    # an impossible option: one line too, not a traceback
    assert main(["train", "--teacher", str(teacher), "--student", str(student), "--data", str(responses),
                 "--output", str(tmp_path / "run"), "--batch-size", "0"]) == 2
    assert capsys.readouterr().err == "distillm2 train: error: batch_size must be >= 1, got 0\n"
