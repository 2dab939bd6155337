"""A complete miniature distillation experiment that runs on two CPU cores in a few minutes.

    python -m distillm2_kernels.experiment            # the default run (prints the table; files in experiment_output/)
    python -m distillm2_kernels.experiment --quick    # a seconds-long smoke run (the tests use it)

Design
------
Task (`task.py`): 3-digit addition with zero-padded operands, `"437+085"` → `"522"`. Answers are checked
exactly, so held-out accuracy is unambiguous. 20 000 training and 500 held-out prompts are drawn without
replacement from the 10⁶ possible ones: the two sets never share a prompt, and a model must learn the carry
rule to score.

Tokenizer (`tokenizer.py`): one token per character plus `<|user|> <|assistant|> <|eos|> <|pad|>`, a chat
template `<|user|>437+085<|assistant|>522<|eos|>`; a regular `PreTrainedTokenizerFast` saved next to each
model.

Models (`models.py`): Llama-style decoders trained from scratch. Teacher: 4 layers × 128 hidden (1.05 M
parameters). Student: 3 layers × 64 hidden (0.20 M), 5× smaller.

Pre-training (`pretrain.py`): next-token cross-entropy on the chat-formatted answer (the prompt is input,
not target: with the random operand digits in the loss the teacher learned far slower, see `pretrain.py`).
Teacher: 1200 steps of 64 examples, lr 1.5e-3 (≈ 97 % held-out). Student: 1000 steps, lr 3e-3, which
leaves it about halfway up the learning curve that small models show on this task (a long plateau, then
the carries are learned): clearly weaker than the teacher, not at zero.

Distillation data: 10 000 training prompts (the first half of the training split), one response each
sampled from the teacher and from the student with the paper's settings (temperature 0.8, top-p 0.95;
`trainer.generation.generate`), joined by `trainer.pairing.pair` into the released DistiLLM-2 format
(`chosen` = teacher, `rejected` = student). No ground-truth answer is used from here on: the student learns
from the teacher only.

Methods (`distil.py`), through `trainer.training.train`, each from the same initial student, on the same
pairs, with the same number of optimizer steps, learning rate, batch size, schedule and seed:
- `distillm2`: the `distillm2` preset of the full objective, SKL (α = 0.1) on the teacher's responses plus
  SRKL (α = 0.1, mixture detached) on the student's — the released DistiLLM-2 code;
- `kd`: forward KL(p ‖ q) on the teacher's responses (SKL at α = 0) — plain KD on teacher outputs;
- `skl`: SKL (α = 0.1) on the teacher's responses only — DistiLLM-2 without its SRKL half.
Budget: 500 optimizer steps of 64 pairs (3.2 epochs over the pairs), AdamW at lr 3e-3 (the student's own
pre-training rate) with 10 % warm-up and cosine decay, gradient clipping at 1, full fine-tuning. `distillm2`
also runs the student's responses, so each of its steps processes twice the rows and takes about twice the
time: the budget is equal in steps and pairs, not in compute.

Why full fine-tuning and not the paper's LoRA. Measured on this setup with the `distillm2` method (500
steps, one seed, held-out accuracy): full fine-tuning 86.8 % at lr 1e-3, 95.8 % at 3e-3, 95.8 % at 5e-3,
≈ 59 s per run; the trainer's LoRA defaults (r = 16, lora_alpha = 128, DoRA, all projections) 87.6 % at
1e-3, 93.6 % at 5e-3, ≈ 88 s per run. Full fine-tuning is as good or better and 1.5× faster here (DoRA
recomputes weight norms each step, which dominates at this size); LoRA is a device for adapting large
pretrained models, and this student is a 0.2 M-parameter model trained from scratch. `--use-lora` runs the
LoRA variant. Disclosure: the learning rate (3e-3) was picked from those `distillm2`-only runs; at lr 1e-3
the three methods gave distillm2 86.8 %, kd 91.2 %, skl 88.2 % (same seed).

Evaluation (`evaluate.py`): every model is loaded back from its folder with `from_pretrained`; held-out
exact-match accuracy of greedy answers, and the NLL per reference answer token (digits and `<|eos|>`).
The distilled students are also evaluated at a few points during training (`distil.py`).

Outputs (in `--output`, default `experiment_output/`): `results.csv`, `results.md`, `training_curves.png`,
and the intermediate artefacts: `models/teacher`, `models/student` (tokenizer beside each), `data/*.jsonl`
(responses and pairs), `runs/<method>/` (the trainer's metrics.csv, last checkpoint and `final/` student).

The numbers are whatever the run gives: one seed, nothing tuned in favour of any method beyond the
disclosure above. On this task small models learn abruptly, so other seeds can move the student's starting
point and the methods' ranking a lot; compare methods over several `--seed`s before concluding anything.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

from .distil import METHODS, DistilResult, DistilSettings, distil
from .models import STUDENT, TEACHER, ModelSize
from .task import AdditionTask

__all__ = ["ExperimentConfig", "QUICK", "ExperimentResult", "run_experiment"]


@dataclass(frozen=True)
class ExperimentConfig:
    output: Path = Path("experiment_output")
    seed: int = 0
    digits: int = 3
    num_train: int = 20_000
    num_heldout: int = 500
    teacher_size: ModelSize = TEACHER
    student_size: ModelSize = STUDENT
    teacher_steps: int = 1200
    teacher_lr: float = 1.5e-3
    student_steps: int = 1000
    student_lr: float = 3e-3
    pretrain_batch_size: int = 64
    num_prompts: int = 10_000  # distillation prompts, the first ones of the training split
    temperature: float = 0.8  # sampling of the distillation data (the paper's)
    top_p: float = 0.95
    distil_steps: int = 500
    distil_lr: float = 3e-3
    distil_batch_size: int = 64
    use_lora: bool = False
    eval_points: int = 4  # held-out evaluations along each distillation run
    methods: Tuple[str, ...] = ("distillm2", "kd", "skl")
    progress: bool = True

    def settings(self) -> Dict[str, object]:
        """The run's settings as flat strings/numbers (for results.csv / results.md)."""
        flat = {k: (str(v) if isinstance(v, (Path, ModelSize, tuple)) else v) for k, v in asdict(self).items()}
        flat["teacher_size"], flat["student_size"] = str(self.teacher_size), str(self.student_size)
        flat["methods"] = " ".join(self.methods)
        flat.pop("progress")
        flat.pop("output")
        return flat


