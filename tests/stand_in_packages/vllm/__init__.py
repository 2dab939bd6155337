"""A stand-in for the parts of vLLM (0.33) that `distillm2_kernels.trainer.generation` uses, as strict as the real
one where the trainer could go wrong (read against the vLLM 0.33.0 source):

- `SamplingParams`: only vLLM's field names (another name is a TypeError, as msgspec raises), vLLM's value
  checks (`VLLMValidationError`), and its silent changes: 0 < temperature < 0.01 raised to 0.01, seed −1
  unseeded, greedy forcing top_p = 1.
- `LLM(model, ...)`: only LLM/EngineArgs keyword names; loads the folder's config and tokenizer (a folder
  without them fails); derives `max_model_len` as vLLM does (the smallest of the config's length keys, 2048
  when none; a larger user value is refused); and reserves `gpu_memory_utilization` of the device at
  startup, failing with vLLM's message when that much is not free. The device is a JSON ledger shared by the
  processes of a test (`VLLM_STAND_IN_DEVICE`). vLLM 0.33 has no `LLM.shutdown`: a reservation ends when
  `llm.llm_engine.engine_core.shutdown()` ends the engine-core process, or when the process that made it
  exits (the driver frees its memory); deleting the LLM is taken to free nothing.
- `LLM.chat`: renders every conversation with the tokenizer's chat template (generation prompt added),
  tokenises it without special tokens, and refuses the whole batch with `VLLMValidationError` when a prompt
  does not fit `max_model_len` (prompt length >= max_model_len), before generating anything.
- outputs: `RequestOutput(request_id, prompt, prompt_token_ids, outputs=[CompletionOutput(index, text,
  token_ids, cumulative_logprob, logprobs, finish_reason, stop_reason)], finished)`. The tokens are a
  deterministic function of the prompt's token ids and the request's seed; a prompt containing
  `[finish_reason=X]` finishes with reason X ("abort", "error", "repetition"), as vLLM reports those.

- `LLM.generate(prompts, sampling_params)` with token prompts `{"prompt_token_ids": [...]}` and
  `SamplingParams(prompt_logprobs=n)`: `RequestOutput.prompt_logprobs` is vLLM's list, `None` for the first
  prompt token, then per token `{token id: Logprob(logprob, rank, decoded_token)}` holding the n best tokens
  (rank 1 = the best) and the prompt token itself with its rank (n or n + 1 entries), log-probabilities of the
  raw logits at temperature 1 over the model's whole lm_head (padded rows included), computed by running the
  model in float32 with transformers. As vLLM, `prompt_logprobs` above the engine's `max_logprobs` (default
  20) is refused, and so is a prompt of `max_model_len` tokens or more.

Every `chat` and `generate` call is recorded in `CALLS` (this process only).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import re
from dataclasses import dataclass
from typing import Any, Optional

from .exceptions import VLLMValidationError

__all__ = ["LLM", "SamplingParams", "EngineArgs", "RequestOutput", "CompletionOutput", "Logprob", "CALLS"]

GiB = 1 << 30
CALLS: list[dict] = []
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")
LENGTH_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
               "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len")
_MAX_TEMP = 1e-2
_SAMPLING_EPS = 1e-5


@dataclass
class SamplingParams:
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: Optional[int] = None
    stop: Any = None
    stop_token_ids: Optional[list] = None
    ignore_eos: bool = False
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self):
        if 0 < self.temperature < _MAX_TEMP:
            self.temperature = _MAX_TEMP
        if self.seed == -1:
            self.seed = None
        if self.n < 1:
            raise VLLMValidationError(f"n must be at least 1, got {self.n}.")
        if not math.isfinite(self.temperature):
            raise VLLMValidationError(f"temperature must be a finite number, got {self.temperature}.",
                                      parameter="temperature", value=self.temperature)
        if self.temperature < 0.0:
            raise VLLMValidationError(f"temperature must be non-negative, got {self.temperature}.",
                                      parameter="temperature", value=self.temperature)
        if self.temperature > 2.0:
            raise VLLMValidationError(f"temperature must be in [0, 2], got {self.temperature}.",
                                      parameter="temperature", value=self.temperature)
        if not 0.0 < self.top_p <= 1.0:
            raise VLLMValidationError(f"top_p must be in (0, 1], got {self.top_p}.", parameter="top_p",
                                      value=self.top_p)
        if self.top_k < -1:
            raise VLLMValidationError(f"top_k must be 0 (disable), or at least 1, got {self.top_k}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise VLLMValidationError(f"max_tokens must be at least 1, got {self.max_tokens}.",
                                      parameter="max_tokens", value=self.max_tokens)
        if self.repetition_penalty <= 0.0:
            raise VLLMValidationError(f"repetition_penalty must be greater than zero, got {self.repetition_penalty}.")
        if self.temperature < _SAMPLING_EPS:  # greedy
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0
            if self.n > 1:
                raise VLLMValidationError(f"n must be 1 when using greedy sampling, got {self.n}.")


@dataclass
class EngineArgs:
    """The EngineArgs fields the trainer may pass (vLLM has many more; the escape hatch is checked against
    these names)."""

    model: str = ""
    tokenizer: Optional[str] = None
    dtype: str = "auto"
    seed: int = 0
    max_model_len: Optional[int] = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    gpu_memory_utilization: float = 0.92
    kv_cache_memory_bytes: Optional[int] = None
    enforce_eager: bool = False
    max_num_seqs: Optional[int] = None
    max_num_batched_tokens: Optional[int] = None
    enable_prefix_caching: Optional[bool] = None
    trust_remote_code: bool = False
    quantization: Optional[str] = None
    disable_log_stats: bool = False
    cpu_offload_gb: float = 0
    swap_space: float = 4
    max_logprobs: int = 20


LLM_ONLY_ARGUMENTS = ("chat_template", "hf_overrides", "compilation_config")


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list
    cumulative_logprob: Optional[float]
    logprobs: Any
    finish_reason: Optional[str] = None
    stop_reason: Any = None


@dataclass
class Logprob:
    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str
    prompt_token_ids: list
    prompt_logprobs: Any
    outputs: list
    finished: bool


@dataclass
class _ModelConfig:
    max_model_len: int


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _device(update=None):
    path = os.environ.get("VLLM_STAND_IN_DEVICE")
    if not path:
        raise RuntimeError("the stand-in vllm needs VLLM_STAND_IN_DEVICE: a JSON file {'total_bytes': N}")
    with open(path, encoding="utf-8") as handle:
        device = json.load(handle)
    # the driver frees the memory of a process that ended
    device["held"] = {key: size for key, size in device.get("held", {}).items() if _process_alive(int(key.split(":")[0]))}
    if update is not None:
        update(device)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(device, handle)
    return device


def _reserve(utilization: float, key: str) -> None:
    """Reserve `utilization` of the device, as vLLM's worker does at startup."""

    def reserve(device):
        total = device["total_bytes"]
        free = total - sum(device["held"].values())
        requested = math.ceil(utilization * total)
        if free < requested:
            raise ValueError(
                f"Free memory on device cuda:0 ({free / GiB:.2f}/{total / GiB:.2f} GiB) on startup is less than "
                f"desired GPU memory utilization ({utilization}, {requested / GiB:.2f} GiB). Decrease GPU memory "
                "utilization or reduce GPU memory used by other processes."
            )
        device["held"][key] = requested

    _device(reserve)


