"""Prompt files: JSON Lines with a `prompt` field per line, or plain text with one prompt per line.

The format is decided by the file's name, not its content: a name ending in `.jsonl` or `.json` is read as
JSON Lines (every line an object with a non-empty string `prompt`; other fields are ignored), any other name
(`prompts.txt`, `prompts`) as plain text, one prompt per non-blank line (lines are stripped of their line
ending only; the file must be UTF-8). The two mix-ups are errors, not silent misreadings: a plain-text file named `*.jsonl` fails on
its first line that is not JSON, and a file of another name whose every line is a JSON object with a string
`prompt` (JSON Lines under a plain-text name) is refused. A prompt may also be given directly as a list of
strings.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence, Union

from .jsonl import DataError, read_jsonl, read_text_lines

__all__ = ["load_prompts", "PromptSource"]

PromptSource = Union[str, os.PathLike, Sequence[str]]

JSONL_SUFFIXES = (".jsonl", ".json")


def _is_prompt_object(line: str) -> bool:
    try:
        value = json.loads(line)
    except ValueError:
        return False
    return isinstance(value, dict) and isinstance(value.get("prompt"), str)


def load_prompts(source: PromptSource) -> list[str]:
    """The prompts of a file (see the module docstring) or of a list of strings, in order."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file {path}: no such file")
        if path.suffix.lower() in JSONL_SUFFIXES:
            prompts = []
            try:
                rows = read_jsonl(path)
            except DataError as error:
                raise DataError(
                    f"{error} (a prompts file named *{path.suffix} is read as JSON Lines, one {{\"prompt\": ...}} "
                    "object per line; name a plain-text file of one prompt per line otherwise, e.g. prompts.txt)"
                ) from None
            for number, row in rows:
                prompt = row.get("prompt")
                if not isinstance(prompt, str) or not prompt.strip():
                    raise DataError(f"{path}:{number}: expected a non-empty string field 'prompt', got {prompt!r}")
                prompts.append(prompt)
        else:
            prompts = [line for _, line in read_text_lines(path) if line.strip()]
            if prompts and all(_is_prompt_object(line) for line in prompts):
                raise DataError(
                    f"{path}: every line is a JSON object with a 'prompt' field, but a prompts file is read as JSON "
                    f"Lines only when its name ends in .jsonl or .json (this one is read as plain text): rename it"
                )
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
