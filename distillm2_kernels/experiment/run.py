"""A miniature distillation experiment that tells the DistiLLM-2 objectives apart, on two CPU cores.

    python -m distillm2_kernels.experiment                # `make demo`: seed 0 only (prints the table)
    python -m distillm2_kernels.experiment --tune-lr --seeds 5 --output results/experiment   # the committed run
    python -m distillm2_kernels.experiment --quick        # a smoke run of toy sizes (the tests use it)

Design
------
Task (`task.py`): arrange the letters of a sorted multiset (5–8 letters of `a`…`h`) so that no two equal
letters touch: `"aabcc"` → `"acabc"`, `"cabac"`, … Many valid answers per prompt, each checked exactly; a
small model's mistakes (a letter dropped, repeated or invented; two equal letters side by side) are ones a
good teacher gives low probability. Per seed, 6000 training prompts (2 uniformly drawn valid answers each),
200 validation prompts (to check the pre-training) and 300 held-out prompts (every reported metric), all
disjoint.

Models (`models.py`): Llama-style decoders trained from scratch with the character tokenizer
(`tokenizer.py`). Teacher 3 layers × 64 (0.20 M parameters), student 2 layers × 24 (19 k), about 10× smaller.

Pre-training (`pretrain.py`, cross-entropy on the answer) for a step count with a margin: the teacher for
800 steps of 64 examples, the student for 1500. Along the way the validity of temperature-0.8 samples on
the validation prompts is measured every 100 steps; the step at which it first reaches the threshold
(teacher 95 %, student 50 %) and the final value are reported for every seed, and a model that misses its
threshold is flagged in the notes. The student is trained to near its plateau, so its starting point does
not hang on where on a steep learning curve a fixed step count lands on one machine's float rounding.

Distillation data: 2048 training prompts, one response each sampled from the teacher and from the initial
student at the paper's settings (temperature 0.8, top-p 0.95; `trainer.generation.generate`), joined by
`trainer.pairing.pair` (`chosen` = teacher, `rejected` = student). No reference answer is used from here on.

Arms (`distil.py`): `distillm2`, `paper`, `skl`, `srkl`, `kd` on those pairs, and `distillm2-onpolicy` (the
trainer's batched on-policy pipeline: the student's responses regenerated at every epoch). Every arm: 3
epochs over 2048 pairs, 32 pairs per step (192 optimizer steps), full fine-tuning, AdamW, 10 % warm-up then
cosine, clipping at 1, the trainer's seed = the experiment seed.

Learning rate: one per arm, chosen for every arm by the same procedure (`--tune-lr`): on a tuning seed
that is not one of the reported seeds (seed 100: its own teacher, student and data), each arm is trained at
each rate of a grid (1e-3, 3e-3, 1e-2) and scored on the validation prompts (the mean of the valid fractions
at temperature 0.8 and 1); the best rate is the arm's. `DEFAULT_LRS` holds the result of that sweep, which the
committed run reproduces (`results/experiment/lr_sweep.md`).

Evaluation (`evaluate.py`): on the 300 held-out prompts, 4 samples each: validity at temperature 0.8 /
top-p 0.95 and at temperature 1, greedy validity, the teacher's log-probability of the temperature-0.8
samples, coverage of distinct valid temperature-1 answers against the teacher's. Evaluation samples are
seeded by the experiment seed, the same for every arm, so arms are compared on the same random stream.

Statistics (`report.py`): mean and standard deviation over the seeds; against `distillm2`, per-seed paired
differences (same teacher, student, data and evaluation stream), seeds ahead, and an exact sign-flip p-value.

Outputs (in `--output`, default `experiment_output/`): `results.csv` (per seed and model), `summary.csv`,
`results.md`, `results.png` (means, ± 1 std error bars and every seed), and per seed `seed-<s>/` with the
models, data and runs; `seed-<s>/rows.json` lets a rerun of the same command skip finished seeds.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .distil import ARMS, DistilSettings, distil
from .models import STUDENT, TEACHER, ModelSize
from .task import ArrangeTask

__all__ = ["ExperimentConfig", "QUICK", "DEFAULT_LRS", "LR_GRID", "TUNE_SEED", "ExperimentResult",
           "run_experiment", "tune_learning_rates", "SeedRun", "outcome_metrics"]

# The per-arm learning rates picked by `--tune-lr` (the sweep of `tune_learning_rates` on TUNE_SEED), as the
# committed run chose them (results/experiment/lr_sweep.md): 1e-2, the top of the grid, for all arms but srkl.
DEFAULT_LRS: Dict[str, float] = {arm: 3e-3 if arm == "srkl" else 1e-2 for arm in ARMS}
LR_GRID: Tuple[float, ...] = (1e-3, 3e-3, 1e-2)
TUNE_SEED = 100


@dataclass(frozen=True)
class ExperimentConfig:
    output: Path = Path("experiment_output")
    seeds: Tuple[int, ...] = (0,)  # `make demo`: one seed (≈ 3 min on 2 cores at load 4–5); --seeds 5: the table
    letters: str = "abcdefgh"
    min_length: int = 5
    max_length: int = 8
    num_train: int = 6000  # training prompts
    answers_per_prompt: int = 2
    num_validation: int = 200  # prompts that check the pre-training
    num_heldout: int = 300  # prompts of every reported metric
    teacher_size: ModelSize = TEACHER
    student_size: ModelSize = STUDENT
    teacher_steps: int = 800
    teacher_lr: float = 3e-3
    teacher_threshold: float = 0.95  # validity of T=0.8 samples on the validation prompts
    student_steps: int = 1500
    student_lr: float = 3e-3
    student_threshold: float = 0.5
    check_every: int = 100
    pretrain_batch_size: int = 64
    num_prompts: int = 2048  # distillation prompts, the first training prompts
    temperature: float = 0.8  # sampling of the distillation data (the paper's)
    top_p: float = 0.95
    distil_epochs: int = 3
    distil_batch_size: int = 32
    lrs: Tuple[Tuple[str, float], ...] = tuple(DEFAULT_LRS.items())
    eval_samples: int = 4
    arms: Tuple[str, ...] = tuple(ARMS)
    progress: bool = True

    @property
    def task(self) -> ArrangeTask:
        return ArrangeTask(self.letters, self.min_length, self.max_length)

    def lr(self, arm: str) -> float:
        return dict(self.lrs)[arm]

    def settings(self) -> Dict[str, object]:
        """The run's settings as flat strings/numbers (for the CSV and markdown files)."""
        flat = {k: (str(v) if isinstance(v, (Path, ModelSize)) else v) for k, v in asdict(self).items()}
        flat["teacher_size"], flat["student_size"] = str(self.teacher_size), str(self.student_size)
        flat["seeds"] = " ".join(map(str, self.seeds))
        flat["arms"] = " ".join(self.arms)
        flat["lrs"] = " ".join(f"{a}={lr:g}" for a, lr in self.lrs if a in self.arms)
        flat.pop("progress")
        flat.pop("output")
        return flat

    def seed_key(self) -> str:
        """A digest of every setting that changes one seed's results (not the list of seeds)."""
        settings = self.settings()
        settings.pop("seeds")
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


