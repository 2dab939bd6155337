"""Fused-linear SKL / SRKL: the skew divergences from the last hidden states and the lm_head weights of
both models, without ever building their full `[N, V]` logits.

Student first. For every token (a row of the flattened leading shape) and each model::

    z = h Wᵀ + b              h: [H] hidden state, W: [V, H] lm_head weight, b: [V] optional bias
    z = c · tanh(z / c)       optional final-logit soft-cap c (Gemma-2 style), per model

then SKL_α = KL(p ‖ αp + (1−α)q) or SRKL_α = KL(q ‖ (1−α)p + αq) with q = softmax(z_s/T),
p = softmax(z_t/T), exactly as in `functional.fused_skl` / `fused_srkl`, and the same reductions.
The student's two hidden sizes may differ from the teacher's; the vocabularies must agree.

The teacher may instead be sparse (docs/design.md §8): `teacher_hidden` a `SparseTeacher` (k token ids per
token with their temperature-1 log-probabilities and the tail log-mass) and `teacher_weight=None`,
`teacher_tail` "renormalize" or "uniform"; then only the student's logits are computed (no teacher GEMM, no
`[N, V]` teacher tensor), the soft-cap applies to the student, and `sparse.py` runs the chunks.

Gradients flow to the student only. With G = ∂loss/∂z_s (rows already weighted by the reduction)::

    G ← G ⊙ (1 − tanh²(z_raw / c))       the soft-cap derivative, when capped
    ∂/∂h_s = G W_s      ∂/∂W_s = Gᵀ H_s      ∂/∂b_s = Σ_rows G

Layout (one concept per file):
    checks.py     the argument checks (`prepare_term`), on top of `_inputs` (shared with the logits ops)
    lm_head.py    one model's lm_head over chunks of rows (`LMHead`: the logits and gradient GEMMs)
    chunks.py     the chunk driver (`run_chunks`), the memory budget (`chunk_rows`)
    ops.py        the driver as the custom ops `distillm2::fused_linear_statistics` / `fused_linear_loss`
    function.py   the autograd Functions: one term (`FusedLinearSkewFunction`), the pair
                  (`FusedLinearSkewPairFunction`)
    sparse.py     the same against a sparse teacher: its chunk driver, custom ops and Functions
    api.py        the public functions

The backends are reached as by the logits ops: a concrete name resolved at call time, then
`backends.backend_module` per chunk. Under torch.compile the two ops are opaque (the count of kept rows is
known only inside them), so `fullgraph=True` traces every fused-linear op.

How it runs:
- Rows whose label is `ignore_index` are dropped before any matmul (an index_select of the kept rows; the
  one host synchronisation of the op, to learn how many rows are kept). Without labels there is none.
- The kept rows go through in chunks of `chunk_rows(V, memory_budget_bytes, ...)` rows, so that the
  chunk's `[rows, V]` temporaries, this op's and the backend's, fit the budget (a backend with
  temporaries of its own is called on sub-blocks of the chunk). Per chunk: both
  logits as float32 GEMM outputs (float32 accumulation, never rounded to bf16), the soft-cap, the loss and
  its logits gradient from the backend's `skew_forward` / `skew_backward` (Triton on CUDA, the CPU
  backend on CPU), then the chunk's hidden gradient and the float32 accumulation of the weight (and bias)
  gradient. The weight gradient is skipped when the weight does not require grad (a frozen lm_head under
  LoRA), the hidden gradient when the hidden states do not.
- Scalar reductions ("sum", "mean", "seqmean"): each row's weight in the reduction is known in the
  forward, so the forward computes the gradients as well (four GEMMs: two logits, grad hidden, grad
  weight) and the backward only multiplies them by the incoming scalar, as Liger-Kernel's fused linear
  losses do.
- reduction="none": the per-row weights arrive only in the backward, so the forward computes the losses
  (two GEMMs) and the backward recomputes each chunk's logits (four more GEMMs).

By-products for the DistiLLM-2 objective (`return_token_outputs=True`, `FusedLinearTokenOutputs`): the
per-token losses and, with labels, the label tokens' log-probabilities `[..., 2]` = (log q(y_k), log p(y_k))
(0 at ignored tokens), both without gradient. The label log-probabilities come out of the backend's sweep 1
(its stats columns `RowStat.LABEL_LOG_Q`, `RowStat.LABEL_LOG_P`), so they cost no extra pass; a scalar reduction still computes its gradients in
the forward.

When the label log-probabilities are needed *before* the loss (the adaptive α of the paper's curriculum
picks each row's α from its sequence probability, and a sequence spans chunks),
`fused_linear_token_statistics` runs a statistics-only pass: per chunk the two logits GEMMs and sweep 1,
no loss sweep, no gradient. Its `TokenStatistics` passed as `statistics=` to the loss op let that op skip
sweep 1, so the adaptive α costs two extra GEMMs over the kept rows and no extra sweep over the vocabulary.
The loss op recomputes the same logits from the same inputs; the statistics (row maxima and log-sum-exps)
only need to match them to rounding.

`fused_linear_skl_plus_srkl` runs the DistiLLM-2 pair, `c_t · SKL` on one set of rows plus `c_s · SRKL` on
another with the same lm_heads, as one op: both terms' weight (and bias) gradients share one float32
accumulator and are rounded to the parameter's dtype once, and one `[V, H_s]` gradient waits for the
backward instead of two.

Memory, beyond inputs and outputs: at most about `memory_budget_bytes` of per-chunk `[rows, V]`
temporaries (default `DEFAULT_MEMORY_BUDGET_BYTES`: 512 MiB for CUDA tensors, 64 MiB otherwise; a chunk
has at least one row); a float32 `[V, H_s]`
weight-gradient accumulator when the student weight requires grad; on the non-CUDA path (and for mixed
dtypes) float32 copies of both lm_head weights made once per call, since CPU matmuls cannot write a float32
result from bfloat16 inputs. Between forward and backward the scalar reductions hold the finished
gradients (in the inputs' dtypes); "none" holds only what it recomputes from.
"""

from .api import (
    FusedLinearSKLFunction,
    FusedLinearSRKLFunction,
    FusedLinearTokenOutputs,
    SKLPlusSRKL,
    fused_linear_skl,
    fused_linear_skl_plus_srkl,
    fused_linear_srkl,
    fused_linear_token_statistics,
)
from .checks import Softcap
from .chunks import DEFAULT_MEMORY_BUDGET_BYTES, LIVE_ROW_TENSORS, UNDECLARED_BACKEND_TEMPORARIES, chunk_rows
from .function import FusedLinearSkewFunction, FusedLinearSkewPairFunction
from .sparse import FusedLinearSparseSkewFunction, FusedLinearSparseSkewPairFunction

__all__ = [
    "fused_linear_skl",
    "fused_linear_srkl",
    "fused_linear_token_statistics",
    "fused_linear_skl_plus_srkl",
    "FusedLinearTokenOutputs",
    "SKLPlusSRKL",
    "FusedLinearSKLFunction",
    "FusedLinearSRKLFunction",
    "FusedLinearSkewFunction",
    "FusedLinearSkewPairFunction",
    "FusedLinearSparseSkewFunction",
    "FusedLinearSparseSkewPairFunction",
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "LIVE_ROW_TENSORS",
    "UNDECLARED_BACKEND_TEMPORARIES",
    "Softcap",
    "chunk_rows",
]
