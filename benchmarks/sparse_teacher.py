"""How much k is enough: sparse (top-k) teachers against the dense teacher, `python -m benchmarks.sparse_teacher`.

Synthetic teacher/student logit pairs with an LLM-like peakedness (below), seeded, at each V; for each k, tail
mode (`teacher_tail`: "renormalize", "uniform"), loss (SKL, SRKL at α = 0.1) and temperature T, the sparse
teacher is the dense teacher's top-k ids with their T = 1 log-probabilities and the exact log-mass of the rest
(what `distillm2 score` stores, without the label column). Reported per configuration, over the N tokens:

- `coverage_mean`, `coverage_min`: the teacher's T = 1 mass on its top-k;
- `loss_rel_err_of_mean`: (mean sparse loss − mean dense loss) / mean dense loss, signed (the bias of the
  batch loss); `loss_rel_err_token_mean`, `loss_rel_err_token_max`: |sparse − dense| / dense per token;
- `grad_cos_mean`, `grad_cos_min`: the cosine between the per-token gradients of the sparse and the dense loss
  with respect to the student's logits; `grad_rel_err_mean`: ‖g_sparse − g_dense‖ / ‖g_dense‖ per token, mean.

The dense side is always the float64 oracle (`reference.skew_kl_rows` / `skew_reverse_kl_rows`, SRKL not
detached). The sparse side (`--impl`) is either the library's public API in float64 (`fused_skl` /
`fused_srkl` with a `SparseTeacher` and `teacher_tail`, per token, gradients by autograd) or the reference math
(the sparse teacher densified, `log_softmax(densified / T)`, and the same oracle): by construction the two
agree to rounding (docs/design.md §8), so the figures measure the approximation, not rounding.

The synthetic distributions (per token, independent, seeded by (seed, row)): teacher logits
`s·spread·(−log rank) + 0.5·ε`, a Zipf law over a random permutation of the vocabulary with a per-token exponent
(`spread` = exp(0.3·ε): some tokens near-deterministic, some flat) plus a Gaussian bulk, the scale s calibrated
over the N rows so that the mean teacher entropy at T = 1 is `--entropy` nats (default 2.0; the top-1 mass
follows, ~0.55); student logits `log p + σ·ε`, σ calibrated so that the mean KL(p ‖ q) at T = 1 is `--kl`
nats (default 0.5). The pairs are held as three float64 [N, V] tensors (0.9 GiB at N = 256, V = 151936); the
losses and gradients are computed in blocks of `--block` tokens to bound the rest. Writes `results.csv` and
`results.md` (device, commit, command, date, the synthetic statistics and the table) to `--out`.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from pathlib import Path

import torch

from distillm2_kernels import reference

from . import environment
from .report.numbers import format_number, significant

DEFAULT_OUT = environment.ROOT / "benchmarks" / "results" / "sparse_teacher"
LOSSES = ("skl", "srkl")
TAILS = ("renormalize", "uniform")
ALPHA = 0.1
SPREAD = 0.3  # log-normal spread of the per-token Zipf exponent
BULK = 0.5  # standard deviation of the Gaussian bulk of the teacher's logits

CONTEXT_COLUMNS = ["date", "commit", "device_name", "torch", "library", "impl", "seed"]
STAT_COLUMNS = ["V", "N", "teacher_entropy_mean", "teacher_top1_mean", "kl_pq_mean", "teacher_scale", "student_sigma"]
CASE_COLUMNS = ["loss", "alpha", "temperature", "tail", "k"]
METRIC_COLUMNS = ["coverage_mean", "coverage_min", "loss_dense_mean", "loss_sparse_mean", "loss_rel_err_of_mean",
                  "loss_rel_err_token_mean", "loss_rel_err_token_max", "grad_cos_mean", "grad_cos_min",
                  "grad_rel_err_mean", "load_avg_1m"]
COLUMNS = CONTEXT_COLUMNS + STAT_COLUMNS + CASE_COLUMNS + METRIC_COLUMNS


def _row_generator(seed: int, row: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + row)


def synthetic_parts(seed: int, rows: range, vocab: int) -> tuple:
    """(Zipf shape −log rank · spread [B, V], Gaussian bulk [B, V], student noise [B, V]) in float64."""
    shapes, bulks, noises = [], [], []
    for row in rows:
        gen = _row_generator(seed, row)
        rank = torch.randperm(vocab, generator=gen).to(torch.float64) + 1
        spread = math.exp(SPREAD * torch.randn(1, generator=gen, dtype=torch.float64).item())
        shapes.append(-torch.log(rank) * spread)
        bulks.append(torch.randn(vocab, generator=gen, dtype=torch.float64) * BULK)
        noises.append(torch.randn(vocab, generator=gen, dtype=torch.float64))
    return torch.stack(shapes), torch.stack(bulks), torch.stack(noises)


def teacher_logits(parts: tuple, scale: float) -> torch.Tensor:
    shape, bulk, _ = parts
    return scale * shape + bulk


def student_logits(teacher: torch.Tensor, parts: tuple, sigma: float) -> torch.Tensor:
    return torch.log_softmax(teacher, dim=-1) + sigma * parts[2]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    log_p = torch.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


def kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    log_p, log_q = torch.log_softmax(teacher, dim=-1), torch.log_softmax(student, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _bisect(value_of, target: float, low: float, high: float, decreasing: bool, steps: int = 40) -> float:
    """x in [low, high] (geometric bisection) with value_of(x) ≈ target, value_of monotone."""
    for _ in range(steps):
        middle = math.sqrt(low * high)
        above = value_of(middle) > target
        if above == decreasing:
            low = middle
        else:
            high = middle
        if high / low < 1 + 1e-4:
            break
    return math.sqrt(low * high)


def calibrate(blocks: list, target_entropy: float, target_kl: float) -> tuple:
    """(teacher scale, student σ) giving the target mean entropy and mean KL(p ‖ q) over all the rows (the
    blocks of `synthetic_parts`, evaluated block by block)."""
    count = sum(parts[0].shape[0] for parts in blocks)

    def mean_entropy(scale):
        return sum(entropy(teacher_logits(parts, scale)).sum().item() for parts in blocks) / count

    def mean_kl(scale, sigma):
        total = 0.0
        for parts in blocks:
            teacher = teacher_logits(parts, scale)
            total += kl(teacher, student_logits(teacher, parts, sigma)).sum().item()
        return total / count

    scale = _bisect(mean_entropy, target_entropy, 0.05, 50.0, decreasing=True)
    sigma = _bisect(lambda g: mean_kl(scale, g), target_kl, 1e-3, 20.0, decreasing=False)
    return scale, sigma


def top_k_teacher(teacher: torch.Tensor, k: int) -> tuple:
    """(ids [B, k], T = 1 log-probabilities [B, k], log of the remaining mass [B]): the tail as the cache stores
    it, a log-sum-exp over the entries left out minus the row's, never 1 − Σ."""
    log_p = torch.log_softmax(teacher, dim=-1)
    logprobs, ids = log_p.topk(k, dim=-1)
    rest = log_p.scatter(-1, ids, float("-inf"))
    return ids, logprobs, torch.logsumexp(rest, dim=-1)


