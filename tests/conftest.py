"""One intra-op thread for every test and every process a test starts: the models here are tiny, and on a
small shared machine two spinning thread pools per process (with loader workers beside them) make runs many
times slower and their timings erratic."""
import os

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
