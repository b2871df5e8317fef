"""distill/finetune_det.py with a fault put in by environment variables, for tests/test_cluster_small.py:

    GRAD_SCALER=1         the run takes fp16's path through the update guard: a grad scaler on the Accelerator
                          (CPU autocast has no fp16, so the Accelerator would not make one itself)
    NONFINITE_RANK=1      that process's loss is non-finite at every step (its gradients too, and through the
                          all-reduce everyone's): the scaler skips every update on every process, but only that
                          process saw a non-finite loss
    CRASH_AT_STEP=N       the loss raises at its Nth call (a defect, not a user error), its loader workers running
"""
import os

import torch

import distill.finetune_det as finetune

if os.environ.get("GRAD_SCALER"):
    make = finetune.make_accelerator

    def with_scaler(*args, **kwargs):
        accelerator = make(*args, **kwargs)
        accelerator.scaler = torch.amp.GradScaler("cpu")
        return accelerator

    finetune.make_accelerator = with_scaler

if os.environ.get("NONFINITE_RANK") == os.environ.get("RANK"):
    build = finetune.build_criterion

    def nonfinite_criterion(*args, **kwargs):
        criterion = build(*args, **kwargs)

        def losses(outputs, targets):
            terms = criterion(outputs, targets)
            first = next(iter(terms))
            return terms | {first: terms[first] * float("inf")}

        return losses

    finetune.build_criterion = nonfinite_criterion

if os.environ.get("CRASH_AT_STEP"):
    build_for_crash = finetune.build_criterion

    def crashing_criterion(*args, **kwargs):
        criterion, calls = build_for_crash(*args, **kwargs), []

        def losses(outputs, targets):
            calls.append(1)
            if len(calls) == int(os.environ["CRASH_AT_STEP"]):
                raise RuntimeError("a fault put in at this step")
            return criterion(outputs, targets)

        return losses

    finetune.build_criterion = crashing_criterion

finetune.main()
