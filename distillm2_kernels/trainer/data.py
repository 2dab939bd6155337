"""Training pairs: reading, tokenising with the chat template, and collating into padded batches.

A pairs file is JSON Lines; each row holds (see `pairing`)::

    {"prompt": str, "chosen": <teacher response>, "rejected": <student response>}

where a response is either a list of messages `{"role": ..., "content": ...}` whose last message is the
assistant's response (the messages before it are the prompt: a system message or earlier turns are kept),
or a plain string (then the prompt is the single user message `prompt`). `rejected` may be absent when the
loss uses the teacher's responses only (`loss="skl"` or `"kd"`).

Tokenisation (as the released DistiLLM-2 code, after TRL's DPO trainer): the prompt messages rendered by the
chat template with the generation prompt, then the response's tokens, then EOS::

    input_ids = template(prompt messages, add_generation_prompt=True) + tokens(response) + [eos]
    labels    = [-100] * len(prompt part)                           + tokens(response) + [eos]

Sequences longer than `max_length` are cut: the prompt keeps its last tokens (at least half of
`max_length`, or all of it when the response leaves room), the response keeps its first tokens (a cut
response loses its EOS).

A batch of B pairs is one `[R, T]` tensor of rows (R = 2B: the B teacher responses, then the B student
responses in the same order; R = B without the student responses), right-padded with the pad token (labels
-100, attention mask 0), so that the student and the teacher each run one forward per batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from .jsonl import DataError, read_jsonl

__all__ = ["PairExample", "TokenizedPair", "PairBatch", "read_pairs", "tokenize_pairs", "collate_pairs", "pad_rows", "IGNORE_INDEX"]

IGNORE_INDEX = -100


@dataclass
class PairExample:
    """One pair as conversations: the prompt messages and the two responses."""

    prompt_messages_chosen: list[dict]
    chosen: str
    prompt_messages_rejected: Optional[list[dict]]
    rejected: Optional[str]


@dataclass
class TokenizedPair:
    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: Optional[list[int]]
    rejected_labels: Optional[list[int]]


@dataclass
class PairBatch:
    """`[R, T]` rows: the B teacher-response rows, then (when present) the B student-response rows."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor  # unshifted: labels[r, k] is the token at position k, or -100
    num_pairs: int

    @property
    def has_student_responses(self) -> bool:
        return self.input_ids.shape[0] == 2 * self.num_pairs

    def to(self, device) -> "PairBatch":
        return PairBatch(
            self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device), self.num_pairs
        )


def _is_message(value) -> bool:
    return isinstance(value, dict) and isinstance(value.get("role"), str) and isinstance(value.get("content"), str)


def _conversation(path: Path, number: int, row: dict, key: str) -> tuple[list[dict], str]:
    """(prompt messages, response) of row[key]: a message list ending with the assistant, or a string."""
    value = row[key]
    if isinstance(value, str):
        prompt = row.get("prompt")
        if not isinstance(prompt, str):
            raise DataError(f"{path}:{number}: '{key}' is a string, so the row needs a string 'prompt'")
        return [{"role": "user", "content": prompt}], value
    if (
        isinstance(value, list) and len(value) >= 2 and all(_is_message(m) for m in value)
        and value[-1]["role"] == "assistant"
    ):
        return [{"role": m["role"], "content": m["content"]} for m in value[:-1]], value[-1]["content"]
    raise DataError(
        f"{path}:{number}: '{key}' must be a list of messages {{'role', 'content'}} ending with the assistant's "
        "response, or the response as a string"
    )


def read_pairs(path: Union[str, os.PathLike], *, need_rejected: bool = True) -> list[PairExample]:
    """The pairs of a JSON Lines file (format in the module docstring); errors name the file and the line."""
    path = Path(path)
    examples = []
    for number, row in read_jsonl(path):
        if "chosen" not in row:
            raise DataError(f"{path}:{number}: missing field 'chosen' (the teacher's response)")
        if need_rejected and "rejected" not in row:
            raise DataError(f"{path}:{number}: missing field 'rejected' (the student's response)")
        prompt_chosen, chosen = _conversation(path, number, row, "chosen")
        prompt_rejected, rejected = (
            _conversation(path, number, row, "rejected") if need_rejected else (None, None)
        )
        examples.append(PairExample(prompt_chosen, chosen, prompt_rejected, rejected))
    if not examples:
        raise DataError(f"{path}: no training pairs")
    return examples


def _sequence(prompt_ids: list[int], response_ids: list[int], max_length: int) -> tuple[list[int], list[int]]:
    response_ids = list(response_ids)
    if len(prompt_ids) + len(response_ids) > max_length:
        kept_prompt = min(len(prompt_ids), max(max_length - len(response_ids), max_length // 2))
        prompt_ids = prompt_ids[len(prompt_ids) - kept_prompt:]
        response_ids = response_ids[: max_length - kept_prompt]
    return prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids


def tokenize_pairs(
    examples: Sequence[PairExample], tokenizer, *, max_length: int = 1024, progress: bool = False
) -> list[TokenizedPair]:
    """Token ids and labels of every pair (rule in the module docstring)."""
    from tqdm.auto import tqdm

    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token: responses need one appended")
    prompt_cache: dict[str, list[int]] = {}

    def encode(messages: list[dict], response: str) -> tuple[list[int], list[int]]:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if text not in prompt_cache:
            prompt_cache[text] = tokenizer(text, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [eos]
        return _sequence(prompt_cache[text], response_ids, max_length)

    pairs = []
    for example in tqdm(examples, desc="tokenize", unit="pair", disable=not progress):
        chosen_ids, chosen_labels = encode(example.prompt_messages_chosen, example.chosen)
        rejected_ids = rejected_labels = None
        if example.rejected is not None:
            rejected_ids, rejected_labels = encode(example.prompt_messages_rejected, example.rejected)
        pairs.append(TokenizedPair(chosen_ids, chosen_labels, rejected_ids, rejected_labels))
    return pairs


def collate_pairs(pairs: Sequence[TokenizedPair], pad_token_id: int, *, with_rejected: bool) -> PairBatch:
    """Right-padded `[R, T]` rows of a batch (layout in the module docstring)."""
    rows = [(p.chosen_ids, p.chosen_labels) for p in pairs]
    if with_rejected:
        if any(p.rejected_ids is None for p in pairs):
            raise ValueError("with_rejected=True but a pair has no student response")
        rows += [(p.rejected_ids, p.rejected_labels) for p in pairs]
    input_ids, attention_mask, labels = pad_rows(rows, pad_token_id)
    return PairBatch(input_ids, attention_mask, labels, len(pairs))


def pad_rows(
    rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(input_ids, attention_mask, labels)` `[R, T]` of (ids, labels) rows, right-padded to the longest with
    `pad_token_id`, mask 0 and label `IGNORE_INDEX` (training needs no left padding: positions start at 0)."""
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for r, (ids, row_labels) in enumerate(rows):
        if len(row_labels) != len(ids):
            raise ValueError(f"row {r}: {len(ids)} token ids but {len(row_labels)} labels")
        input_ids[r, : len(ids)] = torch.tensor(ids)
        labels[r, : len(ids)] = torch.tensor(row_labels)
        attention_mask[r, : len(ids)] = 1
    return input_ids, attention_mask, labels
