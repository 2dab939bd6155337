# The README's commands: `make demo` (the main job on a small built-in default), `make test` and `make bench`.
# Each creates .venv on first use and installs the pinned CPU torch, the test dependencies and this package.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# The C++ CPU backend is compiled by the editable install: rebuild it when its sources change.
CSRC := $(wildcard csrc/*.cpp csrc/*.h)

.PHONY: install demo kernel-demo test bench clean

# Options of the benchmark suite, e.g. make bench BENCH_ARGS="--quick" (see python -m benchmarks --help)
BENCH_ARGS ?=

install: $(STAMP)

$(STAMP): setup.py requirements-test.txt $(CSRC)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -r requirements-test.txt
	$(PY) -m pip install --quiet --no-build-isolation -e .
	# pip's editable install does not compile extensions here: build the C++ backend in place explicitly
	$(PY) setup.py --quiet build_ext --inplace
	$(PY) -c "from distillm2_kernels.backends import cpu_backend as c; print('C++ CPU backend:', c.unavailable_reason() or 'built (' + c.kernel_isa() + ')')"
	touch $(STAMP)

# the miniature distillation experiment (teacher and student trained from scratch, three methods compared)
demo: install
	$(PY) -m distillm2_kernels.experiment

# the kernels alone: fused loss and gradient against the float64 oracle, time and memory against naive PyTorch
kernel-demo: install
	$(PY) -m distillm2_kernels.demo

# The fast numerical subset, run a second time by `make test` under an ATen instruction set that is not
# this machine's own (AVX2 on an AVX-512 CPU, else the portable build), so no result holds on one vector path
# only. pytest -m "not slow" tests is the quick loop of the whole suite.
NUMERICAL_TESTS ?= tests/test_reference.py tests/test_skew_divergence.py tests/test_fused_linear.py tests/test_cpu_backend.py

test: install
	$(PY) -m pytest -q tests
	@other=$$($(PY) -c "import torch; own = torch.backends.cpu.get_cpu_capability(); print('avx2' if own == 'AVX512' else '' if own == 'DEFAULT' else 'default')"); \
	if [ -z "$$other" ]; then echo "this machine runs ATen's portable build only: no second instruction set to test"; \
	else echo "numerical tests again under ATEN_CPU_CAPABILITY=$$other"; \
	ATEN_CPU_CAPABILITY=$$other $(PY) -m pytest -q -m "not slow" $(NUMERICAL_TESTS); fi

bench: install
	$(PY) -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info distillm2_kernels/_C*.so
