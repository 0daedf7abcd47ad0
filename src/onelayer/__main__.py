"""`python -m onelayer ...` is the `onelayer` command (torchrun starts each process of a job this way)."""

import sys

from onelayer.cli import main

sys.exit(main())
