"""The chunk driver of the fused-linear ops: both models' logits a chunk of rows at a time, through a backend.

Rows whose label is `ignore_index` are dropped before any matmul (`kept_rows`: an index_select of the kept
rows, the op's one host synchronisation, to learn how many there are; none without labels). The kept rows go
through in chunks of `chunk_rows(V, budget, ...)` rows, so that the chunk's `[rows, V]` temporaries, this
driver's and the backend's, fit the budget (a backend with temporaries of its own is called on sub-blocks of
the chunk). Per chunk: both logits as float32 GEMM outputs (float32 accumulation, never rounded to bf16),
the soft-cap, then the backend's sweeps (`statistics_only`: sweep 1; else the loss, and with `row_weights`
its logits gradient), then the chunk's hidden gradient and the float32 accumulation of the weight (and
bias) gradient.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Optional

import torch

from .._inputs import SkewRows, TokenOptions, flat_rows
from ..backends import backend_module
from ..statistics import LABEL_LOGPROBS, STATS
from .lm_head import LMHead

DEFAULT_MEMORY_BUDGET_BYTES = {"cuda": 512 * 2**20, "other": 64 * 2**20}

# [rows, V] tensors of the compute dtype this driver holds at once in a chunk: the student and teacher
# logits, the soft-cap's tanh, the logits gradient. A backend adds its own count, `ROW_TEMPORARIES` in its
# module (Triton 0, the chunked-torch fallback 18); one that does not declare it is assumed to need
# UNDECLARED_BACKEND_TEMPORARIES.
LIVE_ROW_TENSORS = 4
UNDECLARED_BACKEND_TEMPORARIES = 18


def chunk_rows(
    vocab_size: int, memory_budget_bytes: int, element_size: int = 4, backend_temporaries: int = 0
) -> tuple[int, int]:
    """(rows per GEMM chunk, rows per backend call; 0: the whole chunk) so that the `[rows, V]`
    temporaries fit the budget.

    This driver holds LIVE_ROW_TENSORS per row of a GEMM chunk; a backend that needs temporaries of its own
    is called on sub-blocks of the chunk, and then each side gets half of the budget.
    """
    if backend_temporaries == 0:
        return max(1, memory_budget_bytes // (LIVE_ROW_TENSORS * element_size * vocab_size)), 0
    half = memory_budget_bytes // 2
    gemm_rows = max(1, half // (LIVE_ROW_TENSORS * element_size * vocab_size))
    return gemm_rows, max(1, min(gemm_rows, half // (backend_temporaries * element_size * vocab_size)))


def default_memory_budget(device: torch.device) -> int:
    return DEFAULT_MEMORY_BUDGET_BYTES["cuda" if device.type == "cuda" else "other"]


def kept_rows(options: TokenOptions) -> Optional[torch.Tensor]:
    """Indices of the rows that count, or None when all do (no host sync without labels)."""
    if options.labels is None:
        return None
    return torch.nonzero(options.labels != options.ignore_index).squeeze(1)


def rows_of(per_row: Optional[torch.Tensor], start: int, end: int, index: Optional[torch.Tensor]):
    """The rows of a per-row tensor that a chunk covers (`index`: the chunk's kept rows, or None for all)."""
    if per_row is None:
        return None
    return per_row[start:end] if index is None else per_row.index_select(0, index)


def scatter_rows(out: torch.Tensor, start: int, end: int, index: Optional[torch.Tensor], values: torch.Tensor) -> None:
    """out[the chunk's rows] = values."""
    if index is None:
        out[start:end] = values
    else:
        out.index_copy_(0, index, values.to(out.dtype))


class _Block(NamedTuple):
    start: int  # within the chunk
    end: int
    rows: SkewRows


def _blocks(z_s, z_t, labels, alpha_rows, options: TokenOptions, block_rows: int) -> Iterator[_Block]:
    """The chunk's logits as the backend's rows, `block_rows` rows per call (0: one call)."""
    n = z_s.shape[0]
    step = block_rows or n
    for a in range(0, n, step):
        b = min(n, a + step)
        rows = flat_rows(
            z_s[a:b], z_t[a:b], None if labels is None else labels[a:b],
            None if alpha_rows is None else alpha_rows[a:b], options.alpha, options.ignore_index,
            options.inv_temperature,
        )
        yield _Block(a, b, rows)


class ChunkOutputs(NamedTuple):
    """What `run_chunks` gives, each `[N, ...]` with zeros at dropped rows, or None when not asked for."""

    row_losses: Optional[torch.Tensor]  # [N] compute dtype
    stats: Optional[torch.Tensor]  # [N, STATS] (statistics_only)
    label_logprobs: Optional[torch.Tensor]  # [N, 2] (want_label_logprobs)
    grad_hidden: Optional[torch.Tensor]  # [N, H_s] in the hidden states' dtype (want_hidden)


def run_chunks(
    student: LMHead,
    teacher: LMHead,
    options: TokenOptions,
    *,
    backend: str,
    budget: int,
    reverse: bool = False,
    detach: bool = False,
    statistics_only: bool = False,
    statistics: Optional[torch.Tensor] = None,
    want_loss: bool = True,
    want_label_logprobs: bool = False,
    row_weights: Optional[torch.Tensor] = None,
    want_hidden: bool = False,
    grad_weight: Optional[torch.Tensor] = None,
    grad_bias: Optional[torch.Tensor] = None,
) -> ChunkOutputs:
    """Run the chunks over the kept rows of `options` with the concrete backend `backend`.

    statistics_only: sweep 1 alone, the row statistics `[N, STATS]` (`options.labels` required).
    Otherwise the loss sweep, on `statistics` `[N, STATS]` from a statistics-only pass when given (skipping
    sweep 1); `want_label_logprobs` (needs labels) also returns the kept rows' (log q(label), log p(label)).
    Gradients need `row_weights` (∂loss/∂row loss, `[N]`): the hidden rows' when `want_hidden`, and the
    weight's / bias's added into the float accumulators `grad_weight` `[V, H_s]` / `grad_bias` `[V]` when given.
    """
    n, vocab = student.hidden.shape[0], student.vocab_size
    device, cd = student.hidden.device, student.compute_dtype
    module = backend_module(backend, cd)
    if row_weights is None:
        want_hidden, grad_weight, grad_bias = False, None, None
    want_grad = want_hidden or grad_weight is not None or grad_bias is not None
    # The backend sees the labels only for the label log-probabilities: every kept row counts.
    pass_labels = statistics_only or want_label_logprobs

    stats = torch.zeros((n, STATS), dtype=cd, device=device) if statistics_only else None
    row_losses = torch.zeros(n, dtype=cd, device=device) if want_loss and not statistics_only else None
    label_logprobs = torch.zeros((n, 2), dtype=cd, device=device) if want_label_logprobs else None
    grad_hidden = torch.zeros_like(student.hidden, memory_format=torch.contiguous_format) if want_hidden else None

    kept = kept_rows(options)
    total = n if kept is None else kept.numel()
    backend_temporaries = getattr(module, "ROW_TEMPORARIES", UNDECLARED_BACKEND_TEMPORARIES)
    step, block_rows = chunk_rows(vocab, budget, torch.finfo(cd).bits // 8, backend_temporaries)
    for start in range(0, total, step):
        end = min(total, start + step)
        index = None if kept is None else kept[start:end]
        h_s = student.rows(start, end, kept)
        z_s, tanh_s = student.logits(h_s, keep_tanh=want_grad)
        z_t, _ = teacher.logits(teacher.rows(start, end, kept), keep_tanh=False)
        labels = rows_of(options.labels, start, end, index) if pass_labels else None
        alpha_rows = rows_of(options.alpha_rows, start, end, index)
        blocks = list(_blocks(z_s, z_t, labels, alpha_rows, options, block_rows))
        if statistics_only:
            scatter_rows(stats, start, end, index, torch.cat([module.skew_statistics(b.rows) for b in blocks]).to(cd))
            continue

        chunk_stats = rows_of(statistics, start, end, index)
        losses, block_stats = [], []
        for block in blocks:
            given = None if chunk_stats is None else chunk_stats[block.start : block.end]
            loss, block_stat = module.skew_forward(block.rows, reverse, detach, given)
            losses.append(loss)
            block_stats.append(block_stat)
        if label_logprobs is not None:
            scatter_rows(label_logprobs, start, end, index, torch.cat([s[:, LABEL_LOGPROBS] for s in block_stats]))
        if row_losses is not None:
            scatter_rows(row_losses, start, end, index, losses[0] if len(losses) == 1 else torch.cat(losses))
        if not want_grad:
            continue

        weights = rows_of(row_weights, start, end, index)
        if len(blocks) == 1:
            grad_z = module.skew_backward(blocks[0].rows, reverse, detach, block_stats[0], weights)
        else:
            grad_z = torch.empty_like(z_s)
            for block, block_stat in zip(blocks, block_stats):
                grad_z[block.start : block.end] = module.skew_backward(
                    block.rows, reverse, detach, block_stat, weights[block.start : block.end]
                )
        del blocks, block_stats, z_s, z_t
        if tanh_s is not None:
            grad_z.mul_(tanh_s.square_().neg_().add_(1.0))  # d/dz c·tanh(z/c) = 1 − tanh²(z/c)
            del tanh_s
        if want_hidden:
            scatter_rows(grad_hidden, start, end, index, student.hidden_grad(grad_z))
        if grad_weight is not None:
            student.accumulate_weight_grad(grad_weight, grad_z, h_s)
        if grad_bias is not None:
            grad_bias += grad_z.sum(0)
    return ChunkOutputs(row_losses, stats, label_logprobs, grad_hidden)
