"""Entry point for `python -m z2all ...` and `torchrun -m z2all train ...`."""

import sys

try:
    from z2all.cli import main
except KeyboardInterrupt:  # Ctrl-C while importing: quiet, like Ctrl-C anywhere else
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(main())
