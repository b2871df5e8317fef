"""One intra-op thread for every test and every process a test starts: the models here are tiny, and on a
small shared machine two spinning thread pools per process (with loader workers beside them) make runs many
times slower and their timings erratic."""
import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


# Files whose tests launch whole runs, longest first. The suite runs on two pytest-xdist workers with a file's
# tests on one worker (module fixtures are shared runs); starting the long files first lets both workers end
# together instead of one finishing a ten-minute file alone.
LONG_FIRST = ["test_demo.py", "test_cluster.py", "test_demo_signals.py", "test_pretrain.py", "test_entry_points.py",
              "test_offline.py", "test_det_cluster.py", "test_det_train.py", "test_curate.py",
              "test_det_model_train.py", "test_feature_distill.py", "test_packaging.py", "test_export_hf_dfine.py",
              "test_det_handoff.py", "test_det_deim.py", "test_export_onnx.py", "test_det_eval_table.py",
              "test_det_dfine.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FIRST)))  # stable: the rest keep their order


@pytest.fixture
def fresh_accelerate_state():
    """For a test that runs an entry point in its own process: its own Accelerator, as a fresh launch would
    build, and one intra-op thread (the models are too small to gain from more, and on cores shared with other
    test workers extra threads only spin against each other: minutes instead of seconds)."""
    from accelerate.state import AcceleratorState

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    torch.set_num_threads(threads)
