"""`python -m onelayer.bench TOOL SPEC_JSON MODEL_DIR DEVICE RESULT_PATH`: the subprocess of one benchmark
run, which `workers.run_worker` starts (not a user command; `onelayer bench` is)."""

import sys

from onelayer.bench.workers import worker_main

if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
