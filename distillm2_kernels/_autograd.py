"""What the package's autograd Functions share: their backward's gradients named, not counted."""

from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch


class InputGrads:
    """Maps a Function's gradients by input name to the positions of its forward's inputs.

    `GRADS = InputGrads(forward)` next to the forward; in the backward `GRADS(student_logits=grad)` is the
    tuple autograd expects, None for every input not named. `GRADS.index("x")` is x's position, for
    `ctx.needs_input_grad`.
    """

    def __init__(self, forward: Callable):
        self.names = tuple(inspect.signature(forward).parameters)[1:]  # after ctx

    def index(self, name: str) -> int:
        return self.names.index(name)

    def __call__(self, **grads: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], ...]:
        unknown = set(grads) - set(self.names)
        if unknown:
            raise TypeError(f"gradients for unknown inputs {sorted(unknown)}; the inputs are {self.names}")
        return tuple(grads.get(name) for name in self.names)
