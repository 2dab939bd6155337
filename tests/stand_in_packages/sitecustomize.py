"""Loaded by a Python process started with this folder on PYTHONPATH (a `generate` subprocess of a test):
the process sees a "GPU", so that `engine="vllm"` selects the stand-in `vllm` of this folder."""

import distillm2_kernels.trainer.generation as _generation

_generation.gpu_available = lambda: True