# A smoke run of seconds: same stages, toy sizes (the numbers mean nothing).
QUICK = dict(
    seeds=(1,), num_train=64, answers_per_prompt=1, num_validation=16, num_heldout=16,
    teacher_size=ModelSize(1, 32, 2, 64), student_size=ModelSize(1, 16, 2, 32), teacher_steps=20,
    student_steps=5, check_every=10, pretrain_batch_size=16, num_prompts=32, distil_epochs=2, distil_batch_size=16,
    eval_samples=2,
)


@dataclass
class ExperimentResult:
    rows: list  # report.SeedRow per seed and model
    summaries: list  # report.Summary per model and metric
    files: Dict[str, Path]
    seconds: float
    notes: List[str] = field(default_factory=list)


def _say(message: str) -> None:
    print(message, flush=True)


def _percent(x: float) -> str:
    return f"{100 * x:.1f} %"


def _sample_validity(model, tokenizer, task: ArrangeTask, prompts: Sequence[str], seed: int) -> float:
    from .evaluate import generate_answers

    answers = generate_answers(model, tokenizer, prompts, temperature=0.8, top_p=0.95, seed=seed,
                               max_new_tokens=task.max_length + 2)
    return sum(task.is_valid(p, row[0]) for p, row in zip(prompts, answers)) / len(prompts)


