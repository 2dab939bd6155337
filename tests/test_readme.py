"""The README is a contract: every code block in it runs here, on tiny models, and every option it gives a
command is accepted.

The README's fenced blocks are parsed, so a new block is picked up without touching this file:

- ```python blocks run as written, in order, in one namespace (a later block continues an earlier one, as
  a reader would), in a temporary working folder. The only setup is what the README's prose says a reader
  provides: every backticked name in the prose up to a block that `PROVIDED` knows (`teacher`, `loader`,
  `prompts.jsonl`, ...) is built from tiny models (tests/tiny_models.py, built from configs: no downloads)
  before that block runs; a name the prose does not mention is not provided, so the block fails.
  A block whose first line is `# not run by tests/test_readme.py: <reason>` is skipped with that reason
  (none is, today).
- ```bash blocks: each command line must match a rule of `COMMANDS`, which runs it at tiny sizes (the
  mapping and its reason are in the rule) or, where running it is impossible here, checks what it relies on
  and says why it is not run. A new command that no rule covers fails `test_readme_command`.
- Other blocks (the math, the data formats, the layout) are prose.

Long runs (a pipeline, two DDP processes, the benchmark suite) are marked `slow`.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
NOT_RUN_MARKER = "# not run by tests/test_readme.py:"

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Block:
    language: str
    line: int  # 1-based line of the opening fence
    code: str
    prose: str  # the README's prose before this block (every block's code left out)

    @property
    def id(self) -> str:
        return f"{self.language}@line{self.line}"


def readme_blocks(text: str) -> list[Block]:
    blocks, prose, lines, k = [], [], text.splitlines(), 0
    while k < len(lines):
        opening = re.match(r"^```(\w*)\s*$", lines[k])
        if not opening:
            prose.append(lines[k])
            k += 1
            continue
        end = next((j for j in range(k + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"README.md:{k + 1}: a fenced block is not closed"
        blocks.append(Block(opening.group(1), k + 1, "\n".join(lines[k + 1:end]) + "\n", "\n".join(prose)))
        k = end + 1
    return blocks


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))
PYTHON_BLOCKS = [b for b in BLOCKS if b.language == "python"]
BASH_BLOCKS = [b for b in BLOCKS if b.language == "bash"]


def mentioned(prose: str) -> set[str]:
    """The backticked names of a stretch of prose."""
    return set(re.findall(r"`([^`\s]+)`", prose))


# ----------------------------------------------------------------------------------------------------
# What a reader provides, built on tiny models
# ----------------------------------------------------------------------------------------------------


class Reader:
    """A reader's session: a working folder, a namespace, and the tiny models and data the prose names."""

    def __init__(self, folder: Path, tiny_models):
        self.folder, self.tiny_models, self.namespace, self.provided = folder, tiny_models, {}, set()
        self._models = None

    def models(self):
        """A teacher and a student in memory, sharing the tokenizer and the vocabulary size (as the README
        asks of the reader's models), and the tokenizer."""
        if self._models is None:
            from tiny_models import build_tokenizer, save_tiny_model
            from transformers import AutoModelForCausalLM

            folders = [save_tiny_model(self.folder / ".models" / name, "llama", hidden, seed=seed)
                       for name, hidden, seed in (("teacher", 48, 1), ("student", 32, 2))]
            teacher, student = (AutoModelForCausalLM.from_pretrained(f) for f in folders)
            teacher.requires_grad_(False)
            self.initial_student = {k: v.clone() for k, v in student.state_dict().items()}
            self._models = teacher, student, build_tokenizer()
        return self._models

    def rows(self, count: int, offset: int, response):
        """`count` right-padded chat rows (ids, attention mask, labels with prompt and padding at −100)."""
        from tiny_models import PROMPTS

        _, _, tokenizer = self.models()
        rows = []
        for i in range(offset, offset + count):
            prompt = PROMPTS[i % len(PROMPTS)]
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                     add_generation_prompt=True)
            prompt_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
            response_ids = tokenizer(response(prompt), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            rows.append((prompt_ids, response_ids))
        width = max(len(p) + len(r) for p, r in rows)
        ids = torch.full((count, width), tokenizer.pad_token_id)
        labels = torch.full((count, width), -100)
        mask = torch.zeros(count, width, dtype=torch.long)
        for k, (p, r) in enumerate(rows):
            ids[k, :len(p) + len(r)] = torch.tensor(p + r)
            labels[k, len(p):len(p) + len(r)] = torch.tensor(r)
            mask[k, :len(p) + len(r)] = 1
        return ids, mask, labels

    def provide(self, name: str) -> None:
        if name in self.provided or name not in PROVIDED:
            return
        value = PROVIDED[name](self)
        if not name.endswith(("/", ".jsonl")):
            self.namespace[name] = value
        self.provided.add(name)

    def link_model_folder(self, role: str) -> None:
        """`teacher/` / `student/`: tiny saved models like the `tiny_models` fixture's (the teacher's lm_head has
        padded rows, as real checkpoints often do), loaded by `from_pretrained` from the folder, with a context
        long enough for the README's `max_new_tokens=1024` (generate refuses a model whose context it fills)."""
        from tiny_models import save_tiny_model

        hidden, padding, seed = (48, 8, 1) if role == "teacher" else (32, 0, 2)
        save_tiny_model(self.folder / role, "llama", hidden, vocab_padding=padding, seed=seed,
                        max_position_embeddings=2048)


def _optimizer(reader: Reader):
    return torch.optim.AdamW(reader.models()[1].parameters(), lr=1e-3)


def _loader(reader: Reader):
    batches = []
    for offset in (0, 2):
        ids, mask, labels = reader.rows(2, offset, lambda prompt: "Sure: " + prompt[::-1])
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def _pair_loader(reader: Reader):
    batches = []
    for offset in (0, 2):
        ids_t, _, labels_t = reader.rows(2, offset, lambda prompt: "The answer to " + prompt)
        ids_s, _, labels_s = reader.rows(2, offset, lambda prompt: "No.")
        batches.append((ids_t, labels_t, ids_s, labels_s))
    return batches


def _prompts_file(reader: Reader):
    from tiny_models import write_prompts

    write_prompts(reader.folder / "prompts.jsonl")


PROVIDED = {
    "teacher": lambda reader: reader.models()[0],
    "student": lambda reader: reader.models()[1],
    "optimizer": _optimizer,
    "loader": _loader,
    "pair_loader": _pair_loader,
    "num_epochs": lambda reader: 2,
    "teacher/": lambda reader: reader.link_model_folder("teacher"),
    "student/": lambda reader: reader.link_model_folder("student"),
    "prompts.jsonl": _prompts_file,
}


@pytest.fixture(scope="module")
def python_reader(tmp_path_factory, tiny_models):
    return Reader(tmp_path_factory.mktemp("readme-python"), tiny_models)


@pytest.fixture(scope="module")
def shell_reader(tmp_path_factory, tiny_models):
    return Reader(tmp_path_factory.mktemp("readme-shell"), tiny_models)


@contextlib.contextmanager
def working_folder(folder: Path):
    previous = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


# ----------------------------------------------------------------------------------------------------
# Python blocks
# ----------------------------------------------------------------------------------------------------


def _python_param(block: Block):
    slow = "distillm2_kernels.trainer" in block.code  # generation, training and a three-epoch pipeline
    return pytest.param(block, id=block.id, marks=[pytest.mark.slow] if slow else [])


def test_the_readme_has_the_blocks_this_file_runs():
    assert len(PYTHON_BLOCKS) >= 4 and len(BASH_BLOCKS) >= 4, [b.id for b in BLOCKS]


@pytest.mark.parametrize("block", [_python_param(b) for b in PYTHON_BLOCKS])
def test_readme_python_block(block: Block, python_reader: Reader):
    """Each block as written, after the previous ones, with what the prose up to it says the reader provides."""
    first_line = block.code.lstrip().splitlines()[0]
    if first_line.startswith(NOT_RUN_MARKER):
        pytest.skip(first_line[len(NOT_RUN_MARKER):].strip())
    for name in sorted(mentioned(block.prose)):
        python_reader.provide(name)
    with working_folder(python_reader.folder):
        exec(compile(block.code, f"README.md:{block.line + 1}", "exec"), python_reader.namespace)
    namespace = python_reader.namespace
    if "loss" in namespace:  # every training example ends with a finite loss that reached the student
        assert torch.isfinite(namespace["loss"]).all()
    if "metrics" in namespace and isinstance(namespace["metrics"], dict):
        assert all(torch.isfinite(v).all() for v in namespace["metrics"].values())


def test_the_training_examples_train_the_student(python_reader: Reader):
    """After the logits and hidden-state examples ran (above), every weight of the student moved, and the
    curriculum advanced by one step per optimizer step and fixed its anchors."""
    namespace = python_reader.namespace
    if "objective" not in namespace:
        pytest.fail("the DistiLLM-2 example did not run (see test_readme_python_block)")
    objective, pair_loader, num_epochs = namespace["objective"], namespace["pair_loader"], namespace["num_epochs"]
    # the loop's steps, plus the hidden-state block's one step after it
    assert objective.state.step == num_epochs * len(pair_loader) + 1
    assert objective.state.epoch == num_epochs - 1 and objective.state.anchor_t is not None
    after = namespace["student"].state_dict()
    unchanged = [k for k, v in python_reader.initial_student.items() if torch.equal(v, after[k])]
    assert not unchanged, unchanged


# ----------------------------------------------------------------------------------------------------
# Command blocks
# ----------------------------------------------------------------------------------------------------


@dataclass
class Command:
    pattern: str  # a regex for the whole line (comments stripped)
    how: str  # "run" (at tiny sizes) or "checked" (not run here; the check and the reason in `why`)
    why: str
    slow: bool = False


def _tiny_cli(reader: Reader, words: list[str], extra: list[str]) -> None:
    from distillm2_kernels.trainer.cli import main

    for token in words:
        if token in PROVIDED:
            reader.provide(token)
    with working_folder(reader.folder):
        assert main(words + extra) == 0, words


def run_distillm2(reader: Reader, words: list[str]) -> None:
    """`distillm2 <command> ...` as written, in-process (the console script is `cli.main`), with tiny sizes
    appended (a later option wins in argparse): 8 new tokens per response instead of 1024, no progress bars.
    `train` runs as written: 8 pairs, batch size 8, so --epochs 3 is three steps."""
    command = words[1]
    tiny = {"generate": ["--max-new-tokens", "8", "--no-progress"], "pair": [], "train": ["--no-progress"],
            "score": ["--no-progress"],
            "pipeline": ["--max-new-tokens", "8", "--no-progress"]}[command]
    _tiny_cli(reader, words[1:], tiny)


def run_python_c(reader: Reader, words: list[str]) -> None:
    """`python -c CODE`: the code runs in-process in the working folder (a subprocess would only add the
    imports' time)."""
    with working_folder(reader.folder):
        exec(compile(words[2], "README.md (python -c)", "exec"), {})


def run_make_demo(reader: Reader, words: list[str]) -> None:
    """`make demo` = `python -m distillm2_kernels.experiment` (the Makefile's target, checked) at its
    `--quick` sizes: the same stages (pretraining, sampling, pairing, six distillation arms, the report) in
    seconds instead of minutes."""
    assert re.search(r"^demo: install\n\t\$\(PY\) -m distillm2_kernels\.experiment$", _makefile(), re.M)
    from distillm2_kernels.experiment.__main__ import main

    output = reader.folder / "experiment_output"
    assert main(["--quick", "--output", str(output), "--no-progress"]) == 0
    for name in ("results.csv", "summary.csv", "results.md", "results.png"):  # what the README says it writes
        assert (output / name).is_file(), name


def check_make_test(reader: Reader, words: list[str]) -> None:
    """`make test` is this suite: the Makefile's target runs pytest over tests/, which holds this file."""
    assert re.search(r"^test: install\n\t\$\(PY\) -m pytest -q tests$", _makefile(), re.M)
    assert Path(__file__).parent == ROOT / "tests"


def check_make_bench(reader: Reader, words: list[str]) -> None:
    """`make bench` is `python -m benchmarks $(BENCH_ARGS)` (about ten minutes on two cores): the Makefile's
    target is checked; the same entry point runs at tiny sizes for the `--quick` line."""
    assert re.search(r"^bench: install\n\t\$\(PY\) -m benchmarks \$\(BENCH_ARGS\)$", _makefile(), re.M)


def check_pip_install(reader: Reader, words: list[str]) -> None:
    """Installing would change this environment (and needs the network for the extras' packages): the test
    checks that the extras named exist in pyproject.toml and that this checkout's package is the one under test
    (tests/test_install.py installs the package as a user would)."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra in re.findall(r"\.\[(\w+)\]", " ".join(words)):
        assert extra in extras, f"pyproject.toml has no extra {extra!r}"
    import distillm2_kernels

    assert Path(distillm2_kernels.__file__).resolve().parent == ROOT / "distillm2_kernels"


def run_benchmarks(reader: Reader, words: list[str]) -> None:
    """`.venv/bin/python -m benchmarks --quick`, this interpreter, into a temporary folder (the README's
    default folder is benchmarks/results/quick/) and on one thread (on a shared machine OpenMP's spinning
    makes two-thread runs far slower)."""
    out = reader.folder / "bench-quick"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)  # a benchmark run does not set it
    process = subprocess.run([sys.executable, "-m", "benchmarks", *words[3:], "--out", str(out), "--threads", "1"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    assert (out / "results.csv").is_file() and (out / "results.md").is_file()


def run_benchmarks_help(reader: Reader, words: list[str], comment: str) -> None:
    """`--help` prints and exits 0, listing every option the README's comment names."""
    from benchmarks.__main__ import parse_args

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit) as exit_:
        parse_args(["--help"])
    assert exit_.value.code == 0
    for option in re.findall(r"--[\w-]+", comment):
        assert option in printed.getvalue(), option


