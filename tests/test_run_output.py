"""What a run shows and records: progress as a bar on a terminal and as plain lines in a log file, with images/s;
an evaluation bar with a total; the start-up banner; trackers checked at load, `metrics.jsonl` always written,
the resolved configuration and the run's name handed to the trackers; the precision Accelerate was told."""
from __future__ import annotations

import io
import json
import logging

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from torch import nn

from distill.config import ConfigError
from distill.engine.logging import check_trackers, logged_trend, make_accelerator, start_trackers
from distill.engine.progress import ProgressBar, banner


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_in_a_log_file_is_plain_lines_per_interval(caplog):
    stream = io.StringIO()  # not a terminal, like a SLURM log
    bar = ProgressBar(10, "distill", stream=stream)
    with caplog.at_level(logging.INFO, logger="distill"):
        for step in range(1, 11):
            bar.update(step, images=32)
            if step % 5 == 0:
                bar.log(loss=1.25, lr=0.001)
        bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2  # one per log interval, nothing more at close
    assert lines[0].startswith("distill 5/10 (50%) | eta ") and lines[1].startswith("distill 10/10 (100%)")
    assert all("loss 1.25" in line and "lr 0.001" in line and "img/s" in line for line in lines)
    assert stream.getvalue() == ""  # no carriage-return bar


def test_progress_on_a_terminal_is_a_bar_with_images_per_second(caplog):
    stream = Terminal()
    bar = ProgressBar(4, "distill", stream=stream)
    with caplog.at_level(logging.INFO, logger="distill"):
        for step in range(1, 5):
            bar.update(step, images=16)
        bar.log(loss=0.5)
        bar.close()
    assert not caplog.records
    assert "\r" in stream.getvalue() and "4/4" in stream.getvalue() and "img/s" in stream.getvalue()


def test_progress_resumed_counts_from_its_step(caplog):
    bar = ProgressBar(100, "distill", initial=90, stream=io.StringIO())
    with caplog.at_level(logging.INFO, logger="distill"):
        bar.update(95, images=10)
        bar.close()  # a last line for steps not logged yet
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("distill 95/100 (95%)")


def test_evaluation_bar_has_a_total(caplog):
    from distill.engine.evaluate import evaluate_topk

    accelerator = make_accelerator("no", 1, "unused", trackers=[])
    batches = [{"image": torch.zeros(4, 3, 8, 8, dtype=torch.uint8), "label": torch.zeros(4, dtype=torch.long)}] * 3
    with caplog.at_level(logging.INFO, logger="distill"):
        top = evaluate_topk({"m": lambda x: torch.ones(len(x), 2)}, batches, accelerator, total_images=12)
    assert top["m_top1"] == 100.0
    assert [r.getMessage().split(" |")[0] for r in caplog.records] == ["eval 12/12 (100%)"]


def test_banner_says_what_runs(caplog):
    accelerator = make_accelerator("no", 1, "unused", trackers=[])
    with caplog.at_level(logging.INFO, logger="distill"):
        text = banner(accelerator, "demo", "runs/demo", steps=300, steps_per_epoch=125.0, batch_size=32,
                      grad_accum=2, models={"student tiny": nn.Linear(1000, 1000), "teacher none": None},
                      details={"data": "mix demo: a 0.75 -> 0.25, b (mixup) 0.25 -> 0.75"})
    assert "recipe demo -> runs/demo" in text
    assert "1 process x batch 32 x accumulation 2 = 64 images a step; precision no" in text
    assert "300 steps = 2.40 epochs of 125.0 steps" in text
    assert "student tiny: 1.00M parameters" in text and "teacher none" not in text
    assert "data: mix demo: a 0.75 -> 0.25" in text
    assert caplog.records and text.splitlines()[0] in caplog.records[0].getMessage()


# ---- trackers --------------------------------------------------------------------------------------------


def test_unknown_and_missing_trackers_stop_at_load():
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbord'.*tensorboard"):
        check_trackers(["tensorbord"])
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    missing = sorted(set(LOGGER_TYPE_TO_CLASS) - {str(t) for t in get_available_trackers()})
    if not missing:
        pytest.skip("every tracker is installed here")
    with pytest.raises(ConfigError, match=f"names {missing[0]}, which is not installed"):
        check_trackers(["jsonl", missing[0]])
    check_trackers(["jsonl", "tensorboard"])


def test_jsonl_always_written_and_config_and_name_reach_the_trackers(tmp_path):
    cfg = OmegaConf.create({"output_dir": str(tmp_path / "my_run"), "recipe": "demo",
                            "train": {"steps": 7, "trackers": ["tensorboard"]}, "optim": {"betas": [0.9, 0.99]}})
    accelerator = make_accelerator("no", 1, cfg.output_dir, trackers=cfg.train.trackers)  # jsonl not named
    start_trackers(accelerator, cfg)
    accelerator.log({"loss": 1.5}, step=3)
    accelerator.end_training()
    (record,) = [json.loads(line) for line in (tmp_path / "my_run" / "metrics.jsonl").read_text().splitlines()]
    assert record["step"] == 3 and record["loss"] == 1.5
    (hparams,) = (tmp_path / "my_run").rglob("hparams.yml")  # tensorboard got the resolved configuration
    stored = yaml.safe_load(hparams.read_text())
    assert stored["train.steps"] == 7 and stored["optim.betas"] == "[0.9, 0.99]" and stored["recipe"] == "demo"


def test_logged_trend_reads_a_resumed_log_by_its_latest_records(tmp_path):
    """A run killed after logging step 30 and resumed from its step-20 checkpoint logs step 30 again: the
    resumed run's record counts."""
    log = tmp_path / "metrics.jsonl"
    rows = [{"step": 10, "feature": 0.9}, {"step": 20, "feature": 0.7}, {"step": 30, "feature": 0.5},
            {"step": 5, "lr": 1.0}, {"step": 30, "feature": 0.4, "loss": 0.4}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert logged_trend(log, "feature") == {"first_step": 10, "first": 0.9, "last_step": 30, "last": 0.4}
    assert logged_trend(log, "kd") is None and logged_trend(tmp_path / "absent.jsonl", "feature") is None


def test_run_name_goes_to_hosted_trackers(tmp_path):
    calls = []

    class Recorder:
        def init_trackers(self, project, config=None, init_kwargs=None):
            calls.append((project, config, init_kwargs))

    cfg = OmegaConf.create({"output_dir": str(tmp_path / "mnv4_conv_s_lr8e-3"), "student": {"name": "x"}})
    start_trackers(Recorder(), cfg)
    ((project, config, init_kwargs),) = calls
    assert project == "distill" and config == {"output_dir": cfg.output_dir, "student.name": "x"}
    assert init_kwargs["wandb"] == {"name": "mnv4_conv_s_lr8e-3"}
    assert init_kwargs["mlflow"] == {"run_name": "mnv4_conv_s_lr8e-3"}


# ---- precision -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe, launched_with, expected", [
    ("auto", "bf16", "bf16"),  # `accelerate launch --mixed_precision bf16` (or accelerate config) is respected
    ("auto", None, "no"),  # not launched by Accelerate, on a CPU
    ("no", "bf16", "no"),  # a recipe that names its precision gets it
    ("bf16", None, "bf16"),
])
def test_mixed_precision_passed_only_when_the_recipe_sets_it(monkeypatch, tmp_path, recipe, launched_with, expected):
    if launched_with:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launched_with)
    else:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert make_accelerator(recipe, 1, tmp_path, trackers=[]).mixed_precision == expected
