"""Tiny Llama- and Qwen2-style causal LMs and a character-level chat tokenizer, saved to local folders.

Built from configs (no hub access) and saved with `save_pretrained`, so the trainer loads them through
`from_pretrained` as users do. The tokenizer is a `tokenizers` WordLevel model over single characters (the
printable ASCII set) plus `<pad>`, `<s>`, `</s>` (EOS), `<unk>` and chat markers; its chat template renders
`<|role|>content</s>` per message and `<|assistant|>` as the generation prompt.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
PROMPTS = [
    "What is 2+3?", "Name a colour.", "Say hi.", "Count to four.", "Spell cat.", "Is ice cold?",
    "Add 1 and 1.", "Pick a letter.",
]


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    characters = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocabulary = {token: i for i, token in enumerate(SPECIAL_TOKENS + characters)}
    backend = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def model_config(family: str, hidden: int, vocab_size: int, max_position_embeddings: int = 256):
    import transformers

    common = dict(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=max_position_embeddings, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    if family == "llama":
        return transformers.LlamaConfig(**common, tie_word_embeddings=False)
    if family == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=True)
    raise ValueError(family)


def save_tiny_model(
    folder: Path, family: str, hidden: int, *, vocab_padding: int = 0, seed: int = 0, max_position_embeddings: int = 256
) -> Path:
    """A randomly initialised tiny model and the tokenizer in `folder` (vocab_padding: extra lm_head rows;
    max_position_embeddings: the context length)."""
    import transformers

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(model_config(family, hidden, len(tokenizer) + vocab_padding,
                                                                           max_position_embeddings))
    with torch.no_grad():  # livelier distributions than the tiny init gives
        model.get_output_embeddings().weight.mul_(8.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_teacher_and_student(root: Path, family: str = "llama") -> tuple[Path, Path]:
    """(teacher, student) folders: the teacher wider (48 vs 32) with 8 padded lm_head rows."""
    teacher = save_tiny_model(root / f"{family}-teacher", family, 48, vocab_padding=8, seed=1)
    student = save_tiny_model(root / f"{family}-student", family, 32, seed=2)
    return teacher, student


def write_prompts(path: Path, prompts=PROMPTS) -> Path:
    import json

    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path
