"""Building and finding the C++ CPU backend (backends/cpu_build.py, backends/cpu_jit.py): the first-use compile
cache (its folder, its key, a missing compiler, a failed compile), and that the per-instruction-set kernel builds
share no code with the rest of the module, so that the order in which their objects are linked cannot put AVX
code on the portable path. The real compile of a user's install, by two processes at once, is in
tests/test_install.py."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distillm2_kernels.backends import cpu_backend, cpu_build, cpu_jit

ROOT = Path(__file__).resolve().parents[1]


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(cpu_jit.CACHE_ENV, str(tmp_path / "chosen"))
    assert cpu_jit.cache_root() == tmp_path / "chosen"
    monkeypatch.delenv(cpu_jit.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cpu_jit.cache_root() == tmp_path / "xdg" / "distillm2_kernels"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cpu_jit.cache_root() == tmp_path / "home" / ".cache" / "distillm2_kernels"


def test_build_key_names_torch_the_instruction_sets_python_and_the_sources(monkeypatch, tmp_path):
    key = cpu_jit.build_key()
    isas = "+".join(isa.lower() for isa in cpu_build.instruction_sets())
    assert key.startswith(f"{torch.__version__}-{isas}-{sys.implementation.cache_tag}-"), key
    assert cpu_jit.build_dir() == cpu_jit.cache_root() / key
    changed = tmp_path / "csrc"
    shutil.copytree(cpu_build.CSRC, changed)
    (changed / "skew_divergence_kernel.h").write_text((changed / "skew_divergence_kernel.h").read_text() + "\n// x\n")
    monkeypatch.setattr(cpu_build, "all_source_files", lambda: sorted(changed.iterdir()))
    assert cpu_jit.build_key() != key


def test_x86_builds_every_instruction_set_other_machines_the_portable_one(monkeypatch):
    monkeypatch.setattr(cpu_build.platform, "machine", lambda: "x86_64")
    assert cpu_build.instruction_sets() == ["DEFAULT", "AVX2", "AVX512"]
    portable = ["skew_divergence.cpp", "skew_divergence_kernel.cpp", "sparse_teacher.cpp", "sparse_teacher_kernel.cpp"]
    assert [p.name for p in cpu_build.source_files()] == portable + [
        "skew_divergence_kernel_avx2.cpp", "skew_divergence_kernel_avx512.cpp",
        "sparse_teacher_kernel_avx2.cpp", "sparse_teacher_kernel_avx512.cpp"]
    monkeypatch.setattr(cpu_build.platform, "machine", lambda: "aarch64")
    assert cpu_build.instruction_sets() == ["DEFAULT"]
    assert [p.name for p in cpu_build.source_files()] == portable


def test_every_source_file_is_built_and_in_the_digest():
    """A .cpp in csrc/ that the build leaves out would be dead code; every .cpp and .h is in the cache key."""
    cpp_files = sorted(p.name for p in cpu_build.CSRC.iterdir() if p.suffix == ".cpp")
    built = sorted(p.name for p in cpu_build.source_files()) if cpu_build.is_x86() else None
    if built is not None:
        assert built == cpp_files
    digested = [p.name for p in cpu_build.all_source_files()]
    for name in ("sparse_teacher.cpp", "sparse_teacher.h", "sparse_teacher_kernel.h", "vector_math.h",
                 "bindings_common.h"):
        assert name in digested, name


def test_missing_compiler_says_how_to_get_one(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv(cpu_jit.CACHE_ENV, str(tmp_path / "cache"))
    module, reason = cpu_jit.load()
    assert module is None
    assert "no C++ compiler found" in reason and "no-such-compiler" in reason, reason
    assert "apt install g++" in reason and "CXX" in reason, reason
    assert not (tmp_path / "cache").exists()


def test_failed_compile_is_reported_logged_and_not_retried(monkeypatch, tmp_path, capfd):
    broken = tmp_path / "broken-compiler"
    broken.write_text("#!/bin/sh\necho 'this compiler always fails' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CXX", str(broken))
    monkeypatch.setenv(cpu_jit.CACHE_ENV, str(tmp_path / "cache"))
    module, reason = cpu_jit.load()
    assert module is None and "compiling it failed" in reason, reason
    failed_log = cpu_jit.build_dir().with_name(cpu_jit.build_dir().name + ".failed.log")
    assert failed_log.exists() and str(failed_log) in reason
    assert not cpu_jit.build_dir().exists()
    assert not list((tmp_path / "cache").glob("*.tmp*")), "the staging folder was left behind"
    stderr = capfd.readouterr().err
    assert "compiling the C++ CPU backend" in stderr and "failed after" in stderr, stderr
    module, reason = cpu_jit.load()
    assert module is None and "failed before" in reason and "delete it to retry" in reason, reason
    assert "compiling" not in capfd.readouterr().err


def test_a_stale_installed_extension_gives_way_to_the_first_use_compile(monkeypatch):
    """A wheel built with torch in its build environment, installed next to another torch."""

    class Stale:
        built_with_torch = "0.0.1"

    class Compiled:
        built_with_torch = torch.__version__

    monkeypatch.setitem(sys.modules, "distillm2_kernels._C", Stale)
    monkeypatch.setattr(cpu_jit, "load", lambda: (Compiled, "compiled on first use, cached in somewhere"))
    assert cpu_backend._load_extension() == (Compiled, None, "compiled on first use, cached in somewhere")
    monkeypatch.setattr(cpu_jit, "load", lambda: (None, "no C++ compiler found (...)"))
    module, reason, origin = cpu_backend._load_extension()
    assert module is None and origin == ""
    assert "built against torch 0.0.1" in reason and "no C++ compiler found" in reason, reason


FIRST_USE_UNDER_COMPILE = """
import sys, warnings
import torch
from distillm2_kernels import fused_skl
from distillm2_kernels.backends import cpu_backend
step = torch.compile(lambda s, t: fused_skl(s, t, 0.1), fullgraph=True, backend="eager")  # a break is an error
student, teacher = torch.randn(4, 64, requires_grad=True), torch.randn(4, 64)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    loss = step(student, teacher)
loss.backward()
assert torch.allclose(loss, fused_skl(student, teacher, 0.1, backend="torch"), rtol=1e-5, atol=1e-6)
fallbacks = [w for w in caught if "C++ CPU backend is unavailable" in str(w.message)]
print("cpu" if cpu_backend.unavailable_reason() is None else "torch", len(fallbacks))
"""


@pytest.mark.parametrize("compiler_found", [True, False])
def test_first_use_inside_torch_compile_does_not_break_the_graph(compiler_found, tmp_path):
    """The extension is looked up (or compiled) on first use, which may be inside a compiled training step."""
    if compiler_found and cpu_backend.unavailable_reason() is not None:
        pytest.skip(f"the C++ CPU backend is unavailable: {cpu_backend.unavailable_reason()}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    script = FIRST_USE_UNDER_COMPILE
    if not compiler_found:
        script = 'import sys; sys.modules["distillm2_kernels._C"] = None\n' + script
        env.update(CXX=str(tmp_path / "no-such-compiler"), DISTILLM2_KERNELS_CACHE=str(tmp_path / "cache"))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == (["cpu", "0"] if compiler_found else ["torch", "1"]), result.stdout


def _disassembly_by_function(path: str) -> dict[str, list[str]]:
    """{demangled function name: its instruction lines} from objdump."""
    listing = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", path], capture_output=True, text=True,
                             check=True).stdout
    functions: dict[str, list[str]] = {}
    current = None
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if header:
            current = functions.setdefault(header.group(1), [])
        elif current is not None and line.startswith(" ") and "\t" in line:
            current.append(line.split("\t", 1)[1].strip())
    return functions


def _uses_avx(instructions: list[str]) -> bool:
    """VEX/EVEX-encoded instructions (mnemonics v...) or 256/512-bit and mask registers: not baseline x86-64."""
    return any(i.startswith("v") or re.search(r"%[yz]mm|%k[0-7]\b", i) for i in instructions)


def _uses_avx512(instructions: list[str]) -> bool:
    return any(re.search(r"%zmm|%k[0-7]\b", i) for i in instructions)


@pytest.mark.skipif(not cpu_build.is_x86(), reason="only x86-64 has per-instruction-set kernel builds")
@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) is not installed")
def test_only_the_instruction_set_builds_hold_avx_code():
    """Functions that inline functions share by name across the objects (c10, std) keep one copy at link time:
    if the AVX builds emitted one, it could serve the portable path on a CPU without AVX. Every function with AVX
    code must belong to an AVX build (its name has the AVX2/AVX512 namespace), AVX-512 code to the AVX512 one."""
    module = cpu_backend._extension_state()[0]
    if module is None:
        pytest.skip(f"the C++ CPU backend is unavailable: {cpu_backend.unavailable_reason()}")
    functions = _disassembly_by_function(module.__file__)
    assert any("distillm2::DEFAULT::" in name for name in functions), "the portable kernels are missing"
    assert any("distillm2::AVX512::" in name for name in functions), "the AVX512 kernels are missing"
    avx_outside = [name for name, code in functions.items()
                   if "AVX2" not in name and "AVX512" not in name and _uses_avx(code)]
    assert not avx_outside, f"AVX code outside the AVX builds: {avx_outside[:5]}"
    avx512_outside = [name for name, code in functions.items() if "AVX512" not in name and _uses_avx512(code)]
    assert not avx512_outside, f"AVX-512 code outside the AVX512 build: {avx512_outside[:5]}"


@pytest.mark.skipif(not cpu_build.is_x86(), reason="only x86-64 has per-instruction-set kernel builds")
@pytest.mark.skipif(shutil.which("objdump") is None or shutil.which("c++") is None, reason="needs c++ and objdump")
def test_the_avx_check_sees_a_shared_inline_function_linked_from_an_avx_object(tmp_path):
    """The hazard the test above guards against: an inline function emitted out of line by an AVX-512 object
    linked first is the one copy in the module, and it is not in an AVX namespace."""
    shared = "__attribute__((noinline)) inline void scale(float* x, int n) { for (int i = 0; i < n; ++i) x[i] *= 3; }\n"
    (tmp_path / "portable.cpp").write_text(shared + "namespace DEFAULT { void run(float* x, int n) { scale(x, n); } }\n")
    (tmp_path / "wide.cpp").write_text(shared + "namespace AVX512 { void run(float* x, int n) { scale(x, n); } }\n")
    for name, flags in (("portable", []), ("wide", ["-mavx512f"])):
        subprocess.run(["c++", "-O3", "-fPIC", "-c", *flags, f"{name}.cpp", "-o", f"{name}.o"], cwd=tmp_path, check=True)
    subprocess.run(["c++", "-shared", "wide.o", "portable.o", "-o", "module.so"], cwd=tmp_path, check=True)
    functions = _disassembly_by_function(str(tmp_path / "module.so"))
    assert _uses_avx512(functions["scale(float*, int)"])
    subprocess.run(["c++", "-shared", "portable.o", "wide.o", "-o", "module.so"], cwd=tmp_path, check=True)
    assert not _uses_avx(_disassembly_by_function(str(tmp_path / "module.so"))["scale(float*, int)"])
