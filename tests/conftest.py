"""Test set-up: the Triton interpreter on machines without a GPU, and NaN-poisoned allocations.

`TRITON_INTERPRET=1` must be set before triton decorates the kernels, so it is set here, before any test
module imports `distillm2_kernels`. With a GPU, the Triton backend runs compiled on CUDA tensors instead.
"""

import math
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings  # noqa: E402

# CI runs 40 examples per property; HYPOTHESIS_PROFILE=thorough runs 500 for a deeper search.
settings.register_profile("default", max_examples=40, deadline=None, print_blob=True)
settings.register_profile("thorough", max_examples=500, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

_real_empty = torch.empty
_real_empty_like = torch.empty_like


def _poison(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.is_floating_point():
        tensor.fill_(math.nan)
    elif tensor.dtype != torch.bool and not tensor.is_complex():
        tensor.fill_(torch.iinfo(tensor.dtype).max)
    return tensor


def _poisoned_empty(*args, **kwargs):
    return _poison(_real_empty(*args, **kwargs))


def _poisoned_empty_like(*args, **kwargs):
    return _poison(_real_empty_like(*args, **kwargs))


@pytest.fixture(autouse=True, scope="session")
def nan_poisoned_allocations():
    """Every `torch.empty` / `torch.empty_like` returns NaN-filled memory, so an output element that a
    kernel forgets to write shows up as NaN (session-scoped so hypothesis tests get it too)."""
    patch = pytest.MonkeyPatch()
    patch.setattr(torch, "empty", _poisoned_empty)
    patch.setattr(torch, "empty_like", _poisoned_empty_like)
    yield
    patch.undo()


def kernel_device() -> torch.device:
    """Where the Triton backend runs in this session: CUDA when present, else CPU under the interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """`tiny_models(family)` -> (teacher folder, student folder) of tiny saved models ("llama" or "qwen2";
    see tiny_models.py), built once per session."""
    from tiny_models import save_teacher_and_student

    built = {}

    def get(family: str = "llama"):
        if family not in built:
            built[family] = save_teacher_and_student(tmp_path_factory.mktemp(f"tiny-{family}"), family)
        return built[family]

    return get


@pytest.fixture
def one_thread():
    """Run the test's torch work on one thread: the tiny models' operations are far too small to share, and
    on a loaded machine OpenMP's waiting between threads makes them 10-30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
