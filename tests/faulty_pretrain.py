"""distill/pretrain.py with a fault put in by environment variables, for the timeout tests:

    SLOW_CHECKPOINT_S=8  the main process takes 8 more seconds to write each checkpoint
    STEP_SLEEP_S=0.5     every process sleeps this long at each step (a lower bound on the run's length)
    ABSENT_RANK=2 ABSENT_BATCH=4
                         that process never gets its micro-batch 4 (counted from 0): it waits for ever before the
                         step's collectives
"""
import os
import time

import distill.engine.checkpoint as checkpoint
import distill.pretrain as pretrain

if float(os.environ.get("SLOW_CHECKPOINT_S", 0)):
    save = checkpoint.atomic_save

    def slow_save(obj, path):
        time.sleep(float(os.environ["SLOW_CHECKPOINT_S"]))
        save(obj, path)

    checkpoint.atomic_save = slow_save

tally = pretrain.tally  # called once a step's micro-batches are at hand, after the process said it is ready


def faulty_tally(mine, micro_batches, *args):
    time.sleep(float(os.environ.get("STEP_SLEEP_S", 0)))
    return tally(mine, micro_batches, *args)


pretrain.tally = faulty_tally

if os.environ.get("ABSENT_RANK") == os.environ.get("RANK"):
    build = pretrain.build_train_loader

    class Stalls:
        """The loader, stalling for ever at the absent step's first micro-batch."""

        def __init__(self, loader, at: int):
            self.loader, self.at = loader, at

        def __getattr__(self, name):
            return getattr(self.loader, name)

        def __iter__(self):
            for i, batch in enumerate(self.loader):
                if i == self.at:
                    time.sleep(3600)
                yield batch

    def stalling_loader(*args, **kwargs):
        return Stalls(build(*args, **kwargs), int(os.environ["ABSENT_BATCH"]))

    pretrain.build_train_loader = stalling_loader

pretrain.main()
