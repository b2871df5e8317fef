"""End-to-end behaviour of the RT-DETR model: eval outputs, a short overfit on generated images, and two
processes of which one has no boxes training together under DistributedDataParallel."""
import contextlib
import time

import pytest
import torch
import torch.multiprocessing as mp
from torchvision.ops import box_iou

from distill.detection.box_ops import cxcywh_to_xyxy
from distill.detection.criterion import RTDETRCriterion, average_box_count
from distill.detection.decoder import generate_anchors
from distill.detection.postprocess import PostProcessor
from distill.detection.rtdetr import build_rtdetr, rtdetr_config

# one colour per class: the class is learnable from the pixels
CLASS_COLOURS = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.8, 0.2], [0.1, 0.2, 0.9]])


def rectangles(count: int, size: int, seed: int):
    """Images of 1-3 filled rectangles (class = colour) on a noisy grey background, with their targets."""
    gen = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(count):
        image = 0.5 + 0.05 * torch.randn(3, size, size, generator=gen)
        labels, boxes = [], []
        for _ in range(int(torch.randint(1, 4, (1,), generator=gen))):
            cls = int(torch.randint(0, len(CLASS_COLOURS), (1,), generator=gen))
            wh = torch.rand(2, generator=gen) * 0.25 + 0.15
            centre = wh / 2 + torch.rand(2, generator=gen) * (1 - wh)
            x0, y0 = ((centre - wh / 2) * size).round().int().tolist()
            x1, y1 = ((centre + wh / 2) * size).round().int().tolist()
            image[:, y0:y1, x0:x1] = CLASS_COLOURS[cls][:, None, None]
            labels.append(cls)
            boxes.append(torch.tensor([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]) / size)
        images.append(image)
        targets.append({"labels": torch.tensor(labels), "boxes": torch.stack(boxes)})
    return torch.stack(images), targets


def tiny_config(**kw):
    return rtdetr_config("mobilenetv4_conv_small_035", num_classes=3, **{
        "hidden_dim": 64, "num_heads": 4, "dim_feedforward": 128, "num_queries": 20, "num_denoising": 20,
        "depth_mult": 0.34, **kw})


@contextlib.contextmanager
def single_thread():
    # many tiny ops: one thread avoids spin-waiting when the cores are shared
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_eval_outputs_and_input_checks():
    torch.manual_seed(0)
    model = build_rtdetr(tiny_config(eval_spatial_size=96)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 96, 96))
    assert set(out) == {"pred_logits", "pred_boxes"}
    assert out["pred_logits"].shape == (2, 20, 3) and ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    anchors, valid = generate_anchors([(12, 12), (6, 6), (3, 3)])
    assert torch.equal(model.decoder.eval_anchors, anchors) and torch.equal(model.decoder.eval_valid, valid)
    _, fine_valid = generate_anchors([(80, 80)])  # stride 8 at 640: the outermost cells sit too close to the edge
    assert not fine_valid[0, 0] and not fine_valid[0, 79] and fine_valid[0, 81] and fine_valid.sum() == 78 * 78
    with pytest.raises(ValueError, match="multiple of the largest stride 32"):
        model(torch.randn(1, 3, 100, 96))
    with pytest.raises(ValueError, match="hold 21 positions, fewer than num_queries=30"):
        build_rtdetr(tiny_config(num_queries=30)).eval()(torch.randn(1, 3, 32, 32))  # 4x4 + 2x2 + 1x1 = 21


def test_reparameterised_model_gives_identical_outputs():
    """In float64: the decoder keeps the top K of the encoder's proposals, and in float32 two of them can score
    within the rounding the fold changes, so their order (and the outputs by position) would depend on the
    CPU's kernels. In float64 the fold is exact to rounding (1e-9 of the outputs' scale)."""
    torch.manual_seed(0)
    model = build_rtdetr(tiny_config()).eval().double()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
        after = model.reparameterize()(x)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    for key in ("pred_logits", "pred_boxes"):
        assert (after[key] - before[key]).abs().max() <= 1e-9 * before[key].abs().max(), key


def test_overfits_a_few_generated_images():
    torch.manual_seed(0)
    images, targets = rectangles(4, 96, seed=0)
    model = build_rtdetr(tiny_config())
    criterion = RTDETRCriterion(num_classes=3)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (model.mean, model.std))
    x = (images - mean) / std
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    history = []
    with single_thread():
        model.train()
        for _ in range(100):
            loss = sum(criterion(model(x, targets), targets).values())
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            history.append(loss.item())
        model.eval()
        with torch.no_grad():
            detections = PostProcessor(num_top=10)(model(x), torch.tensor([[96, 96]] * len(images)))
    assert sum(history[-5:]) / 5 < 0.5 * history[0], history
    # every object is found: a top-scoring detection of the right class overlaps it
    for found, target in zip(detections, targets):
        count = len(target["labels"])
        iou = box_iou(cxcywh_to_xyxy(target["boxes"]) * 96, found["boxes"][: count + 1])
        same_class = target["labels"][:, None] == found["labels"][None, : count + 1]
        assert ((iou > 0.5) & same_class).any(1).all(), (iou, found["labels"], target["labels"])


def _ddp_worker(rank: int, world: int, folder: str):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(build_rtdetr(tiny_config(num_queries=8, num_denoising=8)))
    criterion = RTDETRCriterion(num_classes=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    images, targets = rectangles(2, 64, seed=rank)
    if rank == 1:  # this process sees no box at all
        targets = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)} for _ in targets]
    losses = []
    for _ in range(2):  # a second step fails if the first left parameters without gradients
        loss = sum(criterion(model(images, targets), targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    checksum = sum(p.double().sum() for p in model.parameters()).item()
    num_boxes = average_box_count(targets, torch.device("cpu")).item()
    torch.save({"losses": losses, "checksum": checksum, "num_boxes": num_boxes,
                "own_boxes": sum(len(t["labels"]) for t in targets)}, f"{folder}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ddp_with_a_process_without_boxes(tmp_path):
    context = mp.start_processes(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 240
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("distributed training with a box-less process hung")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in results)
    assert results[1]["own_boxes"] == 0 and results[0]["own_boxes"] > 0
    assert results[0]["num_boxes"] == results[1]["num_boxes"] == max(results[0]["own_boxes"] / 2, 1)
    assert results[0]["checksum"] == pytest.approx(results[1]["checksum"], rel=1e-9)  # replicas stayed in sync
