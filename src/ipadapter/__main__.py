"""`python -m ipadapter ...`: the same command line as the `ipadapter` script."""

import sys

from .cli import main

sys.exit(main())
