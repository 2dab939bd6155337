"""backends/huge_pages.py: large CPU outputs are advised for transparent huge pages, nothing else changes."""

from __future__ import annotations

import sys

import pytest
import torch

from distillm2_kernels import fused_skl
from distillm2_kernels.backends import huge_pages

LINUX = sys.platform.startswith("linux")


def test_small_outputs_are_left_alone():
    small = torch.empty(huge_pages.MIN_ADVISED_BYTES // 4 - 1, dtype=torch.float32)
    assert huge_pages.advised_range(small) is None
    assert not huge_pages.advise(small)


def test_the_advised_range_is_whole_huge_pages_inside_the_storage():
    out = huge_pages.empty_rows((64, 40_000), torch.bfloat16)
    start, length = huge_pages.advised_range(out)
    begin = out.untyped_storage().data_ptr()
    assert start % huge_pages.HUGE_PAGE_BYTES == 0 and length % huge_pages.HUGE_PAGE_BYTES == 0 and length > 0
    assert begin <= start and start + length <= begin + out.untyped_storage().nbytes()
    assert out.shape == (64, 40_000) and out.dtype == torch.bfloat16 and out.is_contiguous()


@pytest.mark.skipif(not LINUX, reason="madvise(MADV_HUGEPAGE) is Linux's")
def test_the_advice_is_taken_on_linux():
    """The system call succeeds (in every transparent-huge-page mode, `never` included)."""
    assert huge_pages.advise(torch.empty(8 << 20, dtype=torch.uint8))


def test_the_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv("DISTILLM2_KERNELS_HUGE_PAGES", "0")
    assert not huge_pages.enabled()
    assert not huge_pages.advise(torch.empty(8 << 20, dtype=torch.uint8))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_gradients_are_the_same_with_and_without_the_advice(monkeypatch, backend):
    """A [N, V] gradient over 4 MiB (so that it is advised), computed with the advice on and off: bit for bit."""
    from distillm2_kernels.backends import available_backends

    if backend not in available_backends(torch.device("cpu")):
        pytest.skip(f"the {backend} backend is not available here")
    gen = torch.Generator().manual_seed(0)
    student = (torch.randn(64, 40_000, generator=gen) * 3).to(torch.bfloat16)
    teacher = (torch.randn(64, 40_000, generator=gen) * 3).to(torch.bfloat16)
    grads = []
    for switch in ("1", "0"):
        monkeypatch.setenv("DISTILLM2_KERNELS_HUGE_PAGES", switch)
        for reduction in ("mean", "none"):
            leaf = student.clone().requires_grad_(True)
            loss = fused_skl(leaf, teacher, 0.1, reduction=reduction, backend=backend)
            (grad,) = torch.autograd.grad(loss.sum(), leaf)
            grads.append(grad)
    assert torch.equal(grads[0], grads[2]) and torch.equal(grads[1], grads[3])
