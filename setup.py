"""The C++ CPU backend's build; everything else about the package is in pyproject.toml.

When torch is importable in the build environment (`pip install --no-build-isolation .`, or a build environment
that has torch), `distillm2_kernels._C` is compiled here against that torch (see
distillm2_kernels/backends/cpu_build.py). An isolated build (plain `pip install .`) has no torch: the package is
then installed without the extension, and the extension is compiled from the sources shipped in the package
(distillm2_kernels/csrc/) on first use and cached (see distillm2_kernels/backends/cpu_jit.py). A failed build here
also leaves the first-use compile.
"""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def _warn(message: str) -> None:
    print(f"distillm2_kernels: {message}", file=sys.stderr)


def _load_cpu_build():
    """backends/cpu_build.py, loaded by path: importing the package would import torch."""
    spec = importlib.util.spec_from_file_location("cpu_build", ROOT / "distillm2_kernels" / "backends" / "cpu_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cpu_extension_build():
    """(ext_modules, cmdclass) for the C++ CPU backend, or ([], {}) when it is not built at install."""
    if os.environ.get("DISTILLM2_SKIP_CPU_EXTENSION", "0") not in ("", "0"):
        _warn("DISTILLM2_SKIP_CPU_EXTENSION is set: installing without the C++ CPU backend")
        return [], {}
    try:
        import torch  # noqa: F401
        import torch.utils.cpp_extension  # noqa: F401
    except Exception as error:  # an isolated build environment has no torch
        _warn(f"torch is not importable in this build environment ({error}): the C++ CPU backend is compiled "
              "on first use instead (once, cached; see `python -m distillm2_kernels.env`)")
        return [], {}
    cpu_build = _load_cpu_build()
    extension = cpu_build.extension("distillm2_kernels/csrc")
    return [extension], {"build_ext": cpu_build.build_ext_class(optional=True, warn=_warn)}


ext_modules, cmdclass = _cpu_extension_build()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
