"""Held-out evaluation: exact-match accuracy of greedy answers, and NLL of the reference answers.

- accuracy: the model answers every held-out prompt by greedy decoding (batched, left-padded, up to
  `max_new_tokens`, stopping at `<|eos|>`); an answer counts when it equals the reference exactly
  (`AdditionTask.is_correct`).
- NLL: teacher-forced on the reference conversation, the mean over all held-out answer tokens (the digits of
  the answer and the closing `<|eos|>`, i.e. the tokens a training label covers) of −log q(token), in nats.
  It is a token-weighted mean over the whole set, not a mean of per-example means.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from .conversations import collate_conversations, encode_conversations
from .task import AdditionTask, Example

__all__ = ["Evaluation", "greedy_answers", "answer_nll", "evaluate"]


@dataclass
class Evaluation:
    accuracy: float  # exact-match fraction on the held-out prompts
    nll: float  # nats per reference answer token
    num_examples: int


@torch.no_grad()
def greedy_answers(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 8,
    batch_size: int = 256,
) -> List[str]:
    """The greedy assistant turn for each user prompt (special tokens stripped)."""
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers: List[str] = []
    try:
        for begin in range(0, len(prompts), batch_size):
            texts = [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                )
                for p in prompts[begin : begin + batch_size]
            ]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            output = model.generate(
                **batch,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            answers += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return answers


@torch.no_grad()
def answer_nll(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], *, batch_size: int = 256
) -> float:
    """Mean −log q over the reference answer tokens (answer + `<|eos|>`) of `examples`, in nats per token."""
    model.eval()
    encoded = encode_conversations(tokenizer, examples, prompt_loss=False)
    total, count = 0.0, 0
    for begin in range(0, len(encoded), batch_size):
        batch = collate_conversations(encoded[begin : begin + batch_size], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
        ).item()
        count += int((labels != -100).sum())
    return total / max(count, 1)


def evaluate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: AdditionTask,
    examples: Sequence[Example],
    *,
    batch_size: int = 256,
) -> Evaluation:
    """Accuracy and NLL of `model` on `examples`."""
    prompts = [e.prompt for e in examples]
    max_new_tokens = max(len(e.answer) for e in examples) + 2  # room for one extra digit and the eos
    answers = greedy_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    correct = sum(task.is_correct(p, a) for p, a in zip(prompts, answers))
    return Evaluation(
        accuracy=correct / len(examples),
        nll=answer_nll(model, tokenizer, examples, batch_size=batch_size),
        num_examples=len(examples),
    )
