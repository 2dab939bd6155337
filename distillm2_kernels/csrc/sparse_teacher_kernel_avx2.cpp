// The sparse-teacher student sweeps built for ATen's AVX2 vectors; compiled with -mavx2 -mfma -mf16c (see backends/cpu_build.py).
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "sparse_teacher_kernel.h"
