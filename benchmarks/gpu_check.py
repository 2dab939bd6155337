"""The first run on a machine with a GPU, in one command: `python -m benchmarks.gpu_check` (`make gpu-check`).

On one H100 or H200 with no network it finishes in at most `BUDGET_S` (8 minutes: a machine that takes a minute
to start still ends inside a 10-minute lease), each step in a child process under its own time limit (the
limits add up to the budget; a step that runs out is killed and the next one runs):

1. environment  the device, torch / triton / Liger versions (and fails the run early when CUDA is missing);
2. wheels       when `.whl/` holds wheels (Liger-Kernel is a pure-Python wheel that can travel there, see the
                README), `pip install --no-index --no-deps --target` them into a temporary folder that the
                later steps find first on PYTHONPATH;
3. tests        the test suite, compiled Triton kernels on CUDA (the tests use CUDA when torch sees it), the
                tests marked `slow` left out; with pytest-xdist installed, in 8 processes;
4. logits       the benchmark's headline rows of fused_skl / fused_srkl: N = 8192, V in {32000, 151936}, bf16,
                fwd and fwd+bwd, implementations naive, naive_compiled (torch.compile), triton and liger;
5. fused_linear fused_linear_skl / fused_linear_srkl at N = 8192, H = 4096, V = 128256, bf16, the same
                implementations and liger_kl.

Results: CSV, markdown and plots of the benchmark (`python -m benchmarks` with `--merge`) and this run's summary
(`gpu_check.md`, `gpu_check.json`: device, commit, command, each step's command, status and seconds) and logs
under `benchmarks/results/<device>/` (`--out` to change it). Exit status 0 when every step passed.

`--dry-run` runs the same steps on the CPU at tiny sizes: the tests step a few kernel tests under the Triton
interpreter, the benchmarks `--quick` sizes with the library's "torch" backend in place of torch.compile (whose
CPU compile alone would take minutes); the triton and Liger rows are then skipped rows, as on any CPU.
tests/test_gpu_check.py runs it in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

from .environment import ROOT, commit, utc_now

BUDGET_S = 480
# step -> its time limit in seconds (they add up to BUDGET_S). Time a step leaves unused passes to the next: step k
# must end by the sum of the limits of steps 1..k after the start (and every step by the budget).
LIMITS = {"environment": 30, "wheels": 30, "tests": 180, "logits": 130, "fused_linear": 110}
IMPLS = "naive,naive_compiled,triton,liger"
DRY_IMPLS = "naive,torch,triton,liger"
ENVIRONMENT_PREFIX = "GPU_CHECK_ENVIRONMENT "
# The bounds of the logits ops' rows in gpu_check.md (docs/design.md section 7): the HBM bound is the row's
# min_traffic_GB at the copy bandwidth measured in the same run (the CSV's ceiling_copy_GBps); the SFU bound is the
# math's need, SFU_PER_ENTRY special-function ops per vocabulary entry (p, q and the mixture's log), at
# SFU_PER_CLOCK per SM at the nominal boost clock (H100 / H200: 1.98 GHz; a lower real clock makes it optimistic).
SFU_PER_ENTRY = 3
SFU_PER_CLOCK = 16
NOMINAL_CLOCK_HZ = 1.98e9
DRY_TESTS = ["tests/test_skew_divergence.py", "-k", "test_vocab_above_block or test_detach_changes_gradient_not_value"]


def probe_environment() -> dict:
    """The device and the versions the steps will use (run as `--environment`, in the steps' environment)."""
    import importlib.metadata

    import torch

    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    cuda = torch.cuda.is_available()
    info = {"cuda_available": cuda, "torch": torch.__version__, "cuda": torch.version.cuda, "triton": version("triton"),
            "liger_kernel": version("liger-kernel"), "transformers": version("transformers"), "peft": version("peft"),
            "accelerate": version("accelerate"), "pytest_xdist": version("pytest-xdist"),
            "pytest_timeout": version("pytest-timeout")}
    if cuda:
        properties = torch.cuda.get_device_properties(0)
        info.update(device_name=torch.cuda.get_device_name(0), memory_GiB=round(properties.total_memory / 2**30),
                    capability=f"sm_{properties.major}{properties.minor}",
                    multiprocessors=properties.multi_processor_count, device_count=torch.cuda.device_count())
    return info


def device_folder(name: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


class Step:
    def __init__(self, name: str, command: list, limit_s: float, env: Optional[dict] = None, note: str = ""):
        self.name, self.command, self.limit_s, self.env, self.note = name, command, limit_s, env, note
        self.status, self.seconds, self.output, self.limit_used = "not run", 0.0, "", 0.0

    def run(self, log_dir: Path, deadline: float) -> "Step":
        """Runs the step until it ends or `deadline` (time.time()) passes."""
        limit = self.limit_used = max(1.0, deadline - time.time())
        print(f"\n=== {self.name}: {shlex.join(self.command)}   (limit {limit:.0f} s)", flush=True)
        started = time.time()
        log_path = log_dir / f"{self.name}.log"
        lines = []
        with open(log_path, "w") as log:
            process = subprocess.Popen(self.command, cwd=ROOT, env=self.env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
                                       start_new_session=True)  # its own process group: a time-out ends it all

            def pump():
                for line in process.stdout:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                    log.write(line)
                    lines.append(line)

            reader = threading.Thread(target=pump, daemon=True)
            reader.start()
            try:
                code = process.wait(timeout=limit)
                self.status = "ok" if code == 0 else f"failed (exit {code})"
            except subprocess.TimeoutExpired:
                _end_group(process)
                self.status = f"timed out after {limit:.0f} s"
            reader.join(timeout=10)
        self.seconds = time.time() - started
        self.output = "".join(lines)
        print(f"=== {self.name}: {self.status} in {self.seconds:.1f} s (log {log_path})", flush=True)
        return self

    def record(self) -> dict:
        return {"step": self.name, "command": shlex.join(self.command), "status": self.status,
                "seconds": round(self.seconds, 1), "limit_s": round(self.limit_used), "note": self.note}


def _end_group(process: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _env(dry_run: bool, site: Optional[Path]) -> dict:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    paths = [str(ROOT)] + ([str(site)] if site else []) + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    if dry_run:
        env["TRITON_INTERPRET"] = "1"  # the tests' kernels on CPU tensors (the benchmark workers drop it)
        env["CUDA_VISIBLE_DEVICES"] = ""  # the same steps as on a CPU-only machine, wherever it runs
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


def _has_module(python: str, module: str, env: dict) -> bool:
    return subprocess.run([python, "-c", f"import {module}"], env=env, capture_output=True).returncode == 0


def environment_step(args, site: Optional[Path]) -> Step:
    return Step("environment", [args.python, "-m", "benchmarks.gpu_check", "--environment"], LIMITS["environment"],
                _env(args.dry_run, site))


def plan(args, out: Path, site: Optional[Path]) -> list:
    """The steps after the environment's."""
    py = args.python
    env = _env(args.dry_run, site)
    steps = []
    wheels = sorted(Path(args.wheels).glob("*.whl")) if Path(args.wheels).is_dir() else []
    if wheels:
        steps.append(Step("wheels", [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                                     "--no-cache-dir", "--upgrade", "--target", str(site)] + [str(w) for w in wheels],
                          LIMITS["wheels"], env))
    if args.dry_run:
        tests = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *DRY_TESTS]
    else:
        tests = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", "--durations=15",
                 "--maxfail=25", "tests"]
        if _has_module(py, "xdist", env):
            tests[4:4] = ["-n", "8", "--dist", "loadfile"]
        if _has_module(py, "pytest_timeout", env):
            tests[4:4] = ["--timeout", "120"]
    if args.pytest_args:
        tests += shlex.split(args.pytest_args)
    if not args.skip_tests:
        steps.append(Step("tests", tests, LIMITS["tests"], env))
    bench = [py, "-m", "benchmarks", "--device", "cpu" if args.dry_run else "cuda", "--dtypes", "bfloat16",
             "--impls", DRY_IMPLS if args.dry_run else IMPLS, "--out", str(out), "--modes", "fwd,fwd+bwd"]
    if args.dry_run:
        logits = bench + ["--quick", "--suite", "skew_divergence", "--N", "64", "--V", "1000,4096", "--threads", "1"]
        fused = bench + ["--quick", "--suite", "fused_linear", "--N", "64", "--V", "1000", "--threads", "1", "--merge"]
        fused[fused.index("--impls") + 1] += ",liger_kl"
    else:
        logits = bench + ["--suite", "skew_divergence", "--N", "8192", "--V", "32000,151936"]
        fused = bench + ["--suite", "fused_linear", "--N", "8192", "--V", "128256", "--merge"]
        fused[fused.index("--impls") + 1] += ",liger_kl"
    steps.append(Step("logits", logits, LIMITS["logits"], env))
    steps.append(Step("fused_linear", fused, LIMITS["fused_linear"], env))
    return steps


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at tiny sizes")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default: benchmarks/results/<device>, dry run: benchmarks/results/dry-run)")
    parser.add_argument("--python", default=sys.executable, help="the interpreter of the steps (default: this one)")
    parser.add_argument("--wheels", default=str(ROOT / ".whl"), help="folder of wheels to install first (default: .whl)")
    parser.add_argument("--skip-tests", action="store_true", help="only the environment and the benchmarks")
    parser.add_argument("--pytest-args", default="", help="extra pytest arguments of the tests step")
    parser.add_argument("--environment", action="store_true", help="print the device and versions as JSON, and exit")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all steps (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.environment:
        print(ENVIRONMENT_PREFIX + json.dumps(probe_environment()))
        return 0
    started = time.time()
    deadline = started + args.budget
    command = "python -m benchmarks.gpu_check" + ("" if not (sys.argv[1:] if argv is None else argv) else
                                                  " " + shlex.join(sys.argv[1:] if argv is None else argv))
    with tempfile.TemporaryDirectory(prefix="distillm2_gpu_check_") as scratch:
        site = Path(scratch) / "site"  # where the wheels step installs
        environment = environment_step(args, site)
        mark = started + environment.limit_s * args.budget / BUDGET_S
        environment.run(Path(scratch), min(mark, deadline))
        info = _environment_info(environment.output)
        if not args.dry_run and not info.get("cuda_available"):
            print("gpu_check: torch sees no CUDA device (use --dry-run on a machine without a GPU)", file=sys.stderr)
            return 2
        out = args.out or (ROOT / "benchmarks" / "results" /
                           ("dry-run" if args.dry_run else device_folder(info.get("device_name", "gpu"))))
        log_dir = out / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / "environment.log").write_text(environment.output)
        steps = [environment] + plan(args, out, site)
        for step in steps[1:]:
            mark += step.limit_s * args.budget / BUDGET_S
            step.run(log_dir, min(mark, deadline))
            if step.name == "wheels":
                step.note = "installed: " + ", ".join(sorted(p.name[:-len(".dist-info")]
                                                             for p in site.glob("*.dist-info"))) if site.is_dir() else ""
    total = time.time() - started
    summary = {"date": utc_now(), "commit": commit(), "command": command, "dry_run": args.dry_run,
               "device": info.get("device_name", "cpu"), "environment": info, "budget_s": args.budget,
               "total_s": round(total, 1), "steps": [step.record() for step in steps]}
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")
    markdown = _markdown(summary) + "\n" + bounds_table(out / "results.csv", info.get("multiprocessors"))
    (out / "gpu_check.md").write_text(markdown)
    print("\n" + markdown)
    return 0 if all(step.status == "ok" for step in steps) else 1


