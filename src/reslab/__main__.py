"""`python -m reslab ...` (what torchrun launches) is the `reslab` command."""

import sys

from reslab.cli import main

sys.exit(main())
