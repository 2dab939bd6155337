"""Sampling one response per prompt with a model's chat template: vLLM on a GPU, transformers elsewhere.

`generate(model_path, prompts, output_path, ...)` renders each prompt as the conversation
`[{"role": "user", "content": prompt}]` with the model's chat template (generation prompt added), samples one
response per prompt, and writes JSON Lines rows, in prompt order::

    {"index": 0, "prompt": "...", "response": "...", "finish_reason": "stop" | "length" | ...,
     "prompt_truncated": false,
     "generation": {"model": ..., "engine": "hf" | "vllm", "dtype": ..., "temperature": ..., "top_p": ...,
                    "max_new_tokens": ..., "seed": ..., "batch_size": ..., "max_prompt_tokens": ...,
                    "engine_args": {...} | None, "batch_invariant": bool | None}}

`index` is the prompt's position in the prompt list; `finish_reason` is "stop" when the model ended its turn
(an end-of-sequence token, not included in `response`) and "length" when `max_new_tokens` cut it; vLLM's
other reasons ("abort", "error", "repetition") are recorded as vLLM gives them. `engine_args` are the
`vllm.LLM` arguments besides model, dtype and seed, and `batch_invariant` whether `VLLM_BATCH_INVARIANT=1` was
set (both None on transformers; neither is a setting that must match to resume). `model` is
the model folder's resolved (absolute) path; `batch_size` is None on vLLM (it does not change the samples).
`generation` also holds `model_relative` (the model's path relative to the output's folder) and
`model_config_sha256` (of its config.json): a row whose model path differs is still this model's when both
of these match, so that a folder holding the model and the output (a pipeline folder) can be moved.

Long prompts: a prompt whose rendered conversation has more than `max_prompt_tokens` tokens (default: the
context length minus `max_new_tokens`; the context length is `max_model_len`, else the one vLLM derives, see
`context_length`) keeps its last
tokens, as `train` cuts prompts to `max_length`: the user message is cut to its last tokens so that the
rendered conversation fits. `prompt` still holds the whole prompt; the row says `"prompt_truncated": true` and
gives `"prompt_tokens"`, the rendered conversation's length before the cut.

Sampling follows the released DistiLLM-2 data generation (vLLM `SamplingParams(temperature, top_p,
max_tokens, seed)`): no top-k, no repetition penalty, whatever the model's own generation_config says (on
transformers the model's generation config is replaced by one holding only its special tokens, since
`generate` would otherwise fill in its top_k, repetition_penalty, ...).
`temperature=0` is greedy decoding (`do_sample=False`). Seeds: prompt `i` is sampled with seed `seed + i` on
vLLM. On transformers the prompts are cut into fixed batches, prompts `[k·B, (k+1)·B)` for batch size B, and
batch k is seeded with `seed + k·B`; a batch is always generated whole (on resuming, a batch of which some
rows were written is generated again and its missing rows kept), so its samples do not depend on which rows
an interruption left: a resumed run writes the rows the uninterrupted run would have (on the same hardware
and software). On vLLM a resumed run draws each prompt with the same seed, but vLLM's results depend on the
batch a prompt is scheduled with unless `VLLM_BATCH_INVARIANT=1` is set, so its new rows need not be the
uninterrupted run's. Every setting that changes the samples (model, engine, dtype, temperature,
top_p, max_new_tokens, seed, max_prompt_tokens, and on transformers the batch size) must match to resume.

Resuming: rows are appended to `<output>.partial` (flushed and fsynced per batch) as they are generated; the
final file is written atomically from the union of the rows of an existing `<output>`, of `<output>.partial`,
and of the new rows, and the partial file is then removed. Rerunning an interrupted command skips every
prompt whose row is already there (rows are matched by `index`, and their `prompt` must match the prompt
list, and their settings these settings), so no row is duplicated or lost. A last line torn by a crash or a
full disk is dropped (and generated again). Running again with a larger `n` extends a finished file, keeping
its rows (the new rows are those of an uninterrupted run with the larger `n`); the output always holds
exactly the rows of the prompts asked for (rows of prompts beyond `n` left by an earlier run are dropped).

Engines: "auto" uses vLLM when it is installed and a CUDA GPU is present, otherwise transformers (batched
`model.generate`, left padding); "vllm" and "hf" force one. vLLM is optional (`pip install vllm`).
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

from .jsonl import (
    DataError,
    JsonlAppender,
    check_writable_file,
    file_sha256,
    read_jsonl,
    remove_stale_temporaries,
    write_jsonl_atomic,
)
from .prompts import PromptSource, load_prompts

__all__ = ["generate", "select_engine", "GenerationResult", "ENGINES", "user_conversation"]

ENGINES = ("auto", "vllm", "hf")
# every setting that changes the samples: a row is reused only when all match
SETTINGS_KEYS = (
    "model", "engine", "dtype", "temperature", "top_p", "max_new_tokens", "seed", "batch_size", "max_prompt_tokens"
)
DEFAULT_BATCH_SIZE = {"hf": 8, "vllm": 1024}
SEED_LIMIT = 2**63 - 1  # the largest seed `seed + index` may reach (vLLM and torch take 64-bit seeds)
VLLM_MIN_TEMPERATURE = 0.01  # vLLM raises a smaller positive temperature to this


@dataclass
class GenerationResult:
    output_path: Path
    num_rows: int  # rows in the output file
    num_generated: int  # rows generated by this call
    num_reused: int  # rows found from an earlier (interrupted or shorter) run
    engine: Optional[str]  # the engine used, None when nothing was left to generate


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def select_engine(engine: str = "auto") -> str:
    """"vllm" or "hf": "auto" is vLLM when it is installed and a CUDA GPU is present, else transformers."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "hf":
        return "hf"
    installed, gpu = vllm_installed(), gpu_available()
    if engine == "vllm":
        if not installed:
            raise ValueError("engine='vllm' but vllm is not installed: `pip install vllm`, or use engine='hf'")
        if not gpu:
            raise ValueError("engine='vllm' needs a CUDA GPU and none is available: use engine='hf'")
        return "vllm"
    return "vllm" if installed and gpu else "hf"