def check_accelerate_gpu(reader: Reader, words: list[str]) -> None:
    """A DDP config for 8 GPUs: not runnable here (no GPU). Its file exists and is the DDP one; the same code
    path runs under the CPU line below (and tests/test_training.py)."""
    config = (ROOT / words[3]).read_text()
    assert "distributed_type: MULTI_GPU" in config


def run_accelerate_cpu(reader: Reader, words: list[str]) -> None:
    """Two gloo processes on the CPU, as written, with the `...` filled in with a tiny `train`: the pairs of
    the `pair` line above (or of a fresh tiny pair run), one step of one pair per process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    while "=" in words[0]:
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    for name in ("teacher/", "student/", "prompts.jsonl"):
        reader.provide(name)
    with working_folder(reader.folder):
        if not Path("pairs.jsonl").exists():
            from distillm2_kernels.trainer.cli import main

            for role in ("teacher", "student"):
                assert main(["generate", "--model", f"{role}/", "--prompts", "prompts.jsonl", "--output",
                             f"{role}.jsonl", "--max-new-tokens", "8", "--no-progress"]) == 0
            assert main(["pair", "--teacher", "teacher.jsonl", "--student", "student.jsonl", "--output",
                         "pairs.jsonl"]) == 0
    assert words[:2] == ["accelerate", "launch"] and words[-1] == "...", words
    module = words.index("-m")
    launcher = Path(sys.executable).parent / "accelerate"
    command = [str(launcher), "launch"] if launcher.exists() else [sys.executable, "-m", "accelerate.commands.launch"]
    # the README's launcher options, then the ones a machine without an accelerate config needs
    command += words[2:module] + ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                                  "--main_process_port", str(_free_port())]
    command += words[module:-1] + ["--teacher", "teacher/", "--student", "student/", "--data", "pairs.jsonl",
                                   "--output", "ddp-run/", "--max-steps", "1", "--batch-size", "1", "--no-progress"]
    process = subprocess.run(command, cwd=reader.folder, env=env, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    assert (reader.folder / "ddp-run" / "final" / "config.json").is_file()


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _makefile() -> str:
    return (ROOT / "Makefile").read_text()


def check_make_target(target: str, recipe: str):
    """A check that the Makefile's `target` runs `recipe` (a regular expression of its command line)."""

    def check(reader: Reader, words: list[str]) -> None:
        assert re.search(rf"^{re.escape(target)}:.*\n\t{recipe}$", _makefile(), re.M), f"make {target}: {recipe}"

    return check


