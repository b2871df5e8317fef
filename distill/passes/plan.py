"""What a teacher pass will do and cost, from its recipe alone (`dry_run=N`): no image is read.

Sizes come from manifests where the data are at hand, else from the recipe (`source_images` for labelling,
`pool.num_images` for curation). Bytes of a stored view are estimated: the JPEG from a measurement on
photographs (below), the label record and tar headers exactly.
"""
from __future__ import annotations

import math
from typing import Optional

from distill.config import ConfigError
from distill.plan import gflops, manifest_images, source_manifest, teacher_geometry
from distill.passes.soft_labels import record_bytes
from distill.passes.view_cost import tar_bytes

# JPEG bytes of one Inception-crop + RandAugment view of a photograph at quality 90: 15.7 KB at 224 px,
# 19.2 KB at 256, 35.1 KB at 384, i.e. about 15.7 KB x (side / 224) ** 1.5 (scripts/bench_view_bytes.py,
# on scikit-image's sample photographs; ImageNet's own figure may differ by some tens of percent).
JPEG_BYTES_224 = 15_700
JPEG_SIZE_EXPONENT = 1.5
META_BYTES = 130  # the optional per-view json (source key, replica, partner, weight)
TOPK_ENTRY_BYTES = 44  # a per-class top-K heap entry, packed into one Python int (distill.passes.topk)


def jpeg_bytes(side: int) -> int:
    return int(round(JPEG_BYTES_224 * (side / 224) ** JPEG_SIZE_EXPONENT))


def view_bytes(side: int, targets: str, num_classes: int, k: int, meta: bool = False) -> dict[str, int]:
    """Estimated bytes of one stored view in its tar shard: the JPEG, the label record (exact) and the whole."""
    label = record_bytes(targets, num_classes, k)
    members = [jpeg_bytes(side), len(str(num_classes - 1)), label] + ([META_BYTES] if meta else [])
    return {"jpeg": members[0], "label": label, "label_in_tar": tar_bytes([label]), "view": tar_bytes(members)}


def plan_labelling(cfg, processes: int) -> dict:
    from distill.data.mix import DataMix

    if processes < 1:
        raise ConfigError(f"dry_run={processes}: give the number of processes to plan for (at least 1)")
    mix = DataMix.load(cfg.mix, cfg.data_root)
    sources = list(cfg.sources) or mix.source_names
    unknown = sorted(set(sources) - set(mix.source_names))
    if unknown:
        raise ConfigError(f"sources {unknown} are not in mix {cfg.mix} (its sources: {mix.source_names})")
    replicas = {s: int(cfg.view.replicas_per_source.get(s, cfg.view.replicas)) for s in sources}
    side, interp, head = teacher_geometry(cfg.teacher, cfg.view.img_size, cfg.teacher.num_classes)
    teacher_gflops = gflops(cfg.teacher.name, side, head)
    sizes = view_bytes(cfg.view.img_size, cfg.view.targets, cfg.teacher.num_classes, cfg.view.topk, cfg.view.meta)
    other = "topk" if cfg.view.targets == "full" else "full"
    per_source, notes = {}, []
    for s in sources:
        images = manifest_images(source_manifest(mix, s), s)
        origin = "manifest"
        if images is None:
            images, origin = cfg.source_images.get(s), "source_images"
        if images is None:
            notes.append(f"source {s}: size unknown (no manifest here and no source_images.{s})")
        views = None if images is None else images * replicas[s]
        per_source[s] = {"images": images, "images_from": origin if images is not None else None,
                         "replicas": replicas[s], "views": views,
                         "bytes": None if views is None else views * sizes["view"]}
    known = [v for v in per_source.values() if v["views"] is not None]
    views = sum(v["views"] for v in known) if known else None
    if cfg.view.quality != 90:
        notes.append(f"view.quality={cfg.view.quality}: the JPEG estimate is for quality 90")
    return {
        "recipe": cfg.recipe,
        "processes": processes,
        "sources": per_source,
        "views": views,
        "views_per_process": None if views is None else math.ceil(views / processes),
        "view_img_size": int(cfg.view.img_size),
        "targets": cfg.view.targets,
        "topk": int(cfg.view.topk) if cfg.view.targets == "topk" else None,
        "bytes_per_view": sizes["view"],
        "jpeg_bytes_per_view": sizes["jpeg"],
        "label_bytes_per_view": sizes["label_in_tar"],
        f"label_bytes_per_view_if_{other}": view_bytes(cfg.view.img_size, other, cfg.teacher.num_classes,
                                                       cfg.view.topk)["label_in_tar"],
        "bytes": None if views is None else views * sizes["view"],
        "teacher": cfg.teacher.name,
        "teacher_img_size": side,
        "teacher_interpolation": interp,
        "teacher_gflops_per_view": teacher_gflops,
        "teacher_pflops": None if views is None or teacher_gflops is None else round(views * teacher_gflops / 1e6, 1),
        "notes": notes,
    }


