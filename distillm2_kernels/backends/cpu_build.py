"""How the C++ CPU backend `distillm2_kernels._C` is compiled from the package's csrc/ folder.

Used by setup.py (at install, when torch is importable in the build environment) and, where the install has no
extension, by `cpu_jit` on first use: `python cpu_build.py OUT_DIR` builds `OUT_DIR/distillm2_kernels/_C*.so`
against the running torch. This file imports only the standard library at load time (setup.py loads it by path
in a build environment that may have no torch).

Instruction sets: on x86-64 the kernels are compiled three times, for ATen's DEFAULT, AVX2 and AVX512 vectors,
each file with only its own `-m` flags, and the one ATen itself selects is used at run time; elsewhere (AArch64)
only the portable build. No `-march=native`: the result runs on any CPU of the architecture. Only the per-ISA
kernel files get `-m` flags; every function they share with other objects must be baseline code, which
tests/test_cpu_build.py checks on the built module (see csrc/skew_divergence_kernel.h).
"""

from __future__ import annotations

import hashlib
import platform
import sys
from pathlib import Path

EXTENSION_NAME = "distillm2_kernels._C"
# The module compiled on first use has a name of its own: a process that has loaded an installed `_C` (and found it
# stale) could not load a second library of the same module name (the loader would hand back the first).
FIRST_USE_EXTENSION_NAME = "distillm2_kernels._C_first_use"
CSRC = Path(__file__).resolve().parent.parent / "csrc"

# Extra flags for the per-instruction-set kernel files, by file-name suffix.
ISA_FLAGS = {
    "_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"],
    "_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
}
COMPILE_FLAGS = ["-O3", "-fopenmp", "-Wno-unknown-pragmas", "-Wno-maybe-uninitialized", "-g0"]


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def instruction_sets() -> list[str]:
    """The kernel builds compiled on this architecture (ATen's names)."""
    return ["DEFAULT", "AVX2", "AVX512"] if is_x86() else ["DEFAULT"]


# The kernels of each family: the dense skew divergence and the sparse-teacher student sweeps.
KERNEL_FAMILIES = ("skew_divergence", "sparse_teacher")


def source_files(csrc: Path = CSRC) -> list[Path]:
    """The dispatchers and the kernel builds of every family, in link order (setuptools sorts them by path
    anyway): `<family>.cpp` and `<family>_kernel.cpp`, then on x86-64 `<family>_kernel_{avx2,avx512}.cpp`."""
    sources = [csrc / f"{family}{suffix}.cpp" for family in KERNEL_FAMILIES for suffix in ("", "_kernel")]
    if is_x86():
        sources += [csrc / f"{family}_kernel_{isa}.cpp" for family in KERNEL_FAMILIES for isa in ("avx2", "avx512")]
    return sources


def all_source_files(csrc: Path = CSRC) -> list[Path]:
    """Every file the build reads (sources and headers), sorted."""
    return sorted(p for p in csrc.iterdir() if p.suffix in (".cpp", ".h"))


def source_digest(csrc: Path = CSRC) -> str:
    """SHA-256 (12 hex digits) of every file the build reads: a compiled module records the digest of the
    sources it was built from (`_C.built_from_sources`), so that a stale build is never used."""
    digest = hashlib.sha256()
    for path in all_source_files(csrc):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def extension(csrc: str, name: str = EXTENSION_NAME):
    """The CppExtension for the C++ CPU backend, its sources under `csrc` (relative for setup.py)."""
    import torch
    from torch.utils.cpp_extension import CppExtension

    root = Path(csrc)
    macros = [("DISTILLM2_TORCH_VERSION", f'"{torch.__version__}"'), ("DISTILLM2_SOURCE_DIGEST", f'"{source_digest()}"')]
    if is_x86():
        macros.append(("DISTILLM2_X86_KERNELS", None))
    return CppExtension(
        name,
        [str(root / p.name) for p in source_files()],
        depends=[str(root / p.name) for p in all_source_files() if p.suffix == ".h"],
        define_macros=macros,
        extra_compile_args={"cxx": list(COMPILE_FLAGS)},
        extra_link_args=["-fopenmp"],
    )


def build_ext_class(optional: bool, warn=None):
    """torch's BuildExtension with the per-file instruction-set flags. `optional`: a failed build is reported
    with `warn(message)` and leaves the pure-Python package (setup.py); otherwise it raises."""
    from torch.utils.cpp_extension import BuildExtension

    class IsaBuildExtension(BuildExtension):
        def build_extension(self, ext):
            compile_one = self.compiler._compile

            def compile_with_isa_flags(obj, src, ext_name, cc_args, extra_postargs, pp_opts):
                flags = next((f for suffix, f in ISA_FLAGS.items() if src.endswith(suffix)), [])
                if isinstance(extra_postargs, dict):
                    extra_postargs = {**extra_postargs, "cxx": list(extra_postargs.get("cxx", [])) + flags}
                else:
                    extra_postargs = list(extra_postargs) + flags
                return compile_one(obj, src, ext_name, cc_args, extra_postargs, pp_opts)

            self.compiler._compile = compile_with_isa_flags
            try:
                super().build_extension(ext)
            except Exception as error:
                if not optional:
                    raise
                warn(
                    f"could not build the C++ CPU backend ({error}); installing without it: it is compiled on "
                    "first use instead (or CPU tensors use the 'torch' backend where that fails too)"
                )
            finally:
                self.compiler._compile = compile_one

    # ninja compiles every source with the same flags, so the per-file flags need the plain compiler.
    return IsaBuildExtension.with_options(use_ninja=False)


def build(out_dir: Path) -> Path:
    """Compiles the extension against the running torch into `out_dir`; returns the module's path."""
    from setuptools import Distribution

    out_dir = Path(out_dir).resolve()
    ext = extension(str(CSRC), FIRST_USE_EXTENSION_NAME)
    dist = Distribution({"name": "distillm2_kernels", "ext_modules": [ext],
                         "cmdclass": {"build_ext": build_ext_class(optional=False)}})
    command = dist.get_command_obj("build_ext")
    command.build_lib = str(out_dir)
    command.build_temp = str(out_dir / "objects")
    dist.run_command("build_ext")
    return Path(command.get_ext_fullpath(ext.name))


if __name__ == "__main__":
    print(build(Path(sys.argv[1])))