def check_wheel_folder_is_ignored(reader: Reader, words: list[str]) -> None:
    """It edits the checkout's git exclude file: checked, not run; no wheel folder is tracked."""
    import subprocess

    tracked = subprocess.run(["git", "ls-files", ".whl"], cwd=ROOT, capture_output=True, text=True).stdout
    assert words[:2] == ["echo", "/.whl/"] and not tracked.strip()


def check_liger_download(reader: Reader, words: list[str]) -> None:
    """It needs the network: checked, not run; the wheel goes to `.whl/`, where gpu_check installs from."""
    from benchmarks import gpu_check

    assert words[-3:-1] == ["-d", ".whl"] and re.fullmatch(r"liger-kernel==[\d.]+", words[-1])
    assert ".whl" in Path(gpu_check.__file__).read_text()


COMMANDS = [
    (r"make demo", run_make_demo, "runs the experiment at its --quick sizes (the full one takes minutes)", False),
    (r"make test", check_make_test, "checked, not run: it is this test suite", False),
    (r"make bench", check_make_bench, "checked, not run: ~10 min; the --quick line runs the same entry point", False),
    (r"pip install .*", check_pip_install, "checked, not run: it would change this environment", False),
    (r"distillm2 (generate|pair|score) .*", run_distillm2, "runs, 8 new tokens per response", False),
    (r"distillm2 (train|pipeline) .*", run_distillm2, "runs as written on 8 pairs (pipeline: 8 new tokens)", True),
    (r"python -c .*", run_python_c, "runs in-process", False),
    (r"accelerate launch --config_file \S+ .*", check_accelerate_gpu, "checked, not run: an 8-GPU config", False),
    (r"ACCELERATE_USE_CPU=true accelerate launch .*", run_accelerate_cpu, "runs: 2 gloo processes, 1 step", True),
    (r"\.venv/bin/python -m benchmarks --quick", run_benchmarks, "runs, into a temporary folder", True),
    (r"\.venv/bin/python -m benchmarks --help", run_benchmarks_help, "runs", False),
    (r"make aot-check", check_make_target("aot-check", r"\$\(PY\) -m benchmarks\.aot_compile"),
     "checked, not run: tests/test_aot_compile.py runs the same module", False),
    (r"make gpu-check", check_make_target("gpu-check", r"\$\(PYTHON\) -m benchmarks\.gpu_check \$\(GPU_CHECK_ARGS\)"),
     "checked, not run: it needs a GPU", False),
    (r"make gpu-check-dry-run", check_make_target("gpu-check-dry-run", r"\$\(PY\) -m benchmarks\.gpu_check --dry-run"),
     "checked, not run: tests/test_gpu_check.py runs the dry run", False),
    (r"echo /\.whl/ '>>' \.git/info/exclude", check_wheel_folder_is_ignored, "checked, not run: edits .git/", False),
    (r"python3 -m pip download .* liger-kernel==\S+", check_liger_download, "checked, not run: needs the network",
     False),
]


