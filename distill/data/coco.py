"""COCO-format detection data: an images folder and an instances JSON → (uint8 image, target) samples.

Category ids become contiguous labels 0..C-1 in sorted id order of the training file; the validation set
takes the training set's mapping (`categories=`) and is checked against it, so a label always means the
same category. `category_ids[label]` maps a label back to the JSON's id for evaluation. A target's boxes
are cxcywh normalised to the transformed image, the form the detector predicts.

Training batches come from `DetectionBatchSampler`, which decides from the batch index alone which images,
which input side (multi-scale: one side per batch and process), whether the strong augmentations are on and
(DEIM's training) which samples are mosaics of which images and which batches are mixed up, so a resumed run
draws exactly the batches it would have drawn. Workers resize; images stay uint8 until
`to_model_input` normalises them on the device, a whole batch at once.

An image that cannot be decoded is skipped and its file name reported in the batch's `skipped` list; in
training the next image takes its place so every process keeps the same batch size.
"""
from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import tv_tensors
from torchvision.ops import box_convert
from torchvision.transforms import v2 as T

from distill.data.coco_index import CocoIndex, InvalidAnnotation, check_annotation, nth_annotation, read_instances
from distill.data.det_augment import (
    MosaicSettings,
    eval_transform,
    mixup_batch,
    mosaic_canvas,
    mosaic_train_transform,
    rtdetr_train_transform,
)
from distill.data.json_stream import StreamedArray
from distill.data.stream import single_threaded_opencv
from distill.engine.host_copy import device_constant, to_device
from distill.engine.preemption import ignore_stop_signals
from distill.errors import CocoFormatError

logger = logging.getLogger("distill")


class SampleRequest(NamedTuple):
    """What the batch sampler asks of the dataset for one image."""

    index: int
    size: int  # square input side in pixels (a multiple of 32)
    strong: bool = False  # photometric distortion, zoom-out and IoU crop on top of flip + resize
    seed: Optional[int] = None  # the augmentation's random draws; set, a resumed run repeats them exactly
    mosaic: tuple[int, ...] = ()  # three more images to tile with this one (DEIM's Mosaic); (): none
    mixup: Optional[float] = None  # set: the batch is mixed up, each image keeping this share (DEIM's MixUp)


# --------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------

@lru_cache(maxsize=64)
def mosaic_transform(size: int, settings: MosaicSettings) -> T.Compose:
    return mosaic_train_transform(size, settings)


@lru_cache(maxsize=64)
def detection_transform(size: int, train: bool, strong: bool) -> T.Compose:
    """RT-DETRv2's pipeline (`distill.data.det_augment`): photometric distortion, zoom-out (aspect kept), IoU
    crop, flip and an antialiased square resize in training (the first three while `strong`); evaluation
    only resizes."""
    return rtdetr_train_transform(size, strong) if train else eval_transform(size)


