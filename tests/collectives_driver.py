"""One process of a small gloo launch that exercises one collective of the package and writes what this process
saw to `<output_dir>/rank<R>.json`, for tests/test_cluster_small.py:

    python tests/collectives_driver.py output_dir=DIR mode=eval|hub|means [ann_file=PATH]

eval   evaluate_detector with this process's share of fixed detections (the model's predictions stand in):
       the metrics it returns, and how many detections this process unpickled from the others
hub    models with hub weights (timm.create_model recorded, no download): whether each process found its
       machine's first process done when its own call started, and the barriers of a model without hub weights
means  process_means over per-process loss terms: its all-reduce count, its values against one reduction per
       key, and what happens when the processes' terms differ
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from distill.engine.distributed import start_processes

IMAGES = {1: [(3, [10.0, 20.0, 30.0, 40.0])], 2: [(5, [5.0, 5.0, 50.0, 20.0]), (3, [60.0, 10.0, 20.0, 30.0])],
          3: [(5, [0.0, 0.0, 80.0, 60.0])], 4: [(3, [30.0, 30.0, 10.0, 10.0])], 5: [(5, [1.0, 2.0, 3.0, 4.0])]}
CATEGORY_IDS = [3, 5]  # contiguous label 0 is category 3, label 1 is category 5


def share_of(rank: int, world: int) -> tuple[list[dict], list[int], list[str]]:
    """This process's detections: near-misses of the ground truth, and one false positive per image."""
    results, ids = [], sorted(IMAGES)[rank::world]
    for image_id in ids:
        boxes, labels, scores = [], [], []
        for k, (cat, (x, y, w, h)) in enumerate(IMAGES[image_id]):
            shift = 2.0 * ((image_id + k) % 3)
            boxes += [[x + shift, y, x + w + shift, y + h], [x + 40, y + 40, x + w + 40, y + h + 40]]
            labels += [CATEGORY_IDS.index(cat)] * 2
            scores += [0.9 - 0.1 * k, 0.3]
        results.append({"boxes": torch.tensor(boxes), "labels": torch.tensor(labels), "scores": torch.tensor(scores)})
    return results, ids, [f"broken-{rank}.jpg"] if rank % 2 else []


def detections_in(obj) -> int:
    """COCO result entries (dicts with a bbox) inside an unpickled object."""
    if isinstance(obj, dict):
        return int("bbox" in obj) + sum(detections_in(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(detections_in(v) for v in obj)
    return 0


def run_eval(out: Path, args: dict, accelerator) -> dict:
    import distill.detection.evaluate as evaluate

    rank, world = accelerator.process_index, accelerator.num_processes
    evaluate.predict = lambda *a, **k: share_of(rank, world)
    received = [0]
    c10d = dist.distributed_c10d
    unpickle = c10d._tensor_to_object

    def counted(*a, **k):
        obj = unpickle(*a, **k)
        received[0] += detections_in(obj)
        return obj

    c10d._tensor_to_object = counted
    metrics = evaluate.evaluate_detector(None, None, None, None, None, CATEGORY_IDS, args["ann_file"], accelerator,
                                         out / "detections.json")
    return {"metrics": metrics, "received_detections": received[0],
            "own_detections": len(evaluate.to_coco_results(*share_of(rank, world)[:2], CATEGORY_IDS))}


def run_hub(out: Path, args: dict, accelerator) -> dict:
    import timm

    from distill.models.factory import create_model
    from distill.models.features import create_feature_extractor
    from distill.models.teacher import create_teacher

    local_main = accelerator.local_process_index == 0
    node = accelerator.process_index // int(os.environ["LOCAL_WORLD_SIZE"])
    build, calls = timm.create_model, []

    def recorded(name, pretrained=False, **kwargs):
        if pretrained:
            marker = out / f"fetched-node{node}-{len(calls)}"
            calls.append({"name": name, "first_done": marker.exists()})
            if local_main:  # a download takes a while; the others must not start meanwhile
                time.sleep(1.0)
                marker.touch()
        return build(name, **kwargs)

    timm.create_model = recorded
    create_model("test_resnet", num_classes=4, pretrained=True)  # the student's and the teacher's path
    create_teacher("test_resnet", True, None, num_classes=4)
    create_feature_extractor("test_efficientnet", pretrained=True)  # the detector's backbone
    barriers, barrier = [0], dist.barrier

    def counted_barrier(*a, **k):
        barriers[0] += 1
        return barrier(*a, **k)

    dist.barrier = counted_barrier
    create_model("test_resnet", num_classes=4)  # no hub weights: no collective
    dist.barrier = barrier
    return {"calls": calls, "local_main": local_main, "barriers_without_hub": barriers[0]}


def run_means(out: Path, args: dict, accelerator) -> dict:
    from distill.engine.logging import process_means

    rank = accelerator.process_index
    terms = {f"loss_{name}": torch.tensor(value * (rank + 1) + rank / 3) for name, value in
             (("vfl", 0.7), ("bbox", 1.25), ("giou", -0.5), ("fgl", 3e-3), ("ddf", 12.5))}
    reduce_calls, all_reduce = [0], dist.all_reduce

    def counted(*a, **k):
        reduce_calls[0] += 1
        return all_reduce(*a, **k)

    dist.all_reduce = counted
    means = process_means(accelerator, terms)
    calls = reduce_calls[0]
    dist.all_reduce = all_reduce
    per_key = {k: accelerator.reduce(v.float(), reduction="mean").item() for k, v in terms.items()}
    outcomes = []
    for case in ("extra_term", "other_term"):
        mine = dict(terms)
        if rank == 1 and case == "extra_term":
            mine["loss_extra"] = torch.tensor(1.0)
        if rank == 1 and case == "other_term":
            mine["loss_other"] = mine.pop("loss_fgl")
        try:
            process_means(accelerator, mine)
            outcomes.append("went on")
        except RuntimeError as e:
            outcomes.append(str(e).split(";")[0])
    after = process_means(accelerator, terms)  # still in step with each other
    return {"means": means, "per_key": per_key, "all_reduce_calls": calls, "mismatch": outcomes, "after": after,
            "keys": list(means)}


def main() -> None:
    args = dict(a.split("=", 1) for a in sys.argv[1:])
    out = Path(args["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    start_processes(120)
    from accelerate import Accelerator

    accelerator = Accelerator()
    record = {"eval": run_eval, "hub": run_hub, "means": run_means}[args["mode"]](out, args, accelerator)
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(record))
    accelerator.wait_for_everyone()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
