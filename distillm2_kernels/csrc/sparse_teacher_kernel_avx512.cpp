// The sparse-teacher student sweeps built for ATen's AVX512 vectors; compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma (see backends/cpu_build.py).
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "sparse_teacher_kernel.h"
