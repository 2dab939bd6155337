"""A new user's install: a wheel built with `pip wheel . --no-deps` with build isolation (no torch in the build
environment) in one clean venv, installed with the pinned CPU torch into another clean venv, must give the C++
backend on CPU tensors: compiled on first use, by two processes that start at once (as DDP ranks do), once, with
results that match the float64 oracle as the "torch" backend's do. Without a C++ compiler the same install warns
once, says how to get one, and computes with the "torch" backend. Several minutes: two venvs, torch, a compile.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from oracle import assert_matches_oracle, logit_magnitude, oracle_loss_and_grad

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TORCH_SPEC = os.environ.get("DISTILLM2_TEST_TORCH_SPEC", "torch==2.13.0")  # the CPU wheel the Makefile pins
OPS = ["skl", "srkl", "srkl_detach"]

SMOKE_SCRIPT = textwrap.dedent(
    """
    import sys, warnings
    warnings.simplefilter("error", RuntimeWarning)  # the fallback warning fails the smoke test
    import torch
    import distillm2_kernels
    from distillm2_kernels import fused_skl, fused_srkl
    from distillm2_kernels.backends import cpu_backend, resolve_backend_name
    inputs = torch.load(sys.argv[1])
    assert resolve_backend_name("auto", torch.device("cpu")) == "cpu", cpu_backend.unavailable_reason()
    results = {"file": distillm2_kernels.__file__, "origin": cpu_backend.extension_origin()}
    for backend in ("auto", "torch"):
        for op in ("skl", "srkl", "srkl_detach"):
            student = inputs["student"].clone().requires_grad_(True)
            kw = dict(labels=inputs["labels"], temperature=1.5, reduction="none", backend=backend)
            if op == "skl":
                loss = fused_skl(student, inputs["teacher"], 0.3, **kw)
            else:
                loss = fused_srkl(student, inputs["teacher"], 0.3, detach_mixture=op == "srkl_detach", **kw)
            loss.backward(inputs["upstream"])
            results[f"{backend}/{op}"] = (loss.detach(), student.grad)
    torch.save(results, sys.argv[2])
    """
)

NO_COMPILER_SCRIPT = textwrap.dedent(
    """
    import warnings
    import torch
    from distillm2_kernels import fused_skl
    student, teacher = torch.randn(4, 50), torch.randn(4, 50)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto = [fused_skl(student, teacher, 0.1), fused_skl(student, teacher, 0.1)]
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    for part in ("C++ CPU backend is unavailable", "no C++ compiler found", "apt install g++", "'torch' backend",
                 "python -m distillm2_kernels.env"):
        assert part in messages[0], (part, messages[0])
    assert torch.equal(auto[0], fused_skl(student, teacher, 0.1, backend="torch"))
    print("no-compiler ok")
    """
)


def _run(command: list, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _clean_venv(path: Path) -> Path:
    _run([sys.executable, "-m", "venv", "--clear", path], timeout=300)
    return path / "bin" / "python"


def _user_env(**extra: str) -> dict:
    """The environment without this test session's settings (the checkout on sys.path, the Triton interpreter)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET", "VIRTUAL_ENV")}
    return dict(env, **extra)


def _checkout_copy(destination: Path) -> Path:
    """The files of a fresh clone (tracked and not ignored), without this checkout's build outputs."""
    listed = _run(["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard"]).stdout
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
    return destination


