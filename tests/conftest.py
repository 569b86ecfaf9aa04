import os

import torch

# The suite runs many small models on a 2-core machine, often beside DataLoader workers or subprocesses:
# more than one intra-op thread per process oversubscribes the cores and is many times slower, not faster.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