def user_conversation(prompt: str) -> list[dict]:
    """The one-turn conversation a prompt is rendered as."""
    return [{"role": "user", "content": prompt}]


def _check_model_dir(model_path) -> Path:
    path = Path(model_path)
    if not path.is_dir():
        raise FileNotFoundError(f"model {path}: not a local directory (models are loaded from local folders only)")
    return path


def default_dtype(engine: str) -> str:
    """The dtype a model is loaded in when none is given: vLLM's "auto"; on transformers bfloat16 on a CUDA
    GPU that supports it, else float32."""
    import torch

    if engine == "vllm":
        return "auto"
    return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"


def check_dtype(dtype: str, engine: str) -> None:
    import torch

    if engine == "vllm" and dtype == "auto":
        return
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ValueError(f"dtype must name a torch dtype (bfloat16, float16, float32, ...), got {dtype!r}")


# the config keys vLLM derives its max_model_len from (the smallest one given), in vLLM's order
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
                "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len")
VLLM_DEFAULT_CONTEXT = 2048  # vLLM's max_model_len when the config gives none of CONTEXT_KEYS


def context_length(model_path: Path, engine: str = "hf") -> Optional[int]:
    """The model's context length as vLLM derives its `max_model_len`: the smallest of the `CONTEXT_KEYS` of
    its (text) config as transformers loads it, architecture defaults included; when none is given, vLLM's
    2048 on vLLM and None (no limit known) on transformers. None without a readable config.json."""
    import json

    path = Path(model_path) / "config.json"
    if not path.is_file():
        return None
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_path, local_files_only=True)
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        values = [getattr(config, key, None) for key in CONTEXT_KEYS]
    except (OSError, ValueError, KeyError, ImportError):  # an architecture transformers does not know
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        raw = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw
        values = [raw.get(key) for key in CONTEXT_KEYS]
    values = [value for value in values if isinstance(value, int) and value > 0]
    if values:
        return min(values)
    return VLLM_DEFAULT_CONTEXT if engine == "vllm" else None


def fit_prompt(tokenizer, prompt: str, max_prompt_tokens: int) -> tuple[str, int, bool]:
    """`(prompt, tokens of its rendered conversation, truncated)`: the prompt cut to its last tokens so that
    its rendered conversation holds at most `max_prompt_tokens` tokens (unchanged when it fits)."""

    def rendered_length(text: str) -> int:  # as the engines tokenise it: the template holds its special tokens
        rendered = tokenizer.apply_chat_template(user_conversation(text), tokenize=False, add_generation_prompt=True)
        return len(tokenizer(rendered, add_special_tokens=False)["input_ids"])

    total = rendered_length(prompt)
    if total <= max_prompt_tokens:
        return prompt, total, False
    content = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    keep = max_prompt_tokens - (total - len(content))
    while keep > 0:
        cut = tokenizer.decode(content[len(content) - keep:], skip_special_tokens=False)
        if rendered_length(cut) <= max_prompt_tokens:
            return cut, total, True
        keep -= max(1, (rendered_length(cut) - max_prompt_tokens))
    raise ValueError(
        f"max_prompt_tokens={max_prompt_tokens} leaves no room for the prompt: the chat template alone takes "
        f"{total - len(content)} tokens"
    )


