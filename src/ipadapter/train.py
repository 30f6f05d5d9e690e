"""Entry point for `accelerate launch -m ipadapter.train ...` (same flags as `ipadapter train`)."""

import sys

from .training.loop import main

if __name__ == "__main__":
    sys.exit(main())
