"""`distillm2_kernels.trainer.training`: tokenisation and batching, the fused step against the reference
objective on materialised logits, exact resume, malformed data, and DDP with 2 processes on gloo."""

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

from distillm2_kernels import reference  # noqa: E402
from distillm2_kernels.trainer import training  # noqa: E402
from distillm2_kernels.trainer.batching import BatchPlan  # noqa: E402
from distillm2_kernels.trainer.data import PairExample, collate_pairs, read_pairs, tokenize_pairs  # noqa: E402
from distillm2_kernels.trainer.jsonl import DataError  # noqa: E402
from distillm2_kernels.trainer.metrics_log import read_metrics  # noqa: E402
from distillm2_kernels.trainer.models import (  # noqa: E402
    HiddenStates,
    load_model,
    load_student,
    load_tokenizer,
    shared_vocab_size,
)
from distillm2_kernels.trainer.objectives import TrainingObjective  # noqa: E402
from distillm2_kernels.trainer.pairing import pair_row  # noqa: E402
from distillm2_kernels.trainer.training import TrainConfig, distillation_loss, train  # noqa: E402
from tiny_models import PROMPTS  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ALLOWANCE_ULPS = 16
TEACHER_RESPONSES = ["5", "Blue, like the sky.", "Hi!", "1 2 3 4", "c-a-t", "Yes."]
STUDENT_RESPONSES = ["4?", "red", "hello there", "one two", "kat", "No, it is warm and dry"]


