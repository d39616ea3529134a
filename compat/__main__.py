import sys

from compat.cli import main

# Guarded: multiprocessing's spawn start method (megatron's checkpoint writer queue) re-imports the
# main module in its child, which must not run the command line again.
if __name__ == "__main__":
    sys.exit(main())
