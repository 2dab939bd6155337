"""A character-level tokenizer with a chat template, as a regular Hugging Face fast tokenizer.

Every character of the task's alphabet is one token; four special tokens frame the conversation:
`<|user|>` and `<|assistant|>` open the turns, `<|eos|>` ends an assistant turn (and generation), `<|pad|>`
pads batches. The chat template renders

    [{"role": "user", "content": "aabcc"}, {"role": "assistant", "content": "acabc"}]
    →  "<|user|>aabcc<|assistant|>acabc<|eos|>"

and, with `add_generation_prompt=True` after a user turn, ends with `<|assistant|>`, so the rendered prompt is
a prefix of the rendered conversation (what trainers that split prompt from response by prefix expect).
The tokenizer is built with the `tokenizers` library, wrapped in `PreTrainedTokenizerFast`, written with
`save_pretrained` and read back with `AutoTokenizer.from_pretrained`, like any user's tokenizer.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

__all__ = ["SPECIAL_TOKENS", "CHAT_TEMPLATE", "build_tokenizer"]

USER, ASSISTANT, EOS, PAD, UNK = "<|user|>", "<|assistant|>", "<|eos|>", "<|pad|>", "<|unk|>"
SPECIAL_TOKENS = [PAD, EOS, USER, ASSISTANT, UNK]  # ids 0..4, in this order

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}" + USER + "{{ message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}" + ASSISTANT + "{{ message['content'] }}" + EOS + ""
    "{%- else -%}{{ raise_exception('only user and assistant turns are supported, got ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}" + ASSISTANT + "{%- endif -%}"
)


def build_tokenizer(alphabet: str) -> PreTrainedTokenizerFast:
    """One token per character of `alphabet` (plus the special tokens); unknown characters map to `<|unk|>`."""
    characters = sorted(set(alphabet))
    if not characters:
        raise ValueError("the alphabet is empty")
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({c: len(SPECIAL_TOKENS) + i for i, c in enumerate(characters)})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # every character a word
    core.decoder = decoders.Fuse()  # join the characters back without separators
    core.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[USER, ASSISTANT],
        chat_template=CHAT_TEMPLATE,
        padding_side="left",  # batched generation appends on the right
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
