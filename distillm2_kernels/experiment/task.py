"""The synthetic task: arrange a multiset of letters so that no two equal letters touch.

A prompt is a multiset of `min_length`…`max_length` letters from `letters` (default `a`…`h`), written
sorted (`"aabcc"`); a valid answer is any arrangement of exactly those letters with no two equal letters
side by side (`"acabc"`, `"cabac"`, …). An answer is checked exactly: same letters with the same counts,
and no adjacent pair equal (`ArrangeTask.is_valid`).

Why this task (the experiment needs one where matching the teacher's distribution matters, not only its argmax):
- many valid answers per prompt (`count_valid`: from 1 to 40 320 here, 120 at the median, 12 for `"aabbc"`), so the
  teacher's distribution carries information beyond its argmax, and how many different valid answers a
  model samples (coverage) is measurable;
- a small model's characteristic mistakes are of two kinds the teacher gives low probability: dropping,
  repeating or inventing a letter (the counts must be tracked over the prompt and the answer so far), and
  placing a letter next to itself;
- prompts are plentiful (10 775 multisets of 5–8 letters that admit an arrangement), so held-out prompts are
  genuinely unseen.

The reference answers used to train the teacher are drawn uniformly from a prompt's valid arrangements
(`sample_valid`, exact: by the counts of completions, not by rejection), so a perfect teacher would be
uniform over them. The split is drawn from one seeded shuffle of the distinct prompts, so train and
held-out never share a prompt and the same seed always gives the same split.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from itertools import combinations_with_replacement
from typing import List, Optional, Tuple

__all__ = ["Example", "ArrangeTask", "Split"]


@dataclass(frozen=True)
class Example:
    prompt: str  # the user turn, e.g. "aabcc"
    answer: str  # one valid assistant turn, e.g. "cabac"


@dataclass(frozen=True)
class Split:
    train: List[Example]  # `answers_per_prompt` examples for each training prompt, prompts in split order
    heldout: List[Example]  # one example per held-out prompt
    train_prompts: List[str]
    heldout_prompts: List[str]


@lru_cache(maxsize=None)
def _completions(counts: Tuple[int, ...], last: int) -> int:
    """Arrangements of the letters left (`counts[i]` of letter i) whose first letter is not `last`."""
    if not any(counts):
        return 1
    total = 0
    for i, c in enumerate(counts):
        if c and i != last:
            total += _completions(counts[:i] + (c - 1,) + counts[i + 1 :], i)
    return total


@dataclass(frozen=True)
class ArrangeTask:
    """Arrange the letters of the prompt so that no two equal letters are adjacent."""

    letters: str = "abcdefgh"
    min_length: int = 5
    max_length: int = 8

    def __post_init__(self):
        if len(set(self.letters)) != len(self.letters) or not self.letters.isalpha() or not self.letters.islower():
            raise ValueError(f"letters must be distinct lower-case letters, got {self.letters!r}")
        if not 2 <= self.min_length <= self.max_length:
            raise ValueError(f"need 2 <= min_length <= max_length, got {self.min_length}, {self.max_length}")

    @property
    def alphabet(self) -> str:
        """Every character a prompt or an answer can contain."""
        return self.letters

    def _counts(self, text: str) -> Optional[Tuple[int, ...]]:
        counter = Counter(text)
        if set(counter) - set(self.letters):
            return None
        return tuple(counter[c] for c in self.letters)

    def is_prompt(self, prompt: str) -> bool:
        return (
            self.min_length <= len(prompt) <= self.max_length
            and prompt == "".join(sorted(prompt))
            and self._counts(prompt) is not None
            and self.count_valid(prompt) > 0
        )

    def count_valid(self, prompt: str) -> int:
        """The number of valid answers of `prompt` (0 when one letter fills more than half of it)."""
        counts = self._counts(prompt)
        if counts is None:
            raise ValueError(f"not a prompt of letters {self.letters!r}: {prompt!r}")
        return _completions(counts, -1)

    def is_valid(self, prompt: str, response: str) -> bool:
        """The response (surrounding whitespace ignored) uses exactly the prompt's letters, no two equal
        letters adjacent."""
        response = response.strip()
        return (
            sorted(response) == sorted(prompt)
            and len(response) > 0
            and all(a != b for a, b in zip(response, response[1:]))
        )

    def error_kind(self, prompt: str, response: str) -> str:
        """"valid", "letters" (wrong multiset: a letter dropped, repeated or invented) or "adjacent"."""
        response = response.strip()
        if sorted(response) != sorted(prompt) or not response:
            return "letters"
        return "valid" if self.is_valid(prompt, response) else "adjacent"

    def sample_valid(self, prompt: str, rng: random.Random) -> str:
        """A valid answer drawn uniformly from all of the prompt's valid answers."""
        counts = self._counts(prompt)
        if counts is None or _completions(counts, -1) == 0:
            raise ValueError(f"{prompt!r} has no valid arrangement")
        out, last = [], -1
        while any(counts):
            options = [i for i, c in enumerate(counts) if c and i != last]
            weights = [_completions(counts[:i] + (counts[i] - 1,) + counts[i + 1 :], i) for i in options]
            last = rng.choices(options, weights)[0]
            counts = counts[:last] + (counts[last] - 1,) + counts[last + 1 :]
            out.append(self.letters[last])
        return "".join(out)

    def all_prompts(self) -> List[str]:
        """Every prompt (sorted multiset with at least one valid answer), in a fixed order."""
        return [
            "".join(combo)
            for length in range(self.min_length, self.max_length + 1)
            for combo in combinations_with_replacement(self.letters, length)
            if _completions(self._counts("".join(combo)), -1) > 0
        ]

    def split(self, num_train: int, num_heldout: int, *, answers_per_prompt: int = 1, seed: int = 0) -> Split:
        """`num_train` training and `num_heldout` held-out prompts (distinct, disjoint, deterministic in
        `seed`); each training prompt comes with `answers_per_prompt` answers drawn uniformly (with
        replacement) from its valid ones, each held-out prompt with one."""
        if num_train < 0 or num_heldout < 0 or answers_per_prompt < 1:
            raise ValueError("num_train and num_heldout must be >= 0, answers_per_prompt >= 1")
        prompts = self.all_prompts()
        if num_train + num_heldout > len(prompts):
            raise ValueError(f"asked for {num_train + num_heldout} distinct prompts; the task has {len(prompts)}")
        rng = random.Random(seed)
        chosen = rng.sample(prompts, num_train + num_heldout)
        train_prompts, heldout_prompts = chosen[:num_train], chosen[num_train:]
        train = [Example(p, self.sample_valid(p, rng)) for p in train_prompts for _ in range(answers_per_prompt)]
        heldout = [Example(p, self.sample_valid(p, rng)) for p in heldout_prompts]
        return Split(train, heldout, train_prompts, heldout_prompts)