# A smoke run of a few seconds: same stages, toy sizes (the numbers mean nothing).
QUICK = dict(
    digits=2, num_train=256, num_heldout=32, teacher_size=ModelSize(1, 32, 2, 64),
    student_size=ModelSize(1, 16, 2, 32), teacher_steps=30, student_steps=5, pretrain_batch_size=32,
    num_prompts=32, distil_steps=4, distil_batch_size=16, eval_points=2,
)


@dataclass
class ExperimentResult:
    rows: list
    distillations: Dict[str, DistilResult]
    files: Dict[str, Path]
    seconds: float
    notes: List[str] = field(default_factory=list)


def _say(message: str) -> None:
    print(message, flush=True)


def _load_and_evaluate(path: Path, task: AdditionTask, heldout) -> Tuple[float, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .evaluate import evaluate

    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    result = evaluate(model, tokenizer, task, heldout)
    return result.accuracy, result.nll


def _sample_accuracy(task: AdditionTask, responses_path: Path) -> float:
    from ..trainer.jsonl import read_jsonl

    rows = [row for _, row in read_jsonl(responses_path)]
    return sum(task.is_correct(r["prompt"], r["response"]) for r in rows) / max(len(rows), 1)


def run_experiment(config: ExperimentConfig) -> ExperimentResult:
    """Every stage of the experiment (see the module docstring); prints a line per stage and the table."""
    from ..trainer.generation import generate
    from ..trainer.pairing import pair
    from .models import build_model, num_parameters, save_model
    from .pretrain import pretrain
    from .report import Row, format_table, plot_curves, write_csv, write_markdown
    from .tokenizer import build_tokenizer

    unknown = set(config.methods) - set(METHODS)
    if unknown or not config.methods:
        raise ValueError(f"methods must be a non-empty subset of {sorted(METHODS)}, got {config.methods}")
    started = time.perf_counter()
    output = Path(config.output)
    models_dir, data_dir, runs_dir = output / "models", output / "data", output / "runs"
    for folder in (models_dir, data_dir, runs_dir):
        folder.mkdir(parents=True, exist_ok=True)

    # task and tokenizer
    task = AdditionTask(config.digits)
    split = task.split(config.num_train, config.num_heldout, seed=config.seed)
    tokenizer = build_tokenizer(task.alphabet)
    _say(f"[task] {config.digits}-digit addition: {len(split.train)} training / {len(split.heldout)} held-out "
         f"prompts (disjoint), seed {config.seed}; character tokenizer of {len(tokenizer)} tokens")

    def evaluate_dir(path: Path) -> Tuple[float, float]:
        return _load_and_evaluate(path, task, split.heldout)

    rows = []

    # pre-training
    def pretrained(role: str, size: ModelSize, steps: int, lr: float, seed: int) -> Path:
        model = build_model(size, tokenizer, seed=seed)
        trained = pretrain(
            model, tokenizer, split.train, steps=steps, batch_size=config.pretrain_batch_size, lr=lr, seed=seed,
            progress=config.progress, description=f"pretrain {role}",
        )
        folder = save_model(model, tokenizer, models_dir / role)
        tick = time.perf_counter()
        accuracy, nll = evaluate_dir(folder)
        name = "teacher" if role == "teacher" else "student (before)"
        rows.append(Row(name, "pretrained", str(size), num_parameters(model), steps, accuracy, nll, trained.seconds))
        _say(f"[{role}] {size} ({num_parameters(model):,} parameters), {steps} steps in "
             f"{trained.seconds:.1f} s: held-out accuracy {100 * accuracy:.1f} %, NLL {nll:.3f} "
             f"(evaluated in {time.perf_counter() - tick:.1f} s)")
        return folder

    teacher_dir = pretrained("teacher", config.teacher_size, config.teacher_steps, config.teacher_lr, config.seed)
    student_dir = pretrained("student", config.student_size, config.student_steps, config.student_lr, config.seed + 1)
    teacher_row, student_row = rows

    # distillation data
    tick = time.perf_counter()
    prompts = [example.prompt for example in split.train[: config.num_prompts]]
    responses = {}
    for role, folder in (("teacher", teacher_dir), ("student", student_dir)):
        path = data_dir / f"{role}.jsonl"
        for stale in (path, path.with_name(path.name + ".partial")):
            stale.unlink(missing_ok=True)  # generate() would resume from rows of an earlier run
        generate(
            folder, prompts, path, temperature=config.temperature, top_p=config.top_p,
            max_new_tokens=config.digits + 3, seed=config.seed, engine="hf", batch_size=256,
            progress=config.progress,
        )
        responses[role] = path
    report = pair(responses["teacher"], responses["student"], data_dir / "pairs.jsonl", strict=True)
    sampled = {role: _sample_accuracy(task, path) for role, path in responses.items()}
    _say(f"[data] {report.num_pairs} pairs from {len(prompts)} training prompts (temperature {config.temperature}, "
         f"top-p {config.top_p}); sampled answers correct: teacher {100 * sampled['teacher']:.1f} %, "
         f"student {100 * sampled['student']:.1f} %; {time.perf_counter() - tick:.1f} s")

    # distillation
    import accelerate  # noqa: F401  (imported here, so that the first method timed does not pay for it)

    settings = DistilSettings(
        steps=config.distil_steps, lr=config.distil_lr, batch_size=config.distil_batch_size, seed=config.seed,
        use_lora=config.use_lora, max_length=4 * config.digits + 8, eval_points=config.eval_points,
    )
    distillations: Dict[str, DistilResult] = {}
    for method in config.methods:
        result = distil(
            method, teacher_dir=teacher_dir, student_dir=student_dir, pairs_path=report.output_path,
            num_pairs=report.num_pairs, output_dir=runs_dir / method, settings=settings,
            evaluate_model=evaluate_dir, progress=config.progress,
        )
        distillations[method] = result
        final = result.curve[-1]
        rows.append(Row(method, "distilled", student_row.size, student_row.parameters, result.steps,
                        final.accuracy, final.nll, result.train_seconds))
        _say(f"[{method}] {result.steps} steps in {result.train_seconds:.1f} s (+{result.eval_seconds:.1f} s for "
             f"{len(result.curve)} held-out evaluations): accuracy {100 * final.accuracy:.1f} %, NLL {final.nll:.3f}")

    # outputs
    from ..trainer.metrics_log import read_metrics

    losses = {m: [(int(r["step"]), float(r["loss"])) for r in read_metrics(d.metrics_csv)]
              for m, d in distillations.items()}
    curves = {m: [(0, student_row.accuracy, student_row.nll)] + [(p.step, p.accuracy, p.nll) for p in d.curve]
              for m, d in distillations.items()}
    notes = [
        f"Held-out: {len(split.heldout)} prompts never seen in training. One seed ({config.seed}). "
        f"Training times are wall-clock on this machine; `distillm2` also runs the student's responses "
        "(twice the rows per step).",
        f"Sampled distillation data: {100 * sampled['teacher']:.1f} % of the teacher's and "
        f"{100 * sampled['student']:.1f} % of the student's responses are correct.",
    ]
    files = {
        "csv": write_csv(rows, output / "results.csv", config.settings()),
        "markdown": write_markdown(rows, output / "results.md", config.settings(), notes, curves),
        "plot": plot_curves(
            output / "training_curves.png", losses, curves, teacher=(teacher_row.accuracy, teacher_row.nll),
            title=f"{config.digits}-digit addition: student {config.student_size} distilled from teacher "
                  f"{config.teacher_size} (seed {config.seed})",
        ),
    }
    seconds = time.perf_counter() - started
    _say("")
    _say(format_table(rows))
    _say("")
    _say(f"total {seconds:.0f} s; wrote {', '.join(str(p) for p in files.values())}")
    return ExperimentResult(rows, distillations, files, seconds, notes)
