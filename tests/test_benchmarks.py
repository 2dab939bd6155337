"""Smoke tests of the benchmark scripts (end to end at their smallest settings) and of `_measure`'s helpers.

The scripts run in subprocesses and write their CSVs to a temporary directory; the committed results under
benchmarks/results/ must come out of the run unchanged.
"""

from __future__ import annotations

import csv
import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from distillm2_kernels import _measure

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
COMMITTED_RESULTS = BENCHMARKS / "results"
MiB = 2**20

CPU_SKEW_CONTEXT = ["date", "commit", "device", "torch", "kernel_isa"]
CPU_SKEW_COLUMNS = CPU_SKEW_CONTEXT + [
    "op", "impl", "dtype", "N", "V", "threads", "runs", "median_ms", "min_ms", "GB_per_s", "baseline_mb",
    "inputs_mb", "grad_mb", "after_inputs_mb", "peak_mb", "op_increase_mb", "excess_mb", "peak_excludes_setup",
    "load_avg_1m", "speedup_vs_naive", "op_increase_vs_naive",
]
FUSED_LINEAR_COLUMNS = [
    "variant", "dtype", "N", "H", "H_teacher", "V", "ms", "gemm_tflops", "peak_mb", "increase_mb",
    "increase_per_fp32_logits", "device", "torch", "commit", "date", "load_average_1min",
]


def _subprocess_env() -> dict:
    """This checkout first on the path; no Triton interpreter (a benchmark run does not set it)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    return env


def _run_script(script: str, *args: str, cwd: Path) -> str:
    """Runs a benchmark script to completion; returns its stdout (stderr is shown on failure)."""
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], cwd=cwd, env=_subprocess_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture
def committed_results_unchanged():
    """Fails the test if any file under benchmarks/results/ was written, created or removed."""
    def digests() -> dict:
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
                for path in sorted(COMMITTED_RESULTS.iterdir()) if path.is_file()}

    before = digests()
    yield
    assert digests() == before, "the benchmark run changed the committed files in benchmarks/results/"


def test_cpu_skew_divergence_quick_run(tmp_path, committed_results_unchanged):
    from distillm2_kernels.backends import cpu_backend

    impls = ["cpu", "torch", "naive"] if cpu_backend.unavailable_reason() is None else ["torch", "naive"]
    out_csv = tmp_path / "cpu_skew_divergence.csv"
    stdout = _run_script("cpu_skew_divergence.py", "--quick", "--repeats", "1", "--impls", ",".join(impls),
                         "--csv", str(out_csv), cwd=tmp_path)

    columns, rows = _read_csv(out_csv)
    assert columns == CPU_SKEW_COLUMNS
    variants = [(row["op"], row["impl"], row["dtype"]) for row in rows]
    expected = {(op, impl, dtype) for op in ("skl", "srkl") for impl in impls for dtype in ("bfloat16", "float32")}
    assert sorted(variants) == sorted(expected)  # one row per variant
    for row in rows:
        assert (row["N"], row["V"]) == ("128", "32000")  # the quick shape [2, 64, 32000]
        for column in ("median_ms", "min_ms", "GB_per_s", "baseline_mb", "inputs_mb", "grad_mb",
                       "after_inputs_mb", "peak_mb", "op_increase_mb"):
            assert float(row[column]) > 0, (column, row)
        assert row["peak_excludes_setup"] == "True"
        assert float(row["peak_mb"]) >= float(row["after_inputs_mb"])
        if row["impl"] == "naive":
            assert float(row["speedup_vs_naive"]) == 1.0
    assert "median_ms" in stdout and f"wrote {out_csv}" in stdout


def test_fused_linear_small_run(tmp_path, committed_results_unchanged):
    out_csv = tmp_path / "fused_linear.csv"
    stdout = _run_script("fused_linear.py", "--batch", "2", "--seq", "64", "--hidden", "64", "--vocab", "8192",
                         "--dtypes", "bfloat16", "--repeats", "1", "--out", str(out_csv), cwd=tmp_path)

    columns, rows = _read_csv(out_csv)
    assert columns == FUSED_LINEAR_COLUMNS
    variants = [(row["variant"], row["dtype"]) for row in rows]
    expected = {(variant, "bfloat16") for variant in ("naive", "logits+fused", "fused_linear")}
    assert sorted(variants) == sorted(expected)  # one row per variant
    for row in rows:
        assert (row["N"], row["H"], row["H_teacher"], row["V"]) == ("128", "64", "64", "8192")
        assert float(row["ms"]) > 0 and float(row["peak_mb"]) > 0, row
        assert float(row["increase_mb"]) >= 0, row
    naive = next(row for row in rows if row["variant"] == "naive")
    assert float(naive["increase_mb"]) > 0  # the naive loss materialises several [N, V] tensors
    assert "| variant | dtype | ms | GEMM TFLOP/s | peak MB | increase MB | increase / fp32 [N,V] |" in stdout
    assert f"wrote {out_csv}" in stdout


# --- the _measure helpers ---------------------------------------------------------------------------------

def _no_setup() -> None:
    return None


def _touch_64_mib(_state) -> None:
    buffer = bytearray(64 * MiB)
    buffer[::4096] = b"\x01" * len(range(0, len(buffer), 4096))  # one write per page: all of it resident


def test_peak_rss_in_subprocess_sees_a_64_mib_allocation():
    increase, peak = _measure.peak_rss_in_subprocess(_no_setup, _touch_64_mib)
    assert 60 * MiB <= increase < 96 * MiB
    assert peak > increase


def test_reset_peak_rss_forgets_a_freed_allocation():
    script = textwrap.dedent(
        """
        from distillm2_kernels._measure import peak_rss_bytes, reset_peak_rss, resident_bytes
        MiB = 2**20
        assert reset_peak_rss()
        start = resident_bytes()
        buffer = bytearray(64 * MiB)
        buffer[::4096] = b"\\x01" * len(range(0, len(buffer), 4096))
        assert resident_bytes() - start >= 60 * MiB, (resident_bytes(), start)
        peak_with_buffer = peak_rss_bytes()
        assert peak_with_buffer - start >= 60 * MiB, (peak_with_buffer, start)
        del buffer
        assert reset_peak_rss()
        assert peak_rss_bytes() <= peak_with_buffer - 60 * MiB, (peak_rss_bytes(), peak_with_buffer)
        assert peak_rss_bytes() >= resident_bytes() - MiB
        """
    )
    result = subprocess.run([sys.executable, "-c", script], env=_subprocess_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def test_reset_peak_rss_reports_when_clear_refs_cannot_be_written(monkeypatch):
    def refusing_open(path, *args, **kwargs):
        raise PermissionError(f"not permitted: {path}")

    monkeypatch.setattr(_measure, "open", refusing_open, raising=False)
    assert _measure.reset_peak_rss() is False


def test_median_seconds_returns_the_median_and_spread_after_warmup(monkeypatch):
    class ScriptedClock:
        """perf_counter for `_measure`: advances only when the timed function runs."""

        def __init__(self):
            self.now = 0.0

        def perf_counter(self):
            return self.now

    clock = ScriptedClock()
    durations = iter([100.0, 3.0, 1.0, 2.0, 7.0, 4.0])  # the first is the warm-up, not counted
    calls = []

    def timed():
        calls.append(1)
        clock.now += next(durations)

    monkeypatch.setattr(_measure, "time", clock)
    median, spread = _measure.median_seconds(timed, repeats=5, warmup=1)
    assert len(calls) == 6
    assert median == 3.0
    assert spread == 6.0
