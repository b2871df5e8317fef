"""Detect objects in images with a fine-tuned RT-DETR.

    python -m distill.predict runs/det_demo data/det_demo/val/images --out predictions/demo
    python -m distill.predict exported/hf "photos/*.jpg" --out predictions/photos --threshold 0.5
    python -m distill.predict exported/detector one_image.png --out predictions/one --no-draw

SOURCE is a detection run folder (its newest checkpoint), a checkpoint file, or a folder exported by
`python -m distill.export` (`--to hf-rtdetr` or `--to hf-dfine`: read back into this project's model;
`--to onnx`: run in onnxruntime), of either decoder head. IMAGES is a folder (its images, sorted), a glob
pattern or one file.

OUT receives `predictions.json`, in COCO format: `images` (ids numbered in file order, file names, sizes),
`categories` (the training set's ids and names) and `annotations`, one per detection at or above
`--threshold`, with `bbox` [x, y, width, height] in pixels and `score`: the `annotations` list is a COCO
results list as `COCO.loadRes` takes it. Images that cannot be read are listed under `skipped` (and
warned about) instead of stopping the run. Unless `--no-draw`, `OUT/images/` gets each image with its
detections drawn (`torchvision.utils.draw_bounding_boxes`). Images are resized as fine-tuning evaluated
them (the run's side, antialiased bilinear) and go through the detector in batches.
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m distill.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source",
                   help="a detection run folder, a checkpoint, or an exported folder (hf-rtdetr, hf-dfine, onnx)")
    p.add_argument("images", help="a folder, a glob pattern (quote it) or one image file")
    p.add_argument("--out", required=True, help="folder for predictions.json and the drawn images")
    p.add_argument("--threshold", type=float, default=0.3, help="lowest score kept (default: 0.3)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-workers", type=int, default=2, help="image decoding processes")
    p.add_argument("--img-size", type=int, help="input side (default: the run's evaluation side)")
    p.add_argument("--num-top", type=int, help="detections considered per image (default: the run's eval.num_top)")
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="a run's EMA (default) or raw weights")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:1, ...")
    p.add_argument("--no-draw", action="store_true", help="write predictions.json only")
    return p.parse_args(argv)


if __name__ == "__main__":  # --help and argument mistakes are answered before the imports below
    parse_args(sys.argv[1:])

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from distill.cli import user_errors
from distill.data.coco import apply_transform, detection_transform, to_model_input
from distill.detection.postprocess import PostProcessor
from distill.engine.checkpoint import atomic_write_text

logger = logging.getLogger("distill")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass
class Predictor:
    """uint8 images (B, 3, S, S) and original sizes (B, 2) as (width, height) → scores, labels, xyxy boxes."""

    detect: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    side: int
    categories: list[dict]  # label i → {"id", "name"}
    device: torch.device


def _torch_predictor(model, side: int, categories: list[dict], device: torch.device, num_top: int) -> Predictor:
    model = model.to(device).eval()
    post = PostProcessor(num_top)

    @torch.inference_mode()
    def detect(images, orig_sizes):
        outputs = model(to_model_input(images.to(device), model.mean, model.std))
        return post.detections(outputs["pred_logits"], outputs["pred_boxes"], orig_sizes.to(device))

    return Predictor(detect, side, categories, device)


def load_run(source: Path, args) -> Predictor:
    from distill.detection.run import load_detector

    run = load_detector(source, args.weights, deploy=True)
    side = args.img_size or run.config.get("data", {}).get("img_size", 640)
    num_top = args.num_top or run.config.get("eval", {}).get("num_top", 300)
    return _torch_predictor(run.model, side, run.categories, args.device, num_top)


def load_hf_folder(source: Path, args) -> Predictor:
    from distill.detection.deploy import deploy_form
    from distill.detection.hf_convert import from_transformers

    model, names = from_transformers(source)
    card = _card(source)
    categories = card.get("categories") or [{"id": i, "name": n} for i, n in enumerate(names)]
    side = args.img_size or card.get("input", {}).get("img_size") or _processor_side(source) or 640
    return _torch_predictor(deploy_form(model), side, categories, args.device, args.num_top or model.cfg.num_queries)


def load_onnx_folder(source: Path, args) -> Predictor:
    import onnxruntime as ort

    card = _card(source)
    session = ort.InferenceSession(str(source / card.get("file", "model.onnx")), providers=["CPUExecutionProvider"])
    side = card["input"]["img_size"]
    if args.img_size and args.img_size != side:
        raise ValueError(f"{source} is an ONNX graph for {side} px; --img-size {args.img_size} does not apply")
    categories = card.get("categories") or [{"id": i, "name": f"class_{i}"} for i in range(card["num_classes"])]

    def detect(images, orig_sizes):
        scores, labels, boxes = session.run(["scores", "labels", "boxes"], {
            "images": (images.float() / 255).numpy(), "orig_sizes": orig_sizes.float().numpy()})
        return torch.from_numpy(scores), torch.from_numpy(labels), torch.from_numpy(boxes)

    return Predictor(detect, side, categories, torch.device("cpu"))


def _card(folder: Path) -> dict:
    path = folder / "distill.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _processor_side(folder: Path) -> Optional[int]:
    path = folder / "preprocessor_config.json"
    return json.loads(path.read_text()).get("size", {}).get("height") if path.is_file() else None


def source_kind(source: Path) -> str:
    if source.is_dir() and (source / "model.onnx").is_file():
        return "onnx"
    if source.is_dir() and (source / "config.json").is_file():
        return "transformers"
    return "run"


SOURCES = {"run": load_run, "transformers": load_hf_folder, "onnx": load_onnx_folder}


def list_images(images: str) -> list[Path]:
    """A folder's images (sorted), a glob pattern's matches, or one file."""
    path = Path(images)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    elif path.is_file():
        found = [path]
    elif glob.has_magic(images):
        found = sorted(Path(p) for p in glob.glob(images, recursive=True) if Path(p).is_file())
    else:
        raise FileNotFoundError(f"{images} is neither a folder, a file nor a glob pattern that matches")
    if not found:
        raise FileNotFoundError(f"no images in {images} (suffixes {sorted(IMAGE_SUFFIXES)})")
    return found


class ImageFiles(Dataset):
    """Decoded and resized images; an unreadable file gives `image=None` and is reported, not raised."""

    def __init__(self, paths: Sequence[Path], side: int):
        self.paths, self.side = list(paths), side

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        try:
            with Image.open(path) as img:
                array = np.array(img.convert("RGB"))
        except Exception as e:  # truncated, not an image, unreadable
            return {"index": index, "image": None, "error": f"{type(e).__name__}: {e}"}
        resized, _, _ = apply_transform(detection_transform(self.side, False, False), array, np.zeros((0, 4)),
                                        np.zeros((0,)))
        height, width = array.shape[:2]
        return {"index": index, "image": resized, "size": (width, height)}


def _collate(items: list[dict]) -> list[dict]:
    return items


def draw(path: Path, boxes: torch.Tensor, captions: list[str], labels: Sequence[int], out: Path) -> None:
    from torchvision.utils import draw_bounding_boxes

    with Image.open(path) as img:
        image = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)
    palette = ["#ff3c3c", "#28dc28", "#3c78ff", "#ffc81e", "#dc3cdc", "#1ec8c8", "#ff8c1e", "#8c3cff"]
    colors = [palette[int(c) % len(palette)] for c in labels]
    width = max(1, round(max(image.shape[-2:]) / 320))
    drawn = draw_bounding_boxes(image, boxes, captions, colors=colors, width=width) if len(boxes) else image
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(out)


def predict_images(predictor: Predictor, paths: Sequence[Path], out: Path, threshold: float = 0.3,
                   batch_size: int = 8, num_workers: int = 2, draw_images: bool = True) -> dict:
    """Run `predictor` over `paths`, write OUT/predictions.json (and OUT/images/); returns the COCO dict."""
    loader = DataLoader(ImageFiles(paths, predictor.side), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_collate)
    images, annotations, skipped = [], [], []
    used_names: set[str] = set()
    for batch in tqdm(loader, desc="predict", unit="batch"):
        for item in batch:
            if item["image"] is None:
                logger.warning("skipping %s: %s", paths[item["index"]], item["error"])
                skipped.append({"file_name": str(paths[item["index"]]), "error": item["error"]})
        kept = [item for item in batch if item["image"] is not None]
        if not kept:
            continue
        sizes = torch.tensor([item["size"] for item in kept], dtype=torch.float32)
        scores, labels, boxes = (t.cpu() for t in predictor.detect(torch.stack([i["image"] for i in kept]), sizes))
        for item, s, lab, box in zip(kept, scores, labels, boxes):
            path = paths[item["index"]]
            image_id = item["index"] + 1
            width, height = item["size"]
            images.append({"id": image_id, "file_name": str(path), "width": width, "height": height})
            keep = s >= threshold
            s, lab, box = s[keep], lab[keep], box[keep]
            for score, label, (x0, y0, x1, y1) in zip(s.tolist(), lab.tolist(), box.tolist()):
                category = predictor.categories[label]
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category["id"],
                                    "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                                    "area": round((x1 - x0) * (y1 - y0), 2), "score": round(score, 5), "iscrowd": 0})
            if draw_images:
                name = path.name if path.name not in used_names else f"{image_id:06d}_{path.name}"
                used_names.add(name)
                captions = [f"{predictor.categories[c]['name']} {v:.2f}" for c, v in zip(lab.tolist(), s.tolist())]
                draw(path, box, captions, lab.tolist(), out / "images" / Path(name).with_suffix(".png"))
    result = {"images": images, "categories": predictor.categories, "annotations": annotations, "skipped": skipped,
              "threshold": threshold}
    atomic_write_text(out / "predictions.json", json.dumps(result))
    return result


def main(argv=None) -> dict:
    with user_errors():
        return run(parse_args(sys.argv[1:] if argv is None else argv))


def run(args) -> dict:
    args.device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                               else "cpu" if args.device == "auto" else args.device)
    source = Path(args.source)
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist (give a detection run, a checkpoint or an exported folder)")
    try:
        predictor = SOURCES[source_kind(source)](source, args)
    except ValueError as e:  # a folder or checkpoint that holds no detector this project can run
        print(f"error: {source}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    paths = list_images(args.images)
    result = predict_images(predictor, paths, Path(args.out), args.threshold, args.batch_size, args.num_workers,
                            not args.no_draw)
    print(json.dumps({"images": len(result["images"]), "detections": len(result["annotations"]),
                      "skipped": len(result["skipped"]), "out": str(Path(args.out) / "predictions.json")}))
    return result


if __name__ == "__main__":
    main()