def apply_transform(transform: T.Compose, image: np.ndarray, boxes_xywh: np.ndarray, labels: np.ndarray,
                    seed: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(H, W, 3) uint8, xywh pixel boxes → (3, h, w) uint8 image, xyxy pixel boxes, labels. With a seed the
    random draws come from it alone (the caller's random state is left as it was)."""
    boxes = torch.as_tensor(boxes_xywh, dtype=torch.float32).reshape(-1, 4)
    return transform_tensors(transform, torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1),
                             box_convert(boxes, "xywh", "xyxy"), labels, seed)


def transform_tensors(transform: T.Compose, image: torch.Tensor, boxes_xyxy: torch.Tensor, labels,
                      seed: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`apply_transform` for a (3, H, W) uint8 tensor and xyxy pixel boxes."""
    height, width = image.shape[-2:]
    sample = {
        "image": tv_tensors.Image(image),
        "boxes": tv_tensors.BoundingBoxes(boxes_xyxy, format="XYXY", canvas_size=(height, width)),
        "labels": torch.as_tensor(labels, dtype=torch.int64).reshape(-1),
    }
    if seed is None:
        out = transform(sample)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = transform(sample)
    return out["image"].as_subclass(torch.Tensor), out["boxes"].as_subclass(torch.Tensor), out["labels"]


# --------------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------------


class CocoDetection(Dataset):
    """Images of one COCO instances file. `train` turns on augmentation and the replacement of
    undecodable images; the item is a `SampleRequest` (or a plain index: `img_size`, no strong aug).

    `categories` (the training set's `categories`) makes this set use the training set's label mapping;
    every category this file lists must be there under the same id and name, else `CocoFormatError`.
    `mosaic` sets the geometry of the mosaics that requests ask for (DEIM's by default)."""

    def __init__(self, image_dir: str | Path, ann_file: str | Path, train: bool = False, img_size: int = 640,
                 categories: Optional[Sequence[dict]] = None, mosaic: MosaicSettings = MosaicSettings()):
        self.mosaic = mosaic
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        self.train = train
        self.img_size = img_size
        if not self.ann_file.is_file():
            raise FileNotFoundError(f"annotation file {self.ann_file} does not exist")
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image folder {self.image_dir} does not exist (annotations: {self.ann_file})")
        text = self.ann_file.read_text()
        try:
            coco, images, annotations = read_instances(text, lambda msg: CocoFormatError(f"{self.ann_file}: {msg}"))
        except json.JSONDecodeError as e:
            raise CocoFormatError(f"{self.ann_file}: not valid JSON: {e}") from None
        if not isinstance(coco, dict):
            raise CocoFormatError(f"{self.ann_file}: not a JSON object")
        for key in ("images", "annotations", "categories"):
            if key not in coco:
                raise CocoFormatError(f"{self.ann_file}: no {key!r} list (keys present: {sorted(coco)})")
            if key != "categories" and not isinstance(coco[key], StreamedArray):
                raise CocoFormatError(f"{self.ann_file}: {key!r} must be a list, got {type(coco[key]).__name__}")

        own = sorted(({"id": c["id"], "name": c.get("name", str(c["id"]))} for c in coco["categories"]),
                     key=lambda c: c["id"])
        if categories is None:
            categories = own
        else:
            categories = [{"id": c["id"], "name": c["name"]} for c in categories]
            check_categories(own, categories, self.ann_file)
        self.category_ids: list[int] = [c["id"] for c in categories]
        self.class_names: list[str] = [c["name"] for c in categories]
        self.label_of: dict[int, int] = {cid: i for i, cid in enumerate(self.category_ids)}
        if not all(type(cid) is int for cid in self.category_ids):
            raise CocoFormatError(f"{self.ann_file}: category ids must be integers, got {self.category_ids}")
        # Flat arrays, not per-image objects: forked loader workers read them without copying (coco_index).
        try:
            self.images: CocoIndex = CocoIndex(images, annotations, self.category_ids)
        except InvalidAnnotation as bad:
            check_annotation(nth_annotation(text, bad.position), self.ann_file, self.label_of, self.category_ids,
                             set(images.ids), CocoFormatError)

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    @property
    def categories(self) -> list[dict]:
        """[{"id", "name"}] in label order: the mapping a detector trained on this set predicts in."""
        return [{"id": i, "name": n} for i, n in zip(self.category_ids, self.class_names)]

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, index: int) -> Path:
        return self.image_dir / self.images.file_name(index)

    def read_image(self, index: int) -> np.ndarray:
        with Image.open(self.image_path(index)) as img:
            return np.array(img.convert("RGB"))

    def annotations(self, index: int, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """Boxes (xywh, clipped to the image, degenerate ones dropped) and labels of one image."""
        boxes, labels = self.images.annotations(index)
        x0 = boxes[:, 0].clip(0, width)
        y0 = boxes[:, 1].clip(0, height)
        x1 = (boxes[:, 0] + boxes[:, 2]).clip(0, width)
        y1 = (boxes[:, 1] + boxes[:, 3]).clip(0, height)
        keep = (x1 - x0 >= 1) & (y1 - y0 >= 1)
        return np.stack([x0, y0, x1 - x0, y1 - y0], 1)[keep], labels[keep].astype(np.int64)

    def _read(self, index: int, skipped: list[str]) -> tuple[int, Optional[np.ndarray]]:
        """(index read, image); in training a corrupt image is replaced by the next one, elsewhere it is left
        out (None). Skipped file names go to `skipped`."""
        for _ in range(len(self) if self.train else 1):
            try:
                return index, self.read_image(index)
            except Exception as e:  # truncated, unreadable or missing files
                name = self.images.file_name(index)
                logger.warning("skipping image %s: %s: %s", self.image_dir / name, type(e).__name__, e)
                skipped.append(name)
                index = (index + 1) % len(self)
        return index, None

    def __getitem__(self, request: SampleRequest | int) -> dict:
        if not isinstance(request, SampleRequest):
            request = SampleRequest(int(request), self.img_size, False)
        skipped = []
        index, image = self._read(request.index, skipped)
        if image is None:
            return {"image": None, "target": None, "skipped": skipped, "mixup": None}

        height, width = image.shape[:2]
        boxes, labels = self.annotations(index, width, height)
        if request.mosaic and self.train:
            parts = [(image, boxes, labels)]
            for other in request.mosaic:
                other, picture = self._read(other, skipped)  # never None in training: some image decoded
                parts.append((picture, *self.annotations(other, picture.shape[1], picture.shape[0])))
            canvas, canvas_boxes, canvas_labels = mosaic_canvas(parts, self.mosaic.size)
            image, boxes, labels = transform_tensors(mosaic_transform(request.size, self.mosaic), canvas,
                                                     canvas_boxes, canvas_labels, request.seed)
        else:
            transform = detection_transform(request.size, self.train, request.strong)
            image, boxes, labels = apply_transform(transform, image, boxes, labels, request.seed)
        side_h, side_w = image.shape[-2:]
        scale = torch.tensor([side_w, side_h, side_w, side_h], dtype=torch.float32)
        boxes = box_convert(boxes, "xyxy", "cxcywh") / scale
        target = {
            "labels": labels,
            "boxes": boxes,
            "image_id": self.images.image_id(index),
            "orig_size": torch.tensor([width, height]),  # (w, h), what the post-processor scales to
        }
        return {"image": image.contiguous(), "target": target, "skipped": skipped, "mixup": request.mixup}


def check_categories(own: Sequence[dict], reference: Sequence[dict], ann_file: Path) -> None:
    """Every category of `own` must be in `reference` (the training set's) with the same id and name."""
    names = {c["id"]: c["name"] for c in reference}
    unknown = [c for c in own if c["id"] not in names]
    renamed = [c for c in own if c["id"] in names and names[c["id"]] != c["name"]]
    if unknown or renamed:
        problems = [f"id {c['id']} ({c['name']!r}) is not a training category" for c in unknown]
        problems += [f"id {c['id']} is {c['name']!r} here but {names[c['id']]!r} in training" for c in renamed]
        raise CocoFormatError(f"{ann_file}: its categories do not match the training annotations': "
                              + "; ".join(problems) + f" (training categories: {list(reference)})")


def collate_detection(items: Sequence[dict]) -> dict:
    """Stack same-sized uint8 images; targets stay a list; skipped file names travel along. A batch whose
    requests carry a MixUp ratio is mixed up here, as DEIM's collate function does (not a single image:
    mixed with itself it would only repeat its own targets)."""
    skipped = [name for item in items for name in item["skipped"]]
    kept = [item for item in items if item["image"] is not None]
    images = torch.stack([item["image"] for item in kept]) if kept else torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
    targets = [item["target"] for item in kept]
    ratio = kept[0].get("mixup") if kept else None
    if ratio is not None and len(kept) > 1:
        images, targets = mixup_batch(images, targets, ratio)
    return {"images": images, "targets": targets, "skipped": skipped}


def to_model_input(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B,3,H,W) on the device → float, normalised with the backbone's statistics."""
    mean_t = device_constant(mean, images.device).view(1, 3, 1, 1) * 255  # no host-to-device copy per batch
    std_t = device_constant(std, images.device).view(1, 3, 1, 1) * 255
    return (images.float() - mean_t) / std_t


def targets_to(targets: list[dict], device: torch.device) -> list[dict]:
    """The targets' tensors on `device`, copied from pinned memory (the loader's, else pinned here) so that the
    training step never waits for the device to receive them."""
    return [{k: to_device(v, device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------


class Phase(NamedTuple):
    """An augmentation drawn with probability `prob` in batches `start <= g < stop` of the sampler's stream."""

    prob: float
    start: int
    stop: int

    def on(self, batch: int) -> bool:
        return self.prob > 0 and self.start <= batch < self.stop


# Tags that keep the mosaic and mixup draws apart from the sampler's other streams (numpy's seed sequences
# treat trailing zeros as absent, so a tag is a large number rather than a position).
MOSAIC_STREAM, MIXUP_STREAM = 0x6D6F7361, 0x6D697875


class DetectionBatchSampler(Sampler[list[SampleRequest]]):
    """Batches `start_batch .. total_batches-1` of a seeded, epoch-wise shuffled stream, this process's share.

    Every process draws the same global batch of `batch_size x world_size` images and takes every
    `world_size`-th one; each process draws its own side for it (as the reference's per-GPU collate does),
    so a step sees several sides at once. Each epoch is a fresh permutation (the tail that does not fill a
    global batch is dropped). The strong augmentations run from batch `strong_from` (DEIM starts them late)
    to `strong_until`, where they and the multi-scale draw stop: from there every batch has side
    `final_size` (default: the largest of `sizes`' most frequent ones, i.e. the base size a recipe repeats).

    DEIM's training: in the batches of `mosaic` (while the strong augmentations are on) each sample is a
    mosaic with probability `mosaic.prob`, its three other images drawn from the whole set; in the batches of
    `mixup` each process's batch is mixed up with probability `mixup.prob`, at a ratio drawn in `mixup_ratio`.
    Mosaics are drawn over the global batch, like the seeds, so a sample is the same however the processes
    split it; mixup per process, as DEIM's per-GPU collate does.
    """

    def __init__(self, num_images: int, batch_size: int, sizes: Sequence[int], total_batches: int, seed: int,
                 strong_until: int, start_batch: int = 0, rank: int = 0, world_size: int = 1,
                 final_size: Optional[int] = None, strong_from: int = 0, mosaic: Optional[Phase] = None,
                 mixup: Optional[Phase] = None, mixup_ratio: Sequence[float] = (0.45, 0.55)):
        self.strong_from, self.mosaic, self.mixup = strong_from, mosaic, mixup
        self.mixup_ratio = (float(mixup_ratio[0]), float(mixup_ratio[1]))
        self.num_images, self.batch_size, self.sizes = num_images, batch_size, list(sizes)
        self.final_size = final_size or max(self.sizes, key=lambda s: (self.sizes.count(s), s))
        self.total_batches, self.seed, self.strong_until = total_batches, seed, strong_until
        self.start_batch, self.rank, self.world_size = start_batch, rank, world_size
        if not self.sizes or any(s % 32 for s in self.sizes):
            raise ValueError(f"input sides must be multiples of 32, got {self.sizes}")
        self.batches_per_epoch = batches_per_epoch(num_images, batch_size, world_size)

    def __len__(self) -> int:
        return max(0, self.total_batches - self.start_batch)

    def __iter__(self):
        global_batch = self.batch_size * self.world_size
        epoch, order = -1, None
        for g in range(self.start_batch, self.total_batches):
            if g // self.batches_per_epoch != epoch:
                epoch = g // self.batches_per_epoch
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_images)
            b = g % self.batches_per_epoch
            mine = order[b * global_batch:(b + 1) * global_batch][self.rank::self.world_size]
            rng = np.random.default_rng([self.seed, epoch, b])
            seeds = rng.integers(2**31, size=global_batch)[self.rank::self.world_size]
            size = int(self.sizes[np.random.default_rng([self.seed, epoch, b, self.rank]).integers(len(self.sizes))])
            strong = self.strong_from <= g < self.strong_until
            size = size if g < self.strong_until else self.final_size
            partners = [()] * len(mine)
            if strong and self.mosaic is not None and self.mosaic.on(g):
                draws = np.random.default_rng([self.seed, epoch, b, MOSAIC_STREAM])
                chosen = draws.random(global_batch)[self.rank::self.world_size] < self.mosaic.prob
                others = draws.integers(self.num_images, size=(global_batch, 3))[self.rank::self.world_size]
                partners = [tuple(int(j) for j in o) if c else () for c, o in zip(chosen, others)]
            mixup = None
            if self.mixup is not None and self.mixup.on(g):
                draws = np.random.default_rng([self.seed, epoch, b, MIXUP_STREAM, self.rank])
                if draws.random() < self.mixup.prob:
                    mixup = float(draws.uniform(*self.mixup_ratio))
            yield [SampleRequest(int(i), size, strong, int(s), p, mixup) for i, s, p in zip(mine, seeds, partners)]


def batches_per_epoch(num_images: int, batch_size: int, world_size: int = 1) -> int:
    n = num_images // (batch_size * world_size)
    if n < 1:
        raise ValueError(
            f"{num_images} training images do not fill one global batch of {batch_size} x {world_size} processes"
        )
    return n


def build_train_loader(dataset: CocoDetection, sampler: DetectionBatchSampler, num_workers: int,
                       seed: int = 0) -> DataLoader:
    """Every sample carries its own seed (see DetectionBatchSampler), and the loader draws nothing from the
    process's random generators: a resumed run gets the same batches."""
    single_threaded_opencv()
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_detection,
                      pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(seed),
                      worker_init_fn=ignore_stop_signals)


def build_eval_loader(dataset: CocoDetection, batch_size: int, num_workers: int, rank: int = 0,
                      world_size: int = 1, size: Optional[int] = None, limit: Optional[int] = None) -> DataLoader:
    """This process's share of the images (every `world_size`-th; of the first `limit`), in order, none repeated."""
    size = size or dataset.img_size
    mine = list(range(rank, min(len(dataset), limit or len(dataset)), world_size))
    batches = [[SampleRequest(i, size, False) for i in mine[j:j + batch_size]] for j in range(0, len(mine), batch_size)]
    single_threaded_opencv()
    return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=collate_detection,
                      pin_memory=torch.cuda.is_available(), generator=torch.Generator(),
                      worker_init_fn=ignore_stop_signals)
