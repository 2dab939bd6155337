"""A short demonstration on the CPU: `python -m distillm2_kernels.demo [--tokens N] [--vocab V]`.

Builds bf16 student and teacher logits `[B, T, V]` with prompt tokens masked (−100), then for SKL and for
SRKL (detached mixture, as the released DistiLLM-2 code does):
  1. the loss of `fused_skl` / `fused_srkl` and of the float64 oracle,
  2. the gradient's agreement with the oracle,
  3. fwd+bwd time and peak resident memory against the naive PyTorch code of the released trainer.
"""

from __future__ import annotations

import argparse

import torch

from . import fused_skl, fused_srkl, reference
from .measure import CpuProbe, measure, peak_rss_in_subprocess
from .backends import resolve_backend_name


def make_batch(batch: int, seq: int, vocab: int, seed: int = 0):
    """bf16 logits (teacher correlated with the student) and labels with the first quarter masked."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, seq, vocab, generator=gen, dtype=torch.bfloat16) * 2
    teacher = student + torch.randn(batch, seq, vocab, generator=gen, dtype=torch.bfloat16) * 2
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[:, : seq // 4] = -100
    return student, teacher, labels


def _fused_step(op: str, student, teacher, labels) -> None:
    student = student.detach().requires_grad_(True)
    if op == "SKL":
        loss = fused_skl(student, teacher, 0.1, labels=labels, reduction="seqmean")
    else:
        loss = fused_srkl(student, teacher, 0.1, labels=labels, reduction="seqmean", detach_mixture=True)
    loss.backward()


def _naive_step(op: str, student, teacher, labels) -> None:
    student = student.detach().requires_grad_(True)
    naive = reference.naive_skl if op == "SKL" else reference.naive_srkl
    naive(student, teacher, labels, 0.1).backward()


def _setup(batch, seq, vocab):
    return make_batch(batch, seq, vocab)


def _run_fused_skl(state):
    _fused_step("SKL", *state)


def _run_fused_srkl(state):
    _fused_step("SRKL", *state)


def _run_naive_skl(state):
    _naive_step("SKL", *state)


def _run_naive_srkl(state):
    _naive_step("SRKL", *state)


_RUNNERS = {
    ("SKL", "fused"): _run_fused_skl,
    ("SRKL", "fused"): _run_fused_srkl,
    ("SKL", "naive"): _run_naive_skl,
    ("SRKL", "naive"): _run_naive_srkl,
}


def _oracle(op: str, student, teacher, labels):
    s64 = student.double().requires_grad_(True)
    if op == "SKL":
        loss = reference.skl_reference(s64, teacher.double(), 0.1, labels=labels, reduction="seqmean")
    else:
        loss = reference.srkl_reference(
            s64, teacher.double(), 0.1, labels=labels, reduction="seqmean", detach_mixture=True
        )
    loss.backward()
    return loss.detach(), s64.grad


def _fused(op: str, student, teacher, labels):
    s = student.detach().requires_grad_(True)
    fn = fused_skl if op == "SKL" else fused_srkl
    kwargs = {} if op == "SKL" else {"detach_mixture": True}
    loss = fn(s, teacher, 0.1, labels=labels, reduction="seqmean", **kwargs)
    loss.backward()
    return loss.detach(), s.grad


def _median_seconds(step, repeats: int) -> float:
    return measure(step, zero_grad=lambda: None, probe=CpuProbe(), warmup=1, repeats=repeats).median_s


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    student, teacher, labels = make_batch(args.batch, args.seq, args.vocab)
    backend = resolve_backend_name("auto", student.device)
    tokens = args.batch * args.seq
    input_mb = 2 * student.numel() * student.element_size() / 2**20
    print(
        f"distillm2_kernels demo: B={args.batch} T={args.seq} V={args.vocab} bf16 ({tokens} tokens, "
        f"{input_mb:.0f} MiB of logits), α=0.1, reduction='seqmean', CPU backend '{backend}', "
        f"{torch.get_num_threads()} threads\n"
    )
    header = (
        f"{'loss':<5} {'fused':>10} {'oracle f64':>11} {'|Δloss|':>9} {'max|Δgrad|/max|grad|':>21} "
        f"{'fused ms':>9} {'naive ms':>9} {'speed-up':>8} {'fused MiB':>10} {'naive MiB':>10}"
    )
    print(header)
    print("-" * len(header))
    for op in ("SKL", "SRKL"):
        loss, grad = _fused(op, student, teacher, labels)
        loss64, grad64 = _oracle(op, student, teacher, labels)
        grad_err = (grad.double() - grad64).abs().max() / grad64.abs().max()
        fused_s = _median_seconds(lambda: _fused_step(op, student, teacher, labels), args.repeats)
        naive_s = _median_seconds(lambda: _naive_step(op, student, teacher, labels), args.repeats)
        sizes = (args.batch, args.seq, args.vocab)
        fused_mem, _ = peak_rss_in_subprocess(_setup, _RUNNERS[(op, "fused")], *sizes)
        naive_mem, _ = peak_rss_in_subprocess(_setup, _RUNNERS[(op, "naive")], *sizes)
        print(
            f"{op:<5} {loss.item():>10.6f} {loss64.item():>11.6f} {abs(loss.double() - loss64).item():>9.2e} "
            f"{grad_err.item():>21.2e} {fused_s * 1e3:>9.1f} {naive_s * 1e3:>9.1f} {naive_s / fused_s:>7.1f}x "
            f"{fused_mem / 2**20:>10.0f} {naive_mem / 2**20:>10.0f}"
        )
    print(
        "\nfused/naive ms: median wall-clock fwd+bwd; MiB: peak resident memory added by one fwd+bwd, "
        "each measured in its own process.\nThe gradient is bf16 (the input dtype): a relative error near "
        "2^-9 ≈ 2e-3 is its rounding."
    )


if __name__ == "__main__":
    main()