def _command_lines():
    """(block, line number, line, comment) of every command in the README's bash blocks."""
    found = []
    for block in BASH_BLOCKS:
        for offset, raw in enumerate(block.code.splitlines(), start=1):
            if not raw.strip():
                continue
            words = shlex.split(raw, comments=True)
            comment = raw[raw.index("#"):] if "#" in raw and not raw.strip().startswith("#") else ""
            if words:
                found.append((block, block.line + offset, shlex.join(words), comment))
    return found


def _rule(line: str):
    return next((rule for rule in COMMANDS if re.fullmatch(rule[0], line)), None)


def _command_params():
    """One param per command line; every line of a block with a slow line is slow (later lines of a block
    use what earlier ones wrote: `python -c` loads the model `train` wrote)."""
    lines = _command_lines()
    slow_blocks = {id(block) for block, _, line, _ in lines if (_rule(line) or (None, None, None, False))[3]}
    return [pytest.param(block, line, comment, _rule(line), id=f"line{number}:{line[:50]}",
                         marks=[pytest.mark.slow] if id(block) in slow_blocks else [])
            for block, number, line, comment in lines]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No hub look-ups: a missing local folder fails at once instead of retrying the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.mark.parametrize("block, line, comment, rule", _command_params())
def test_readme_command(block, line, comment, rule, shell_reader: Reader):
    """Each command line of the README's bash blocks, in order, through the rule that covers it (the rule's
    docstring says how it maps the command to tiny sizes, or why it only checks)."""
    assert rule is not None, (f"README.md:{block.line}: no rule in tests/test_readme.py COMMANDS covers {line!r}: "
                              "add one that runs it at tiny sizes, or checks it and says why not")
    for name in sorted(mentioned(block.prose)):
        shell_reader.provide(name)
    handler = rule[1]
    words = shlex.split(line)
    if handler is run_benchmarks_help:
        handler(shell_reader, words, comment)
    else:
        handler(shell_reader, words)


