"""Prompt files: JSON Lines with a `prompt` field per line, or plain text with one prompt per line.

A file whose name ends in `.jsonl` or `.json` is read as JSON Lines (every line an object with a non-empty
string `prompt`; other fields are ignored); any other file as plain text, one prompt per non-blank line
(lines are stripped of their line ending only; the file must be UTF-8). A prompt may also be given directly as a list of strings.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

from .jsonl import DataError, read_jsonl, read_text_lines

__all__ = ["load_prompts", "PromptSource"]

PromptSource = Union[str, os.PathLike, Sequence[str]]

JSONL_SUFFIXES = (".jsonl", ".json")


def load_prompts(source: PromptSource) -> list[str]:
    """The prompts of a file (see the module docstring) or of a list of strings, in order."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file {path}: no such file")
        if path.suffix.lower() in JSONL_SUFFIXES:
            prompts = []
            for number, row in read_jsonl(path):
                prompt = row.get("prompt")
                if not isinstance(prompt, str) or not prompt.strip():
                    raise DataError(f"{path}:{number}: expected a non-empty string field 'prompt', got {prompt!r}")
                prompts.append(prompt)
        else:
            prompts = [line for _, line in read_text_lines(path) if line.strip()]
        if not prompts:
            raise DataError(f"{path}: no prompts")
        return prompts
    prompts = list(source)
    for position, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompts[{position}] must be a non-empty string, got {prompt!r}")
    if not prompts:
        raise ValueError("prompts is empty")
    return prompts
