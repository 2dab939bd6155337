"""`distillm2 score`: the teacher's top-K distributions over every response token of a pairs file, stored once.

    score("teacher/", "pairs.jsonl", "cache/", top_k=32)      # -> ScoreResult; then train(teacher_cache="cache/")

The pairs are tokenized exactly as `train` tokenizes them (`data.tokenize_pairs` with the teacher's tokenizer,
whose fingerprint the student's must match at training time, and the same `max_length`). For every response
token y at position p of a row, the teacher's distribution at position p − 1 (the one that predicts y) is
stored as K + 1 entries (`teacher_cache`): the top-K token ids and their log-probabilities, plus y when it is
not among them (else the (K+1)-th best), so the label's exact log-probability is always stored; and the
log of the mass of the other tokens, `tail_logprob`.

Temperature: the stored log-probabilities are the teacher's at temperature 1, over the tokenizer's
vocabulary (lm_head rows a checkpoint pads beyond the tokenizer are not tokens). A training temperature
T ≠ 1 tempers this sparse distribution: the loss uses `log_softmax(densified / T)` of the densified T = 1
teacher (docs/design.md §8), which equals the tempered dense teacher on the stored tokens only
when the tail is negligible; the cache does not depend on T.

Engines (`--engine`, as `generate`):
- "hf" (transformers): one teacher forward per batch up to the last hidden states (`hf.lm_head_inputs`),
  then, over chunks of the response positions sized by `memory_budget` bytes (never a `[T, V]` softmax of a
  whole row), the chunk's logits `[rows, V]` in float32, their log-sum-exp, the top-(K+1), the label's
  log-probability, and the tail exactly: the log-sum-exp of the logits with the stored entries masked to −inf,
  minus the log-sum-exp (no `log(1 − Σ p)` cancellation).
- "vllm": vLLM's prompt log-probabilities (`SamplingParams(prompt_logprobs=K+1, max_tokens=1)`), which give
  per prompt token the top-(K+1) and the prompt token itself (vLLM's log-probabilities are those of the raw
  logits, temperature 1); mapped to the same K + 1 entries. vLLM returns no log-sum-exp, so there the tail is
  `log(1 − Σ exp(logprobs))` (clamped: −inf when the stored mass rounds to ≥ 1), accurate to about float32
  rounding of the stored mass — not the exact tail of the transformers path. vLLM normalises over the model's
  whole lm_head: entries of padded rows (ids beyond the tokenizer) are dropped, their mass stays in the tail,
  and a freed slot holds an unused id with log-probability −inf. Needs `max_logprobs ≥ K + 1`, which is
  passed to `vllm.LLM` unless `engine_args` sets it.

Resumable (`teacher_cache.CacheWriter`): the pairs are scored in fixed shards of `pairs_per_shard` pairs, each
in fixed batches of `batch_size` pairs, so a resumed run writes the shards the uninterrupted one would have.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from ..sparse_teacher import log_remaining_mass
from .data import read_pairs, tokenize_pairs
from .jsonl import file_sha256
from .teacher_cache import (
    CacheWriter,
    SideScores,
    chat_template_sha256,
    label_positions,
    tokenizer_fingerprint,
)

__all__ = ["score", "ScoreResult", "sparse_rows", "DEFAULT_TOP_K", "DEFAULT_MEMORY_BUDGET"]

DEFAULT_TOP_K = 32
DEFAULT_MEMORY_BUDGET = 256 << 20  # bytes of float32 logits chunks (about three [rows, V] buffers)
DEFAULT_PAIRS_PER_SHARD = 256


@dataclass
class ScoreResult:
    output_dir: Path
    num_pairs: int
    num_scored: int  # pairs scored by this call
    num_reused: int  # pairs found scored by an earlier (interrupted) run
    tokens: int  # response tokens scored by this call
    seconds: float
    engine: Optional[str]  # None when nothing was left to score

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def sparse_rows(logits: torch.Tensor, labels: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(ids [n, K+1] int64, logprobs [n, K+1] float32, tail_logprob [n] float32)` of float32 logits `[n, V]`:
    the top-K and the label (the top-(K+1) when the label is among the top K), their log-probabilities, and
    the log-mass of the other tokens, `logsumexp(logits off the entries) − logsumexp(logits)`."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    best = logits.topk(top_k + 1, dim=-1).indices
    label_in_top = (best[:, :top_k] == labels[:, None]).any(dim=-1, keepdim=True)
    ids = torch.where(label_in_top, best, torch.cat([best[:, :top_k], labels[:, None]], dim=-1))
    logprobs = logits.gather(1, ids) - lse
    tail = torch.logsumexp(logits.scatter(1, ids, float("-inf")), dim=-1) - lse[:, 0]
    return ids, logprobs, tail


def _chunked_sparse_rows(hidden, weight, bias, softcap, labels, top_k, memory_budget):
    """`sparse_rows` of `softcap(hidden @ weight.T + bias)` over chunks of rows of about `memory_budget` bytes."""
    vocab = weight.shape[0]
    step = max(1, memory_budget // (3 * 4 * vocab))
    outputs = []
    for start in range(0, hidden.shape[0], step):
        logits = hidden[start:start + step].float() @ weight.float().T
        if bias is not None:
            logits += bias.float()
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        outputs.append(sparse_rows(logits, labels[start:start + step], top_k))
    return [torch.cat(parts) for parts in zip(*outputs)]


class _HFScorer:
    name = "hf"

    def __init__(self, model_path: Path, dtype: Optional[str], vocab_size: int, top_k: int, memory_budget: int):
        from .generation import check_dtype, default_dtype
        from .models import load_model

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or default_dtype("hf")
        check_dtype(dtype, "hf")
        self.model = load_model(model_path, "teacher", getattr(torch, dtype)).to(self.device).eval()
        self.vocab_size, self.top_k, self.memory_budget = vocab_size, top_k, memory_budget

    def close(self) -> None:
        from .generation import free_memory

        self.model = None
        free_memory()

    def score_rows(self, rows: list[tuple[list[int], list[int]]], pad_token_id: int) -> list:
        from ..hf import lm_head_inputs
        from .data import pad_rows

        input_ids, attention_mask, labels = pad_rows(rows, pad_token_id)
        with torch.no_grad():
            head = lm_head_inputs(self.model, input_ids.to(self.device), attention_mask=attention_mask.to(self.device))
            if head.weight.shape[0] < self.vocab_size:
                raise ValueError(f"the teacher's lm_head has {head.weight.shape[0]} rows, fewer than the "
                                 f"tokenizer's {self.vocab_size} tokens")
            spans = [label_positions(row_labels) for _, row_labels in rows]
            select = [(r, p - 1) for r, (first, tokens) in enumerate(spans) for p in range(first, first + len(tokens))]
            index_r = torch.tensor([r for r, _ in select], dtype=torch.long, device=self.device)
            index_p = torch.tensor([p for _, p in select], dtype=torch.long, device=self.device)
            hidden = head.hidden_states[index_r, index_p]
            targets = torch.tensor([t for _, tokens in spans for t in tokens], dtype=torch.long, device=self.device)
            bias = None if head.bias is None else head.bias[: self.vocab_size]
            ids, logprobs, tail = _chunked_sparse_rows(hidden, head.weight[: self.vocab_size], bias, head.softcap,
                                                       targets, self.top_k, self.memory_budget)
        return _split(spans, ids.cpu(), logprobs.cpu(), tail.cpu())


class _VLLMScorer:
    name = "vllm"

    def __init__(self, model_path: Path, dtype: Optional[str], seed: int, engine_args: dict, vocab_size: int,
                 top_k: int):
        from vllm import LLM

        arguments = {"max_logprobs": top_k + 1, **engine_args}
        self.llm = LLM(model=str(model_path), dtype=dtype or "auto", seed=seed, **arguments)
        self.vocab_size, self.top_k = vocab_size, top_k

    def close(self) -> None:
        from .generation import free_memory

        llm, self.llm = self.llm, None
        engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        del llm, engine_core
        free_memory()

    def score_rows(self, rows: list[tuple[list[int], list[int]]], pad_token_id: int) -> list:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=self.top_k + 1, detokenize=False)
        try:
            outputs = self.llm.generate([{"prompt_token_ids": list(ids)} for ids, _ in rows], sampling_params=params,
                                        use_tqdm=False)
        except Exception as error:
            if type(error).__name__ != "VLLMValidationError":
                raise
            raise ValueError(f"vLLM refused a batch of the pairs: {error}") from error
        spans = [label_positions(row_labels) for _, row_labels in rows]
        ids, logprobs, tails = [], [], []
        for (first, tokens), output in zip(spans, outputs):
            for p, label in zip(range(first, first + len(tokens)), tokens):
                entry_ids, entry_logprobs = _from_prompt_logprobs(output.prompt_logprobs[p], label, self.top_k,
                                                                  self.vocab_size)
                ids.append(entry_ids)
                logprobs.append(entry_logprobs)
        width = self.top_k + 1
        ids = torch.tensor(ids, dtype=torch.long).reshape(-1, width)
        logprobs = torch.tensor(logprobs, dtype=torch.float32).reshape(-1, width)
        tails = log_remaining_mass(logprobs.double())  # vLLM gives no log-sum-exp: the tail is 1 − Σ p
        return _split(spans, ids, logprobs, tails.float())


def _from_prompt_logprobs(entries: dict, label: int, top_k: int, vocab_size: int) -> tuple[list[int], list[float]]:
    """K + 1 (id, logprob) of one vLLM prompt position (`{token id: Logprob(logprob, rank, ...)}`: the
    top-(K+1) and the prompt token): the K+1 best tokens of the vocabulary when the label is among the K best,
    else the K best and the label; slots of dropped padded-row entries hold unused ids with −inf."""
    if label not in entries:
        raise ValueError(f"vLLM's prompt log-probabilities lack the prompt token {label}")
    ranked = [(token, value.logprob) for token, value in sorted(entries.items(), key=lambda item: item[1].rank)
              if token < vocab_size]
    if [token for token, _ in ranked].index(label) < top_k:
        chosen = ranked[: top_k + 1]
    else:
        chosen = [entry for entry in ranked if entry[0] != label][:top_k] + [(label, entries[label].logprob)]
    used = {token for token, _ in chosen}
    spare = (token for token in range(vocab_size) if token not in used)
    while len(chosen) < top_k + 1:
        chosen.append((next(spare), float("-inf")))
    return [token for token, _ in chosen], [logprob for _, logprob in chosen]


def _split(spans, ids, logprobs, tails) -> list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per row: (position, labels, ids, logprobs, tail) of the flat scored positions."""
    results, offset = [], 0
    for first, tokens in spans:
        rows = slice(offset, offset + len(tokens))
        results.append((first, torch.tensor(tokens, dtype=torch.long), ids[rows], logprobs[rows], tails[rows]))
        offset += len(tokens)
    return results


