"""Held-out evaluation of a model on the arrangement task, with the teacher as judge.

On the held-out prompts (never trained on), each model is loaded back from its folder and measured by:

- `valid_0.8`: the fraction of valid answers among `samples` answers per prompt sampled at the paper's
  settings (temperature 0.8, top-p 0.95);
- `valid_1.0`: the same at temperature 1 (no top-p): the model's own distribution;
- `greedy`: the fraction of prompts whose greedy answer is valid;
- `teacher_logp`: the teacher's mean log-probability of the model's temperature-0.8 samples, in nats per
  answer (the sum over the answer's letters and `<|eos|>`), a teacher-as-judge analogue of the paper's
  win rate (higher is better; the teacher's own samples set the ceiling);
- `coverage`: the distinct valid answers among the model's temperature-1 samples, summed over prompts, as a
  fraction of the same count for the teacher's temperature-1 samples on the same prompts — below 1 when the
  model has collapsed onto fewer answers than the teacher (or makes more invalid ones), about 1 when it
  covers as many;
- `letters_error`, `adjacent_error`: the kinds of invalid temperature-0.8 samples (`ArrangeTask.error_kind`).

Sampling is seeded (`seed`), batched and left-padded; an answer ends at `<|eos|>` or after
`max_new_tokens`. The teacher scores an answer as the rendered conversation `<|user|>prompt<|assistant|>
answer<|eos|>`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from .conversations import collate_conversations, encode_conversations
from .task import ArrangeTask, Example

__all__ = ["Evaluation", "METRICS", "generate_answers", "answer_log_probs", "coverage", "evaluate"]

# metric -> (label, higher is better)
METRICS: Dict[str, tuple] = {
    "valid_0.8": ("valid samples, T=0.8 top-p 0.95 (%)", True),
    "valid_1.0": ("valid samples, T=1 (%)", True),
    "greedy": ("valid greedy answers (%)", True),
    "teacher_logp": ("teacher log-prob of samples (nats/answer)", True),
    "coverage": ("coverage of valid answers vs teacher (%)", True),
}


@dataclass
class Evaluation:
    valid_08: float
    valid_10: float
    greedy: float
    teacher_logp: float
    coverage: float
    letters_error: float
    adjacent_error: float
    num_prompts: int
    samples_per_prompt: int

    def metrics(self) -> Dict[str, float]:
        return {"valid_0.8": self.valid_08, "valid_1.0": self.valid_10, "greedy": self.greedy,
                "teacher_logp": self.teacher_logp, "coverage": self.coverage}

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)


def _prompt_texts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> List[str]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts]


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    samples: int = 1,
    temperature: Optional[float] = None,
    top_p: float = 1.0,
    seed: int = 0,
    max_new_tokens: int = 12,
    batch_size: int = 512,
) -> List[List[str]]:
    """`samples` assistant turns per prompt (special tokens stripped): greedy when `temperature` is None,
    else sampled at `temperature` / `top_p` with the random stream seeded by `seed`."""
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    flat: List[str] = []
    per_batch = max(1, batch_size // samples)
    sampling = dict(do_sample=False) if temperature is None else dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for begin in range(0, len(prompts), per_batch):
                batch = tokenizer(_prompt_texts(tokenizer, prompts[begin : begin + per_batch]), return_tensors="pt",
                                  padding=True, add_special_tokens=False)
                output = model.generate(
                    **batch, num_return_sequences=samples,
                    max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id, **sampling,
                )
                flat += tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [flat[i * samples : (i + 1) * samples] for i in range(len(prompts))]


@torch.no_grad()
def answer_log_probs(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    batch_size: int = 512,
) -> List[float]:
    """log q(answer + `<|eos|>` | prompt) per example, in nats (teacher-forced on the chat conversation)."""
    model.eval()
    encoded = encode_conversations(tokenizer, examples, prompt_loss=False)
    scores: List[float] = []
    for begin in range(0, len(encoded), batch_size):
        batch = collate_conversations(encoded[begin : begin + batch_size], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        mask = labels != -100
        log_probs = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        scores += (log_probs * mask).sum(-1).tolist()
    return scores


def coverage(task: ArrangeTask, prompts: Sequence[str], answers: Sequence[Sequence[str]],
             reference: Sequence[Sequence[str]]) -> float:
    """Distinct valid `answers`, summed over prompts, over the same count for `reference` (e.g. the teacher's)."""
    def distinct_valid(rows):
        return sum(len({a.strip() for a in row if task.is_valid(p, a)}) for p, row in zip(prompts, rows))

    return distinct_valid(answers) / max(distinct_valid(reference), 1)


def evaluate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: ArrangeTask,
    prompts: Sequence[str],
    *,
    teacher: torch.nn.Module,
    teacher_samples_t1: Sequence[Sequence[str]],
    samples: int = 4,
    seed: int = 0,
    batch_size: int = 512,
) -> Evaluation:
    """The metrics of the module docstring for `model` on `prompts`; `teacher_samples_t1` are the teacher's
    temperature-1 answers to the same prompts (`samples` each), the reference of `coverage`."""
    max_new_tokens = task.max_length + 2  # room for one extra letter and the eos
    options = dict(samples=samples, seed=seed, max_new_tokens=max_new_tokens, batch_size=batch_size)
    at_08 = generate_answers(model, tokenizer, prompts, temperature=0.8, top_p=0.95, **options)
    at_10 = generate_answers(model, tokenizer, prompts, temperature=1.0, **options)
    greedy = generate_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    flat_08 = [(p, a) for p, row in zip(prompts, at_08) for a in row]
    kinds = [task.error_kind(p, a) for p, a in flat_08]
    judged = answer_log_probs(teacher, tokenizer, [Example(p, a.strip()) for p, a in flat_08], batch_size=batch_size)
    total = len(flat_08)
    return Evaluation(
        valid_08=kinds.count("valid") / total,
        valid_10=sum(task.is_valid(p, a) for p, row in zip(prompts, at_10) for a in row) / total,
        greedy=sum(task.is_valid(p, row[0]) for p, row in zip(prompts, greedy)) / len(prompts),
        teacher_logp=sum(judged) / total,
        coverage=coverage(task, prompts, at_10, teacher_samples_t1),
        letters_error=kinds.count("letters") / total,
        adjacent_error=kinds.count("adjacent") / total,
        num_prompts=len(prompts),
        samples_per_prompt=samples,
    )