def describe_labelling(p: dict) -> list[str]:
    lines = [f"plan: offline labels, {p['recipe']} on {p['processes']} processes"]
    for name, s in p["sources"].items():
        lines.append(f"  {name:<8} {_n(s['images'])} images x {s['replicas']} replicas = {_n(s['views'])} views, "
                     f"{_bytes(s['bytes'])}")
    lines += [
        f"  views    {_n(p['views'])} in all, {_n(p['views_per_process'])} a process, {p['view_img_size']} px",
        f"  bytes    {_bytes(p['bytes'])} in all: ~{p['bytes_per_view']:,} a view (JPEG ~{p['jpeg_bytes_per_view']:,}, "
        f"label {p['label_bytes_per_view']:,} as {p['targets']}"
        + (f" top-{p['topk']}" if p["topk"] else "") + ")",
        f"  teacher  {p['teacher']} at {p['teacher_img_size']} px ({p['teacher_interpolation']}): "
        f"{_n(p['teacher_gflops_per_view'])} GFLOPs a view, {_n(p['teacher_pflops'])} PFLOPs in all",
    ]
    return lines + [f"  note     {n}" for n in p["notes"]]


def plan_curation(cfg, processes: int) -> dict:
    from distill.data.shards import read_manifest
    from distill.models.teacher import model_spec
    from distill.passes.units import pool_units

    if processes < 1:
        raise ConfigError(f"dry_run={processes}: give the number of processes to plan for (at least 1)")
    images, origin, units = None, None, None
    try:
        found = pool_units(cfg.pool.shards, cfg.pool.folder, cfg.data_root, cfg.pool.folder_chunk)
        units = len(found)
        if cfg.pool.folder:
            images, origin = sum(len(u.files) for u in found), "folder"
        else:
            manifest = read_manifest([u.name for u in found])
            if manifest:
                images, origin = int(manifest["num_samples"]), "manifest"
    except FileNotFoundError:
        pass
    if images is None and cfg.pool.num_images:
        images, origin = int(cfg.pool.num_images), "pool.num_images"
    hub = bool(cfg.scorer.pretrained and not cfg.scorer.checkpoint)
    head = None if hub else cfg.scorer.num_classes
    try:
        side = cfg.scorer.img_size or model_spec(cfg.scorer.name, head).img_size
    except Exception:  # a model this machine cannot build without its files
        side = 224
    scorer_gflops = gflops(cfg.scorer.name, side, head)
    k, classes = int(cfg.select.per_class), int(cfg.scorer.num_classes)
    topk_entries = k * classes if images is None else min(k * classes, math.ceil(images / processes))
    return {
        "recipe": cfg.recipe,
        "processes": processes,
        "pool_images": images,
        "pool_images_from": origin,
        "pool_units": units,
        "scorer": cfg.scorer.name,
        "scorer_img_size": int(side),
        "scorer_gflops_per_image": scorer_gflops,
        "scorer_pflops": None if images is None or scorer_gflops is None else round(images * scorer_gflops / 1e6, 2),
        "threshold": cfg.select.threshold,
        "per_class": k,
        "num_classes": classes,
        "output_images_at_most": k * classes,
        "fill": cfg.select.fill,
        "score_memory_per_process_bytes": topk_entries * TOPK_ENTRY_BYTES,
        "write_memory_per_process": "one pool unit's selected positions and 256 images, whatever the selection's size",
        "notes": [] if images is not None else ["pool size unknown: no pool manifest here and no pool.num_images"],
    }


def describe_curation(p: dict) -> list[str]:
    lines = [
        f"plan: curation, {p['recipe']} on {p['processes']} processes",
        f"  pool     {_n(p['pool_images'])} images" + (f" ({p['pool_images_from']})" if p["pool_images_from"] else ""),
        f"  scorer   {p['scorer']} at {p['scorer_img_size']} px: {_n(p['scorer_gflops_per_image'])} GFLOPs an image, "
        f"{_n(p['scorer_pflops'])} PFLOPs in all",
        f"  keep     top-class probability > {p['threshold']}, at most {p['per_class']:,} a class x {p['num_classes']} "
        f"classes = {p['output_images_at_most']:,} images ({p['fill']})",
        f"  memory   scoring: top-K bookkeeping <= {_bytes(p['score_memory_per_process_bytes'])} a process; "
        f"writing: {p['write_memory_per_process']}",
    ]
    return lines + [f"  note     {n}" for n in p["notes"]]


def _n(x: Optional[float]) -> str:
    if x is None:
        return "?"
    return f"{x:,}" if isinstance(x, int) else f"{x:,.4g}" if x < 1000 else f"{x:,.0f}"


def _bytes(x: Optional[int]) -> str:
    if x is None:
        return "? bytes"
    for unit, scale in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x} B"
