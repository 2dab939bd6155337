"""A DistiLLM-2 training step with the teacher model against the same step with a teacher cache,
`python -m benchmarks.teacher_cache_step`.

Tiny synthetic Llama models (random weights, seeded): a teacher of `--teacher-layers` × `--teacher-hidden` and a
student of `--student-layers` × `--student-hidden`, both with vocabulary `--vocab`; a batch of `--pairs` pairs of
`--tokens` tokens (a `--prompt`-token prompt, then the response), chosen and rejected sides. The cache holds the
teacher's top-`--k` entries (plus the label) and tail log-mass of every response token, computed beforehand with
`trainer.scoring.sparse_rows` (what `distillm2 score --engine hf` stores) and written with `CacheWriter`; at
training time it is read back memory-mapped through `TeacherCache.sparse_teacher`, as `train --teacher-cache`
does. Variants (`--variants`):

- `teacher-fused-linear`: today's trainer step: the teacher's decoder under `no_grad`, the objective on both
  models' hidden states and lm_heads (`TrainingObjective`, fused linear + loss, no `[N, V]` logits);
- `cache-fused-linear`: the same objective on the student's hidden states and the cache's `SparseTeacher`;
- `teacher-logits`, `cache-logits`: the student's logits materialised and `DistiLLM2Loss` on them, against the
  teacher's logits or the cache's `SparseTeacher`.

A step is the student's forward, the loss, the backward and an AdamW step (same student, same batch in every
variant). Step time: the median over `--steps` steps after one warm-up step, in this process. Memory: in a fresh
spawned process (`measure.peak_rss_in_subprocess`) the models are built and one step is taken (optimizer state
allocated), then the peak resident size of one more step is read: the absolute peak (models, optimizer, the
cache's memory-mapped pages that were touched, the step) and the step's own increase over the resident size
before it. `loss` is the first step's loss (the same in both fused-linear variants when the cache holds the
whole vocabulary, `--k` = V − 1). Writes `results.csv` and `results.md` to `--out`.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from distillm2_kernels import DistiLLM2Loss, SparseTeacher
from distillm2_kernels.hf import lm_head_inputs
from distillm2_kernels.measure import peak_rss_in_subprocess
from distillm2_kernels.trainer.data import TokenizedPair, collate_pairs
from distillm2_kernels.trainer.models import LMHead
from distillm2_kernels.trainer.objectives import TrainingObjective
from distillm2_kernels.trainer.scoring import sparse_rows
from distillm2_kernels.trainer.teacher_cache import CacheWriter, SideScores, TeacherCache, label_positions

from . import environment
from .report.numbers import format_number, significant

DEFAULT_OUT = environment.ROOT / "benchmarks" / "results" / "teacher_cache_step"
VARIANTS = ("teacher-fused-linear", "cache-fused-linear", "teacher-logits", "cache-logits")
TEACHER_SEED, STUDENT_SEED, DATA_SEED = 1, 2, 0

CONTEXT_COLUMNS = ["date", "commit", "device_name", "torch", "library", "threads"]
SIZE_COLUMNS = ["V", "K", "pairs", "tokens", "prompt", "teacher", "student"]
METRIC_COLUMNS = ["variant", "teacher_source", "objective", "steps", "step_s_median", "step_s_min", "loss",
                  "peak_rss_mib", "step_rss_increase_mib", "load_avg_1m"]
COLUMNS = CONTEXT_COLUMNS + SIZE_COLUMNS + METRIC_COLUMNS


def llama(vocab: int, hidden: int, layers: int, tokens: int, seed: int):
    """A randomly initialised LlamaForCausalLM (heads of 64, or one head below 64)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    heads = max(1, hidden // 64)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=tokens, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def synthetic_pairs(sizes: dict) -> list:
    """`pairs` random pairs: each side `tokens` ids, the first `prompt` labels masked."""
    generator = torch.Generator().manual_seed(DATA_SEED)
    out = []
    for _ in range(sizes["pairs"]):
        sides = []
        for _ in range(2):
            ids = torch.randint(0, sizes["V"], (sizes["tokens"],), generator=generator).tolist()
            sides.append((ids, [-100] * sizes["prompt"] + ids[sizes["prompt"]:]))
        out.append(TokenizedPair(sides[0][0], sides[0][1], sides[1][0], sides[1][1]))
    return out


def teacher_model(sizes: dict):
    return llama(sizes["V"], sizes["teacher_hidden"], sizes["teacher_layers"], sizes["tokens"],
                 TEACHER_SEED).eval().requires_grad_(False)


def build_cache(folder: Path, sizes: dict) -> None:
    """Scores every response token of both sides with the teacher (top-K + label, tail) into `folder`."""
    teacher, tokenized, k = teacher_model(sizes), synthetic_pairs(sizes), sizes["K"]
    writer = CacheWriter(folder, {
        "pairs_file": "-", "pairs_sha256": "-", "tokenizer_fingerprint": "-", "top_k": k, "vocab_size": sizes["V"],
        "num_pairs": len(tokenized), "engine": "hf",
        "settings": {"max_length": sizes["tokens"], "chat_template_sha256": "-", "with_rejected": True,
                     "pairs_per_shard": len(tokenized)}})
    sides = []
    with torch.no_grad():
        for side in (0, 1):
            for index, pair in enumerate(tokenized):
                ids, labels = (pair.chosen_ids, pair.chosen_labels) if side == 0 else (
                    pair.rejected_ids, pair.rejected_labels)
                first, tokens = label_positions(labels)
                logits = teacher(torch.tensor([ids])).logits[0, first - 1:first - 1 + len(tokens)]
                labels_tensor = torch.tensor(tokens)
                top_ids, logprobs, tail = sparse_rows(logits, labels_tensor, k)
                sides.append(SideScores(index, side, first, labels_tensor, top_ids, logprobs, tail))
    writer.write_shard(0, sides)


def setup(variant: str, sizes: dict, folder: str) -> dict:
    """The models, the batch, the optimizer and the objective of one variant (the teacher only if it is used)."""
    torch.set_num_threads(sizes["threads"])
    student = llama(sizes["V"], sizes["student_hidden"], sizes["student_layers"], sizes["tokens"], STUDENT_SEED)
    state = {"variant": variant, "student": student,
             "batch": collate_pairs(synthetic_pairs(sizes), 0, with_rejected=True),
             "optimizer": torch.optim.AdamW(student.parameters(), lr=1e-4)}
    if variant.startswith("teacher"):
        state["teacher"] = teacher_model(sizes)
    else:
        state["cache"] = TeacherCache(folder)
    if variant.endswith("fused-linear"):
        state["objective"] = TrainingObjective("distillm2", "distillm2")
    else:
        state["objective"] = DistiLLM2Loss("distillm2")
    return state


def step(state: dict) -> float:
    """One training step; returns its loss."""
    student, batch, variant, objective = state["student"], state["batch"], state["variant"], state["objective"]
    n = batch.num_pairs
    head = lm_head_inputs(student, batch.input_ids, attention_mask=batch.attention_mask)
    if variant == "teacher-fused-linear":
        with torch.no_grad():
            teacher = lm_head_inputs(state["teacher"], batch.input_ids, attention_mask=batch.attention_mask)
        loss, _ = objective(head.hidden_states, teacher.hidden_states, batch.labels, n,
                            LMHead(head.weight, None, None), LMHead(teacher.weight, None, None))
    elif variant == "cache-fused-linear":
        cached = state["cache"].sparse_teacher(list(range(n)), batch)
        loss, _ = objective(head.hidden_states, cached, batch.labels, n, LMHead(head.weight, None, None), None)
    else:
        student_logits = (head.hidden_states @ head.weight.T)[:, :-1]
        labels = batch.labels[:, 1:]
        if variant == "teacher-logits":
            with torch.no_grad():
                logits = state["teacher"](batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
            on_teacher, on_student = logits[:n], logits[n:]
        else:
            sparse = state["cache"].sparse_teacher(list(range(n)), batch)
            shifted = [t[:, :-1] for t in (sparse.ids, sparse.logprobs, sparse.tail_logprob)]
            on_teacher = SparseTeacher(*(t[:n] for t in shifted))
            on_student = SparseTeacher(*(t[n:] for t in shifted))
        loss = objective(student_logits[:n], on_teacher, labels[:n], student_logits[n:], on_student, labels[n:])[0]
    loss.backward()
    state["optimizer"].step()
    state["optimizer"].zero_grad(set_to_none=True)
    return loss.item()


def setup_after_one_step(variant: str, sizes: dict, folder: str) -> dict:
    """`setup` and one step (the optimizer's state allocated, the cache's pages touched)."""
    state = setup(variant, sizes, folder)
    step(state)
    return state


def time_steps(variant: str, sizes: dict, folder: str, steps: int) -> tuple:
    """(first step's loss, step times in seconds after it)."""
    state = setup(variant, sizes, folder)
    loss = step(state)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step(state)
        times.append(time.perf_counter() - start)
    return loss, times


def _rounded(value):
    return significant(value, 4) if isinstance(value, float) else value


TABLE = [("variant", "step"), ("step_s_median", "median step time (s)"), ("step_s_min", "min (s)"),
         ("peak_rss_mib", "peak RSS (MiB)"), ("step_rss_increase_mib", "step's RSS increase (MiB)"),
         ("loss", "first loss")]


def table_lines(rows: list, markdown: bool) -> list:
    header = [label for _, label in TABLE]
    cells = [[format_number(row[column]) if isinstance(row[column], float) else str(row[column])
              for column, _ in TABLE] for row in rows]
    if markdown:
        return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
            "| " + " | ".join(line) + " |" for line in cells]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    return ["  ".join(h.rjust(w) for h, w in zip(header, widths))] + [
        "  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells]


def _ratio_lines(rows: list) -> list:
    by_variant = {row["variant"]: row for row in rows}
    lines = []
    for objective in ("fused-linear", "logits"):
        teacher, cache = by_variant.get(f"teacher-{objective}"), by_variant.get(f"cache-{objective}")
        if teacher and cache:
            time_ratio = cache["step_s_median"] / teacher["step_s_median"]
            memory_ratio = cache["peak_rss_mib"] / teacher["peak_rss_mib"]
            extra_mib = cache["peak_rss_mib"] - teacher["peak_rss_mib"]
            lines.append(f"- {objective}: the cache's step takes {time_ratio:.2f}× the teacher's time and "
                         f"{memory_ratio:.2f}× its peak RSS ({extra_mib:+.0f} MiB).")
    return lines


def write_markdown(rows: list, path: Path, context: dict, sizes: dict, command: str, elapsed_s: float,
                   load: tuple) -> Path:
    lines = [
        "# A training step with the teacher cache against the same step with the teacher model",
        "",
        f"Command (from the repository root): `{command}`; {elapsed_s / 60:.1f} minutes. Raw rows: "
        "[`results.csv`](results.csv) (the columns and the method are described in "
        "`benchmarks/teacher_cache_step.py`).",
        "",
        f"- date {context['date']}, commit `{context['commit']}`, distillm2_kernels {context['library']}, "
        f"torch {context['torch']}, {context['device_name']}, {context['threads']} torch thread(s)",
        f"- load average (1, 5, 15 min) at the start: {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f} "
        "(a shared machine: the times are noisy)",
        f"- V = {sizes['V']}, K = {sizes['K']} (+ the label); {sizes['pairs']} pairs ({2 * sizes['pairs']} rows) × "
        f"{sizes['tokens']} tokens ({sizes['prompt']}-token prompt); teacher {sizes['teacher']} "
        f"(layers × hidden), student {sizes['student']}; random Llama weights; AdamW; loss `distillm2`",
        f"- step time: median over {rows[0]['steps']} steps after one warm-up step; memory: peak resident size "
        "of one step in a fresh process after one step (absolute, and the step's increase)",
        "",
    ]
    lines += table_lines(rows, markdown=True) + [""] + _ratio_lines(rows)
    lines += ["", "first loss: the step's loss, for checking, not for comparing: with random weights the teacher is "
              "nearly uniform over the vocabulary, so unless K is close to V its top-K (the cache, default tail "
              "`renormalize`) is a very different distribution from the dense teacher and the losses differ; with "
              "K = V − 1 they agree to rounding (tests/test_benchmark_teacher_cache_step.py). The teacher's "
              "weights are what the cache's peak leaves out; its activations are what the step's increase "
              "leaves out."]
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.teacher_cache_step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--k", type=int, default=32, help="top-K entries stored per token (plus the label)")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128, help="tokens per row")
    parser.add_argument("--prompt", type=int, default=32, help="masked prompt tokens per row")
    parser.add_argument("--teacher-layers", type=int, default=4)
    parser.add_argument("--teacher-hidden", type=int, default=512)
    parser.add_argument("--student-layers", type=int, default=2)
    parser.add_argument("--student-hidden", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed steps after the warm-up step")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    args = parser.parse_args(argv)
    args.variant_list = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(args.variant_list) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = {"V": args.vocab, "K": args.k, "pairs": args.pairs, "tokens": args.tokens, "prompt": args.prompt,
             "teacher_layers": args.teacher_layers, "teacher_hidden": args.teacher_hidden,
             "student_layers": args.student_layers, "student_hidden": args.student_hidden, "threads": args.threads,
             "teacher": f"{args.teacher_layers}x{args.teacher_hidden}",
             "student": f"{args.student_layers}x{args.student_hidden}"}
    described = environment.describe(torch.device("cpu"))
    context = {"date": environment.utc_now(), "commit": environment.commit(), "device_name": described["device_name"],
               "torch": described["torch"], "library": described["library"], "threads": args.threads}
    given = sys.argv[1:] if argv is None else argv
    command = "python -m benchmarks.teacher_cache_step" + (" " + " ".join(given) if given else "")
    load = os.getloadavg()
    print(f"# teacher model against teacher cache, one training step; {context['device_name']}; commit "
          f"{context['commit']}, {context['date']}; load {load[0]:.2f}", flush=True)
    print(f"# V={args.vocab} K={args.k}, {args.pairs} pairs x {args.tokens} tokens; teacher {sizes['teacher']}, "
          f"student {sizes['student']}; {args.threads} thread(s)", flush=True)
    started = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = str(Path(scratch) / "cache")
        build_cache(Path(folder), sizes)
        for variant in args.variant_list:
            increase, peak = peak_rss_in_subprocess(setup_after_one_step, step, variant, sizes, folder)
            loss, times = time_steps(variant, sizes, folder, args.steps)
            source, objective = variant.split("-", 1)
            row = {**context, **{c: sizes[c] for c in SIZE_COLUMNS}, "variant": variant, "teacher_source": source,
                   "objective": objective, "steps": len(times), "step_s_median": statistics.median(times),
                   "step_s_min": min(times), "loss": loss, "peak_rss_mib": peak / 2**20,
                   "step_rss_increase_mib": increase / 2**20, "load_avg_1m": round(os.getloadavg()[0], 2)}
            rows.append({column: row[column] if column == "loss" else _rounded(row[column]) for column in COLUMNS})
            print(f"# {variant}: {row['step_s_median']:.3f} s, peak {row['peak_rss_mib']:.0f} MiB "
                  f"({time.time() - started:.0f} s)", flush=True)
    print("\n".join(table_lines(rows, markdown=False)))
    print("\n".join(_ratio_lines(rows)))
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    md = write_markdown(rows, args.out / "results.md", context, sizes, command, time.time() - started, load)
    print(f"\n# {len(rows)} rows in {time.time() - started:.0f} s; wrote {args.out / 'results.csv'}, {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
