# The README's commands: `make demo` (the main job on a small built-in default), `make test` and `make bench`;
# `make aot-check` (kernels compiled for sm_80 / sm_90 without a GPU) and `make gpu-check` (on a GPU machine).
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

test: install
	$(PY) -m pytest -q tests

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
