"""`python -m onelayer.bench TOOL SPEC_JSON MODEL_DIR DEVICE RESULT_PATH`: the subprocess of one benchmark
run, which `workers.run_worker` starts (not a user command; `onelayer bench` is); under torchrun (`bench
--nproc N`) each process leaves through `train.distributed.run_and_leave`."""

import sys

from onelayer.bench.workers import worker_main

if __name__ == "__main__":
    from onelayer.train.distributed import launched, run_and_leave

    if launched():
        run_and_leave(lambda: worker_main(sys.argv[1:]))
    sys.exit(worker_main(sys.argv[1:]))