def _build_wheel(tmp_path: Path) -> Path:
    python = _clean_venv(tmp_path / "build-venv")
    source = _checkout_copy(tmp_path / "checkout")
    _run([python, "-m", "pip", "wheel", "--no-deps", "-w", tmp_path / "dist", source], env=_user_env(), timeout=600)
    (wheel,) = (tmp_path / "dist").glob("distillm2_kernels-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "distillm2_kernels/csrc/skew_divergence_kernel.h" in names and "distillm2_kernels/py.typed" in names
    assert any(name.endswith("licenses/LICENSE") for name in names), names
    assert not any("/_C." in name for name in names), "the isolated build has no torch, so no extension"
    return wheel


def _smoke_inputs(path: Path) -> dict:
    gen = torch.Generator().manual_seed(3)
    student = (torch.randn(5, 1500, generator=gen) * 3).to(torch.bfloat16)
    teacher = (torch.randn(5, 1500, generator=gen) * 3 + 0.5 * student.float()).to(torch.bfloat16)
    inputs = dict(student=student, teacher=teacher, labels=torch.tensor([1, -100, 2, 3, 4]),
                  upstream=torch.rand(5, generator=gen))
    torch.save(inputs, path)
    return inputs


def _assert_matches_the_oracle(results: dict, inputs: dict, backend: str) -> None:
    student, teacher, upstream = inputs["student"], inputs["teacher"], inputs["upstream"]
    kw = dict(labels=inputs["labels"], ignore_index=-100, temperature=1.5, upstream=upstream)
    magnitude = logit_magnitude(student, teacher, temperature=1.5)
    for op in OPS:
        loss, grad = results[f"{backend}/{op}"]
        loss64, grad64 = oracle_loss_and_grad(op, student, teacher, 0.3, dtype=torch.float64, **kw)
        loss_lo, grad_lo = oracle_loss_and_grad(op, student, teacher, 0.3, dtype=torch.bfloat16, **kw)
        assert_matches_oracle(loss, loss64, loss_lo, out_dtype=torch.float32, magnitude=magnitude,
                              scale=loss64.abs().max().item() + math.log(1501), what=f"{backend} {op} loss")
        q64, p64 = torch.softmax(student.double() / 1.5, -1), torch.softmax(teacher.double() / 1.5, -1)
        grad_scale = (upstream.double().unsqueeze(-1) * (q64 + p64)).max().item() / 1.5
        assert_matches_oracle(grad, grad64, grad_lo, out_dtype=torch.bfloat16, magnitude=magnitude,
                              scale=grad_scale, what=f"{backend} {op} grad")


def test_wheel_from_an_isolated_build_gives_the_cpp_backend(tmp_path):
    wheel = _build_wheel(tmp_path)
    python = _clean_venv(tmp_path / "user-venv")
    _run([python, "-m", "pip", "install", TORCH_SPEC], env=_user_env(), timeout=600)
    _run([python, "-m", "pip", "install", wheel], env=_user_env(), timeout=600)
    venv = tmp_path / "user-venv"
    work = tmp_path / "work"  # not the checkout: the installed package must be the one imported
    work.mkdir()
    inputs = _smoke_inputs(work / "in.pt")

    # two processes at once on an empty cache: one compiles, the other waits for it; both get the C++ backend
    cache = tmp_path / "cache"
    env = _user_env(DISTILLM2_KERNELS_CACHE=str(cache), OMP_NUM_THREADS="1")
    ranks = [subprocess.Popen([str(python), "-c", SMOKE_SCRIPT, "in.pt", f"out{rank}.pt"], cwd=work, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [rank.communicate(timeout=1200) for rank in ranks]
    for rank, (stdout, stderr) in zip(ranks, outputs):
        assert rank.returncode == 0, stderr[-3000:]
    stderr = [err for _, err in outputs]
    assert sum("compiling the C++ CPU backend" in err for err in stderr) == 1, stderr
    assert any(" done in " in err for err in stderr), stderr
    (built,) = [p for p in cache.iterdir() if p.is_dir()]
    assert not list(cache.glob("*.tmp*")) and not list(cache.glob("*.failed.log"))
    for rank in (0, 1):
        results = torch.load(work / f"out{rank}.pt")
        assert Path(results["file"]).is_relative_to(venv), results["file"]
        assert results["origin"] == f"compiled on first use, cached in {built}", results["origin"]
        for backend in ("auto", "torch"):
            _assert_matches_the_oracle(results, inputs, backend)

    report = _run([python, "-m", "distillm2_kernels.env"], cwd=work, env=env, timeout=300).stdout
    print(report)
    assert 'backend="auto" on CPU tensors: "cpu"' in report and "compiled on first use" in report, report
    assert "no CUDA device" in report or "compute capability" in report, report

    # no compiler and an empty cache: one warning that says how to get one, and the torch backend's result
    env = _user_env(DISTILLM2_KERNELS_CACHE=str(tmp_path / "empty-cache"), CXX=str(tmp_path / "no-such-c++"))
    assert "no-compiler ok" in _run([python, "-c", NO_COMPILER_SCRIPT], cwd=work, env=env, timeout=300).stdout
