"""`python -m ipadapter.train` for the DeepSpeed test, without DeepSpeed's shared-memory allreduce op.

DeepSpeed compiles that C++ op the first time a CPU run initialises its communication (one to two minutes on two
cores, most of the test's time on a fresh machine). It only speeds up allreduce between CPU processes, which gloo
does without it; the training, its sharded optimizer and its checkpoints are the same. Launched by
`accelerate launch --config_file ... tests/train_without_shm_op.py <ipadapter train flags>`.
"""

import importlib
import sys

from ipadapter.training.loop import main

# (`deepspeed.comm.torch` as an attribute is PyTorch itself, which deepspeed.comm imports under that name)
backend = importlib.import_module("deepspeed.comm.torch")
backend.build_shm_op = lambda: None  # TorchBackend calls it when DeepSpeed sets up its communication

if __name__ == "__main__":
    sys.exit(main())