# ----------------------------------------------------------------------------------------------------
# Options the README gives the commands
# ----------------------------------------------------------------------------------------------------


def _section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def _options_of(command: str) -> set[str]:
    from distillm2_kernels.trainer.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return set(subparsers.choices[command]._option_string_actions)


def test_every_option_the_readme_gives_the_trainer_commands_is_accepted():
    """The train table's options (first column and the ones named in the meanings), the generation options
    the generate and pipeline paragraphs name, and `--strict` of pair; pipeline takes every generation option
    of generate and the training options but `--max-steps` / `--resume`."""
    section = _section("Reference trainer")
    table = [line for line in section.splitlines() if line.startswith("| `--")]
    training = set(re.findall(r"--[a-z][\w-]*", "\n".join(table)))
    assert {"--loss", "--preset", "--epochs", "--max-steps", "--bf16", "--resume", "--no-progress"} <= training
    assert training <= _options_of("train"), training - _options_of("train")
    assert training - {"--max-steps", "--resume"} <= _options_of("pipeline")

    generate_paragraph = section[section.index("**generate**"):section.index("**pair**")]
    generation = set(re.findall(r"--[a-z][\w-]*", generate_paragraph))
    assert {"--n", "--engine", "--dtype", "--generation-batch-size"} <= generation
    assert generation <= _options_of("generate")
    pipeline_paragraph = section[section.index("**pipeline**"):section.index("Data formats")]
    named = set(re.findall(r"--[a-z][\w-]*", pipeline_paragraph)) - {"--max-steps", "--resume", "--config_file"}
    assert named <= _options_of("pipeline"), named - _options_of("pipeline")
    assert _options_of("generate") - {"--model", "--prompts", "--output"} <= _options_of("pipeline")
    assert "--strict" in _options_of("pair")


