"""The benchmark suite of distillm2_kernels: `python -m benchmarks` (see `benchmarks/__main__.py`)."""
