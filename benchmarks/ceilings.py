"""The device's measured ceilings, against which achieved GB/s and TFLOP/s are reported.

- copy: `dst.copy_(src)` of a large float32 tensor; GB/s = 2 × bytes (one read, one write) / median time.
- matmul: `a @ b` of square matrices in bfloat16 and in float32 (torch's default precision settings: on CUDA
  no TF32 for float32 unless the user enabled it); TFLOP/s = 2·n³ / median time.

- exp pass (CPU only): `torch.exp(x, out=y)` over a float32 tensor of 2048 × 32000 entries (`--quick`: 2048 ×
  4000), reported as ns per entry; a CPU row's `exp_passes` is its median time over that times N·V, its time in
  units of one `torch.exp` pass over a float32 [N, V] tensor (docs/design.md §7), measured in the same run.

Sizes: CUDA 2 GiB copy and n = 8192; CPU 512 MiB copy and n = 2048 (`--quick`: 64 MiB, n = 512 on both).
Timed like the cases (`distillm2_kernels.measure.measure`): median over the repeats after a warm-up.
"""

from __future__ import annotations

import torch

from distillm2_kernels.measure import measure

SIZES = {  # (copy bytes, matmul n)
    ("cuda", False): (2 * 2**30, 8192),
    ("cpu", False): (512 * 2**20, 2048),
    ("cuda", True): (64 * 2**20, 512),
    ("cpu", True): (64 * 2**20, 512),
}


def measure_ceilings(probe, quick: bool = False, repeats: int = 5) -> dict:
    device = probe.device
    copy_bytes, n = SIZES[(device.type, quick)]
    src = torch.empty(copy_bytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)

    def copy_once() -> None:
        dst.copy_(src)

    copy = measure(copy_once, lambda: None, probe, warmup=2, repeats=repeats)
    del src, dst
    result = {"ceiling_copy_GBps": round(2 * copy_bytes / copy.median_s / 1e9, 1)}
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        gen = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(n, n, generator=gen, device=device, dtype=dtype)
        b = torch.randn(n, n, generator=gen, device=device, dtype=dtype)

        def matmul_once() -> None:
            torch.mm(a, b)

        matmul = measure(matmul_once, lambda: None, probe, warmup=2, repeats=repeats)
        result[f"ceiling_matmul_{name}_TFLOPs"] = round(2 * n**3 / matmul.median_s / 1e12, 3)
        del a, b
    if device.type == "cpu":
        result["ceiling_exp_ns_per_entry"] = measure_exp_pass(probe, quick=quick, repeats=repeats)
    return result


EXP_PASS_ENTRIES = {False: 2048 * 32000, True: 2048 * 4000}


def measure_exp_pass(probe, quick: bool = False, repeats: int = 5) -> float:
    """ns per entry of one `torch.exp` over a float32 tensor (into a preallocated output)."""
    entries = EXP_PASS_ENTRIES[quick]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(entries, generator=gen, dtype=torch.float32)
    y = torch.empty_like(x)

    def exp_once() -> None:
        torch.exp(x, out=y)

    timing = measure(exp_once, lambda: None, probe, warmup=2, repeats=repeats)
    return round(timing.median_s / entries * 1e9, 4)


def exp_passes(median_ms: float, context: dict, row: dict):
    """A CPU row's time in exp passes over its [N, V] logits, or "" when it has none to compare with."""
    ns_per_entry = context.get("ceiling_exp_ns_per_entry")
    if not ns_per_entry or not row.get("N") or not row.get("V"):
        return ""
    return median_ms * 1e6 / (ns_per_entry * row["N"] * row["V"])
