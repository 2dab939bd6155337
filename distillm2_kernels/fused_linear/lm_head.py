"""One model's lm_head over chunks of hidden rows: the logits GEMM (with bias and soft-cap) and, for the
student, the gradient GEMMs."""

from __future__ import annotations

from typing import Optional

import torch


class LMHead:
    """One model's hidden rows `[N, H]`, lm_head weight `[V, H]`, bias and soft-cap, for chunked GEMMs.

    On CUDA with float16/bfloat16 hidden states and weight of one dtype the GEMMs take them as they are and
    write float32 (`out_dtype`); otherwise the weight is converted to the compute dtype once.
    """

    def __init__(self, hidden_rows, weight, bias, softcap: Optional[float], compute_dtype: torch.dtype):
        self.hidden = hidden_rows
        self.native = (
            hidden_rows.is_cuda
            and compute_dtype == torch.float32
            and hidden_rows.dtype == weight.dtype
            and weight.dtype in (torch.float16, torch.bfloat16)
        )
        self.weight = weight if self.native else weight.to(compute_dtype)
        self.bias = None if bias is None else bias.to(compute_dtype)
        self.softcap = softcap
        self.compute_dtype = compute_dtype

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    def rows(self, start: int, end: int, kept: Optional[torch.Tensor]) -> torch.Tensor:
        """Hidden rows [start, end) of the kept rows (all rows when `kept` is None)."""
        if kept is None:
            return self.hidden[start:end]
        return self.hidden.index_select(0, kept[start:end])

    def logits(self, hidden: torch.Tensor, keep_tanh: bool):
        """(soft-capped logits `[rows, V]` in the compute dtype, tanh(z_raw / c) or None)."""
        if self.native:
            z = torch.mm(hidden, self.weight.t(), out_dtype=torch.float32)
        else:
            z = torch.mm(hidden.to(self.compute_dtype), self.weight.t())
        if self.bias is not None:
            z += self.bias
        if self.softcap is None:
            return z, None
        tanh = z.div_(self.softcap).tanh_()
        if keep_tanh:
            return tanh * self.softcap, tanh
        return tanh.mul_(self.softcap), None

    def hidden_grad(self, grad_logits: torch.Tensor) -> torch.Tensor:
        """G W for a chunk, in the hidden states' dtype."""
        if self.native:
            return torch.mm(grad_logits.to(self.weight.dtype), self.weight)
        return torch.mm(grad_logits, self.weight).to(self.hidden.dtype)

    def accumulate_weight_grad(self, accumulator: torch.Tensor, grad_logits, hidden) -> None:
        """accumulator [V, H] (compute dtype) += Gᵀ h for a chunk."""
        if self.native:
            accumulator.add_(torch.mm(grad_logits.to(hidden.dtype).t(), hidden, out_dtype=torch.float32))
        else:
            accumulator.addmm_(grad_logits.t(), hidden.to(self.compute_dtype))
