"""Smoke tests of the benchmark suite (`python -m benchmarks --quick`, end to end into a temporary folder), of
its baselines (the naive objective computes the library's function), of its helpers, and of `distillm2_kernels.measure`.

The committed results under benchmarks/results/ must come out of every run unchanged.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import distillm2_kernels
from benchmarks import implementations, sizes
from benchmarks.report import ratios, schema
from distillm2_kernels import DistiLLM2Loss
from distillm2_kernels import measure as measure_module
from distillm2_kernels.measure import CpuProbe, measure
from distillm2_kernels.backends import available_backends, cpu_backend

ROOT = Path(__file__).resolve().parents[1]
COMMITTED_RESULTS = ROOT / "benchmarks" / "results"
MiB = 2**20
HAS_CUDA = torch.cuda.is_available()


def _subprocess_env() -> dict:
    """This checkout first on the path; no Triton interpreter (a benchmark run does not set it)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    return env


def _run_suite(*args: str, out: Path) -> subprocess.CompletedProcess:
    # one thread: OpenMP's spinning barriers make 2-thread runs on a shared, busy machine 10-100x slower
    result = subprocess.run([sys.executable, "-m", "benchmarks", *args, "--threads", "1", "--out", str(out)], cwd=ROOT,
                            env=_subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"the suite failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _read_csv(path: Path) -> tuple:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def _committed_digests() -> dict:
    return {str(path.relative_to(COMMITTED_RESULTS)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(COMMITTED_RESULTS.rglob("*")) if path.is_file() and "logs" not in path.parts}


@pytest.fixture
def committed_results_unchanged():
    """Fails the test if any committed file under benchmarks/results/ was written, created or removed."""
    before = _committed_digests()
    yield
    assert _committed_digests() == before, "the benchmark run changed the files in benchmarks/results/"


@pytest.mark.slow
def test_quick_run_writes_table_csv_markdown_and_plots(tmp_path, committed_results_unchanged):
    """Every suite at the quick sizes, every implementation but the compiled one (compiling costs ~10 s per
    shape: `test_compiled_baseline_runs` covers it). Unavailable implementations are rows marked skipped."""
    impls = ["naive", "torch", "cpu", "triton", "liger", "liger_kl"]
    result = _run_suite("--quick", "--impls", ",".join(impls), out=tmp_path)

    columns, rows = _read_csv(tmp_path / "results.csv")
    assert columns == schema.COLUMNS
    suites = {"skew_divergence", "fused_linear", "objective", "training_step"}
    assert {row["suite"] for row in rows} == suites
    for row in rows:  # context on every row
        assert row["library"] == distillm2_kernels.__version__
        assert row["device"] == ("cuda" if HAS_CUDA else "cpu") and row["device_name"]
        assert row["commit"] and row["date"] and row["torch"] == torch.__version__
        assert float(row["ceiling_copy_GBps"]) > 0 and float(row["ceiling_matmul_bf16_TFLOPs"]) > 0
        if row["device"] == "cpu":  # the exp pass of docs/design.md §7, and every ok row in units of it
            assert float(row["ceiling_exp_ns_per_entry"]) > 0
            if row["status"] == "ok" and row["N"] and row["V"]:
                expected = float(row["median_ms"]) * 1e6 / (float(row["ceiling_exp_ns_per_entry"]) * int(row["N"])
                                                             * int(row["V"]))
                assert float(row["exp_passes"]) == pytest.approx(expected, rel=1e-2), row

    ours = "triton" if HAS_CUDA else ("cpu" if cpu_backend.unavailable_reason() is None else None)
    runnable = {"naive", "torch"} | ({ours} if ours else set())
    by_impl = {}
    for row in rows:
        by_impl.setdefault(row["impl"], set()).add(row["status"])
    if not HAS_CUDA:  # the Triton kernels and Liger are listed, skipped with the reason
        for impl in ("triton", "liger", "liger_kl"):
            assert by_impl[impl] == {"skipped"}
        triton_notes = {row["note"] for row in rows if row["impl"] == "triton"}
        assert triton_notes == {implementations.unavailable_reason("triton", torch.device("cpu"))}

    # one row per suite × shape × op × mode for every implementation that can run
    for name in suites:
        suite_module = importlib.import_module(f"benchmarks.{name}")
        expected = {(shape["V"], op, mode) for shape in sizes.shapes(name, "cuda" if HAS_CUDA else "cpu", quick=True)
                    for op in suite_module.OPS for mode in suite_module.MODES}
        for impl in runnable:
            got = [(int(r["V"]), r["op"], r["mode"]) for r in rows
                   if r["suite"] == name and r["impl"] == impl and r["status"] == "ok"]
            assert sorted(got) == sorted(expected), (name, impl)
    ok = [row for row in rows if row["status"] == "ok"]
    for row in ok:
        assert float(row["median_ms"]) > 0 and float(row["min_ms"]) <= float(row["median_ms"]) <= float(row["max_ms"])
        assert float(row["op_increase_MiB"]) >= 0 and float(row["peak_MiB"]) > 0, row
        metric = {"fused_linear": "TFLOP_per_s", "training_step": "tokens_per_s"}.get(row["suite"], "GB_per_s")
        assert float(row[metric]) > 0
        if row["impl"] == "naive":
            assert float(row["speedup_vs_naive"]) == 1.0
            assert float(row["op_increase_MiB"]) > 0  # the naive code builds [N, V] float32 tensors
        else:  # the same function as the released code, on the same inputs
            assert float(row["loss_rel_diff_vs_naive"]) < 1e-3, row
            assert row["speedup_vs_naive"] and row["memory_ratio_vs_naive"]

    markdown = (tmp_path / "results.md").read_text()
    assert "## Headline" in markdown and "## skew_divergence" in markdown and "## training_step" in markdown
    plots = sorted(p.name for p in tmp_path.glob("*.png"))
    for suite_name in suites:
        for op in importlib.import_module(f"benchmarks.{suite_name}").OPS:  # against V, one per op and dtype
            assert any(name.startswith(f"{op}_") for name in plots), (op, plots)
        assert f"## {suite_name}" in result.stdout
    for name in plots:
        assert f"]({name})" in markdown
    if not HAS_CUDA:
        assert "skipped: triton" in result.stdout and "skipped: liger" in markdown
    assert "median ms" in result.stdout and "## headline" in result.stdout


@pytest.mark.slow
def test_compiled_baseline_runs_and_merge_keeps_other_suites(tmp_path, committed_results_unchanged):
    """`naive_compiled` on one quick shape, a fresh worker per case (`--isolation case`): torch.compile of the
    naive code gives the naive loss (its compile time is in warmup_s). Then `--merge`: a second run of another suite into the same folder keeps these rows."""
    _run_suite("--quick", "--suite", "skew_divergence", "--ops", "fused_skl", "--impls", "naive,naive_compiled",
               "--V", "1000", "--modes", "fwd+bwd", "--no-plots", "--isolation", "case", out=tmp_path)
    _, rows = _read_csv(tmp_path / "results.csv")
    compiled = [row for row in rows if row["impl"] == "naive_compiled"]
    assert len(compiled) == 1 and compiled[0]["status"] == "ok", rows
    assert float(compiled[0]["loss_rel_diff_vs_naive"]) < 1e-5
    assert float(compiled[0]["speedup_vs_naive"]) > 0 and float(compiled[0]["warmup_s"]) > 0

    _run_suite("--quick", "--suite", "objective", "--impls", "naive", "--V", "1000", "--modes", "fwd", "--merge",
               "--no-plots", out=tmp_path)
    _, merged = _read_csv(tmp_path / "results.csv")
    assert sorted((row["suite"], row["impl"]) for row in merged) == [
        ("objective", "naive"), ("skew_divergence", "naive"), ("skew_divergence", "naive_compiled")]
    assert merged[0] == rows[0]  # the earlier rows as they were
    assert "## skew_divergence" in (tmp_path / "results.md").read_text()


# --- the baselines compute the library's functions ---------------------------------------------------------

@pytest.mark.parametrize("backend", [b for b in available_backends(torch.device("cpu")) if b != "triton"])
def test_naive_objective_is_the_distillm2_preset(backend):
    """The released code's objective on one [2B, T, V] batch (both divergences on all rows, half kept) is
    `DistiLLM2Loss("distillm2")` on the two halves: the same loss and the same gradient."""
    gen = torch.Generator().manual_seed(0)
    student = (torch.randn(4, 6, 50, generator=gen) * 2).requires_grad_(True)
    teacher = torch.randn(4, 6, 50, generator=gen) * 2
    labels = torch.randint(0, 50, (4, 6), generator=gen)
    labels[:, :2] = -100
    labels[1, 4:] = -100
    naive = implementations.naive_distillm2_loss(student, teacher, labels)
    (naive_grad,) = torch.autograd.grad(naive, student)
    ours, _ = DistiLLM2Loss("distillm2", backend=backend)(student[:2], teacher[:2], labels[:2], student[2:],
                                                         teacher[2:], labels[2:])
    (our_grad,) = torch.autograd.grad(ours, student)
    torch.testing.assert_close(ours, naive, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(our_grad, naive_grad, rtol=1e-4, atol=1e-6)


# --- the suite's helpers -----------------------------------------------------------------------------------

def test_sizes_overrides_replace_tokens_and_vocabularies():
    shapes = sizes.shapes("skew_divergence", "cpu", tokens=[64, 128], vocabs=[1000], dtypes=["bfloat16"])
    assert shapes == [{"dtype": "bfloat16", "N": 64, "V": 1000}, {"dtype": "bfloat16", "N": 128, "V": 1000}]
    default = sizes.shapes("skew_divergence", "cuda")
    assert {s["V"] for s in default} == set(sizes.VOCABS) and {s["N"] for s in default} == {1024, 4096, 8192}
    (step,) = sizes.shapes("training_step", "cpu", tokens=[64], vocabs=[500])
    assert step["V"] == 500 and "N" not in step


def test_ratios_are_against_the_same_case():
    def row(impl, median, increase, n=64):
        values = {column: "" for column in schema.COLUMNS}
        values.update(suite="skew_divergence", op="fused_skl", impl=impl, mode="fwd", dtype="bfloat16", N=n, V=1000,
                      status="ok", median_ms=median, op_increase_MiB=increase, loss="2.0")
        return values

    rows = [row("naive", 10.0, 40.0), row("cpu", 2.0, 0.25), row("torch", 4.0, 8.0), row("cpu", 1.0, 4.0, n=128)]
    ratios.add_ratios(rows)
    assert rows[1]["speedup_vs_naive"] == 5.0 and rows[1]["speedup_vs_torch"] == 2.0
    assert rows[1]["memory_ratio_vs_naive"] == 40.0  # increases under 1 MiB count as 1 MiB
    assert rows[2]["memory_ratio_vs_naive"] == 5.0
    assert rows[3]["speedup_vs_naive"] == ""  # no naive row at N = 128
    assert rows[1]["loss_rel_diff_vs_naive"] == "0.0e+00"


def test_measure_sees_the_calls_allocation_and_counts_the_calls():
    calls = []

    def run():
        buffer = bytearray(64 * MiB)
        buffer[::4096] = b"\x01" * len(range(0, len(buffer), 4096))  # every page resident
        calls.append(1)
        return torch.tensor(1.5)

    result = measure(run, lambda: None, CpuProbe(), warmup=2, repeats=3)
    assert len(calls) == 2 + 1 + 3  # warm-up, the memory call, the timed calls
    assert len(result.times_s) == 3 and result.loss == 1.5
    assert 60 * MiB <= result.increase_bytes < 96 * MiB
    assert result.peak_bytes > result.increase_bytes


def test_cuda_probe_drives_the_allocator_statistics_and_events(monkeypatch):
    """The CUDA path of `measure` and `environment.describe` against a fake torch.cuda (no GPU here): the
    names it calls exist in torch.cuda (monkeypatch refuses to set a missing one), the op's increase is
    max_memory_allocated − memory_allocated after the peak reset, and the times come from the events."""
    from benchmarks import environment

    log, allocated = [], {"now": 1000, "peak": 1000}

    class FakeEvent:
        clock = [0.0]

        def __init__(self, enable_timing=False):
            assert enable_timing
            self.at = None

        def record(self, stream=None):
            FakeEvent.clock[0] += 2.5
            self.at = FakeEvent.clock[0]

        def synchronize(self):
            log.append("event.synchronize")

        def elapsed_time(self, end):
            return end.at - self.at  # milliseconds

    def reset_peak_memory_stats(device=None):
        log.append("reset_peak")
        allocated["peak"] = allocated["now"]

    class FakeProperties:
        total_memory, major, minor = 80 * 2**30, 9, 0

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append("synchronize"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: log.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset_peak_memory_stats)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: allocated["peak"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: FakeProperties())
    monkeypatch.setattr(measure_module, "L2_FLUSH_BYTES", 1024)

    probe = measure_module.CudaProbe(torch.device("cpu"))  # the fake's tensors live on the CPU

    def run():
        allocated["peak"] = max(allocated["peak"], allocated["now"] + 5000)  # the op's transient 5000 bytes
        return torch.tensor(0.5)

    result = measure(run, lambda: None, probe, warmup=2, repeats=4)
    assert result.before_bytes == 1000 and result.peak_bytes == 6000 and result.increase_bytes == 5000
    assert result.times_s == [2.5e-3] * 4 and result.loss == 0.5
    assert log.count("reset_peak") == 1 and log.count("event.synchronize") == 4
    assert probe._flush is None  # the flush buffer exists only while timing

    described = environment.describe(torch.device("cuda"))
    assert described["device"] == "cuda" and described["device_name"] == "Fake GPU (80 GiB, sm_90)"


# --- the process memory helpers ---------------------------------------------------------------------------------

def _no_setup() -> None:
    return None


def _touch_64_mib(_state) -> None:
    buffer = bytearray(64 * MiB)
    buffer[::4096] = b"\x01" * len(range(0, len(buffer), 4096))  # one write per page: all of it resident


def test_peak_rss_in_subprocess_sees_a_64_mib_allocation():
    increase, peak = measure_module.peak_rss_in_subprocess(_no_setup, _touch_64_mib)
    assert 60 * MiB <= increase < 96 * MiB
    assert peak > increase


def test_reset_peak_rss_forgets_a_freed_allocation():
    script = textwrap.dedent(
        """
        from distillm2_kernels.measure import peak_rss_bytes, reset_peak_rss, resident_bytes
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

    monkeypatch.setattr(measure_module, "open", refusing_open, raising=False)
    assert measure_module.reset_peak_rss() is False


def test_measure_times_each_call_after_the_warm_up_and_the_memory_call(monkeypatch):
    """The demo's and the benchmarks' timing: the warm-up (reported alone) and the memory call are not timed;
    each of the `repeats` calls is, and the median is theirs."""
    class ScriptedClock:
        """perf_counter for `distillm2_kernels.measure`: advances only when the timed function runs."""

        def __init__(self):
            self.now = 0.0

        def perf_counter(self):
            return self.now

    clock = ScriptedClock()
    durations = iter([100.0, 50.0, 3.0, 1.0, 2.0, 7.0, 4.0])  # the warm-up, the memory call, five timed calls
    calls = []

    def timed():
        calls.append(1)
        clock.now += next(durations)

    monkeypatch.setattr(measure_module, "time", clock)
    result = measure(timed, lambda: None, CpuProbe(), warmup=1, repeats=5)
    assert len(calls) == 7
    assert result.warmup_s == 100.0 and result.times_s == [3.0, 1.0, 2.0, 7.0, 4.0]
    assert result.median_s == 3.0
    assert max(result.times_s) - min(result.times_s) == 6.0
