"""`hf.lm_head_inputs` + the fused-linear loss equal running the model to logits + `fused_skl`.

Tiny Llama- and Gemma-2-style models (Gemma-2: final logit soft-capping and tied embeddings) are built from
configs, saved with `save_pretrained` into a temporary folder and loaded back with
`AutoModelForCausalLM.from_pretrained` (no hub access), plain and wrapped by a peft LoRA adapter. Teacher
and student have different hidden sizes. The tolerance rule of test_fused_linear applies: errors against a
float64 run of the unfused path, no larger than the float32 unfused path's plus the stated allowance.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import distillm2_kernels as dk  # noqa: E402
from distillm2_kernels.hf import lm_head_inputs, lm_head_of  # noqa: E402

VOCAB = 128
ALLOWANCE_ULPS = 8  # float32 ulps of the largest |value| (loss) or |gradient entry| of the parameter


def _config(family: str, hidden: int):
    common = dict(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=2 * hidden)
    if family == "llama":
        return transformers.LlamaConfig(**common)
    return transformers.Gemma2Config(**common, head_dim=hidden // 4, final_logit_softcapping=5.0,
                                     attn_logit_softcapping=50.0, query_pre_attn_scalar=hidden // 4)


@pytest.fixture(scope="module", params=["llama", "gemma2"])
def saved_models(request, tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(request.param)
    for role, hidden in (("student", 32), ("teacher", 48)):
        model = transformers.AutoModelForCausalLM.from_config(_config(request.param, hidden))
        with torch.no_grad():  # a visible soft-cap and peaked distributions: scale the output layer up
            model.get_output_embeddings().weight.mul_(40.0)
        model.save_pretrained(folder / role)
    return request.param, folder


def _load(folder, role, dtype, lora: bool):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder / role, dtype=dtype, attn_implementation="eager")
    if lora:
        config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                 init_lora_weights=False)
        model = peft.get_peft_model(model, config)
    return model


def _batch():
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (2, 7), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 5:] = 0
    labels = torch.randint(0, VOCAB, (2, 7), generator=g)
    labels[:, :2] = -100
    labels[1, 5:] = -100
    return input_ids, attention_mask, labels


def _trainable(model):
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _unfused(folder, dtype, lora, batch):
    """Model to logits, then fused_skl: the loss and the student's trainable-parameter gradients."""
    torch.manual_seed(2)  # the same LoRA initialisation in every load
    student, teacher = _load(folder, "student", dtype, lora), _load(folder, "teacher", dtype, False)
    input_ids, attention_mask, labels = batch
    with torch.no_grad():
        teacher_logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits
    student_logits = student(input_ids=input_ids, attention_mask=attention_mask).logits
    loss = dk.fused_skl(student_logits, teacher_logits, 0.1, labels=labels, reduction="seqmean", backend="torch")
    loss.backward()
    return loss.detach(), {k: p.grad for k, p in _trainable(student).items()}


def _fused_linear(folder, lora, batch):
    torch.manual_seed(2)
    student, teacher = _load(folder, "student", torch.float32, lora), _load(folder, "teacher", torch.float32, False)
    input_ids, attention_mask, labels = batch
    s = lm_head_inputs(student, input_ids, attention_mask=attention_mask)
    with torch.no_grad():
        t = lm_head_inputs(teacher, input_ids, attention_mask=attention_mask)
    loss = dk.fused_linear_skl(
        s.hidden_states, s.weight, t.hidden_states, t.weight.detach(), 0.1,
        student_bias=s.bias, teacher_bias=None if t.bias is None else t.bias.detach(),
        labels=labels, softcap=(s.softcap, t.softcap), reduction="seqmean", backend="torch",
    )
    loss.backward()
    return loss.detach(), {k: p.grad for k, p in _trainable(student).items()}, s, student


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
def test_helper_and_fused_linear_match_model_logits(saved_models, lora):
    family, folder = saved_models
    batch = _batch()
    oracle_loss, oracle_grads = _unfused(folder, torch.float64, lora, batch)
    unfused_loss, unfused_grads = _unfused(folder, torch.float32, lora, batch)
    loss, grads, student_inputs, student = _fused_linear(folder, lora, batch)

    assert student_inputs.softcap == (5.0 if family == "gemma2" else None)
    assert student_inputs.hidden_states.shape == (2, 7, 32)
    if lora:
        assert not student_inputs.weight.requires_grad  # frozen lm_head: no weight gradient computed
        assert all("lora_" in name for name in grads)
    if family == "gemma2":  # tied embeddings: the lm_head weight is the input embedding matrix
        assert student_inputs.weight is dk.hf.unwrap_peft(student).get_input_embeddings().weight

    eps = torch.finfo(torch.float32).eps
    assert oracle_loss > 0.1
    error = abs(loss.double() - oracle_loss).item()
    base = abs(unfused_loss.double() - oracle_loss).item()
    assert error <= base + ALLOWANCE_ULPS * eps * oracle_loss.abs().item(), (error, base)
    assert grads.keys() == oracle_grads.keys() and grads
    for name, grad in grads.items():
        oracle = oracle_grads[name]
        error = (grad.double() - oracle).abs().max().item()
        base = (unfused_grads[name].double() - oracle).abs().max().item()
        assert error <= base + ALLOWANCE_ULPS * eps * oracle.abs().max().item(), (name, error, base)


def test_lora_on_lm_head_is_refused(saved_models):
    _, folder = saved_models
    model = transformers.AutoModelForCausalLM.from_pretrained(folder / "student")
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    with pytest.raises(NotImplementedError, match="not a plain nn.Linear"):
        lm_head_of(model)
