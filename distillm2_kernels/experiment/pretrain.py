"""Supervised training from scratch: next-token cross-entropy on chat-formatted prompt + answer.

Each example is rendered with the tokenizer's chat template (`<|user|>aabcc<|assistant|>acabc<|eos|>`), the
whole conversation is the model's input, and the loss covers the assistant turn and its `<|eos|>`
(`prompt_loss=False`, the default, as in supervised fine-tuning) or every token (`prompt_loss=True`: plain
language modelling). The default was measured on the experiment's earlier task, multi-digit addition: at
1000 steps of 64 examples a 4 × 128 teacher reached 83 % held-out accuracy with the answer-only loss and
1.8 % with the prompt in the loss — random prompt characters are noise that dominates the loss and its
gradient. (Not re-measured on the arrangement task.)
AdamW, linear warm-up then cosine decay to 10 % of the peak rate, gradient clipping at 1, batches drawn by
a seeded shuffle of the examples (a new shuffle each pass).

`run.py` sets the budgets: the teacher for a step count well past its quality threshold, the smaller student
for one near its plateau; `callback` lets it measure the validation quality along the way.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .conversations import collate_conversations, encode_conversations
from .task import Example

__all__ = ["PretrainResult", "pretrain"]


@dataclass
class PretrainResult:
    losses: List[float]  # training loss per optimizer step
    seconds: float


def pretrain(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    warmup_ratio: float = 0.05,
    weight_decay: float = 0.01,
    prompt_loss: bool = False,
    seed: int = 0,
    progress: bool = True,
    description: str = "pretrain",
    callback: Optional[Callable[[int, torch.nn.Module], None]] = None,
) -> PretrainResult:
    """Train `model` in place for `steps` optimizer steps; returns the per-step losses and the time.
    `callback(step, model)`, when given, runs after every optimizer step (1-based `step`)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    start = time.perf_counter()
    data = encode_conversations(tokenizer, examples, prompt_loss=prompt_loss)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)
    warmup = max(1, int(warmup_ratio * steps))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_ = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    order: List[int] = []
    losses: List[float] = []
    bar = tqdm(range(steps), desc=description, disable=not progress, leave=False, mininterval=0.5)
    for _ in bar:
        if len(order) < batch_size:
            shuffled = list(range(len(data)))
            rng.shuffle(shuffled)
            order += shuffled
        batch = collate_conversations([data[i] for i in order[:batch_size]], tokenizer.pad_token_id)
        del order[:batch_size]
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if callback is not None:
            callback(len(losses), model)
            model.train()
        if len(losses) % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / 20:.3f}")
    bar.close()
    model.eval()
    return PretrainResult(losses=losses, seconds=time.perf_counter() - start)