def score(
    teacher: Union[str, os.PathLike],
    data: Union[str, os.PathLike],
    output: Union[str, os.PathLike],
    *,
    top_k: int = DEFAULT_TOP_K,
    batch_size: int = 8,
    max_length: int = 1024,
    with_rejected: bool = True,
    engine: str = "auto",
    dtype: Optional[str] = None,
    pairs_per_shard: int = DEFAULT_PAIRS_PER_SHARD,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    seed: int = 0,
    engine_args: Optional[dict] = None,
    progress: bool = True,
    stop_after_shards: Optional[int] = None,
) -> ScoreResult:
    """Score the pairs file `data` with the teacher in the local folder `teacher` into the cache folder `output`
    (see the module docstring); resumes an interrupted run. `max_length` must be `train`'s. `with_rejected=False`
    scores the chosen sides only (enough for loss skl / kd). `stop_after_shards`: end after writing that many
    shards (the cache stays resumable)."""
    from tqdm.auto import tqdm

    from .generation import select_engine
    from .jsonl import check_writable_folder
    from .models import load_tokenizer, local_model_dir

    teacher = local_model_dir(teacher, "teacher")
    for name, value in (("top_k", top_k), ("batch_size", batch_size), ("pairs_per_shard", pairs_per_shard)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if memory_budget < 1:
        raise ValueError(f"memory_budget must be > 0 bytes, got {memory_budget}")
    chosen_engine = select_engine(engine)
    if chosen_engine != "vllm" and engine_args:
        raise ValueError(f"engine_args are vLLM settings; the engine is {chosen_engine!r}")
    output = check_writable_folder(output, "output")
    tokenizer = load_tokenizer(teacher)
    vocab_size = max(len(tokenizer), 1 + max(tokenizer.get_vocab().values()))
    if top_k + 1 > vocab_size:
        raise ValueError(f"top_k={top_k}: K + 1 entries must fit in the vocabulary of {vocab_size} tokens")
    examples = read_pairs(data, need_rejected=with_rejected)
    header = {
        "pairs_file": str(Path(data).resolve()), "pairs_sha256": file_sha256(data),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "top_k": top_k, "vocab_size": vocab_size,
        "num_pairs": len(examples), "engine": chosen_engine,
        "settings": {"max_length": max_length, "chat_template_sha256": chat_template_sha256(tokenizer),
                     "with_rejected": with_rejected, "pairs_per_shard": pairs_per_shard},
    }
    writer = CacheWriter(output, header)
    todo = [index for index in range(writer.num_shards) if index not in writer.done_shards]
    reused = len(examples) - sum(len(writer.shard_pairs(index)) for index in todo)
    if not todo:
        return ScoreResult(output, len(examples), 0, reused, 0, 0.0, None)
    pairs = tokenize_pairs(examples, tokenizer, max_length=max_length, progress=False)
    if chosen_engine == "vllm":
        scorer = _VLLMScorer(teacher, dtype, seed, dict(engine_args or {}), vocab_size, top_k)
    else:
        scorer = _HFScorer(teacher, dtype, vocab_size, top_k, memory_budget)
    tokens, scored, started = 0, 0, time.perf_counter()
    bar = tqdm(total=len(examples), initial=reused, unit="pair", desc=f"score ({chosen_engine})", disable=not progress)
    try:
        for count, shard in enumerate(todo):
            if stop_after_shards is not None and count >= stop_after_shards:
                break
            sides = []
            members = list(writer.shard_pairs(shard))
            for start in range(0, len(members), batch_size):
                indices = members[start:start + batch_size]
                batch = [pairs[i] for i in indices]
                rows = [(p.chosen_ids, p.chosen_labels) for p in batch]
                if with_rejected:
                    rows += [(p.rejected_ids, p.rejected_labels) for p in batch]
                results = scorer.score_rows(rows, tokenizer.pad_token_id)
                keys = [(i, 0) for i in indices] + ([(i, 1) for i in indices] if with_rejected else [])
                for (pair, side), (position, labels, ids, logprobs, tail) in zip(keys, results):
                    sides.append(SideScores(pair, side, position, labels, ids, logprobs, tail))
                bar.update(len(indices))
                tokens += sum(len(result[1]) for result in results)
                elapsed = time.perf_counter() - started
                bar.set_postfix(tokens_per_s=f"{tokens / elapsed:.0f}" if elapsed > 0 else "-")
            writer.write_shard(shard, sides)
            scored += len(members)
    finally:
        bar.close()
        scorer.close()
    return ScoreResult(output, len(examples), scored, reused, tokens, time.perf_counter() - started, chosen_engine)
