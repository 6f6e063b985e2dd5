"""Entry point for `python -m z2all ...` and `torchrun -m z2all train ...`."""

import sys

from z2all.cli import main

if __name__ == "__main__":
    sys.exit(main())