def _write_pairs(path: Path, count: int = 6) -> Path:
    rows = [pair_row(PROMPTS[i], TEACHER_RESPONSES[i], STUDENT_RESPONSES[i]) for i in range(count)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------


def test_tokenisation_masks_the_prompt_appends_eos_and_pads(tiny_models, tmp_path):
    _, student = tiny_models("llama")
    tokenizer = load_tokenizer(student)
    examples = read_pairs(_write_pairs(tmp_path / "pairs.jsonl", 2))
    pairs = tokenize_pairs(examples, tokenizer, max_length=64)
    prompt = tokenizer("<|user|>What is 2+3?</s><|assistant|>", add_special_tokens=False)["input_ids"]
    response = tokenizer("5", add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    assert pairs[0].chosen_ids == prompt + response + [eos]
    assert pairs[0].chosen_labels == [-100] * len(prompt) + response + [eos]
    assert pairs[0].rejected_labels[len(prompt):] == tokenizer("4?", add_special_tokens=False)["input_ids"] + [eos]

    batch = collate_pairs(pairs, tokenizer.pad_token_id, with_rejected=True)
    assert batch.num_pairs == 2 and batch.input_ids.shape[0] == 4 and batch.has_student_responses
    lengths = [len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs]
    assert batch.attention_mask.sum(1).tolist() == lengths
    assert batch.input_ids[1, lengths[1]:].eq(tokenizer.pad_token_id).all()
    assert batch.labels[1, lengths[1]:].eq(-100).all()

    # a long response keeps at least half of max_length for the prompt's last tokens, and loses its EOS
    long = tokenize_pairs([PairExample([{"role": "user", "content": "x" * 30}], "y" * 40, None, None)], tokenizer,
                          max_length=32)[0]
    assert len(long.chosen_ids) == 32 and long.chosen_labels.count(-100) == 16
    assert long.chosen_ids[:16] == tokenizer("x" * 14 + "</s><|assistant|>", add_special_tokens=False)["input_ids"]
    assert eos not in long.chosen_labels


def test_the_loss_covers_the_tokenizer_vocabulary_not_the_padded_lm_head_rows():
    """As the released code (which resizes both models to the tokenizer): when both checkpoints pad their
    lm_head beyond the tokenizer (Qwen2.5: 151936 and 152064 rows for 151665 tokens), the padded rows are
    not part of either distribution."""
    from transformers import AutoModelForCausalLM
    from tiny_models import build_tokenizer, model_config

    tokenizer = build_tokenizer()
    student, teacher = (AutoModelForCausalLM.from_config(model_config("llama", 16, len(tokenizer) + padding))
                        for padding in (4, 8))
    assert shared_vocab_size(student, teacher, tokenizer) == len(tokenizer)
    small = AutoModelForCausalLM.from_config(model_config("llama", 16, len(tokenizer) - 1))
    with pytest.raises(ValueError, match="lm_head"):
        shared_vocab_size(student, small, tokenizer)


def test_fsdp_cpu_ram_efficient_loading_is_refused_as_it_would_leave_the_teacher_uninitialised(monkeypatch):
    """`accelerate launch` with `fsdp_cpu_ram_efficient_loading: true` makes `from_pretrained` load real
    weights on each node's first process only (transformers 4.x: `torch.empty` elsewhere), for FSDP to
    broadcast; the teacher is not FSDP-wrapped, so it would stay garbage on the other processes."""
    from distillm2_kernels.trainer.models import check_teacher_loading

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")
    check_teacher_loading()
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    with pytest.raises(ValueError, match="fsdp_cpu_ram_efficient_loading"):
        check_teacher_loading()


def test_the_deepspeed_config_gets_the_trainers_micro_batch_and_clipping_and_a_different_clip_is_refused():
    """Accelerate takes the micro-batch from a prepared data loader, which the trainer has not, and `prepare`
    fails without it; the DeepSpeed engine clips, at the trainer's max_grad_norm (tests/test_multiprocess.py
    runs the whole trainer under ZeRO-3)."""
    from types import SimpleNamespace

    from distillm2_kernels.trainer.models import configure_deepspeed

    def accelerator(**config):
        return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=config)))

    filled = accelerator(train_micro_batch_size_per_gpu="auto")
    configure_deepspeed(filled, 3, 0.5)
    assert filled.state.deepspeed_plugin.deepspeed_config == {"train_micro_batch_size_per_gpu": 3, "gradient_clipping": 0.5}
    unclipped = accelerator(train_micro_batch_size_per_gpu=2, gradient_clipping="auto")
    configure_deepspeed(unclipped, 3, None)
    assert unclipped.state.deepspeed_plugin.deepspeed_config == {"train_micro_batch_size_per_gpu": 2,
                                                                  "gradient_clipping": 0.0}
    configure_deepspeed(accelerator(gradient_clipping=1.0), 1, 1.0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        configure_deepspeed(accelerator(gradient_clipping=1.0), 1, 0.5)
    configure_deepspeed(SimpleNamespace(state=SimpleNamespace()), 1, 1.0)  # no DeepSpeed: nothing to do


def test_batch_plan_covers_every_pair_each_epoch_and_splits_ranks():
    plan = BatchPlan(num_examples=10, batch_size=2, world_size=2, grad_accum=2, seed=5)
    assert plan.steps_per_epoch == 2  # 10 pairs, 8 per step: the second step wraps around
    for epoch in range(2):
        ranks = [plan.micro_batches(epoch, rank) for rank in range(2)]
        seen = [i for rank in ranks for batch in rank for i in batch]
        assert len(seen) == 16 and set(seen) == set(range(10))
        assert all(len(b) == 2 for rank in ranks for b in rank) and len(ranks[0]) == 4
        assert plan.micro_batches(epoch, 1, start_step=1) == ranks[1][2:]
    assert plan.order(0) != plan.order(1) and plan.order(0) == BatchPlan(10, 2, 2, 2, 5).order(0)


def test_malformed_pairs_file_is_reported_with_file_and_line(tiny_models, tmp_path):
    teacher, student = tiny_models("llama")
    data = _write_pairs(tmp_path / "pairs.jsonl", 3)
    lines = data.read_text().splitlines()
    data.write_text("\n".join([lines[0], lines[1], lines[2][:-5], ""]))
    config = TrainConfig(teacher=str(teacher), student=str(student), data=str(data), output=str(tmp_path / "out"),
                         progress=False)
    with pytest.raises(DataError, match=r"pairs\.jsonl:3: not valid JSON"):
        train(config)
    data.write_text(lines[0] + "\n" + json.dumps({"prompt": "p", "chosen": [{"role": "user", "content": "p"}],
                                                  "rejected": "r"}) + "\n")
    with pytest.raises(DataError, match=r"pairs\.jsonl:2: 'chosen' must be a list of messages"):
        read_pairs(data)
    data.write_text(json.dumps({"prompt": "p", "chosen": "t"}) + "\n")
    with pytest.raises(DataError, match=r"pairs\.jsonl:1: missing field 'rejected'"):
        read_pairs(data)
    assert read_pairs(data, need_rejected=False)[0].chosen == "t"  # enough for loss="skl" / "kd"


# ---------------------------------------------------------------------------------------------------------
# one step: fused objective from hidden states == reference objective on the models' logits
# ---------------------------------------------------------------------------------------------------------


def _models(teacher_dir, student_dir, dtype, *, use_lora=True):
    torch.manual_seed(0)
    student = load_student(student_dir, dtype, use_lora=use_lora, lora_dropout=0.0)
    with torch.no_grad():  # LoRA's B starts at 0, which would give A no gradient: make the adapter non-trivial
        for name, parameter in student.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    teacher = load_model(teacher_dir, "teacher", dtype)
    teacher.requires_grad_(False)
    return student, teacher


def _reference_loss(loss_kind, preset, student_logits, teacher_logits, labels, num_pairs):
    """The objective written from `reference` on materialised logits (docs/design.md §4)."""
    s, t, y = student_logits[:, :-1], teacher_logits[:, :-1], labels[:, 1:]
    pt, ps = slice(0, num_pairs), slice(num_pairs, 2 * num_pairs)
    if loss_kind == "srkl":
        return reference.srkl_reference(s[ps], t[ps], 0.1, labels=y[ps], reduction="seqmean", detach_mixture=True)
    if loss_kind != "distillm2":
        alpha = 0.0 if loss_kind == "kd" else 0.1
        return reference.skl_reference(s[pt], t[pt], alpha, labels=y[pt], reduction="seqmean")
    reduction = "mean" if preset == "distillm" else "seqmean"
    skl = reference.skl_reference(s[pt], t[pt], 0.1, labels=y[pt], reduction=reduction)
    srkl = reference.srkl_reference(s[ps], t[ps], 0.1, labels=y[ps], reduction=reduction,
                                    detach_mixture=preset != "distillm")
    if preset == "paper":  # first epoch, first step: α = α₀, β = clip(0/E + 0/T, β₀ = 0.5, 1)
        beta = 0.5
        return 0.5 * ((1 - beta) * skl + beta * srkl)
    return skl + srkl


def _one_step(family, tiny_models, loss_kind, preset, dtype, backend, fused: bool):
    teacher_dir, student_dir = tiny_models(family)
    tokenizer = load_tokenizer(student_dir)
    examples = [PairExample([{"role": "user", "content": PROMPTS[i]}], TEACHER_RESPONSES[i],
                            [{"role": "user", "content": PROMPTS[i]}], STUDENT_RESPONSES[i]) for i in range(3)]
    batch = collate_pairs(tokenize_pairs(examples, tokenizer), tokenizer.pad_token_id,
                          with_rejected=loss_kind in ("distillm2", "srkl"))
    student, teacher = _models(teacher_dir, student_dir, dtype)
    vocab = shared_vocab_size(student, teacher, tokenizer)
    if fused:
        objective = TrainingObjective(loss_kind, preset, num_epochs=2, total_steps=4, backend=backend)
        loss, metrics = distillation_loss(HiddenStates(student), student, teacher, objective, batch, vocab)
        assert metrics["srkl" if loss_kind == "srkl" else "skl"] > 0
    else:
        student_logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[..., :vocab]
        with torch.no_grad():
            teacher_logits = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[..., :vocab]
        loss = _reference_loss(loss_kind, preset, student_logits, teacher_logits, batch.labels, batch.num_pairs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize(
    "loss_kind, preset",
    [("distillm2", "distillm2"), ("distillm2", "paper"), ("distillm2", "distillm"), ("skl", "distillm2"),
     ("kd", "distillm2"), ("srkl", "distillm2")],
)
def test_fused_step_gradients_equal_the_reference_on_materialised_logits(tiny_models, family, loss_kind, preset):
    """float64 models, the "torch" backend (the one that runs float64): the LoRA/DoRA gradients of one step
    through `distillation_loss` (hidden states, fused-linear ops, no logits) equal autograd through
    `model(...).logits` and the reference objective to float64 rounding (rtol 1e-9)."""
    loss, grads = _one_step(family, tiny_models, loss_kind, preset, torch.float64, "torch", fused=True)
    reference_loss, reference_grads = _one_step(
        family, tiny_models, loss_kind, preset, torch.float64, "torch", fused=False
    )
    assert loss.dtype == torch.float64 and reference_loss > 0.05
    torch.testing.assert_close(loss, reference_loss, rtol=1e-10, atol=0)
    assert grads.keys() == reference_grads.keys()
    assert any("lora_A" in n for n in grads) and any("lora_magnitude" in n for n in grads)  # DoRA is on
    for name, grad in grads.items():
        scale = reference_grads[name].abs().max()
        assert scale > 0, name
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-9, atol=1e-9 * scale.item(), msg=name)


def test_fused_step_in_float32_on_the_default_backend_is_as_accurate_as_the_float32_reference(tiny_models):
    """float32, backend "auto" (the C++ kernels on CPU): the error of every gradient against the float64
    reference is at most that of the reference objective evaluated in float32 plus 16 float32 ulps of the
    gradient's scale (the tolerance rule of tests/oracle.py)."""
    oracle_loss, oracle = _one_step("llama", tiny_models, "distillm2", "distillm2", torch.float64, "torch", fused=False)
    base_loss, base = _one_step("llama", tiny_models, "distillm2", "distillm2", torch.float32, "auto", fused=False)
    loss, grads = _one_step("llama", tiny_models, "distillm2", "distillm2", torch.float32, "auto", fused=True)
    eps = torch.finfo(torch.float32).eps
    loss_error, base_error = abs(loss.double() - oracle_loss).item(), abs(base_loss.double() - oracle_loss).item()
    assert loss_error <= base_error + ALLOWANCE_ULPS * eps * oracle_loss.item()
    for name, grad in grads.items():
        error = (grad.double() - oracle[name]).abs().max().item()
        allowed = (base[name].double() - oracle[name]).abs().max().item()
        assert error <= allowed + ALLOWANCE_ULPS * eps * oracle[name].abs().max().item(), (name, error, allowed)


# ---------------------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------------------


def _saved_weights(run: Path, adapter: bool) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "final" / ("adapter/adapter_model.safetensors" if adapter else "model.safetensors")))


