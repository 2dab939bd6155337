"""The synthetic task: multi-digit addition, with answers that can be checked exactly.

A prompt is `"a+b"` with `a` and `b` drawn uniformly from `[0, 10**digits)` and written with `digits` digits
(zero-padded); the answer is the plain decimal sum, most significant digit first (`"437+085"` → `"522"`).
With `digits=3` there are 10⁶ distinct prompts, so a few thousand training prompts leave the held-out ones
genuinely unseen: a model has to learn the carry rule, not memorise a table.

Why zero-padded operands: they put the digits of equal weight at fixed positions, which small models find
much faster. Measured (2 layers × 64 hidden, 1000 steps of 64 examples, same seed): 44 % held-out accuracy
with padded operands, 0 % without; the 4 × 128 teacher reached 95–98 % in 1200 steps with them. (Writing the
answer least-significant digit first, a common trick, did worse here with unpadded operands: 0 % after 800
teacher steps.) The split is drawn from one seeded shuffle of distinct prompts, so train and held-out
never share a prompt and the same seed always gives the same split.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import List

__all__ = ["Example", "AdditionTask", "Split"]

_PROMPT = re.compile(r"^(\d+)\+(\d+)$")


@dataclass(frozen=True)
class Example:
    prompt: str  # the user turn, e.g. "437+085"
    answer: str  # the reference assistant turn, e.g. "522"


@dataclass(frozen=True)
class Split:
    train: List[Example]
    heldout: List[Example]


@dataclass(frozen=True)
class AdditionTask:
    """`a+b` with `a, b` uniform in `[0, 10**digits)`."""

    digits: int = 3

    def __post_init__(self):
        if self.digits < 1:
            raise ValueError(f"digits must be >= 1, got {self.digits}")

    @property
    def num_prompts(self) -> int:
        return (10**self.digits) ** 2

    @property
    def alphabet(self) -> str:
        """Every character a prompt or an answer can contain."""
        return "0123456789+"

    def example(self, a: int, b: int) -> Example:
        return Example(f"{a:0{self.digits}d}+{b:0{self.digits}d}", str(a + b))

    def answer(self, prompt: str) -> str:
        """The reference answer of an addition prompt (padded or not); `ValueError` for anything else."""
        match = _PROMPT.match(prompt.strip())
        if match is None:
            raise ValueError(f"not an addition prompt: {prompt!r}")
        return str(int(match.group(1)) + int(match.group(2)))

    def is_correct(self, prompt: str, response: str) -> bool:
        """Exact match of the response (surrounding whitespace ignored) with the reference answer."""
        return response.strip() == self.answer(prompt)

    def split(self, num_train: int, num_heldout: int, *, seed: int = 0) -> Split:
        """`num_train` training and `num_heldout` held-out examples: distinct prompts, no prompt in both,
        deterministic in `seed`."""
        total = num_train + num_heldout
        if num_train < 0 or num_heldout < 0:
            raise ValueError("num_train and num_heldout must be >= 0")
        if total > self.num_prompts:
            raise ValueError(f"asked for {total} distinct prompts; {self.digits}-digit addition has {self.num_prompts}")
        rng = random.Random(seed)
        side = 10**self.digits
        # distinct (a, b) pairs, in the order drawn: a seeded sample without replacement from all pairs
        codes = rng.sample(range(side * side), total)
        examples = [self.example(code // side, code % side) for code in codes]
        return Split(train=examples[:num_train], heldout=examples[num_train:])

