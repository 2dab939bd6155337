"""`fused_skl` with the C++ backend (N = 2048, V = 32000 bf16, 2 threads, reduction "mean", student logits that
require grad: the forward computes the gradient) called 8 times with a pause of `sys.argv[1]` seconds before each
call; prints the milliseconds of each call. Run it as `python first_write_pauses.py 1.5` and
`THP_MEM_ALLOC_ENABLE=1 python first_write_pauses.py 1.5` (torch's switch for transparent huge pages) to compare
how the new gradient's first write costs with 4 KiB and 2 MiB pages."""

import os
import sys
import time

import torch

from distillm2_kernels import fused_skl


def main() -> None:
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(2048, 32000, generator=gen, dtype=torch.bfloat16).mul_(3)
    teacher = torch.randn(2048, 32000, generator=gen, dtype=torch.bfloat16).mul_(3).add_(student, alpha=0.5)
    student.requires_grad_(True)
    pause = float(sys.argv[1])
    times = []
    for _ in range(8):
        time.sleep(pause)
        start = time.perf_counter()
        loss = fused_skl(student, teacher, 0.1, reduction="mean", backend="cpu")
        times.append(round((time.perf_counter() - start) * 1e3))
        del loss
    print(f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', '0')} pause {pause} s: {times} ms")


if __name__ == "__main__":
    main()
