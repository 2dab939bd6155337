// The row kernels built for ATen's DEFAULT (portable) vectors, with no instruction-set flags. The AVX builds
// share no out-of-line code with it (tests/test_cpu_build.py checks the built module), so the order in which
// the objects are linked does not matter.
#define CPU_CAPABILITY DEFAULT
#include "skew_divergence_kernel.h"