@dataclass
class _Pretrained:
    folder: Path
    steps: int
    seconds: float
    curve: List[Tuple[int, float]]  # (step, validation validity at T=0.8)
    threshold: float

    @property
    def crossed_at(self) -> Optional[int]:
        return next((step for step, value in self.curve if value >= self.threshold), None)


class SeedRun:
    """One seed's teacher, student, distillation data and evaluation, in `<output>/seed-<seed>/`."""

    def __init__(self, config: ExperimentConfig, seed: int):
        from .tokenizer import build_tokenizer

        self.config, self.seed, self.task = config, seed, config.task
        self.folder = Path(config.output) / f"seed-{seed}"
        self.split = self.task.split(config.num_train + config.num_validation, config.num_heldout,
                                     answers_per_prompt=config.answers_per_prompt, seed=seed)
        prompts = self.split.train_prompts
        self.train_prompts = prompts[: config.num_train]
        self.validation_prompts = prompts[config.num_train :]
        validation = set(self.validation_prompts)
        self.train = [e for e in self.split.train if e.prompt not in validation]
        self.tokenizer = build_tokenizer(self.task.alphabet)
        self.notes: List[str] = []

    def pretrain(self, role: str) -> _Pretrained:
        from .models import build_model, num_parameters, save_model
        from .pretrain import pretrain

        config = self.config
        size, steps, lr, threshold = (
            (config.teacher_size, config.teacher_steps, config.teacher_lr, config.teacher_threshold)
            if role == "teacher" else
            (config.student_size, config.student_steps, config.student_lr, config.student_threshold)
        )
        seed = self.seed if role == "teacher" else self.seed + 10_000
        model = build_model(size, self.tokenizer, seed=seed, max_positions=2 * config.max_length + 8)
        curve: List[Tuple[int, float]] = []

        def check(step: int, current) -> None:
            if step % config.check_every == 0 or step == steps:
                curve.append((step, _sample_validity(current, self.tokenizer, self.task, self.validation_prompts,
                                                     seed=self.seed)))

        trained = pretrain(model, self.tokenizer, self.train, steps=steps, batch_size=config.pretrain_batch_size,
                           lr=lr, seed=seed, progress=config.progress, description=f"seed {self.seed}: {role}",
                           callback=check)
        result = _Pretrained(save_model(model, self.tokenizer, self.folder / "models" / role), steps,
                             trained.seconds, curve, threshold)
        crossed = "never" if result.crossed_at is None else f"at step {result.crossed_at}"
        _say(f"[seed {self.seed}] {role} {size} ({num_parameters(model):,} parameters), {steps} steps in "
             f"{trained.seconds:.0f} s: validation validity (T=0.8) {_percent(curve[-1][1])}; reached "
             f"{_percent(threshold)} {crossed}")
        if result.crossed_at is None:
            self.notes.append(f"seed {self.seed}: the {role} did not reach its validation threshold "
                              f"{_percent(threshold)} ({_percent(curve[-1][1])} after {steps} steps)")
        return result

    def distillation_data(self, teacher_dir: Path, student_dir: Path) -> Dict[str, Path]:
        from ..trainer.generation import generate
        from ..trainer.jsonl import read_jsonl
        from ..trainer.pairing import pair

        config = self.config
        data = self.folder / "data"
        data.mkdir(parents=True, exist_ok=True)
        prompts = self.train_prompts[: config.num_prompts]
        paths = {"prompts": data / "prompts.jsonl"}
        paths["prompts"].write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        tick = time.perf_counter()
        valid = {}
        for role, folder in (("teacher", teacher_dir), ("student", student_dir)):
            path = paths[role] = data / f"{role}.jsonl"
            for stale in (path, path.with_name(path.name + ".partial")):
                stale.unlink(missing_ok=True)  # generate() would resume from rows of an earlier run
            generate(folder, prompts, path, temperature=config.temperature, top_p=config.top_p,
                     max_new_tokens=config.max_length + 2, seed=self.seed, engine="hf", batch_size=512,
                     progress=config.progress)
            rows = [row for _, row in read_jsonl(path)]
            valid[role] = sum(self.task.is_valid(r["prompt"], r["response"]) for r in rows) / len(rows)
        paths["pairs"] = pair(paths["teacher"], paths["student"], data / "pairs.jsonl", strict=True).output_path
        _say(f"[seed {self.seed}] data: {len(prompts)} pairs (T={config.temperature}, top-p {config.top_p}); valid "
             f"responses: teacher {_percent(valid['teacher'])}, student {_percent(valid['student'])}; "
             f"{time.perf_counter() - tick:.0f} s")
        return paths

    def evaluator(self, teacher_dir: Path, prompts: Sequence[str]):
        """`evaluate(folder)` -> Evaluation of the model in `folder` on `prompts`, judged by the teacher."""
        from transformers import AutoModelForCausalLM

        from .evaluate import evaluate, generate_answers

        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
        reference = generate_answers(teacher, self.tokenizer, prompts, samples=self.config.eval_samples,
                                     temperature=1.0, seed=self.seed + 1, max_new_tokens=self.task.max_length + 2)

        def run(folder: Path):
            model = AutoModelForCausalLM.from_pretrained(folder)
            return evaluate(model, self.tokenizer, self.task, prompts, teacher=teacher, teacher_samples_t1=reference,
                            samples=self.config.eval_samples, seed=self.seed)

        return run

    def settings(self, arm: str) -> DistilSettings:
        config = self.config
        return DistilSettings(epochs=config.distil_epochs, lr=config.lr(arm), batch_size=config.distil_batch_size,
                              seed=self.seed, temperature=config.temperature, top_p=config.top_p,
                              max_new_tokens=config.max_length + 2, max_length=2 * config.max_length + 8)


