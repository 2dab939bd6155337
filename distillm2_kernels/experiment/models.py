"""The teacher and the student: small Llama-style decoders, built from scratch and saved like any model.

Both use the same character-level tokenizer (so the same vocabulary, as the DistiLLM-2 objective needs) and
Llama's architecture (RMSNorm, rotary positions, SwiGLU MLP), tied input/output embeddings. They differ in
depth and width only:

| model   | layers | hidden | heads | MLP | parameters (13-token vocabulary) |
| ------- | ------ | ------ | ----- | --- | -------------------------------- |
| teacher | 3      | 64     | 4     | 256 | 0.20 M                           |
| student | 2      | 24     | 2     | 96  | 19 k                             |

Why these sizes (measured on the arrangement task, one seed, batches of 64, validity of temperature-0.8
samples on 200 unseen prompts): one-layer models do not learn it (1 × 32: 1 %, 1 × 64: 8 % after 300–400
steps); the 3 × 64 teacher reaches about 98 % within 800 steps; students of two layers learn it partly and
plateau by width: 2 × 32 at 98 % after 2000 steps, 2 × 24 at about 88 % (67 % at 1000 steps, 86 % at 1500,
88 % at 2000). The 2 × 24 student is the capacity-limited one: at its plateau it still makes the
characteristic mistakes the distillation can act on.

`save_model` writes the model and the tokenizer side by side (`config.json`, `model.safetensors`,
`tokenizer.json`, ...), so the trainer and the evaluation load them with `AutoModelForCausalLM.from_pretrained`
and `AutoTokenizer.from_pretrained`, exactly as they would a user's checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

__all__ = ["ModelSize", "TEACHER", "STUDENT", "build_model", "save_model", "num_parameters"]


@dataclass(frozen=True)
class ModelSize:
    layers: int
    hidden: int
    heads: int
    mlp: int

    def __str__(self) -> str:
        return f"{self.layers} layers x {self.hidden} hidden"


TEACHER = ModelSize(layers=3, hidden=64, heads=4, mlp=256)
STUDENT = ModelSize(layers=2, hidden=24, heads=2, mlp=96)


def build_model(
    size: ModelSize, tokenizer: PreTrainedTokenizerBase, *, seed: int, max_positions: int = 64
) -> LlamaForCausalLM:
    """A freshly initialised model of `size` over `tokenizer`'s vocabulary (initialisation seeded)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden,
        intermediate_size=size.mlp,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, path: Union[str, Path]) -> Path:
    """Write model and tokenizer to `path` (loadable with `from_pretrained`); returns the path."""
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
