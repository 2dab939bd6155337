"""`python -m benchmarks.gpu_check` (make gpu-check): its plan for a GPU, its time limits, and `--dry-run`, which
runs the same steps on the CPU at tiny sizes end to end into a temporary folder."""

import json
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def _args(**overrides):
    args = dict(dry_run=False, python=sys.executable, wheels="/nonexistent", skip_tests=False, pytest_args="")
    args.update(overrides)
    return SimpleNamespace(**args)


def _value(command, flag):
    return command[command.index(flag) + 1]


def test_the_gpu_plan_runs_the_headline_rows_and_the_tests_on_cuda(tmp_path):
    steps = {step.name: step for step in gpu_check.plan(_args(), tmp_path, tmp_path / "site")}
    assert list(steps) == ["tests", "logits", "fused_linear"]  # no .whl folder: no wheels step
    logits, fused = steps["logits"].command, steps["fused_linear"].command
    for command in (logits, fused):
        assert command[1:3] == ["-m", "benchmarks"] and _value(command, "--device") == "cuda"
        assert _value(command, "--dtypes") == "bfloat16" and _value(command, "--modes") == "fwd,fwd+bwd"
        assert _value(command, "--out") == str(tmp_path) and "--quick" not in command
        assert {"naive", "naive_compiled", "triton", "liger"} <= set(_value(command, "--impls").split(","))
    assert _value(logits, "--suite") == "skew_divergence" and _value(logits, "--N") == "8192"
    assert _value(logits, "--V") == "32000,151936"
    assert _value(fused, "--suite") == "fused_linear" and _value(fused, "--N") == "8192"
    assert _value(fused, "--V") == "128256" and "--merge" in fused and "liger_kl" in _value(fused, "--impls")
    tests = steps["tests"].command
    assert tests[1:3] == ["-m", "pytest"] and tests[-1] == "tests" and tests[tests.index("-m", 3) + 1] == "not slow"
    assert "TRITON_INTERPRET" not in steps["tests"].env
    assert steps["tests"].env["PYTHONPATH"].split(":")[:2] == [str(ROOT), str(tmp_path / "site")]
    assert sum(gpu_check.LIMITS.values()) == gpu_check.BUDGET_S <= 8 * 60


def test_the_fused_linear_sizes_are_the_published_configuration():
    from benchmarks import sizes

    shapes = sizes.shapes("fused_linear", "cuda", dtypes=["bfloat16"], tokens=[8192], vocabs=[128256])
    assert shapes == [{"dtype": "bfloat16", "N": 8192, "V": 128256, "H": 4096, "H_teacher": 4096}]
    shapes = sizes.shapes("skew_divergence", "cuda", dtypes=["bfloat16"], tokens=[8192], vocabs=[32000, 151936])
    assert shapes == [{"dtype": "bfloat16", "N": 8192, "V": 32000}, {"dtype": "bfloat16", "N": 8192, "V": 151936}]


def test_a_step_past_its_limit_is_ended_with_its_children(tmp_path):
    sleeper = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); " \
              "print('started', flush=True); time.sleep(60)"
    step = gpu_check.Step("sleep", [sys.executable, "-c", sleeper], 2.0)
    started = time.time()
    step.run(tmp_path, time.time() + 2.0)
    assert step.status.startswith("timed out") and time.time() - started < 20
    assert "started" in (tmp_path / "sleep.log").read_text()


def test_without_cuda_the_gpu_run_stops_at_once(capsys):
    if gpu_check.probe_environment()["cuda_available"]:
        pytest.skip("this machine has a GPU: the real run would start")
    assert gpu_check.main(["--out", "/nonexistent/never-written"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_device_folder():
    assert gpu_check.device_folder("NVIDIA H200") == "nvidia-h200"
    assert gpu_check.device_folder("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def _tiny_wheel(folder: Path) -> None:
    """A pure-Python wheel, as Liger-Kernel's travels to the GPU machine in .whl/."""
    folder.mkdir()
    name = "gpu_check_probe"
    with zipfile.ZipFile(folder / f"{name}-0.1-py3-none-any.whl", "w") as wheel:
        wheel.writestr(f"{name}/__init__.py", "VALUE = 42\n")
        wheel.writestr(f"{name}-0.1.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
        wheel.writestr(f"{name}-0.1.dist-info/WHEEL",
                       "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{name}-0.1.dist-info/RECORD", "")


@pytest.mark.slow
def test_dry_run_runs_every_step_and_writes_the_results(tmp_path):
    """About 40 s of CPU (two minutes on a loaded two-core machine)."""
    _tiny_wheel(tmp_path / "whl")
    out = tmp_path / "out"
    code = gpu_check.main(["--dry-run", "--out", str(out), "--wheels", str(tmp_path / "whl")])
    summary = json.loads((out / "gpu_check.json").read_text())
    steps = {step["step"]: step for step in summary["steps"]}
    assert code == 0, steps
    assert list(steps) == ["environment", "wheels", "tests", "logits", "fused_linear"]
    assert all(step["status"] == "ok" and step["seconds"] > 0 for step in steps.values())
    assert "gpu_check_probe-0.1" in steps["wheels"]["note"]
    assert summary["dry_run"] and summary["command"].startswith("python -m benchmarks.gpu_check --dry-run")
    assert summary["commit"] and summary["device"] == "cpu" and summary["total_s"] < gpu_check.BUDGET_S
    assert " passed" in (out / "logs" / "tests.log").read_text()
    markdown = (out / "gpu_check.md").read_text()
    assert "| logits | ok |" in markdown and "| fused_linear | ok |" in markdown

    from benchmarks.report import schema

    rows = schema.read_csv(out / "results.csv")
    assert {row["suite"] for row in rows} == {"skew_divergence", "fused_linear"}  # --merge kept the first suite
    by_impl = {}
    for row in rows:
        by_impl.setdefault(row["impl"], set()).add(row["status"])
    assert by_impl["naive"] == {"ok"} and by_impl["torch"] == {"ok"}
    assert by_impl["triton"] == {"skipped"} and by_impl["liger"] == {"skipped"}  # the CPU has no CUDA
    assert {row["mode"] for row in rows} == {"fwd", "fwd+bwd"} and {row["dtype"] for row in rows} == {"bfloat16"}
    assert "python -m benchmarks" in (out / "results.md").read_text()
    assert list(out.glob("*.png")) and (out / "logs" / "tests.log").exists()


def test_bounds_table_gives_percent_of_the_hbm_and_sfu_bounds(tmp_path):
    from benchmarks import gpu_check

    path = tmp_path / "results.csv"
    header = "suite,device,status,op,impl,mode,dtype,N,V,median_ms,min_traffic_GB,ceiling_copy_GBps\n"
    path.write_text(header + "skew_divergence,cuda,ok,fused_skl,triton,fwd+bwd,bfloat16,8192,151936,3.48,7.4682,4300\n"
                    + "skew_divergence,cpu,ok,fused_skl,torch,fwd,bfloat16,64,1000,1.0,0.001,30\n")
    table = gpu_check.bounds_table(path, 132)
    # HBM: 7.4682 GB at 4300 GB/s = 1.737 ms, 50 % of 3.48 ms; SFU: 1.245e9 entries x 3 / (132 x 16 x 1.98e9) = 0.893 ms
    assert "| fused_skl | triton | fwd+bwd | bfloat16 | 8192 | 151936 | 3.480 | 1.737 | 50 | 0.893 | 26 |" in table
    assert "torch" not in table  # CPU rows have no GPU bounds
    assert "no CUDA rows" in gpu_check.bounds_table(tmp_path / "missing.csv", 132)