class _EngineCoreClient:
    """vLLM's engine-core client: `shutdown()` ends the engine-core process, which frees its memory; nothing
    else does (deleting the LLM leaves it to garbage collection, which the stand-in takes as never)."""

    def __init__(self, key: str):
        self.key = key

    def shutdown(self, timeout=None):
        _device(lambda device: device["held"].pop(self.key, None))


class LLM:
    def __init__(self, model: str, *, tensor_parallel_size: int = 1, dtype: str = "auto", seed: int = 0,
                 gpu_memory_utilization: float = 0.92, max_model_len: Optional[int] = None, **kwargs):
        from transformers import AutoConfig, AutoTokenizer

        known = {f.name for f in dataclasses.fields(EngineArgs)} | set(LLM_ONLY_ARGUMENTS)
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"EngineArgs.__init__() got an unexpected keyword argument {unknown[0]!r}")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        gpus = int(os.environ.get("VLLM_STAND_IN_GPUS", "1"))
        if tensor_parallel_size > gpus:
            raise ValueError(f"World size ({tensor_parallel_size}) is larger than the number of available GPUs "
                             f"({gpus}) in this node.")
        config = AutoConfig.from_pretrained(model, local_files_only=True)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        lengths = [getattr(text_config, key) for key in LENGTH_KEYS if getattr(text_config, key, None) is not None]
        derived = min(lengths) if lengths else 2048
        if max_model_len is not None and max_model_len > derived:
            raise ValueError(f"User-specified max_model_len ({max_model_len}) is greater than the derived "
                             f"max_model_len ({derived} in model's config.json).")
        self.tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
        key = f"{os.getpid()}:{id(self)}"
        _reserve(gpu_memory_utilization, key)
        self.init_arguments = dict(model=model, tensor_parallel_size=tensor_parallel_size, dtype=dtype, seed=seed,
                                   gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                                   **kwargs)
        self.llm_engine = type("LLMEngine", (), {})()
        self.llm_engine.model_config = _ModelConfig(max_model_len or derived)
        self.llm_engine.engine_core = _EngineCoreClient(key)
        self._requests = 0
        self._model_path = model
        self._max_logprobs = kwargs.get("max_logprobs", 20)
        self._model = None

    def get_tokenizer(self):
        return self.tokenizer

    def chat(self, messages, sampling_params=None, use_tqdm=True, *, chat_template=None,
             add_generation_prompt=True, continue_final_message=False, chat_template_kwargs=None):
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(
            conversations)
        if len(params) != len(conversations):
            raise ValueError("The lengths of prompts and sampling_params must be the same.")
        if not all(isinstance(p, SamplingParams) for p in params):
            raise TypeError("sampling_params must be SamplingParams")
        max_model_len = self.llm_engine.model_config.max_model_len
        rendered = []
        for conversation in conversations:
            text = self.tokenizer.apply_chat_template(
                conversation, chat_template=chat_template, tokenize=False,
                add_generation_prompt=add_generation_prompt, **(chat_template_kwargs or {}),
            )
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) > max_model_len:
                raise VLLMValidationError(
                    f"This model's maximum context length is {max_model_len} tokens. However, your prompt "
                    f"contains {len(ids)} input tokens, which exceeds this limit even without any output tokens. "
                    "Please reduce the length of the input prompt.", parameter="input_tokens", value=len(ids))
            if len(ids) == max_model_len:
                raise VLLMValidationError(
                    f"The decoder prompt (length {len(ids)}) plus the number of requested output tokens (at least "
                    f"1) is longer than the maximum model length of {max_model_len}.")
            rendered.append((text, ids))
        CALLS.append(dict(conversations=conversations, params=params, use_tqdm=use_tqdm,
                          prompt_token_ids=[ids for _, ids in rendered]))
        outputs = []
        for (text, ids), param, conversation in zip(rendered, params, conversations):
            outputs.append(self._complete(text, ids, param, conversation, max_model_len))
        return outputs

    def generate(self, prompts, sampling_params=None, use_tqdm=True, lora_request=None):
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(
            prompts)
        if len(params) != len(prompts):
            raise ValueError("The lengths of prompts and sampling_params must be the same.")
        max_model_len = self.llm_engine.model_config.max_model_len
        token_prompts = []
        for prompt, param in zip(prompts, params):
            if not isinstance(prompt, dict) or "prompt_token_ids" not in prompt:
                raise NotImplementedError("the stand-in takes token prompts {'prompt_token_ids': [...]} only")
            ids = list(prompt["prompt_token_ids"])
            if len(ids) >= max_model_len:
                raise VLLMValidationError(
                    f"The decoder prompt (length {len(ids)}) plus the number of requested output tokens (at least "
                    f"1) is longer than the maximum model length of {max_model_len}.")
            if param.prompt_logprobs is not None and param.prompt_logprobs > self._max_logprobs:
                raise VLLMValidationError(
                    f"Requested prompt logprobs of {param.prompt_logprobs}, which is greater than max allowed: "
                    f"{self._max_logprobs}", parameter="prompt_logprobs", value=param.prompt_logprobs)
            token_prompts.append(ids)
        CALLS.append(dict(prompts=prompts, params=params, use_tqdm=use_tqdm, prompt_token_ids=token_prompts))
        outputs = []
        for ids, param in zip(token_prompts, params):
            prompt_logprobs = None if param.prompt_logprobs is None else self._prompt_logprobs(ids, param.prompt_logprobs)
            completion = CompletionOutput(0, "", [self.tokenizer.eos_token_id], None, None, "stop",
                                          self.tokenizer.eos_token_id)
            outputs.append(RequestOutput(str(self._requests), None, ids, prompt_logprobs, [completion], True))
            self._requests += 1
        return outputs

    def _prompt_logprobs(self, ids, count):
        import torch
        from transformers import AutoModelForCausalLM

        if self._model is None:
            self._model = AutoModelForCausalLM.from_pretrained(self._model_path, local_files_only=True,
                                                               dtype=torch.float32).eval()
        with torch.no_grad():
            logits = self._model(torch.tensor([ids])).logits[0].double()
        logprobs = torch.log_softmax(logits, dim=-1)
        result = [None]
        for position in range(1, len(ids)):
            row = logprobs[position - 1]
            token = ids[position]
            best = row.topk(count).indices.tolist()
            entries = {t: Logprob(float(row[t]), rank, None) for rank, t in enumerate(best, start=1)}
            if token not in entries:
                entries[token] = Logprob(float(row[token]), 1 + int((row > row[token]).sum()), None)
            result.append(entries)
        return result

    def _complete(self, text, ids, param, conversation, max_model_len) -> RequestOutput:
        request_id = str(self._requests)
        self._requests += 1
        seed = param.seed if param.seed is not None else int.from_bytes(os.urandom(8), "little")
        digest = hashlib.sha256(json.dumps([seed, param.temperature, ids]).encode()).digest()
        rng = random.Random(digest)
        budget = min(param.max_tokens or 16, max_model_len - len(ids))
        eos = self.tokenizer.eos_token_id
        letters = self.tokenizer.convert_tokens_to_ids(list("abcdefghij "))
        tokens = [rng.choice(letters) for _ in range(rng.randint(1, budget))]
        reason = "length" if len(tokens) == budget else "stop"
        forced = re.search(r"\[finish_reason=(\w+)\]", conversation[-1]["content"])
        if forced:
            reason = forced.group(1)
            assert reason in FINISH_REASONS, reason
        elif reason == "stop":
            tokens.append(eos)  # the EOS is in token_ids, not in the text
        text_out = self.tokenizer.decode(tokens, skip_special_tokens=param.skip_special_tokens)
        completion = CompletionOutput(0, text_out, tokens, None, None, reason, eos if reason == "stop" else None)
        return RequestOutput(request_id, text, ids, None, [completion], True)
