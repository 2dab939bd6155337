"""The worker process: runs the tasks the runner sends it, one JSON line per task on stdin, and answers each
result on a stdout line that starts with `PREFIX` (anything else a library prints there is ignored), then a
`done` line.

A task is `{"kind": "environment", "device", "quick", "repeats"}` (the device description and its measured
ceilings) or `{"kind": "case", "device", "suite", "op", "impl", "shape", "modes", "warmup", "repeats"}` (one
implementation on one shape, every mode on the same inputs). Tracebacks go to stderr (the runner keeps them
in a log file).

    python -m benchmarks.worker      # started by benchmarks.runner, not by hand
"""

from __future__ import annotations

import gc
import json
import os
import sys
import traceback

import torch

from distillm2_kernels.measure import measure, probe_for

from . import ceilings, environment, fused_linear, objective, skew_divergence, training_step

PREFIX = "@@distillm2-bench "
SUITES = {module.NAME: module for module in (skew_divergence, fused_linear, objective, training_step)}


def emit(message: dict) -> None:
    sys.stdout.write(PREFIX + json.dumps(message) + "\n")
    sys.stdout.flush()


def _is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    text = str(error)
    return "out of memory" in text.lower() or "can't allocate memory" in text


def _failure(mode: str, error: BaseException) -> dict:
    traceback.print_exc(file=sys.stderr)
    status = "oom" if _is_out_of_memory(error) else "error"
    return {"mode": mode, "status": status, "note": f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"}


def run_case(task: dict) -> list:
    device = torch.device(task["device"])
    probe = probe_for(device)
    suite = SUITES[task["suite"]]
    baseline = probe.clean()
    results = []
    try:
        bench = suite.Bench(task["shape"], task["op"], task["impl"], device)
    except Exception as error:  # noqa: BLE001  (reported as the row's status)
        return [_failure(mode, error) for mode in task["modes"]]
    try:
        note = bench.check()
    except Exception as error:  # noqa: BLE001
        note = f"loss check failed: {type(error).__name__}: {error}"
    for mode in task["modes"]:
        try:
            m = measure(bench.run(mode), bench.zero_grad, probe, warmup=task["warmup"], repeats=task["repeats"])
        except Exception as error:  # noqa: BLE001
            bench.zero_grad()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            results.append(_failure(mode, error))
            continue
        results.append({
            "mode": mode, "status": "ok", "note": note or "",
            "warmup_s": m.warmup_s, "times_s": m.times_s, "loss": m.loss,
            "baseline_bytes": baseline, "before_bytes": m.before_bytes, "peak_bytes": m.peak_bytes,
            "input_bytes": bench.input_bytes, "output_bytes": bench.output_bytes(mode),
            "load_avg_1m": round(os.getloadavg()[0], 2),
        })
    del bench
    probe.clean()
    return results


def run_environment(task: dict) -> dict:
    device = torch.device(task["device"])
    probe = probe_for(device)
    result = environment.describe(device)
    result.update(ceilings.measure_ceilings(probe, quick=task["quick"], repeats=task["repeats"]))
    probe.clean()
    return result


def main() -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        task = json.loads(line)
        try:
            if task["kind"] == "environment":
                emit({"environment": run_environment(task)})
            else:
                for result in run_case(task):
                    emit({"result": result})
        except Exception as error:  # noqa: BLE001  (a bug in the harness: report it, keep serving)
            traceback.print_exc(file=sys.stderr)
            emit({"error": f"{type(error).__name__}: {error}"})
        emit({"done": True})


if __name__ == "__main__":
    main()
