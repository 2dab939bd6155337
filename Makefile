# The README's commands: `make demo` (the main job on a small built-in default), `make test` and `make bench`;
# `make aot-check` (kernels compiled for sm_80 / sm_90 without a GPU) and `make gpu-check` (on a GPU machine).
# Each creates .venv on first use and installs the pinned CPU torch, the test dependencies and this package.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo kernel-demo test lint bench clean

# Options of the benchmark suite, e.g. make bench BENCH_ARGS="--quick" (see python -m benchmarks --help)
BENCH_ARGS ?=

# The package is installed as a user would (an isolated build, no torch in it); the C++ CPU backend is then
# compiled on first use and cached per torch version and source hash (~/.cache/distillm2_kernels), so an edit
# of distillm2_kernels/csrc/ recompiles it. An in-place build (setup.py build_ext --inplace) would shadow that
# cache, so the install removes it. `python -m distillm2_kernels.env` compiles it if needed and reports.
install: $(STAMP)
	$(PY) -m distillm2_kernels.env

$(STAMP): pyproject.toml setup.py requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -r requirements-test.txt
	$(PY) -m pip install --quiet -e .
	rm -f distillm2_kernels/_C.*.so
	touch $(STAMP)

# the miniature distillation experiment (teacher and student trained from scratch, six arms compared; one seed)
demo: install
	$(PY) -m distillm2_kernels.experiment

# the kernels alone: fused loss and gradient against the float64 oracle, time and memory against naive PyTorch
kernel-demo: install
	$(PY) -m distillm2_kernels.demo

# The fast numerical subset, run a second time by `make test` under an ATen instruction set that is not
# this machine's own (AVX2 on an AVX-512 CPU, else the portable build), so no result holds on one vector path
# only. pytest -m "not slow" tests is the quick loop of the whole suite.
NUMERICAL_TESTS ?= tests/test_reference.py tests/test_skew_divergence.py tests/test_fused_linear.py tests/test_cpu_backend.py \
	tests/test_sparse_teacher.py tests/test_sparse_cpu_backend.py tests/test_fused_linear_sparse.py

test: install
	$(PY) -m pytest -q tests
	@other=$$($(PY) -c "import torch; own = torch.backends.cpu.get_cpu_capability(); print('avx2' if own == 'AVX512' else '' if own == 'DEFAULT' else 'default')"); \
	if [ -z "$$other" ]; then echo "this machine runs ATen's portable build only: no second instruction set to test"; \
	else echo "numerical tests again under ATEN_CPU_CAPABILITY=$$other"; \
	ATEN_CPU_CAPABILITY=$$other $(PY) -m pytest -q -m "not slow" $(NUMERICAL_TESTS); fi

# ruff with the rules in pyproject.toml (tests/test_lint.py runs the same check in `make test`)
lint: $(STAMP)
	$(PY) -m ruff check .

bench: install
	$(PY) -m benchmarks $(BENCH_ARGS)

# Every Triton kernel specialization compiled ahead of time for sm_80 / sm_90 (no GPU needed): registers, spills,
# shared memory, instructions and SFU ops per vocabulary entry (see python -m benchmarks.aot_compile --help)
aot-check: install
	$(PY) -m benchmarks.aot_compile

# The first run on a GPU machine (one H100 / H200, no network, at most 8 minutes): the tests on CUDA and the
# headline benchmark rows into benchmarks/results/<device>/. Runs $(PYTHON) (the system python3 with CUDA torch),
# never the .venv with the CPU torch pin; wheels in .whl/ (Liger-Kernel) are installed first. Options:
# make gpu-check GPU_CHECK_ARGS="--skip-tests" (see python -m benchmarks.gpu_check --help)
GPU_CHECK_ARGS ?=
gpu-check:
	$(PYTHON) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

# the same steps on the CPU at tiny sizes, the tests under the Triton interpreter (about a minute)
gpu-check-dry-run: install
	$(PY) -m benchmarks.gpu_check --dry-run

.PHONY: aot-check gpu-check gpu-check-dry-run

clean:
	rm -rf $(VENV) build *.egg-info distillm2_kernels/_C*.so
