// The sparse-teacher student sweeps built for ATen's DEFAULT (portable) vectors, with no instruction-set flags (see
// skew_divergence_kernel.cpp for why the AVX builds share no out-of-line code with it).
#define CPU_CAPABILITY DEFAULT
#include "sparse_teacher_kernel.h"
