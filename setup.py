"""Build script: `pip install .` (pure Python for now; the C++ CPU backend is added in csrc/)."""

import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "distillm2_kernels" / "__init__.py").read_text()).group(1)

setup(
    name="distillm2_kernels",
    version=VERSION,
    description="Fused Triton kernels for LLM distillation with the DistiLLM-2 skew KL / skew reverse KL losses",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["distillm2_kernels", "distillm2_kernels.*"]),
    # torch is not pinned here: users keep the build (CUDA or CPU) they have. The Makefile pins the CPU wheel.
    install_requires=["torch>=2.3", "triton>=3.0; platform_system == 'Linux'"],
    extras_require={"test": ["pytest>=8", "hypothesis>=6.100", "numpy"]},
)