def outcome_metrics(evaluation) -> Dict[str, float]:
    """The outcome columns of one evaluated model: the task metrics and the two error rates."""
    return {**evaluation.metrics(), "letters_error": evaluation.letters_error,
            "adjacent_error": evaluation.adjacent_error}


def _run_seed(config: ExperimentConfig, seed: int) -> Tuple[list, List[str]]:
    """The rows (teacher, initial student, every arm) of one seed, reused from `seed-<s>/rows.json` when the
    same settings produced it."""
    from .report import SeedRow

    cache = Path(config.output) / f"seed-{seed}" / "rows.json"
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved["key"] == config.seed_key():
            _say(f"[seed {seed}] reusing {cache}")
            return [SeedRow(**row) for row in saved["rows"]], saved["notes"]
    state = SeedRun(config, seed)
    teacher = state.pretrain("teacher")
    student = state.pretrain("student")
    paths = state.distillation_data(teacher.folder, student.folder)
    evaluate = state.evaluator(teacher.folder, state.split.heldout_prompts)
    rows = []
    for name, model in (("teacher", teacher), ("student (before)", student)):
        tick = time.perf_counter()
        metrics = outcome_metrics(evaluate(model.folder))
        metrics.update(threshold_step=float(model.crossed_at or -1), validation_valid=model.curve[-1][1])
        rows.append(SeedRow(seed, name, model.steps, model.seconds, metrics))
        _say(f"[seed {seed}] {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())
             + f" ({time.perf_counter() - tick:.0f} s)")
    import accelerate  # noqa: F401  (imported once here, so that the first arm timed does not pay for it)

    for arm in config.arms:
        result = distil(arm, teacher_dir=teacher.folder, student_dir=student.folder, pairs_path=paths["pairs"],
                        prompts_path=paths["prompts"], teacher_responses=paths["teacher"],
                        output_dir=state.folder / "runs" / arm, settings=state.settings(arm),
                        progress=config.progress)
        tick = time.perf_counter()
        metrics = outcome_metrics(evaluate(result.final_dir))
        rows.append(SeedRow(seed, arm, result.steps, result.seconds, metrics))
        _say(f"[seed {seed}] {arm} (lr {config.lr(arm):g}): {result.steps} steps in {result.seconds:.0f} s; "
             + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()) + f" ({time.perf_counter() - tick:.0f} s)")
    cache.write_text(json.dumps({"key": config.seed_key(), "rows": [asdict(r) for r in rows],
                                 "notes": state.notes}, indent=1))
    return rows, state.notes


