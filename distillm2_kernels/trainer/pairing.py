"""Joining teacher and student responses into DistiLLM-2 training pairs.

`pair(teacher_path, student_path, output_path)` reads two files written by `generate` (or any JSON Lines
with string fields `prompt` and `response`), joins them on the prompt text, and writes one row per prompt
present on both sides, in the teacher file's order::

    {"prompt": p,
     "chosen":   [{"role": "user", "content": p}, {"role": "assistant", "content": <teacher response>}],
     "rejected": [{"role": "user", "content": p}, {"role": "assistant", "content": <student response>}]}

This is the released DistiLLM-2 data format ("chosen" = the teacher's response y_t, "rejected" = the
student's y_s). A prompt that occurs k times on one side is joined occurrence by occurrence. Rows present
on one side only are not paired: they are counted and listed in the returned `PairReport` (and printed by
the command line), and `strict=True` makes any of them an error.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from .jsonl import DataError, check_writable_file, read_jsonl, remove_stale_temporaries, write_jsonl_atomic

__all__ = ["pair", "PairReport", "pair_row"]

PathLike = Union[str, os.PathLike]


@dataclass
class PairReport:
    output_path: Path
    num_pairs: int
    missing_student: list[str] = field(default_factory=list)  # prompts with a teacher row and no student row
    missing_teacher: list[str] = field(default_factory=list)  # prompts with a student row and no teacher row

    @property
    def complete(self) -> bool:
        return not self.missing_student and not self.missing_teacher

    def summary(self, show: int = 3) -> str:
        """What `pair` wrote, and the prompts it could not pair."""
        return "\n".join([f"{self.num_pairs} pairs written to {self.output_path}"] + self._missing_lines(show))

    def _missing_lines(self, show: int = 3) -> list[str]:
        lines = []
        for side, missing in (("student", self.missing_student), ("teacher", self.missing_teacher)):
            if missing:
                examples = "; ".join(repr(p[:60]) for p in missing[:show])
                more = f" (and {len(missing) - show} more)" if len(missing) > show else ""
                lines.append(f"{len(missing)} prompt(s) have no {side} response and were not paired: {examples}{more}")
        return lines

    def strict_error(self) -> str:
        """The error of `strict=True`: nothing was written."""
        return "\n".join(
            [f"not every prompt has both responses (strict): nothing written to {self.output_path}, "
             f"{self.num_pairs} pairs were possible"] + self._missing_lines()
        )


def pair_row(prompt: str, teacher_response: str, student_response: str) -> dict:
    """One training row in the released DistiLLM-2 format."""
    user = {"role": "user", "content": prompt}
    return {
        "prompt": prompt,
        "chosen": [user, {"role": "assistant", "content": teacher_response}],
        "rejected": [dict(user), {"role": "assistant", "content": student_response}],
    }


def _responses(path: Path) -> list[tuple[str, str]]:
    rows = []
    for number, row in read_jsonl(path):
        prompt, response = row.get("prompt"), row.get("response")
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise DataError(f"{path}:{number}: expected string fields 'prompt' and 'response'")
        rows.append((prompt, response))
    return rows


def pair(teacher_path: PathLike, student_path: PathLike, output_path: PathLike, *, strict: bool = False) -> PairReport:
    """Join the teacher's and the student's responses on the prompt into `output_path` (see the module
    docstring). Returns a `PairReport`; with `strict=True` a prompt missing on either side raises ValueError."""
    check_writable_file(output_path)
    remove_stale_temporaries(output_path)
    teacher_rows, student_rows = _responses(Path(teacher_path)), _responses(Path(student_path))
    student_by_prompt = defaultdict(list)
    for prompt, response in student_rows:
        student_by_prompt[prompt].append(response)
    pairs, missing_student = [], []
    for prompt, teacher_response in teacher_rows:
        queue = student_by_prompt.get(prompt)
        if queue:
            pairs.append(pair_row(prompt, teacher_response, queue.pop(0)))
        else:
            missing_student.append(prompt)
    missing_teacher = [prompt for prompt, left in student_by_prompt.items() for _ in left]
    report = PairReport(Path(output_path), len(pairs), missing_student, missing_teacher)
    if strict and not report.complete:
        raise ValueError(report.strict_error())
    write_jsonl_atomic(output_path, pairs)
    return report
