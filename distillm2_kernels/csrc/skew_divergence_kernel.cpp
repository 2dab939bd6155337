// The row kernels built for ATen's DEFAULT (portable) vectors, with no instruction-set flags. setup.py links this
// object before the AVX ones so that the inline functions they share are this build's copies.
#define CPU_CAPABILITY DEFAULT
#include "skew_divergence_kernel.h"
