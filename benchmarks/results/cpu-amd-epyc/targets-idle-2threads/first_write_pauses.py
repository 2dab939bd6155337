"""The C++ backend's skew_forward_and_grad (SKL, N = 2048, V = 32000 bf16, 2 threads) called 8 times with a pause
of `sys.argv[1]` seconds before each call; prints the milliseconds of each call. Run it as
`python first_write_pauses.py 1.5` and `THP_MEM_ALLOC_ENABLE=1 python first_write_pauses.py 1.5` (torch's switch
for transparent huge pages) to compare how the new gradient's first write costs with 4 KiB and 2 MiB pages."""
import torch, time, os, sys
torch.set_num_threads(2)
from distillm2_kernels.backends import cpu_backend
from distillm2_kernels._inputs import prepare_rows
N,V=2048,32000
g=torch.Generator().manual_seed(0)
s=torch.randn(N,V,generator=g,dtype=torch.bfloat16).mul_(3); te=torch.randn(N,V,generator=g,dtype=torch.bfloat16).mul_(3).add_(s,alpha=0.5)
rows=prepare_rows(s,te,0.1,None,-100,1.0)
w=torch.full((N,),1.0/N)
gap=float(sys.argv[1])
ts=[]
for i in range(8):
    time.sleep(gap)
    a=time.perf_counter(); out=cpu_backend.skew_forward_and_grad(rows, False, False, w); ts.append(round((time.perf_counter()-a)*1e3)); del out
print("THP_MEM_ALLOC_ENABLE=" + os.environ.get("THP_MEM_ALLOC_ENABLE","0"), "gap", gap, ts)