def tune_learning_rates(config: ExperimentConfig, grid: Sequence[float] = LR_GRID, seed: int = TUNE_SEED,
                        ) -> Dict[str, float]:
    """Each arm at each rate of `grid` on `seed` (not a reported seed), scored on the validation prompts by
    the mean of the T=0.8 and T=1 valid fractions; returns the best rate per arm (the smaller one on a tie) and
    writes `<output>/lr_sweep.csv` and `<output>/lr_sweep.md`."""
    import csv

    output = Path(config.output)
    cache = output / "lr-sweep" / "chosen.json"
    key = hashlib.sha256(json.dumps([config.seed_key(), list(grid), seed]).encode()).hexdigest()[:16]
    if cache.is_file() and json.loads(cache.read_text())["key"] == key:
        best = json.loads(cache.read_text())["lrs"]
        _say(f"[lr sweep] reusing {cache}: " + ", ".join(f"{arm} {lr:g}" for arm, lr in best.items()))
        return best
    state = SeedRun(replace(config, output=output / "lr-sweep"), seed)
    teacher = state.pretrain("teacher")
    student = state.pretrain("student")
    paths = state.distillation_data(teacher.folder, student.folder)
    evaluate = state.evaluator(teacher.folder, state.validation_prompts)
    scores: Dict[Tuple[str, float], Dict[str, float]] = {}
    for arm in config.arms:
        for lr in grid:
            settings = replace(state.settings(arm), lr=lr)
            result = distil(arm, teacher_dir=teacher.folder, student_dir=student.folder, pairs_path=paths["pairs"],
                            prompts_path=paths["prompts"], teacher_responses=paths["teacher"],
                            output_dir=state.folder / "runs" / f"{arm}-lr{lr:g}", settings=settings,
                            progress=config.progress)
            metrics = evaluate(result.final_dir).metrics()
            metrics["score"] = (metrics["valid_0.8"] + metrics["valid_1.0"]) / 2
            scores[arm, lr] = metrics
            _say(f"[lr sweep, seed {seed}] {arm} lr {lr:g}: score {metrics['score']:.3f} "
                 f"(valid_0.8 {metrics['valid_0.8']:.3f}, valid_1.0 {metrics['valid_1.0']:.3f})")
    best = {arm: max(grid, key=lambda lr: (scores[arm, lr]["score"], -lr)) for arm in config.arms}
    with open(output / "lr_sweep.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        keys = ["score", "valid_0.8", "valid_1.0", "greedy", "teacher_logp", "coverage"]
        writer.writerow(["arm", "lr", *keys, "chosen"])
        for (arm, lr), m in scores.items():
            writer.writerow([arm, lr, *(f"{m[k]:.6g}" for k in keys), int(best[arm] == lr)])
    lines = [f"# Learning-rate sweep (seed {seed}, {len(state.validation_prompts)} validation prompts)", "",
             "Score: mean of the valid fractions at T=0.8/top-p 0.95 and at T=1 (%); the chosen rate in bold.", "",
             "| arm | " + " | ".join(f"lr {lr:g}" for lr in grid) + " |", "| --- |" + " ---: |" * len(grid)]
    for arm in config.arms:
        cells = [f"{100 * scores[arm, lr]['score']:.1f}" for lr in grid]
        cells = [f"**{c}**" if lr == best[arm] else c for c, lr in zip(cells, grid)]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    (output / "lr_sweep").with_suffix(".md").write_text("\n".join(lines) + "\n")
    cache.write_text(json.dumps({"key": key, "lrs": best}))
    _say("[lr sweep] chosen: " + ", ".join(f"{arm} {lr:g}" for arm, lr in best.items()))
    return best


def run_experiment(config: ExperimentConfig) -> ExperimentResult:
    """Every seed (see the module docstring), then the summary; prints a line per stage and the table."""
    from .report import format_table, plot_summary, summarise, write_csv, write_markdown, write_summary_csv

    unknown = set(config.arms) - set(ARMS)
    if unknown or not config.arms or "distillm2" not in config.arms:
        raise ValueError(f"arms must be a subset of {sorted(ARMS)} holding distillm2, got {config.arms}")
    if not config.seeds:
        raise ValueError("at least one seed is needed")
    started = time.perf_counter()
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    task = config.task
    _say(f"[task] arrange {config.min_length}-{config.max_length} letters of {config.letters!r} with no two equal "
         f"letters adjacent ({len(task.all_prompts())} prompts); seeds {list(config.seeds)}; arms "
         + ", ".join(f"{a} (lr {config.lr(a):g})" for a in config.arms))
    rows, notes = [], []
    for seed in config.seeds:
        seed_rows, seed_notes = _run_seed(config, seed)
        rows += seed_rows
        notes += seed_notes
    summaries = summarise(rows)
    seconds = time.perf_counter() - started
    by = {(r.model, r.seed): r for r in rows}
    crossing = {role: [int(by[role, s].metrics["threshold_step"]) for s in config.seeds]
                for role in ("teacher", "student (before)")}
    notes = [
        f"Seeds {', '.join(map(str, config.seeds))}; {config.num_heldout} held-out prompts × {config.eval_samples} "
        "samples per model and seed. Training times are wall-clock on this machine.",
        f"Pre-training thresholds (validity of T=0.8 samples on {config.num_validation} validation prompts): teacher "
        f"{_percent(config.teacher_threshold)}, first reached at step {crossing['teacher']} of {config.teacher_steps} "
        f"(per seed; -1: never); student {_percent(config.student_threshold)}, at step "
        f"{crossing['student (before)']} of {config.student_steps}.",
        *notes,
        f"Total wall-clock time: {seconds:.0f} s.",
    ]
    settings = config.settings()
    files = {
        "csv": write_csv(rows, output / "results.csv", settings),
        "summary": write_summary_csv(summaries, output / "summary.csv"),
        "markdown": write_markdown(summaries, output / "results.md", settings, notes, rows),
        "plot": plot_summary(output / "results.png", summaries, rows,
                             title=f"student {config.student_size} distilled from teacher {config.teacher_size}, "
                                   f"{len(config.seeds)} seed(s), mean ± std"),
    }
    _say("")
    _say(format_table(summaries))
    _say("")
    _say(f"total {seconds:.0f} s; wrote {', '.join(str(p) for p in files.values())}")
    return ExperimentResult(rows, summaries, files, seconds, notes)
