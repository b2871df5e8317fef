"""What a launch of many processes needs beyond a correct step: batch MixUp that can act on the per-process
batch, evaluation detections on the main process alone, hub weights fetched once per machine, one all-reduce
for a log step's loss terms, and one decision on non-finite updates for every process."""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from collectives_driver import CATEGORY_IDS, IMAGES, share_of
from launches import WARM, free_port, ranks, run

from distill.data.synthetic_coco import generate_coco_shapes
from distill.detection.evaluate import coco_box_metrics, to_coco_results
from distill.detection.recipe import check_mixup_batch, load_det_config
from distill.errors import ConfigError
from distill.finetune_det import plan_steps

ROOT = Path(__file__).resolve().parent.parent
DRIVER = str(ROOT / "tests" / "collectives_driver.py")
FAULTY = str(ROOT / "tests" / "faulty_finetune.py")


def finished(procs, log: Path, timeout: float = 300) -> list[int]:
    """The exit statuses of a launch's processes; a process still running after `timeout` is a hang."""
    try:
        return [p.wait(timeout) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.send_signal(9)
        raise AssertionError("the processes did not end (a hang):\n" + log.read_text()[-3000:]) from None


def records(out: Path, processes: int) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]


# ---- batch MixUp and the per-process batch ---------------------------------------------------------


def test_mixup_with_one_image_a_process_is_refused_naming_the_keys():
    cfg = load_det_config(["recipe=dfine_mnv4_conv_s"])  # DEIM: mixup_prob 0.5, global batch 32
    plan = plan_steps(cfg, 118_287, 32)
    assert cfg.data.batch_size == 1 and plan.mixup[0] < plan.mixup[1]
    with pytest.raises(ConfigError) as refused:
        check_mixup_batch(cfg, 32, plan.mixup)
    message = str(refused.value)
    assert "\n" not in message
    for part in ("data.mixup_prob=0.5", "data.batch_size is 1", "data.global_batch_size=32 over 32 processes",
                 "set data.mixup_prob=0"):
        assert part in message, message

    check_mixup_batch(cfg, 32, plan.mixup, from_step=plan.mixup[1])  # resumed past MixUp: nothing to refuse
    cfg.data.mixup_prob = 0.0
    check_mixup_batch(cfg, 32, plan.mixup)
    cfg = load_det_config(["recipe=dfine_mnv4_conv_s"])
    check_mixup_batch(cfg, 16, plan_steps(cfg, 118_287, 16).mixup)  # two images a process mix


# ---- evaluation: the detections go to the main process only -----------------------------------------


def test_evaluation_gathers_detections_on_the_main_process_only(tmp_path):
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 120, "height": 100} for i in IMAGES]
    anns = [{"id": 10 * i + k, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for i, objects in IMAGES.items() for k, (c, b) in enumerate(objects)]
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns,
                                    "categories": [{"id": c, "name": str(c)} for c in CATEGORY_IDS]}))
    processes, out = 3, tmp_path / "eval"
    codes = finished(ranks(DRIVER, processes, out, "mode=eval", f"ann_file={ann_file}"), Path(f"{out}.log"))
    assert codes == [0] * processes, Path(f"{out}.log").read_text()[-3000:]

    shares = [share_of(r, processes) for r in range(processes)]  # what one process would have scored alone
    detections = [d for results, ids, _ in shares for d in to_coco_results(results, ids, CATEGORY_IDS)]
    scored = json.loads(json.dumps(detections))  # the scoring adds keys to what it is given
    expected = coco_box_metrics(ann_file, scored, [i for _, ids, _ in shares for i in ids])
    expected |= {"eval_images": len(IMAGES), "eval_skipped_images": sum(len(s[2]) for s in shares)}
    assert 0 < expected["AP"] < 1
    seen = records(out, processes)
    assert all(r["metrics"] == expected for r in seen), (expected, [r["metrics"] for r in seen])
    assert json.loads((out / "detections.json").read_text()) == detections
    assert seen[0]["received_detections"] == len(detections)
    assert [r["received_detections"] for r in seen[1:]] == [0] * (processes - 1)
    assert all(r["own_detections"] > 0 for r in seen)


def test_a_scoring_failure_on_the_main_process_stops_every_process_with_its_message(tmp_path):
    """The main process alone scores; its failure (here: no annotation file) reaches the others through the
    broadcast they wait in, rather than leaving them there until the collective timeout."""
    processes, out = 3, tmp_path / "eval_fails"
    log = Path(f"{out}.log")
    codes = finished(ranks(DRIVER, processes, out, "mode=eval", f"ann_file={tmp_path / 'missing.json'}"), log)
    assert all(code != 0 for code in codes), log.read_text()[-3000:]
    assert log.read_text().count("evaluation failed on the main process") == processes, log.read_text()[-3000:]