class HFEngine:
    """Batched `model.generate` of transformers, left-padded, on CUDA when present else CPU."""

    name = "hf"

    def __init__(self, model_path: Path, dtype: Optional[str] = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        from .models import torch_dtype_kwargs

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or default_dtype("hf")
        check_dtype(dtype, "hf")
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        if self.tokenizer.chat_template is None:
            raise ValueError(f"the tokenizer of {model_path} has no chat template to render the prompts with")
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, local_files_only=True, **torch_dtype_kwargs(getattr(torch, dtype))
        ).to(self.device)
        self.model.eval()
        eos = {self.tokenizer.eos_token_id}
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        eos.update(configured if isinstance(configured, (list, tuple)) else [configured])
        self.eos_token_ids = sorted(token for token in eos if token is not None)
        if not self.eos_token_ids:
            raise ValueError(f"model {model_path}: the tokenizer has no eos token, so generation could never stop")
        # Sample with the given settings only, as vLLM's SamplingParams do: `generate` fills every setting that
        # its GenerationConfig leaves unset (transformers 5) or at the default (4.x) from the model's own
        # generation_config.json, whose top_k, repetition_penalty, min_new_tokens, num_beams, ... would apply.
        self.model.generation_config = GenerationConfig(
            bos_token_id=self.model.generation_config.bos_token_id, eos_token_id=self.eos_token_ids,
            pad_token_id=self.tokenizer.pad_token_id,
        )

    def close(self) -> None:
        """Drop the model and give its memory back."""
        self.model = None
        free_memory()

    def generate(
        self, prompts: Sequence[str], indices: Sequence[int], *, temperature, top_p, max_new_tokens, seed
    ) -> list[tuple[str, str]]:
        import torch
        from transformers import GenerationConfig

        texts = [
            self.tokenizer.apply_chat_template(user_conversation(p), tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
        # the chat template already holds the special tokens it needs (as vLLM's chat() does it)
        encoded = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        sampling = temperature > 0
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=sampling,
            temperature=temperature if sampling else None,
            top_p=top_p if sampling else None,
            top_k=0 if sampling else None,  # 0: no top-k (unset, transformers would apply its default 50)
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.eos_token_ids,
        )
        torch.manual_seed(seed + indices[0])
        with torch.no_grad():
            output = self.model.generate(**encoded, generation_config=config)
        results = []
        for row in output[:, encoded["input_ids"].shape[1]:].tolist():
            stop = next((k for k, token in enumerate(row) if token in self.eos_token_ids), None)
            tokens = row if stop is None else row[:stop]
            reason = "stop" if stop is not None else "length"
            results.append((self.tokenizer.decode(tokens, skip_special_tokens=True), reason))
        return results


class VLLMEngine:
    """vLLM's offline `LLM.chat` with one `SamplingParams` per prompt (seed `seed + index`); `engine_args` are
    further `LLM(...)` keyword arguments (gpu_memory_utilization, max_model_len, tensor_parallel_size, ...)."""

    name = "vllm"

    def __init__(self, model_path: Path, dtype: Optional[str] = None, seed: int = 0,
                 engine_args: Optional[dict] = None):
        from vllm import LLM

        self.llm = LLM(model=str(model_path), dtype=dtype or "auto", seed=seed, **(engine_args or {}))
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len

    def close(self) -> None:
        """Give the GPU memory back: end vLLM's engine-core process (vLLM 0.33 has no `LLM.shutdown`), drop
        the engine, collect, and empty torch's cache. Best effort: only the end of the process is sure to free
        everything, which is why the pipeline runs each vLLM generation in its own process."""
        llm, self.llm = self.llm, None
        engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        del llm, engine_core
        free_memory()

    @property
    def tokenizer(self):
        return self.llm.get_tokenizer()

    def generate(
        self, prompts: Sequence[str], indices: Sequence[int], *, temperature, top_p, max_new_tokens, seed
    ) -> list[tuple[str, str]]:
        from vllm import SamplingParams

        params = [
            SamplingParams(
                n=1,
                temperature=temperature,
                top_p=top_p if temperature > 0 else 1.0,
                max_tokens=max_new_tokens,
                seed=seed + index,
            )
            for index in indices
        ]
        try:
            outputs = self.llm.chat([user_conversation(p) for p in prompts], sampling_params=params, use_tqdm=False)
        except Exception as error:
            if type(error).__name__ != "VLLMValidationError":  # vLLM 0.33's, not a ValueError
                raise
            raise ValueError(f"vLLM refused the batch of prompts {indices[0]}..{indices[-1]}: {error}") from error
        # vLLM's finish reasons: "stop", "length", "abort", "error", "repetition", recorded as they are
        return [(output.outputs[0].text, str(output.outputs[0].finish_reason)) for output in outputs]


def free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _make_engine(engine: str, model_path: Path, dtype: Optional[str], seed: int, engine_args: Optional[dict] = None):
    return VLLMEngine(model_path, dtype, seed, engine_args) if engine == "vllm" else HFEngine(model_path, dtype)


def _partial_path(output_path: Path) -> Path:
    return output_path.with_name(output_path.name + ".partial")


def model_identity(model_path: Path, output_path: Path) -> dict:
    """What identifies the model besides its resolved path, so that a folder holding both the model and the
    output (a pipeline folder) can be moved: the model's path relative to the output's folder, and the
    SHA-256 of its config.json."""
    config = model_path / "config.json"
    return {
        "model_relative": os.path.relpath(model_path.resolve(), output_path.parent.resolve()),
        "model_config_sha256": file_sha256(config) if config.is_file() else None,
    }


def _same_model_moved(recorded: dict, identity: dict) -> bool:
    """A row's model at another absolute path is this one when the model and the output moved together: the
    same path relative to the output and the same config.json."""
    return (
        identity["model_config_sha256"] is not None
        and recorded.get("model_config_sha256") == identity["model_config_sha256"]
        and recorded.get("model_relative") == identity["model_relative"]
    )


def _existing_rows(
    path: Path, prompts: list[str], settings: dict, identity: dict, *, torn_tail: bool
) -> dict[int, dict]:
    """The rows of an earlier run that this run can keep, by index (rows beyond the prompt list are dropped)."""
    rows = {}
    if not path.exists():
        return rows
    for number, row in read_jsonl(path, allow_torn_tail=torn_tail):
        index = row.get("index")
        if not isinstance(index, int) or not isinstance(row.get("response"), str):
            raise DataError(f"{path}:{number}: not a row of `generate` (needs an integer 'index' and a 'response')")
        if index >= len(prompts):
            continue
        if row.get("prompt") != prompts[index]:
            raise DataError(
                f"{path}:{number}: row {index} is for another prompt than prompt {index} of this prompt list; "
                "resume with the same prompts, or write to a new output file"
            )
        recorded = row.get("generation") or {}
        previous = {key: recorded.get(key) for key in SETTINGS_KEYS}
        if previous["model"] != settings["model"] and _same_model_moved(recorded, identity):
            previous["model"] = settings["model"]
        if previous != settings:
            raise ValueError(
                f"{path}:{number}: generated with settings {previous}, this run uses {settings}; "
                "resume with the same settings, or write to a new output file"
            )
        rows[index] = row
    return rows


def generate(
    model_path: Union[str, os.PathLike],
    prompts: PromptSource,
    output_path: Union[str, os.PathLike],
    *,
    n: Optional[int] = None,
    temperature: float = 0.8,
    top_p: float = 0.95,
    max_new_tokens: int = 1024,
    seed: int = 42,
    engine: str = "auto",
    batch_size: Optional[int] = None,
    dtype: Optional[str] = None,
    max_prompt_tokens: Optional[int] = None,
    gpu_memory_utilization: Optional[float] = None,
    max_model_len: Optional[int] = None,
    tensor_parallel_size: Optional[int] = None,
    engine_args: Optional[dict] = None,
    progress: bool = True,
) -> GenerationResult:
    """Sample one response per prompt from the model in the local folder `model_path` and write them to
    `output_path` (JSON Lines, see the module docstring); resumes an interrupted run.

    prompts: a prompts file (JSON Lines with a `prompt` field, or plain text, one prompt per line) or a list
    of strings. n: use only the first n prompts (None: all). temperature: 0 is greedy decoding. batch_size:
    prompts per engine call and per durable append (default 8 on transformers, 1024 on vLLM). dtype: the
    model's dtype name ("bfloat16", "float32", ...; default bfloat16 on a GPU that supports it, else
    float32, and vLLM's "auto"). max_prompt_tokens: longer prompts keep their last tokens (default: the
    model's context length minus max_new_tokens, when its config.json gives it; see the module docstring).
    max_model_len: the context length (vLLM's `max_model_len`, default: the model's), on both engines.
    gpu_memory_utilization, tensor_parallel_size, engine_args (further `vllm.LLM` keyword arguments): vLLM
    only. Every setting is checked against the engine before the model is loaded.
    """
    model_path = _check_model_dir(model_path)
    output_path = Path(output_path)
    prompt_list = load_prompts(prompts)
    if n is not None:
        if n < 1:
            raise ValueError(f"n must be a positive number of prompts, got {n}")
        prompt_list = prompt_list[:n]
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not isinstance(seed, int) or not 0 <= seed <= SEED_LIMIT - len(prompt_list):
        raise ValueError(f"seed must be >= 0, and seed + the number of prompts below 2**63, got {seed} "
                         "(prompt i is sampled with seed + i; vLLM takes seed -1 as unseeded)")
    chosen_engine = select_engine(engine)
    if chosen_engine == "vllm" and not (temperature == 0 or VLLM_MIN_TEMPERATURE <= temperature <= 2):
        raise ValueError(f"temperature must be 0 (greedy) or in [{VLLM_MIN_TEMPERATURE}, 2] on vLLM, got "
                         f"{temperature} (vLLM refuses more than 2 and raises 0 < T < 0.01 to 0.01)")
    dtype = dtype or default_dtype(chosen_engine)
    check_dtype(dtype, chosen_engine)
    vllm_args = _engine_arguments(chosen_engine, gpu_memory_utilization, max_model_len, tensor_parallel_size,
                                  engine_args)
    context = context_length(model_path, chosen_engine)
    if max_model_len is not None:
        if context is not None and max_model_len > context:
            raise ValueError(f"max_model_len={max_model_len} is more than the model's context of {context} tokens "
                             "(vLLM refuses it)")
        context = max_model_len
    if max_prompt_tokens is None:
        if context is not None:
            max_prompt_tokens = context - max_new_tokens
            if max_prompt_tokens < 1:
                raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                                 f"context of {context} tokens: lower it, or set max_prompt_tokens")
    elif max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
    elif context is not None and max_prompt_tokens + max_new_tokens > context:
        raise ValueError(f"max_prompt_tokens={max_prompt_tokens} and max_new_tokens={max_new_tokens} exceed the "
                         f"model's context of {context} tokens: a prompt and its response must fit in it")
    batch_size = batch_size or DEFAULT_BATCH_SIZE[chosen_engine]
    check_writable_file(output_path)
    remove_stale_temporaries(output_path)

    settings = dict(
        model=str(model_path.resolve()), engine=chosen_engine, dtype=dtype, temperature=temperature, top_p=top_p,
        max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size if chosen_engine == "hf" else None,
        max_prompt_tokens=max_prompt_tokens,
    )
    identity = model_identity(model_path, output_path)
    recorded = {**settings, **identity, "engine_args": vllm_args if chosen_engine == "vllm" else None,
                "batch_invariant": os.environ.get("VLLM_BATCH_INVARIANT") == "1" if chosen_engine == "vllm" else None}
    partial_path = _partial_path(output_path)
    done = _existing_rows(output_path, prompt_list, settings, identity, torn_tail=False)
    done.update(_existing_rows(partial_path, prompt_list, settings, identity, torn_tail=True))
    reused = len(done)
    batches = _batches(len(prompt_list), set(done), batch_size, whole=chosen_engine == "hf")

    generated = 0
    if batches:
        from tqdm.auto import tqdm

        runner = _make_engine(chosen_engine, model_path, dtype, seed, vllm_args)
        try:
            generated = _generate_batches(runner, batches, prompt_list, done, partial_path, recorded,
                                          max_prompt_tokens, dict(temperature=temperature, top_p=top_p,
                                                                  max_new_tokens=max_new_tokens, seed=seed),
                                          tqdm(total=len(prompt_list), initial=reused, unit="prompt",
                                               desc=f"generate ({chosen_engine})", disable=not progress))
        finally:
            close = getattr(runner, "close", None)
            if close is not None:
                close()
    elif not partial_path.exists() and output_path.exists() and len(read_jsonl(output_path)) == len(done):
        return GenerationResult(output_path, len(done), 0, reused, None)  # already complete

    write_jsonl_atomic(output_path, (done[i] for i in sorted(done)))
    partial_path.unlink(missing_ok=True)
    return GenerationResult(output_path, len(done), generated, reused, chosen_engine if generated else None)


