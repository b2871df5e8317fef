"""The prepared GPU benchmark stays runnable: its smoke mode runs every row on the CPU at tiny sizes."""
import re
from pathlib import Path

import launches

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_gpu.py"


def test_smoke_run_prints_every_row_with_a_ratio():
    proc = launches.run(str(SCRIPT), "--smoke", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.startswith("device: CPU") and "| figure | measured | ratio | target |" in out
    for row in ("compute bound", "online KD: ours vs timm", "offline: real shards", "RT-DETR train step",
                "RT-DETR batch-1 latency"):
        line = next((line for line in out.splitlines() if row in line), None)
        assert line is not None, (row, out)
        if row != "compute bound":
            assert re.search(r"\| \d+\.\d\dx", line) and ("| met |" in line or "not met" in line), line