# ---- hub weights: the first process of each machine fetches them, the others read the cache ---------


def test_hub_weights_are_fetched_by_each_machines_first_process_before_the_others(tmp_path):
    """Four processes as two machines of two: on each, the second process's hub-weights calls start only
    once its machine's first process finished the same call."""
    processes, per_machine, out = 4, 2, tmp_path / "hub"
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(processes), "LOCAL_WORLD_SIZE": str(per_machine)}
    log = Path(f"{out}.log")
    procs = [WARM.start(DRIVER, [f"output_dir={out}", "mode=hub"],
                        env | {"RANK": str(r), "LOCAL_RANK": str(r % per_machine)}, log) for r in range(processes)]
    assert finished(procs, log) == [0] * processes, log.read_text()[-3000:]
    seen = records(out, processes)
    assert [r["local_main"] for r in seen] == [True, False, True, False]
    for r in seen:
        assert [c["name"] for c in r["calls"]] == ["test_resnet", "test_resnet", "test_efficientnet"]
        assert r["barriers_without_hub"] == 0
    for r in seen[1::2]:
        assert all(c["first_done"] for c in r["calls"]), r["calls"]


# ---- the log step's loss terms: one all-reduce --------------------------------------------------------


def test_loss_terms_are_averaged_in_one_all_reduce_and_differing_terms_stop_every_process(tmp_path):
    processes, out = 2, tmp_path / "means"
    codes = finished(ranks(DRIVER, processes, out, "mode=means"), Path(f"{out}.log"))
    assert codes == [0] * processes, Path(f"{out}.log").read_text()[-3000:]
    for r in records(out, processes):
        assert r["all_reduce_calls"] == 1
        assert r["keys"] == sorted(r["per_key"])
        for key, value in r["per_key"].items():
            assert r["means"][key] == pytest.approx(value, rel=1e-6, abs=1e-7 * max(map(abs, r["per_key"].values())))
        assert r["after"] == r["means"]
        assert r["mismatch"] == ["the processes have different terms to log"] * 2


# ---- non-finite updates: one decision for every process -----------------------------------------------


@pytest.fixture(scope="module")
def det_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("det_small")
    generate_coco_shapes(root / "shapes", num_train=8, num_val=1, img_size=64, num_classes=2, max_objects=2, seed=3)
    (root / "tiny.yaml").write_text(
        "model: {backbone: test_efficientnet, hidden_dim: 32, dim_feedforward: 64, num_heads: 2, num_queries: 10,\n"
        "        num_decoder_layers: 2, num_points: 2, num_denoising: 10}\n"
        f"data: {{root: {root / 'shapes'}, train_images: train/images, train_ann: train/annotations.json,\n"
        "       val_images: val/images, val_ann: val/annotations.json, img_size: 64, batch_size: 2,\n"
        "       val_batch_size: 2, num_workers: 0}\n"
        "optim: {lr: 0.001, backbone_lr: 0.0005, warmup_steps: 1}\n"
        "train: {steps: 6, ckpt_every: 100, log_every: 1, max_bad_steps: 2, precision: 'no', trackers: [jsonl]}\n"
        "cluster: {timeout_s: 60}\n"
        "eval: {visualize: 0}\n"
    )
    return root


def test_the_entry_point_refuses_mixup_with_one_image_a_process(det_world, tmp_path):
    done = run("-m distill.finetune_det", f"recipe={det_world / 'tiny.yaml'}", f"output_dir={tmp_path / 'run'}",
               "data.batch_size=1", "data.mixup_prob=0.5", "train.no_aug_epochs=0")
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 2 and len(errors) == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "data.mixup_prob=0.5" in errors[0] and "data.batch_size is 1" in errors[0], errors
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before the model is built


def test_non_finite_losses_on_one_process_stop_every_process_together(det_world, tmp_path, monkeypatch):
    """fp16's path: the scaler skips each update everywhere, but only process 1 saw its loss non-finite.
    Both stop at the same step with the same one-line error, rather than one stopping and one waiting."""
    monkeypatch.setenv("GRAD_SCALER", "1")
    monkeypatch.setenv("NONFINITE_RANK", "1")
    out, log = tmp_path / "run", tmp_path / "run.log"
    codes = finished(ranks(FAULTY, 2, out, f"recipe={det_world / 'tiny.yaml'}"), log)
    text = log.read_text()
    errors = re.findall(r"error: [^\n]*?check the data\.", text)  # anywhere: both processes share the log
    assert codes == [2, 2], text[-3000:]
    assert len(errors) == 2 and len(set(errors)) == 1, text[-3000:]
    assert "2 non-finite updates in a row by step 2" in errors[0] and "train.max_bad_steps=2" in errors[0]
    assert "Traceback" not in text, text[-3000:]
