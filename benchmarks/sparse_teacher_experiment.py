"""The miniature experiment with a cached top-K teacher: `python -m benchmarks.sparse_teacher_experiment`.

Per seed, the miniature experiment's teacher, student and distillation pairs (`distillm2_kernels.experiment`,
its default sizes and stages, `--quick` its toy ones), then the `distillm2` arm twice over: against the
teacher model (the experiment's arm: `train --teacher`) and against a teacher cache of the same teacher on the
same pairs (`scoring.score(top_k=K)`, then `train --teacher-cache --teacher-tail TAIL`), for each K of `--k`
and each tail. Everything else is the experiment's `distillm2` arm: learning rate, epochs, batch, schedule,
seed, and the evaluation on the held-out prompts (validity at T = 0.8 / T = 1 / greedy, the teacher's
log-probability of the samples, coverage of the teacher's answers). The vocabulary is the character
tokenizer's (13 tokens), so K is small: K = V − 1 leaves one token out (the cache stores K + 1 entries: the
top-K and the label, or the (K+1)-th best).

Writes `results.csv` (one row per seed and arm) and `results.md` (device, commit, command, date; means over
the seeds and each arm's paired difference against the dense teacher) to `--out`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

from . import environment

DEFAULT_OUT = environment.ROOT / "benchmarks" / "results" / "sparse_teacher" / "experiment"
TAILS = ("renormalize", "uniform")
METRICS = ("valid_0.8", "valid_1.0", "greedy", "teacher_logp", "coverage", "letters_error", "adjacent_error")


def _cache_arm(state, teacher_dir: Path, student_dir: Path, pairs: Path, out: Path, k: int, tail: str,
               progress: bool):
    """The experiment's `distillm2` arm with `teacher_cache` in place of the teacher model (the options are
    those of `experiment.distil.distil`)."""
    from distillm2_kernels.trainer.scoring import score
    from distillm2_kernels.trainer.training import TrainConfig, train

    settings = state.settings("distillm2")
    cache = out.parent / f"cache-k{k}"
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        if not (cache / "manifest.json").exists():
            score(teacher_dir, pairs, cache, top_k=k, max_length=settings.max_length, engine="hf", progress=False)
        scored = time.perf_counter() - started
        if out.exists():
            shutil.rmtree(out)
        trained = train(TrainConfig(
            teacher=None, teacher_cache=str(cache), teacher_tail=tail, student=str(student_dir), data=str(pairs),
            output=str(out), epochs=settings.epochs, seed=settings.seed, progress=progress, preset="distillm2",
            loss="distillm2", lr=settings.lr, batch_size=settings.batch_size, grad_accum=1,
            max_length=settings.max_length, use_lora=False, warmup_ratio=settings.warmup_ratio, save_steps=None,
            save_total_limit=1, logging_steps=1, backend=settings.backend,
        ))
    return trained.final_dir, trained.global_step, time.perf_counter() - started - scored, scored


def run_seed(config, seed: int, ks: list, out: Path) -> list:
    from distillm2_kernels.experiment.distil import distil
    from distillm2_kernels.experiment.run import SeedRun, outcome_metrics

    state = SeedRun(config, seed)
    teacher = state.pretrain("teacher")
    student = state.pretrain("student")
    paths = state.distillation_data(teacher.folder, student.folder)
    evaluate = state.evaluator(teacher.folder, state.split.heldout_prompts)
    rows = []
    result = distil("distillm2", teacher_dir=teacher.folder, student_dir=student.folder, pairs_path=paths["pairs"],
                    prompts_path=paths["prompts"], teacher_responses=paths["teacher"],
                    output_dir=state.folder / "runs" / "distillm2", settings=state.settings("distillm2"),
                    progress=config.progress)
    rows.append({"seed": seed, "arm": "dense teacher", "k": "", "tail": "", "steps": result.steps,
                 "train_s": round(result.seconds, 1), "score_s": "", **outcome_metrics(evaluate(result.final_dir))})
    print(f"[seed {seed}] dense teacher: " + ", ".join(f"{m} {rows[-1][m]:.3f}" for m in METRICS), flush=True)
    for k in ks:
        for tail in TAILS:
            final_dir, steps, train_s, score_s = _cache_arm(state, teacher.folder, student.folder, paths["pairs"],
                                                            state.folder / "runs" / f"cache-k{k}-{tail}", k, tail,
                                                            config.progress)
            rows.append({"seed": seed, "arm": f"cache K={k} {tail}", "k": k, "tail": tail, "steps": steps,
                         "train_s": round(train_s, 1), "score_s": round(score_s, 1),
                         **outcome_metrics(evaluate(final_dir))})
            print(f"[seed {seed}] {rows[-1]['arm']}: " + ", ".join(f"{m} {rows[-1][m]:.3f}" for m in METRICS),
                  flush=True)
    return rows


def write_markdown(rows: list, path: Path, context: dict, command: str, elapsed_s: float, config) -> Path:
    seeds = sorted({r["seed"] for r in rows})
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    by = {(r["arm"], r["seed"]): r for r in rows}
    lines = [
        "# The miniature experiment with a cached top-K teacher",
        "",
        f"Command (from the repository root): `{command}`; {elapsed_s / 60:.1f} minutes. Raw rows: "
        "[`results.csv`](results.csv).",
        "",
        f"- date {context['date']}, commit `{context['commit']}`, {context['device_name']}; seeds {seeds}",
        f"- the experiment's `distillm2` arm (lr {config.lr('distillm2'):g}, {config.distil_epochs} epochs, "
        f"{config.num_prompts} pairs, batch {config.distil_batch_size}) against the teacher model and against "
        "`score --top-k K` caches of it (K + 1 entries per token: the top-K and the label), both tails",
        "",
        "Mean over the seeds (valid fractions and coverage in %, the teacher's log-probability per token); in "
        "brackets the mean paired difference against the dense teacher (same seed: same models, data and "
        "evaluation stream).",
        "",
        "| arm | " + " | ".join(METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    for arm in arms:
        cells = []
        for metric in METRICS:
            scale = 100 if metric not in ("teacher_logp",) else 1
            values = [by[arm, s][metric] * scale for s in seeds]
            cell = f"{statistics.mean(values):.3g}"
            if arm != arms[0]:
                diff = statistics.mean(v - by[arms[0], s][metric] * scale for v, s in zip(values, seeds))
                cell += f" ({diff:+.2g})"
            cells.append(cell)
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", f"`train_s`, `score_s` in the CSV: wall-clock seconds on a shared machine (load "
              f"{context['load']}), not a speed measurement."]
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sparse_teacher_experiment", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0", help="comma-separated experiment seeds")
    parser.add_argument("--k", default="1,4", help="comma-separated cache sizes K")
    parser.add_argument("--quick", action="store_true", help="the experiment's toy sizes (a smoke run)")
    parser.add_argument("--work", type=Path, default=Path("experiment_output") / "sparse_teacher",
                        help="folder of the models, data, caches and runs")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder of results.csv and results.md")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    import os

    from distillm2_kernels.experiment.run import QUICK, ExperimentConfig

    config = ExperimentConfig(output=args.work, progress=not args.no_progress)
    if args.quick:
        config = replace(config, **{k: v for k, v in QUICK.items() if k != "seeds"})
    seeds = [int(s) for s in args.seeds.split(",")]
    ks = [int(k) for k in args.k.split(",")]
    context = {"date": environment.utc_now(), "commit": environment.commit(), "device_name": environment.cpu_name()}
    command = "python -m benchmarks.sparse_teacher_experiment" + ("" if argv is None and len(sys.argv) <= 1 else " "
                                                                  + " ".join(sys.argv[1:] if argv is None else argv))
    started = time.time()
    rows = []
    for seed in seeds:
        rows += run_seed(config, seed, ks, args.work)
    context["load"] = f"{os.getloadavg()[0]:.1f}"
    args.out.mkdir(parents=True, exist_ok=True)
    columns = ["date", "commit", "seed", "arm", "k", "tail", "steps", "train_s", "score_s", *METRICS]
    with open(args.out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({"date": context["date"], "commit": context["commit"], **row} for row in rows)
    md = write_markdown(rows, args.out / "results.md", context, command, time.time() - started, config)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
