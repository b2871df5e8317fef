"""The SLURM scripts: run as a command they make their log folder and submit themselves; inside a job their
requeue logic turns the requeue exit status into `scontrol requeue` and leaves finished or failed runs alone."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from distill.config import ClusterConfig
from distill.engine.preemption import EXIT_REQUEUE

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


COMMON = SCRIPT.parent / "slurm_common.sh"


def requeue_logic(tmp_path, status: int, restarts: int = 0) -> tuple[int, list[str]]:
    """`requeue_if_stopped STATUS` in a job (fake scontrol on PATH): its exit status and scontrol's calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "scontrol"
    fake.write_text('#!/bin/bash\nprintf "%s\\n" "$*" >> "$CALLS"\n')
    fake.chmod(0o755)
    calls = tmp_path / "calls.txt"
    calls.write_text("")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CALLS": str(calls),
           "SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": str(restarts)}
    done = subprocess.run(["bash", "-c", f'source "{COMMON}"; requeue_if_stopped {status}'], env=env,
                          capture_output=True, text=True, timeout=60)
    return done.returncode, calls.read_text().splitlines()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_a_run_stopped_by_a_signal_is_requeued_and_a_finished_or_failed_one_is_not(tmp_path):
    assert requeue_logic(tmp_path, EXIT_REQUEUE) == (0, ["requeue 4242"])
    assert requeue_logic(tmp_path, 0) == (0, [])  # finished
    assert requeue_logic(tmp_path, 1) == (1, [])  # failed: the failure stands
    assert requeue_logic(tmp_path, 137) == (137, [])  # killed outright: no checkpoint was promised
    status, calls = requeue_logic(tmp_path, EXIT_REQUEUE, restarts=100)  # keeps stopping: left alone
    assert (status, calls) == (EXIT_REQUEUE, [])


def test_both_scripts_ask_for_the_signal_before_the_time_limit_and_start_one_process_per_gpu():
    for name in ("slurm_pretrain.sbatch", "slurm_finetune.sbatch"):
        text = (SCRIPT.parent / name).read_text()
        options = dict((line[len("#SBATCH "):] + "=").split("=")[:2] for line in text.splitlines()
                       if line.startswith("#SBATCH --"))
        assert options["--signal"].startswith("USR1@"), name  # before the time limit, to every process
        assert "--requeue" in options and options["--ntasks-per-node"] == options["--gpus-per-node"], name
        assert "run_ranks" in text, name
    assert "SIGUSR1" in ClusterConfig().stop_signals