def dense_rows(loss: str, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    if loss == "skl":
        return reference.skew_kl_rows(student, teacher, ALPHA, temperature)
    return reference.skew_reverse_kl_rows(student, teacher, ALPHA, temperature)


def library_available() -> bool:
    """Whether this checkout's public `fused_skl` takes a `SparseTeacher` with `teacher_tail`."""
    import inspect

    import distillm2_kernels

    return (hasattr(distillm2_kernels, "SparseTeacher")
            and "teacher_tail" in inspect.signature(distillm2_kernels.fused_skl).parameters)


def sparse_rows(impl: str, loss: str, student: torch.Tensor, sparse: tuple, vocab: int, tail: str,
                temperature: float) -> torch.Tensor:
    ids, logprobs, tail_logprob = sparse
    if impl == "reference":
        return dense_rows(loss, student, reference.densify_sparse_teacher(ids, logprobs, vocab, tail, tail_logprob),
                          temperature)
    from distillm2_kernels import SparseTeacher, fused_skl, fused_srkl

    op = fused_skl if loss == "skl" else fused_srkl
    return op(student, SparseTeacher(ids, logprobs, tail_logprob), ALPHA, temperature=temperature,
              reduction="none", teacher_tail=tail, backend="torch")


def _loss_and_grad(rows_of, student: torch.Tensor) -> tuple:
    """(per-token loss [B], per-token gradient [B, V]): the rows are independent, so ∂Σ/∂z is per row."""
    z = student.detach().requires_grad_(True)
    loss = rows_of(z)
    (grad,) = torch.autograd.grad(loss.sum(), z)
    return loss.detach(), grad


def evaluate(vocab: int, num_rows: int, ks: list, temperatures: list, impl: str, seed: int, block: int,
             target_entropy: float, target_kl: float) -> tuple:
    """(statistics of the synthetic pairs, {(loss, T, tail, k): per-token arrays})."""
    ks = sorted({min(k, vocab) for k in ks})
    blocks = [synthetic_parts(seed, range(start, min(start + block, num_rows)), vocab)
              for start in range(0, num_rows, block)]
    scale, sigma = calibrate(blocks, target_entropy, target_kl)
    per_token, stats = {}, {"entropy": [], "top1": [], "kl": []}

    def keep(key, **values):
        for name, value in values.items():
            per_token.setdefault(key, {}).setdefault(name, []).append(value)

    for parts in blocks:
        teacher = teacher_logits(parts, scale)
        student = student_logits(teacher, parts, sigma)
        stats["entropy"].append(entropy(teacher))
        stats["top1"].append(torch.softmax(teacher, dim=-1).amax(-1))
        stats["kl"].append(kl(teacher, student))
        ids, logprobs, _ = top_k_teacher(teacher, ks[-1])
        log_p = torch.log_softmax(teacher, dim=-1)
        sparse_by_k = {}
        for k in ks:
            rest = log_p.scatter(-1, ids[:, :k], float("-inf"))
            sparse_by_k[k] = (ids[:, :k].contiguous(), logprobs[:, :k].contiguous(), torch.logsumexp(rest, dim=-1))
        for temperature in temperatures:
            for loss in LOSSES:
                dense_loss, dense_grad = _loss_and_grad(lambda z: dense_rows(loss, z, teacher, temperature), student)
                for tail in TAILS:
                    for k in ks:
                        sparse = sparse_by_k[k]
                        sparse_loss, sparse_grad = _loss_and_grad(
                            lambda z: sparse_rows(impl, loss, z, sparse, vocab, tail, temperature), student)
                        cosine = torch.nn.functional.cosine_similarity(sparse_grad, dense_grad, dim=-1)
                        grad_err = (sparse_grad - dense_grad).norm(dim=-1) / dense_grad.norm(dim=-1)
                        keep((loss, temperature, tail, k), dense=dense_loss, sparse=sparse_loss, cosine=cosine,
                             grad_err=grad_err, coverage=sparse[1].exp().sum(-1))
    stats = {name: torch.cat(values) for name, values in stats.items()}
    summary = {"V": vocab, "N": num_rows, "teacher_entropy_mean": stats["entropy"].mean().item(),
               "teacher_top1_mean": stats["top1"].mean().item(), "kl_pq_mean": stats["kl"].mean().item(),
               "teacher_scale": scale, "student_sigma": sigma}
    return summary, {key: {name: torch.cat(values) for name, values in arrays.items()}
                     for key, arrays in per_token.items()}


def metrics(arrays: dict) -> dict:
    dense, sparse = arrays["dense"], arrays["sparse"]
    token_err = (sparse - dense).abs() / dense.abs()
    return {
        "coverage_mean": arrays["coverage"].mean().item(), "coverage_min": arrays["coverage"].min().item(),
        "loss_dense_mean": dense.mean().item(), "loss_sparse_mean": sparse.mean().item(),
        "loss_rel_err_of_mean": ((sparse.mean() - dense.mean()) / dense.mean()).item(),
        "loss_rel_err_token_mean": token_err.mean().item(), "loss_rel_err_token_max": token_err.max().item(),
        "grad_cos_mean": arrays["cosine"].mean().item(), "grad_cos_min": arrays["cosine"].min().item(),
        "grad_rel_err_mean": arrays["grad_err"].mean().item(),
    }


def _rounded(value):
    return significant(value, 4) if isinstance(value, float) and math.isfinite(value) else value


TABLE = [("V", "V"), ("loss", "loss"), ("temperature", "T"), ("tail", "tail"), ("k", "k"),
         ("coverage_mean", "top-k mass"), ("loss_rel_err_of_mean", "rel. err. of mean loss"),
         ("loss_rel_err_token_mean", "per-token |rel. err.|"), ("grad_cos_mean", "grad cos (mean)"),
         ("grad_cos_min", "grad cos (min)"), ("grad_rel_err_mean", "grad rel. err.")]


def table_lines(rows: list, markdown: bool) -> list:
    header = [label for _, label in TABLE]
    cells = [[format_number(row[column]) for column, _ in TABLE] for row in rows]
    if markdown:
        return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
            "| " + " | ".join(line) + " |" for line in cells]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    return ["  ".join(h.rjust(w) for h, w in zip(header, widths))] + [
        "  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells]


def _percent(value: float) -> str:
    if abs(value) >= 0.995:
        return f"{100 * value:+.0f} %"
    return f"{100 * value:+.2g} %" if abs(value) >= 5e-5 else "0 %"


def summary_lines(rows: list, temperature: float) -> list:
    """The markdown summary at one temperature: per (V, k), the top-k mass and, per loss and tail, the relative
    error of the mean loss and the mean gradient cosine."""
    columns = [(loss, tail) for loss in LOSSES for tail in TAILS]
    lines = ["| V | k | top-k mass | " + " | ".join(f"{loss.upper()} {tail}" for loss, tail in columns) + " |",
             "|---|---|---|" + "---|" * len(columns)]
    by_case = {(r["V"], r["k"], r["loss"], r["tail"]): r for r in rows if r["temperature"] == temperature}
    for vocab, k in sorted({(v, k) for v, k, _, _ in by_case}):
        cells = [by_case[vocab, k, loss, tail] for loss, tail in columns]
        lines.append(f"| {vocab} | {k} | {cells[0]['coverage_mean']:.3f} | " + " | ".join(
            f"{_percent(c['loss_rel_err_of_mean'])} / {c['grad_cos_mean']:.3f}" for c in cells) + " |")
    return lines


def write_markdown(rows: list, summaries: list, path: Path, context: dict, command: str, elapsed_s: float) -> Path:
    impl_text = ("the library's public API: `fused_skl` / `fused_srkl` (float64 student, torch backend) with a "
                 "`SparseTeacher` and `teacher_tail`" if context["impl"] == "library" else
                 "the reference math: the sparse teacher densified and the float64 oracle (the library's "
                 "sparse ops compute the same function)")
    lines = [
        "# Sparse teachers: how much k is enough",
        "",
        f"Command (from the repository root): `{command}`; {elapsed_s / 60:.1f} minutes. Raw rows: "
        "[`results.csv`](results.csv) (the columns are described in `benchmarks/sparse_teacher.py`).",
        "",
        f"- date {context['date']}, commit `{context['commit']}`, distillm2_kernels {context['library']}, "
        f"torch {context['torch']}, {context['device_name']}",
        f"- sparse side: {impl_text}; dense side: the float64 oracle with the dense teacher",
        f"- α = {ALPHA}; SRKL not detached; seed {context['seed']}; no labels (the cache's label column is left out)",
        "",
        "## The synthetic pairs",
        "",
        "| V | N | teacher entropy (mean, nats) | teacher top-1 mass (mean) | KL(p ‖ q) (mean, nats) |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {s['V']} | {s['N']} | {s['teacher_entropy_mean']:.3g} | {s['teacher_top1_mean']:.3g} | "
              f"{s['kl_pq_mean']:.3g} |" for s in summaries]
    lines += ["", "Teacher logits: a Zipf law over a random permutation of the vocabulary, a per-token exponent "
              "(log-normal spread 0.3), plus a Gaussian bulk (σ = 0.5), scaled to the target mean entropy; "
              "student logits: the teacher's log-probabilities plus Gaussian noise scaled to the target mean "
              "KL(p ‖ q), both at T = 1.", ""]
    for temperature in sorted({r["temperature"] for r in rows}):
        lines += [f"## Summary at T = {format_number(temperature)}", "",
                  "Per cell: the relative error of the mean loss (sparse − dense, signed) / the mean cosine between "
                  "the sparse and the dense loss's gradients with respect to the student's logits.", ""]
        lines += summary_lines(rows, temperature) + [""]
    lines += ["## Sparse against dense", ""]
    lines += table_lines(rows, markdown=True)
    lines += [
        "",
        "## How to read this",
        "",
        "- top-k mass: the teacher's T = 1 probability on its top-k tokens, mean over the tokens.",
        "- rel. err. of mean loss: (mean sparse loss − mean dense loss) / mean dense loss, signed: the bias of "
        "the batch loss. per-token |rel. err.|: the mean over tokens of |sparse − dense| / dense.",
        "- grad cos: the cosine between a token's gradients of the sparse and the dense loss with respect to the "
        "student's logits (mean and minimum over the tokens); grad rel. err.: ‖g_sparse − g_dense‖ / ‖g_dense‖, "
        "mean over the tokens.",
        "- renormalize: the teacher restricted to its top-k; uniform: the stored tail mass spread evenly over the "
        "other V − k tokens. At T ≠ 1 the sparse teacher is the T = 1 one tempered (`log_softmax(densified / T)`).",
    ]
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sparse_teacher", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--V", default="32000,151936", help="vocabulary sizes (comma-separated)")
    parser.add_argument("--N", type=int, default=256, help="tokens per vocabulary size")
    parser.add_argument("--k", default="8,32,128,512", help="support sizes (comma-separated; clamped to V)")
    parser.add_argument("--T", default="1,2", help="temperatures (comma-separated)")
    parser.add_argument("--impl", choices=("auto", "library", "reference"), default="auto",
                        help="the sparse side: the library's API, the reference math, or (auto) the library's "
                             "API where it takes a SparseTeacher")
    parser.add_argument("--entropy", type=float, default=2.0, help="target mean teacher entropy at T = 1, nats")
    parser.add_argument("--kl", type=float, default=0.5, help="target mean KL(p ‖ q) at T = 1, nats")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--block", type=int, default=32, help="tokens per block (bounds memory)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    args = parser.parse_args(argv)
    args.vocabularies = [int(v) for v in args.V.split(",")]
    args.ks = [int(k) for k in args.k.split(",")]
    args.temperatures = [float(t) for t in args.T.split(",")]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    impl = args.impl if args.impl != "auto" else ("library" if library_available() else "reference")
    if impl == "library" and not library_available():
        print("--impl library: this checkout's fused_skl does not take a SparseTeacher", file=sys.stderr)
        return 2
    described = environment.describe(torch.device("cpu"))
    context = {"date": environment.utc_now(), "commit": environment.commit(), "device_name": described["device_name"],
               "torch": described["torch"], "library": described["library"], "impl": impl, "seed": args.seed}
    command = "python -m benchmarks.sparse_teacher" + ("" if argv is None and len(sys.argv) <= 1 else " " + " ".join(
        sys.argv[1:] if argv is None else argv))
    print(f"# sparse teachers against dense, {impl}; {context['device_name']}; commit {context['commit']}, "
          f"{context['date']}", flush=True)
    started = time.time()
    rows, summaries = [], []
    for vocab in args.vocabularies:
        summary, per_token = evaluate(vocab, args.N, args.ks, args.temperatures, impl, args.seed, args.block,
                                      args.entropy, args.kl)
        summaries.append(summary)
        print(f"# V={vocab} N={args.N}: teacher entropy {summary['teacher_entropy_mean']:.3f} nats, top-1 "
              f"{summary['teacher_top1_mean']:.3f}, KL(p‖q) {summary['kl_pq_mean']:.3f} nats "
              f"({time.time() - started:.0f} s)", flush=True)
        for (loss, temperature, tail, k), arrays in per_token.items():
            row = {**context, **summary, "loss": loss, "alpha": ALPHA, "temperature": temperature, "tail": tail,
                   "k": k, **metrics(arrays), "load_avg_1m": round(os.getloadavg()[0], 2)}
            rows.append({column: _rounded(row[column]) for column in COLUMNS})
    rows.sort(key=lambda r: (r["V"], r["temperature"], r["loss"], r["tail"], r["k"]))
    print("\n".join(table_lines(rows, markdown=False)))
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    md = write_markdown(rows, summaries, args.out / "results.md", context, command, time.time() - started)
    print(f"\n# {len(rows)} rows in {time.time() - started:.0f} s; wrote {args.out / 'results.csv'}, {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
