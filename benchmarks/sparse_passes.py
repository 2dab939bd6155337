"""The sparse-teacher student sweeps in exp-passes: `python -m benchmarks.sparse_passes [--N 2048,256 --V 32000,151936]`.

Times each function of `backends/cpu_sparse.py` (C++) and of `backends/torch_sparse.py` (chunked PyTorch, the
spec) on bf16 student logits (3·randn, T = 1, every row counted; a uniform tail log c = log(0.1/V), α = 0.3,
row_scale 1/N, row_shift 0.5), interleaved with one `torch.exp` over a float32 [N, V] tensor as in
`cpu_passes`. Reported per (N, V, kernel): the median ms of each backend and of the exp pass, the kernels' times
in exp-passes (docs/design.md §7), and the C++ speed-up. N, V pairs are zipped. Wall clock, in-process.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from distillm2_kernels.backends import cpu_sparse, torch_sparse

from . import environment
from .cpu_passes import interleaved

LOSSES = {"skl": (False, False), "srkl": (True, False)}


def kernels(module, student: torch.Tensor) -> dict:
    """{kernel name: a call of `module` on these rows}."""
    n, v = student.shape
    lse = cpu_sparse.student_logsumexp(student, None, -100, 1.0)
    log_tail = torch.full((n,), math.log(0.1 / v))
    alpha = torch.full((n,), 0.3)
    scale, shift = torch.full((n,), 1.0 / n), torch.full((n,), 0.5)
    calls = {
        "logsumexp": lambda: module.student_logsumexp(student, None, -100, 1.0),
        "grad (no tail)": lambda: module.student_grad(student, None, -100, 1.0, lse, scale, shift, None, alpha,
                                                      False, False),
    }
    for loss, (reverse, detach) in LOSSES.items():
        calls[f"{loss} tail_sums"] = lambda r=reverse, d=detach: module.tail_sums(
            student, None, -100, 1.0, lse, log_tail, alpha, r, d)
        calls[f"{loss} grad (tail)"] = lambda r=reverse, d=detach: module.student_grad(
            student, None, -100, 1.0, lse, scale, shift, log_tail, alpha, r, d)
    return calls


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--N", default="2048,256", help="token counts, zipped with --V")
    parser.add_argument("--V", default="32000,151936", help="vocabulary sizes, zipped with --N")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if cpu_sparse.unavailable_reason() is not None:
        print(f"the C++ CPU backend is unavailable: {cpu_sparse.unavailable_reason()}", file=sys.stderr)
        return 1
    print(f"# {environment.cpu_name()}, {torch.get_num_threads()} threads, commit {environment.commit()}, "
          f"{environment.utc_now()}", flush=True)
    print(f"{'N':>5} {'V':>7} {'kernel':16} {'cpu ms':>9} {'torch ms':>9} {'exp ms':>8} {'cpu passes':>10} "
          f"{'torch passes':>12} {'speed-up':>8}")
    for n, v in zip((int(x) for x in args.N.split(",")), (int(x) for x in args.V.split(","))):
        gen = torch.Generator().manual_seed(0)
        student = torch.randn(n, v, generator=gen).mul_(3).to(torch.bfloat16)
        exp_in = torch.randn(n, v, generator=gen)
        exp_out = torch.empty_like(exp_in)

        def exp_pass() -> None:
            torch.exp(exp_in, out=exp_out)

        cpu_calls, torch_calls = kernels(cpu_sparse, student), kernels(torch_sparse, student)
        for name in cpu_calls:
            cpu_ms, exp_a = interleaved(cpu_calls[name], args.repeats, exp_pass)
            torch_ms, exp_b = interleaved(torch_calls[name], args.repeats, exp_pass)
            exp_ms = (exp_a + exp_b) / 2
            print(f"{n:5d} {v:7d} {name:16} {cpu_ms:9.1f} {torch_ms:9.1f} {exp_ms:8.1f} {cpu_ms / exp_ms:10.2f} "
                  f"{torch_ms / exp_ms:12.2f} {torch_ms / cpu_ms:8.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