def _environment_info(output: str) -> dict:
    for line in output.splitlines():
        if line.startswith(ENVIRONMENT_PREFIX):
            return json.loads(line[len(ENVIRONMENT_PREFIX):])
    return {}


def bounds_table(csv_path: Path, multiprocessors: Optional[int]) -> str:
    """Markdown: each CUDA row of the logits ops with its time as % of the HBM bound and of the SFU bound
    (100 % = at the bound; see SFU_PER_ENTRY)."""
    import csv

    title = "## Logits ops against their bounds (HBM: min_traffic_GB at the measured copy GB/s; SFU: " \
            f"{SFU_PER_ENTRY} ops per entry at {SFU_PER_CLOCK}/clock/SM, {NOMINAL_CLOCK_HZ / 1e9:.2f} GHz)\n"
    rows = []
    if csv_path.is_file() and multiprocessors:
        with open(csv_path, newline="") as handle:
            for row in csv.DictReader(handle):
                if row.get("suite") != "skew_divergence" or row.get("device") != "cuda" or row.get("status") != "ok":
                    continue
                try:
                    ms, traffic = float(row["median_ms"]), float(row["min_traffic_GB"])
                    copy, entries = float(row["ceiling_copy_GBps"]), float(row["N"]) * float(row["V"])
                except (KeyError, ValueError):
                    continue
                hbm_ms = traffic / copy * 1e3
                sfu_ms = entries * SFU_PER_ENTRY / (multiprocessors * SFU_PER_CLOCK * NOMINAL_CLOCK_HZ) * 1e3
                rows.append(f"| {row['op']} | {row['impl']} | {row['mode']} | {row['dtype']} | {row['N']} | {row['V']} "
                            f"| {ms:.3f} | {hbm_ms:.3f} | {100 * hbm_ms / ms:.0f} | {sfu_ms:.3f} | {100 * sfu_ms / ms:.0f} |")
    if not rows:
        return title + "\n(no CUDA rows of the logits ops)\n"
    return title + "\n" + "\n".join(
        ["| op | impl | mode | dtype | N | V | ms | HBM bound ms | % of HBM bound | SFU bound ms | % of SFU bound |",
         "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"] + rows) + "\n"


def _markdown(summary: dict) -> str:
    env = summary["environment"]
    versions = ", ".join(f"{k} {env.get(k)}" for k in ("torch", "cuda", "triton", "liger_kernel", "transformers")
                         if env.get(k))
    lines = [f"# gpu_check{' --dry-run' if summary['dry_run'] else ''}: {summary['device']}", "",
             f"- date {summary['date']}, commit {summary['commit']}",
             f"- command `{summary['command']}`",
             f"- {versions}",
             f"- {summary['total_s']:.0f} s in all (budget {summary['budget_s']:.0f} s); benchmark tables in "
             f"results.md, logs in logs/", "",
             "| step | status | seconds | limit s | command |", "| --- | --- | --- | --- | --- |"]
    for step in summary["steps"]:
        lines.append(f"| {step['step']} | {step['status']} | {step['seconds']:.1f} | {step['limit_s']:.0f} | "
                     f"`{step['command']}`{' (' + step['note'] + ')' if step['note'] else ''} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
