"""Build script: `pip install .` installs the package and, when torch is importable at build time, compiles the
C++ CPU backend `distillm2_kernels._C` from csrc/ against that torch.

The extension is optional: without torch in the build environment (an isolated build), or when the compiler
fails, the pure-Python package is installed and the "cpu" backend falls back to the "torch" one with a warning.
Use `pip install --no-build-isolation .` so that the build sees (and matches) the installed torch.

Instruction sets: the kernels are compiled three times, for ATen's DEFAULT, AVX2 and AVX512 vectors (x86-64),
each with only its own `-m` flags, and the one ATen itself selects is used at run time. No `-march=native`:
the built wheel runs on any x86-64 CPU.
"""

import os
import platform
import re
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "distillm2_kernels" / "__init__.py").read_text()).group(1)

# Extra flags for the per-instruction-set kernel files, by file-name suffix.
ISA_FLAGS = {
    "_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"],
    "_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
}


def _warn(message: str) -> None:
    print(f"distillm2_kernels: {message}", file=sys.stderr)


def _cpu_extension_build():
    """(ext_modules, cmdclass) for the C++ CPU backend, or ([], {}) when torch is not importable."""
    if os.environ.get("DISTILLM2_SKIP_CPU_EXTENSION", "0") not in ("", "0"):
        _warn("DISTILLM2_SKIP_CPU_EXTENSION is set: installing without the C++ CPU backend")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as error:  # an isolated build environment has no torch
        _warn(f"torch is not importable at build time ({error}); installing without the C++ CPU backend")
        return [], {}

    x86 = platform.machine().lower() in ("x86_64", "amd64")
    # Link order matters: inline functions (c10's half/bfloat16 conversions, ...) are emitted in every kernel
    # object and the linker keeps the first copy, so the portable build must come first. setuptools links the
    # sources sorted by path: skew_divergence_kernel.cpp sorts before skew_divergence_kernel_avx*.cpp.
    sources = ["csrc/skew_divergence.cpp", "csrc/skew_divergence_kernel.cpp"]
    macros = [("DISTILLM2_TORCH_VERSION", f'"{torch.__version__}"')]
    if x86:
        sources += ["csrc/skew_divergence_kernel_avx2.cpp", "csrc/skew_divergence_kernel_avx512.cpp"]
        macros.append(("DISTILLM2_X86_KERNELS", None))
    extension = CppExtension(
        "distillm2_kernels._C",
        sources,
        depends=sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.h")),
        define_macros=macros,
        extra_compile_args={"cxx": ["-O3", "-fopenmp", "-Wno-unknown-pragmas", "-Wno-maybe-uninitialized", "-g0"]},
        extra_link_args=["-fopenmp"],
    )

    class OptionalBuildExtension(BuildExtension):
        """Adds the per-file instruction-set flags; a failed build leaves the pure-Python package."""

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
                _warn(
                    f"could not build the C++ CPU backend ({error}); installing without it: "
                    "backend='auto' uses the 'torch' backend on CPU tensors"
                )
            finally:
                self.compiler._compile = compile_one

    # ninja compiles every source with the same flags, so the per-file flags need the plain compiler.
    return [extension], {"build_ext": OptionalBuildExtension.with_options(use_ninja=False)}


ext_modules, cmdclass = _cpu_extension_build()

setup(
    name="distillm2_kernels",
    version=VERSION,
    description="Fused Triton kernels for LLM distillation with the DistiLLM-2 skew KL / skew reverse KL losses",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["distillm2_kernels", "distillm2_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    # torch is not pinned here: users keep the build (CUDA or CPU) they have. The Makefile pins the CPU wheel.
    install_requires=["torch>=2.3", "triton>=3.0; platform_system == 'Linux'"],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6.100", "numpy"],
        # the reference trainer and its `distillm2` command
        "train": ["transformers>=4.46", "peft>=0.13", "accelerate>=1.0", "tqdm", "matplotlib"],
        # generation with vLLM (GPU only); without it `distillm2 generate` uses transformers
        "vllm": ["vllm"],
        "bench": ["matplotlib", "tqdm"],
    },
    entry_points={"console_scripts": ["distillm2 = distillm2_kernels.trainer.cli:main"]},
)
