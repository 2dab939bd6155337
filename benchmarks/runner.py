"""Runs the plan: every case in a worker process (`benchmarks.worker`), results collected as they come.

Isolation (`--isolation`):
- "impl" (default): one long-lived worker per implementation. Cases go out case by case, each shape to
  every implementation in turn, so that a change of machine load during the run hits all implementations
  of a shape alike. Memory is still the case's own: see `measure` (CUDA: allocator statistics; CPU: the heap
  is trimmed and the resident high-water mark reset before the measured call). The absolute peak on the CPU
  includes what the worker process had accumulated before (its `baseline_mb`: libraries, compiled code).
- "case": a fresh worker per case (an implementation on one shape, all modes): the absolute CPU peak is then
  that of a fresh process; costs about two seconds of start-up per case.

A worker that dies (a crash, the kernel's OOM killer) fails its case with the end of its log and is replaced.
Workers run with this checkout first on PYTHONPATH, without TRITON_INTERPRET, and with OMP_NUM_THREADS set when
`--threads` is given.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Optional

from .environment import ROOT
from .worker import PREFIX


class WorkerDied(RuntimeError):
    pass


class Worker:
    def __init__(self, name: str, log_dir: Path, threads: Optional[int] = None):
        self.name = name
        self.log_path = Path(log_dir) / f"worker_{name}.log"
        self.log = open(self.log_path, "ab")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
        env.pop("TRITON_INTERPRET", None)
        env.setdefault("PYTHONUNBUFFERED", "1")
        if threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.worker"], cwd=ROOT, env=env, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1,
        )

    def request(self, task: dict) -> Iterator[dict]:
        """Sends one task; yields its messages until the worker says it is done."""
        try:
            self.process.stdin.write(json.dumps(task) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError) as error:
            raise WorkerDied(self._death_note()) from error
        while True:
            line = self.process.stdout.readline()
            if not line:
                self.process.wait()
                raise WorkerDied(self._death_note())
            if not line.startswith(PREFIX):
                continue
            message = json.loads(line[len(PREFIX):])
            if message.get("done"):
                return
            yield message

    def _death_note(self) -> str:
        code = self.process.poll()
        if code is not None and code < 0:
            how = f"killed by signal {signal.Signals(-code).name}" + (" (out of memory?)" if code == -9 else "")
        else:
            how = f"exit code {code}"
        self.log.flush()
        try:
            tail = self.log_path.read_text(errors="replace").strip().splitlines()[-3:]
        except OSError:
            tail = []
        return f"worker {self.name} died ({how}); log {self.log_path}: " + " | ".join(tail)[-600:]

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.close()
                self.process.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self.log.close()


class Pool:
    """Workers by implementation name, long-lived ("impl") or one per case ("case")."""

    def __init__(self, isolation: str = "impl", log_dir: Optional[Path] = None, threads: Optional[int] = None):
        if isolation not in ("impl", "case"):
            raise ValueError(f"isolation must be 'impl' or 'case', got {isolation!r}")
        self.isolation = isolation
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="distillm2_bench_"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.threads = threads
        self.workers: dict = {}

    def run(self, name: str, task: dict) -> list:
        """The messages of one task on the worker `name`; a dead worker's task gives
        `[{"error": note}]` and the worker is replaced at the next task."""
        worker = self.workers.get(name)
        if worker is None or worker.process.poll() is not None:
            worker = self.workers[name] = Worker(name, self.log_dir, self.threads)
        try:
            messages = list(worker.request(task))
        except WorkerDied as died:
            worker.close()
            del self.workers[name]
            return [{"error": str(died)}]
        if self.isolation == "case":
            worker.close()
            del self.workers[name]
        return messages

    def close(self) -> None:
        for worker in self.workers.values():
            worker.close()
        self.workers.clear()
