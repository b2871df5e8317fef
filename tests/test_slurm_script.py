"""scripts/slurm_pretrain.sbatch run as a command: it makes its log folder, then submits itself."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "slurm_pretrain.sbatch"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_submits_itself_after_making_the_log_folder(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"  # records its arguments and whether logs/ existed when it ran
    fake.write_text('#!/bin/bash\n[ -d logs ] && echo "logs ok" > called.txt\nprintf "%s\\n" "$@" >> called.txt\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    done = subprocess.run(["bash", str(SCRIPT), "--nodes=4", "--time=1:00:00", "recipe=mnv4_conv_l",
                           "data.root=/datasets"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "called.txt").read_text().splitlines() == [
        "logs ok", "--nodes=4", "--time=1:00:00", str(SCRIPT), "recipe=mnv4_conv_l", "data.root=/datasets"]
    assert "logs/" in SCRIPT.read_text().split("#SBATCH --output=")[1].splitlines()[0]
