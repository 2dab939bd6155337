"""The examples as chat conversations for a causal LM: token ids with their labels, and padded batches.

The training (`pretrain`) and the held-out NLL (`evaluate`) read the same encoding: the chat template's
prompt, then the assistant's answer and `<|eos|>`; the labels are −100 on the prompt unless `prompt_loss`.
"""

from __future__ import annotations

from typing import List, Sequence

from transformers import PreTrainedTokenizerBase

from ..trainer.data import pad_rows
from .task import Example

__all__ = ["encode_conversations", "collate_conversations"]


def encode_conversations(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], *, prompt_loss: bool = False
) -> List[tuple]:
    """(input_ids, labels) per example; labels are -100 on the prompt when `prompt_loss` is False."""
    encoded = []
    for example in examples:
        user = [{"role": "user", "content": example.prompt}]
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            user + [{"role": "assistant", "content": example.answer}], tokenize=False
        )
        assert full.startswith(prompt), "the chat template's prompt must prefix the conversation"
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        labels = list(ids) if prompt_loss else [-100] * len(prompt_ids) + ids[len(prompt_ids):]
        encoded.append((ids, labels))
    return encoded


def collate_conversations(batch: Sequence[tuple], pad_id: int) -> dict:
    """Right-padded tensors of (input_ids, labels) rows, as the trainer pads them."""
    input_ids, attention_mask, labels = pad_rows(batch, pad_id)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
