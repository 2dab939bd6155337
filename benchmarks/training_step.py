"""Suite `training_step`: one optimizer step of a small Llama-style causal LM distilled with the DistiLLM-2
objective, end to end.

Models: `transformers.LlamaForCausalLM` built from a config (random weights, seeded; untied lm_head) in the
case's dtype: the student with hidden size H, the teacher with H_t, both with `layers` layers, vocabulary V,
head dimension 64. Batch: B pairs, i.e. 2B rows of T random tokens (rows `[:B]` stand for the teacher's
responses, `[B:]` for the student's), the first quarter of each row a prompt (label −100). One step: the
teacher's forward under no_grad, the student's forward, the loss, backward, `AdamW.step()`, `zero_grad()`.

- `naive`, `naive_compiled`: the released trainer's way: `model(ids).logits` (`[2B, T, V]`) of both models,
  then the released loss (`implementations.naive_distillm2_loss`, float32) on the shifted logits; compiled =
  the loss function under `torch.compile` (the models run eagerly in every variant).
- `torch`, `cpu`, `triton`: no logits: `distillm2_kernels.hf.lm_head_inputs` gives both models' last hidden
  states and lm_head weights, and `DistiLLM2Loss("distillm2", backend=...).from_hidden(...)` computes the same
  objective through the fused-linear ops.

Reported: tokens per second = 2·B·T (all tokens of the step, prompt included) / median step time; memory as
in the other suites, the step's own increase over the resident models, optimizer state and batch (the warm-up
steps create the optimizer state first).
"""

from __future__ import annotations

from typing import Optional

import torch

from distillm2_kernels import DistiLLM2Loss
from distillm2_kernels.hf import lm_head_inputs

from . import implementations as impls
from .objective import not_comparable  # noqa: F401  (the same: Liger-Kernel has no objective to compare)

NAME = "training_step"
OPS = ("distillm2_step",)
MODES = ("step",)
IMPLS = ("naive", "naive_compiled", "torch", "cpu", "triton", "liger")
METRIC = "tokens/s"


def unavailable_reason() -> Optional[str]:
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        return "transformers is not installed (pip install transformers): the model is a transformers Llama"
    return None


def work(shape: dict, mode: str) -> dict:
    return {"tokens": 2 * shape["B"] * shape["T"]}


def build_model(vocab: int, hidden: int, layers: int, seq: int, dtype: torch.dtype, device: torch.device, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=(8 * hidden // 3 + 63) // 64 * 64,
        num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 1), num_key_value_heads=max(hidden // 64, 1),
        max_position_embeddings=seq, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


class Bench:
    def __init__(self, shape: dict, op: str, impl: str, device: torch.device):
        self.impl = impl
        dtype = getattr(torch, shape["dtype"])
        vocab, seq, pairs = shape["V"], shape["T"], shape["B"]
        self.student = build_model(vocab, shape["H"], shape["layers"], seq, dtype, device, seed=0)
        self.teacher = build_model(vocab, shape["H_teacher"], shape["layers"], seq, dtype, device, seed=1)
        self.teacher.requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=1e-5)
        gen = torch.Generator(device=device).manual_seed(0)
        self.ids = torch.randint(0, vocab, (2 * pairs, seq), generator=gen, device=device)
        labels = self.ids.clone()
        labels[:, : seq // 4] = -100
        self.labels = labels[:, 1:]  # position k's logits predict token k + 1
        self.pairs = pairs
        if impl in ("naive", "naive_compiled"):
            loss = impls.naive_distillm2_loss
            self.naive_loss = impls.compiled(loss) if impl == "naive_compiled" else loss
        elif impl in impls.LIBRARY:
            self.objective = DistiLLM2Loss("distillm2", backend=impl)
        else:
            raise ValueError(f"{NAME}: no implementation {impl!r}")
        parameters = list(self.student.parameters()) + list(self.teacher.parameters())
        self.input_bytes = sum(p.nbytes for p in parameters) + self.ids.nbytes

    def output_bytes(self, mode: str) -> int:
        return 0  # the step updates the parameters in place

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def loss(self) -> torch.Tensor:
        if self.impl in ("naive", "naive_compiled"):
            with torch.no_grad():
                teacher_logits = self.teacher(input_ids=self.ids, use_cache=False).logits[:, :-1]
            student_logits = self.student(input_ids=self.ids, use_cache=False).logits[:, :-1]
            return self.naive_loss(student_logits, teacher_logits, self.labels)
        with torch.no_grad():
            teacher = lm_head_inputs(self.teacher, self.ids)
        student = lm_head_inputs(self.student, self.ids)
        h_s, h_t, labels, b = student.hidden_states[:, :-1], teacher.hidden_states[:, :-1], self.labels, self.pairs
        loss, _metrics = self.objective.from_hidden(
            h_s[:b], h_t[:b], labels[:b], h_s[b:], h_t[b:], labels[b:],
            student_weight=student.weight, teacher_weight=teacher.weight,
            student_bias=student.bias, teacher_bias=teacher.bias,
        )
        return loss

    def run(self, mode: str):
        def step():
            loss = self.loss()
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            return loss.detach()
        return step

    def check(self) -> Optional[str]:
        return None
