"""`python -m ipadapter.train` for the two-process test, with a process-group timeout of 10 s and an embedding-cache
build that takes 15 s longer than that: what a real build of hours does against NCCL's 10-minute timeout (gloo's
is 30 minutes). A process that waits in a collective while the main process builds fails with a timeout.
Launched by `accelerate launch --multi_gpu --num_processes 2 tests/train_slow_cache_build.py <ipadapter train flags>`.
"""

import sys
import time
from datetime import timedelta

import torch.distributed.distributed_c10d as c10d

import ipadapter.training.loop as loop

c10d.default_pg_timeout = timedelta(seconds=10)  # read when Accelerate creates the process group
build = loop.build_cache


def slow_build(*args, **kwargs):
    time.sleep(15)
    return build(*args, **kwargs)


loop.build_cache = slow_build

if __name__ == "__main__":
    sys.exit(loop.main())