def _engine_arguments(engine: str, gpu_memory_utilization, max_model_len, tensor_parallel_size, engine_args) -> dict:
    """The `vllm.LLM` keyword arguments besides model, dtype and seed, checked before anything is loaded."""
    named = dict(gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                 tensor_parallel_size=tensor_parallel_size)
    if max_model_len is not None and (not isinstance(max_model_len, int) or max_model_len < 2):
        raise ValueError(f"max_model_len must be an integer >= 2, got {max_model_len}")
    if engine != "vllm":
        if gpu_memory_utilization is not None or tensor_parallel_size is not None or engine_args:
            raise ValueError("gpu_memory_utilization, tensor_parallel_size and engine_args are vLLM settings; the "
                             f"engine is {engine!r}")
        return {}
    if gpu_memory_utilization is not None and not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must lie in (0, 1], got {gpu_memory_utilization}")
    if tensor_parallel_size is not None and (not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1):
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
    extra = dict(engine_args or {})
    if not isinstance(engine_args or {}, dict):
        raise ValueError(f"engine_args must be a mapping of vllm.LLM keyword arguments, got {engine_args!r}")
    for key in sorted(extra):
        if key in ("model", "dtype", "seed"):
            raise ValueError(f"engine_args: {key!r} is set by generate itself (its own option)")
        if key in named:
            raise ValueError(f"engine_args: {key!r} has its own option, {key}=")
    unknown = sorted(set(extra) - _vllm_argument_names()) if extra else []
    if unknown:
        raise ValueError(f"engine_args: {', '.join(unknown)} is not an argument of vLLM's LLM or EngineArgs")
    return {**{key: value for key, value in named.items() if value is not None}, **extra}