def kill_after_checkpoint(monkeypatch, config: TrainConfig, step: int) -> None:
    """Runs `train(config)` and stops it (a simulated preemption) right after its checkpoint of `step`."""
    real_save = training.save_checkpoint

    def killed(accelerator, output, state, *args, **kwargs):
        path = real_save(accelerator, output, state, *args, **kwargs)
        if state.global_step == step:
            raise KeyboardInterrupt("simulated preemption")
        return path

    monkeypatch.setattr(training, "save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        training.train(config)
    monkeypatch.setattr(training, "save_checkpoint", real_save)


def _run_whole_and_interrupted(tmp_path, monkeypatch, options: dict, kill_after_step: int):
    """The uninterrupted run, and the same run killed right after its checkpoint of `kill_after_step` then
    resumed; returns both TrainResults."""
    whole = train(TrainConfig(output=str(tmp_path / "whole"), **options))
    kill_after_checkpoint(monkeypatch, TrainConfig(output=str(tmp_path / "resumed"), **options), kill_after_step)
    assert not (tmp_path / "resumed" / "final").exists()
    resumed = train(TrainConfig(output=str(tmp_path / "resumed"), resume=True, **options))
    return whole, resumed


def _same_metrics(whole, resumed) -> list[dict]:
    timing = ("tokens_per_s", "elapsed_s")
    rows_whole, rows_resumed = read_metrics(whole.metrics_csv), read_metrics(resumed.metrics_csv)
    assert [r["step"] for r in rows_resumed] == [str(k) for k in range(1, whole.total_steps + 1)]
    assert [{k: v for k, v in r.items() if k not in timing} for r in rows_whole] == [
        {k: v for k, v in r.items() if k not in timing} for r in rows_resumed
    ]
    return rows_whole


def test_resume_reproduces_the_uninterrupted_run_exactly(tiny_models, tmp_path, monkeypatch):
    """The "paper" preset (its α anchors, β schedule and curriculum epoch are checkpointed state), DoRA with
    dropout (RNG state), 2 micro-batches per step, 2 epochs of 2 steps; the run is killed after the
    checkpoint of step 3, in the middle of epoch 1, and resumed. The final adapter equals the uninterrupted
    run's bit for bit, and so does every logged metric but the timings."""
    teacher, student = tiny_models("qwen2")
    data = _write_pairs(tmp_path / "pairs.jsonl", 6)
    options = dict(teacher=str(teacher), student=str(student), data=str(data), preset="paper", epochs=2,
                   batch_size=2, grad_accum=2, save_steps=1, lr=1e-3, progress=False)
    whole, resumed = _run_whole_and_interrupted(tmp_path, monkeypatch, options, kill_after_step=3)
    assert (whole.global_step, whole.total_steps, whole.epochs_completed) == (4, 4, 2)
    assert resumed.global_step == 4

    expected, actual = _saved_weights(tmp_path / "whole", True), _saved_weights(tmp_path / "resumed", True)
    assert expected.keys() == actual.keys() and expected
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    rows = _same_metrics(whole, resumed)
    assert rows[3]["epoch"] == "1" and float(rows[3]["beta"]) > 0.5  # the curriculum moved on

    # a resumed run must keep the settings that shape the data order or the math
    with pytest.raises(ValueError, match=r"settings changed \(batch_size: 2 -> 3"):
        train(TrainConfig(output=str(tmp_path / "resumed"), resume=True, **{**options, "batch_size": 3}))
    with pytest.raises(ValueError, match=r"settings changed \(epochs: 2 -> 3\)"):  # the schedule's length is fixed
        train(TrainConfig(output=str(tmp_path / "resumed"), resume=True, **{**options, "epochs": 3}))
    # a fresh start must not mix with an earlier run's checkpoints (a later --resume would pick those up)
    with pytest.raises(ValueError, match=r"holds checkpoints of an earlier run \(checkpoint-4\)"):
        train(TrainConfig(output=str(tmp_path / "whole"), **options))
    # another data file is accepted at an epoch boundary (the pipeline's fresh responses), but not another
    # number of pairs: the schedule was planned for 6 pairs (2 steps) per epoch
    fewer = _write_pairs(tmp_path / "fewer.jsonl", 4)
    with pytest.raises(ValueError, match=r"settings changed \(pairs in the data file: 6 -> 4\)"):
        train(TrainConfig(output=str(tmp_path / "resumed"), resume=True, **{**options, "data": str(fewer)}))


def test_full_fine_tuning_in_bf16_with_gradient_checkpointing_resumes_exactly(tiny_models, tmp_path, monkeypatch):
    """--no-lora --bf16 --gradient-checkpointing on the tied-embedding Qwen2 model: checkpoints hold every
    weight (the tied lm_head once), the run resumes bit for bit, and the final model is the trained one."""
    from transformers import AutoModelForCausalLM

    teacher, student = tiny_models("qwen2")
    data = _write_pairs(tmp_path / "pairs.jsonl", 4)
    options = dict(teacher=str(teacher), student=str(student), data=str(data), use_lora=False, bf16=True,
                   gradient_checkpointing=True, loss="skl", max_steps=3, batch_size=2, save_steps=1, lr=1e-3,
                   progress=False)
    whole, resumed = _run_whole_and_interrupted(tmp_path, monkeypatch, options, kill_after_step=1)
    expected, actual = _saved_weights(tmp_path / "whole", False), _saved_weights(tmp_path / "resumed", False)
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    rows = _same_metrics(whole, resumed)
    assert all(r["srkl"] == "" and float(r["skl"]) > 0 for r in rows)  # loss="skl": teacher responses only
    trained = AutoModelForCausalLM.from_pretrained(whole.final_dir)
    initial = AutoModelForCausalLM.from_pretrained(student)
    assert trained.model.embed_tokens.weight.dtype == torch.float32  # full fine-tuning keeps float32 weights
    assert not torch.equal(trained.model.embed_tokens.weight, initial.model.embed_tokens.weight)
    assert trained.lm_head.weight.data_ptr() == trained.model.embed_tokens.weight.data_ptr()  # still tied


# ---------------------------------------------------------------------------------------------------------
# DDP: 2 processes on gloo
# ---------------------------------------------------------------------------------------------------------

DRIVER = Path(__file__).resolve().parent / "multiprocess_driver.py"  # trains each run, saves rank<i>.pt


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _logged(rows: list[dict]) -> list[dict]:
    """The metrics of each step as numbers (the timings and empty columns left out)."""
    return [{k: float(v) for k, v in r.items() if v != "" and k not in ("tokens_per_s", "elapsed_s")} for r in rows]


@pytest.mark.slow
def test_two_gloo_processes_under_accelerate_launch_train_as_one_process_on_both_batches(tiny_models, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` with ACCELERATE_USE_CPU=true runs DDP on gloo, each
    process on 1 pair per step. Two runs: LoRA with the "paper" preset, and full fine-tuning of the untied
    Llama (whose lm_head gradient comes from the fused loss, outside the DDP-wrapped forward). The processes
    train on different pairs, so their parameters stay equal only if every gradient is all-reduced; the
    gradient norms, losses and token counts equal those of one process on both pairs, so the reduction is the
    mean of the single-process objective (for LoRA one process accumulating 2 micro-batches of 1 pair, which
    checks the gradient accumulation's scaling too; for full fine-tuning one batch of 2 pairs); and the adaptive α's anchors, fixed on the first
    batch, are the same on both processes (a checkpoint, written by the main process, holds one copy)."""
    teacher, student = tiny_models("llama")
    data = _write_pairs(tmp_path / "pairs.jsonl", 4)
    common = dict(teacher=str(teacher), student=str(student), data=str(data), warmup_ratio=0.0, lr=1e-2,
                  save_steps=None, progress=False)
    runs = {"lora": dict(common, preset="paper", lora_dropout=0.0, max_steps=2),
            "full": dict(common, use_lora=False, loss="skl", max_steps=1)}
    one_process = {"lora": dict(batch_size=1, grad_accum=2), "full": dict(batch_size=2)}
    launcher = Path(sys.executable).parent / "accelerate"
    command = [str(launcher), "launch"] if launcher.exists() else [sys.executable, "-m", "accelerate.commands.launch"]
    ddp = [dict(options, output=str(tmp_path / f"ddp-{name}"), batch_size=1) for name, options in runs.items()]
    command += ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--main_process_port", str(_free_port()), str(DRIVER),
                json.dumps(ddp)]
    repository = Path(__file__).resolve().parents[1]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(repository), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]

    initial = load_model(student, "student", torch.float32).state_dict()
    for name, options in runs.items():
        output = tmp_path / f"ddp-{name}"
        rank0, rank1 = torch.load(output / "rank0.pt"), torch.load(output / "rank1.pt")
        assert rank0["weights"].keys() == rank1["weights"].keys() == initial.keys()
        for key in rank0["weights"]:
            assert torch.equal(rank0["weights"][key], rank1["weights"][key]), (name, key)
        changed = [key for key in initial if not torch.equal(rank0["weights"][key], initial[key])]
        assert any("q_proj" in key for key in changed), name  # the attention weights moved
        if name == "full":
            assert "lm_head.weight" in changed

        single = train(TrainConfig(**options, output=str(tmp_path / f"single-{name}"), **one_process[name]))
        ddp_rows, single_rows = _logged(read_metrics(output / "metrics.csv")), _logged(read_metrics(single.metrics_csv))
        assert [r["step"] for r in ddp_rows] == [float(k) for k in range(1, options["max_steps"] + 1)]
        for ddp_row, single_row in zip(ddp_rows, single_rows, strict=True):
            assert ddp_row.keys() == single_row.keys() and ddp_row["grad_norm"] > 0
            for key in ddp_row:
                assert ddp_row[key] == pytest.approx(single_row[key], rel=1e-5), (name, key)
    lora0, lora1 = (torch.load(tmp_path / "ddp-lora" / f"rank{r}.pt")["anchors"] for r in (0, 1))
    assert lora0[0] is not None and lora0 == lora1


def test_resume_refuses_another_teacher_source_or_tail(tmp_path):
    """The teacher's source (model or cache) and the cached teacher's tail change the loss: a resumed run must
    keep them; a checkpoint written before they were recorded ran with the teacher model, renormalized."""
    from distillm2_kernels.trainer.checkpoint import RESUME_INVARIANTS, TrainerState

    def config(**changes):
        base = dict(teacher="T", student="S", data="pairs.jsonl", output=str(tmp_path))
        return TrainConfig(**{**base, **changes})

    run = config().run_invariants()
    assert {"teacher_source", "teacher_tail"} <= set(RESUME_INVARIANTS) and run["teacher_source"] == "model"
    state = TrainerState(total_steps=4, num_epochs=2, run=run)
    resume = dict(folder=tmp_path, world_size=1, data_file="pairs.jsonl", data_sha256="", num_examples=None)
    state.check_resumable(run=run, **resume)
    cached = config(teacher=None, teacher_cache=str(tmp_path / "cache"), teacher_tail="uniform").run_invariants()
    with pytest.raises(ValueError, match=r"teacher_source: 'model' -> 'cache', teacher_tail: 'renormalize' -> 'uniform'"):
        state.check_resumable(run=cached, **resume)
    older = TrainerState(total_steps=4, num_epochs=2, run={k: v for k, v in run.items() if not k.startswith("teacher_")})
    older.check_resumable(run=run, **resume)
    with pytest.raises(ValueError, match=r"teacher_source: 'model' -> 'cache'"):
        older.check_resumable(run=cached, **resume)