def test_pipeline_dtype_reaches_every_generation(monkeypatch, tmp_path):
    """`distillm2 pipeline --dtype bfloat16` is accepted and given to each generation, in-process and (through
    the launcher) as a `generate` command line."""
    from distillm2_kernels.trainer import arguments, cli, pipeline

    seen = {}
    monkeypatch.setattr(cli, "run_pipeline", lambda config: seen.setdefault("config", config) and (_ for _ in ()).throw(
        ValueError("stop")))
    assert cli.main(["pipeline", "--prompts", "p.jsonl", "--teacher", "t/", "--student", "s/", "--output",
                     str(tmp_path), "--dtype", "bfloat16", "--max-new-tokens", "4"]) == 2
    config = seen["config"]
    assert config.dtype == "bfloat16"
    options = pipeline._generation_options(config, seed=1)
    assert options["dtype"] == "bfloat16"
    argv = arguments.generation_arguments(options)
    assert argv[argv.index("--dtype") + 1] == "bfloat16"
    assert cli.build_parser().parse_args(["generate", "--model", "m", "--prompts", "p", "--output", "o", *argv]).dtype == "bfloat16"


def test_the_experiment_takes_the_options_the_readme_names():
    from distillm2_kernels.experiment.__main__ import parse_args

    config = parse_args(["--quick", "--seed", "3", "--output", "elsewhere"])
    assert config.seeds == (3,) and str(config.output) == "elsewhere"
    assert parse_args(["--seeds", "5"]).seeds == (0, 1, 2, 3, 4)