def _vllm_argument_names() -> set:
    """The keyword arguments `vllm.LLM(...)` accepts: its own and those of `vllm.EngineArgs`."""
    import dataclasses
    import inspect

    import vllm

    names = set(inspect.signature(vllm.LLM.__init__).parameters) - {"self", "kwargs"}
    return names | {f.name for f in dataclasses.fields(vllm.EngineArgs)}


def _generate_batches(runner, batches, prompt_list, done, partial_path, recorded, max_prompt_tokens, sampling,
                      bar) -> int:
    """Generate `batches` with `runner`, appending each batch's rows to the partial file; returns the number of
    rows written."""
    if getattr(runner, "max_model_len", None) is not None and max_prompt_tokens is not None:
        if max_prompt_tokens >= runner.max_model_len:
            raise ValueError(f"vLLM's max_model_len is {runner.max_model_len}: max_prompt_tokens="
                             f"{max_prompt_tokens} does not fit; set max_model_len or max_prompt_tokens")
    generated = 0
    with JsonlAppender(partial_path) as partial, bar:
        for indices in batches:
            fitted = [
                fit_prompt(runner.tokenizer, prompt_list[i], max_prompt_tokens)
                if max_prompt_tokens is not None else (prompt_list[i], None, False)
                for i in indices
            ]
            outputs = runner.generate([text for text, _, _ in fitted], indices, **sampling)
            rows = []
            for i, (text, reason), (_, tokens, truncated) in zip(indices, outputs, fitted):
                if i in done:
                    continue  # written before the interruption: its batch was generated again whole
                row = {"index": i, "prompt": prompt_list[i], "response": text, "finish_reason": reason,
                       "prompt_truncated": truncated}
                if truncated:
                    row["prompt_tokens"] = tokens
                rows.append({**row, "generation": recorded})
            partial.append(rows)
            done.update((row["index"], row) for row in rows)
            generated += len(rows)
            bar.update(len(rows))
    return generated


def _batches(count: int, done: set, batch_size: int, *, whole: bool) -> list[list[int]]:
    """The engine calls still to make: with `whole`, every fixed batch `[k·B, (k+1)·B)` that misses a row, in
    full (its samples depend on all its rows); else the missing indices in runs of `batch_size`."""
    if whole:
        blocks = [list(range(start, min(start + batch_size, count))) for start in range(0, count, batch_size)]
        return [block for block in blocks if not done.issuperset(block)]
    todo = [index for index in range(count) if index not in done]
    return [todo[start:start + batch_size] for start in range(0, len(todo), batch_size)]
