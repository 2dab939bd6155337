// The row kernels built for ATen's DEFAULT vectors; compiled with no instruction-set flags: ATen's portable vectors.
#define CPU_CAPABILITY DEFAULT
#include "skew_divergence_kernel.h"
