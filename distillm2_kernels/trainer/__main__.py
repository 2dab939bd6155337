"""`python -m distillm2_kernels.trainer ...`: the `distillm2` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