# ----------------------------------------------------------------------------------------------------
# Docstring examples of the public API
# ----------------------------------------------------------------------------------------------------


def _public_objects():
    import inspect

    import distillm2_kernels

    for name in distillm2_kernels.__all__:
        value = getattr(distillm2_kernels, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            yield name, value


def test_public_docstring_examples_are_doctests_and_pass():
    """Every example in a public docstring (distillm2_kernels.__all__, their methods included) is a doctest
    (`>>>`), and passes; an indented code example that is not one is a failure here."""
    import doctest
    import inspect

    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    ran = 0
    for name, value in _public_objects():
        for test in finder.find(value, name, globs={name: value}):
            if test.examples:
                with working_folder(ROOT):
                    result = runner.run(test, out=lambda text: None)
                assert result.failed == 0, f"{test.name}: {result.failed} failing example(s)"
                ran += len(test.examples)
        own = [getattr(m, "__func__", m) for m in vars(value).values()] if inspect.isclass(value) else []
        docs = [inspect.getdoc(value) or ""] + [m.__doc__ or "" for m in own if inspect.isfunction(m)]
        docs = [inspect.cleandoc(doc) for doc in docs]
        for doc in docs:
            for block in re.findall(r"(?:\n\n)((?: {4}.+\n?)+)", doc):
                assert block.lstrip().startswith(">>>"), f"{name}: an example that is not a doctest:\n{block}"
    assert ran >= 10  # DistiLLM2Loss's and fused_skl's examples


def test_the_quick_benchmark_says_how_long_it_takes_and_leaves_out_the_compile():
    """`--quick` is not "seconds": its help and the README give its measured length, and it leaves out
    torch.compile's baseline (~10 s of compiling per shape) unless --impls names it."""
    from benchmarks.__main__ import QUICK_RUN, parse_args, plan

    assert "1.5 min" in README.read_text(encoding="utf-8") and "1.5 minutes" in QUICK_RUN
    impls = {task[3] for task in plan(parse_args(["--quick"]), "cpu")}
    assert "naive_compiled" not in impls and {"naive", "torch", "cpu"} <= impls
    named = {task[3] for task in plan(parse_args(["--quick", "--impls", "naive,naive_compiled"]), "cpu")}
    assert named == {"naive", "naive_compiled"}
    assert "naive_compiled" in {task[3] for task in plan(parse_args([]), "cpu")}
