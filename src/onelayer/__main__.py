"""`python -m onelayer ...` is the `onelayer` command (torchrun starts each process of a job this way; such a
process leaves through `train.distributed.run_and_leave`)."""

import os
import sys

from onelayer.cli import main

if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one of a torchrun job's processes
    from onelayer.train.distributed import run_and_leave

    run_and_leave(main)
sys.exit(main())
