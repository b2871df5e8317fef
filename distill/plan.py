"""How long a run is and what it costs, from the recipe and the mix alone: no image is read.

`plan_steps` sizes the run for the training loop. `plan_run` adds what to check before launching one: the
batch split, the epoch and where its size comes from, the warm-ups, the EMA's decay, teacher and student
GFLOPs per image and the mix's shares over the run. `python distill/pretrain.py recipe=NAME dry_run=N` prints
it as if on N processes: a readable summary, then the same figures as one JSON object on the last line.

An epoch is one pass over the images (1,281,167 for ImageNet-1k), in both modes: stored views of offline
labelling count once per image, not once per replica.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Optional

from distill.data.labels import check_labels
from distill.data.shards import read_manifest
from distill.engine.ema import decay_at, steps_to_reach
from distill.errors import ConfigError


def plan_steps(cfg, mix, world_size: int) -> tuple[int, int, int]:
    """Total optimizer steps, the global batch (samples per optimizer step) and the warm-up steps.

    A recipe that names `data.global_batch_size` keeps it on any number of processes: the per-process batch
    is derived from it here (and written back to the configuration)."""
    if cfg.data.global_batch_size:
        share = world_size * cfg.optim.grad_accum
        if cfg.data.global_batch_size % share:
            raise ConfigError(
                f"data.global_batch_size={cfg.data.global_batch_size} does not split evenly over "
                f"{world_size} processes x optim.grad_accum={cfg.optim.grad_accum}"
            )
        cfg.data.batch_size = cfg.data.global_batch_size // share
    global_batch = cfg.data.batch_size * world_size * cfg.optim.grad_accum
    steps_per_epoch = 0.0
    if not cfg.train.steps or cfg.optim.warmup_steps is None:  # a length in epochs: the epoch's size is needed
        steps_per_epoch = epoch_images(cfg, mix)[0] / global_batch
    total = int(cfg.train.steps) if cfg.train.steps else max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    warmup = cfg.optim.warmup_steps if cfg.optim.warmup_steps is not None else cfg.optim.warmup_epochs * steps_per_epoch
    return total, global_batch, min(int(warmup), total)


def epoch_steps(cfg, mix, global_batch: int) -> float:
    """Optimizer steps in one epoch (see `epoch_images`)."""
    return epoch_images(cfg, mix)[0] / global_batch


# ---- sizes, from manifests when they are there ------------------------------------------------------------


def source_manifest(mix, name: str) -> Optional[dict]:
    """The manifest that describes exactly this source's shards; None when the shards or a manifest are missing."""
    try:
        paths = mix.shard_paths(name)
    except FileNotFoundError:
        return None
    folders = {Path(p).parent for p in paths}
    if len(folders) == 1:
        whole = read_manifest(next(iter(folders)))
        if whole and sorted(s["name"] for s in whole.get("shards", [])) == sorted(Path(p).name for p in paths):
            return whole
    return read_manifest(paths)


def manifest_images(manifest: Optional[dict], folder_name: str = "") -> Optional[int]:
    """Distinct images behind a manifest: its samples, or, for stored views, its samples over the replicas."""
    if manifest is None:
        return None
    if "images" in manifest:
        return int(manifest["images"])
    replicas = (manifest.get("offline_labels") or {}).get("replicas")
    if isinstance(replicas, dict):  # written before manifests counted images: replicas by source name
        replicas = replicas.get(folder_name)
    return int(manifest["num_samples"]) // max(int(replicas or 1), 1)


def epoch_images(cfg, mix) -> tuple[int, str]:
    """(images in one epoch, where that number comes from)."""
    if cfg.data.samples_per_epoch:
        return int(cfg.data.samples_per_epoch), "data.samples_per_epoch"
    first = mix.source_names[0]
    manifest = source_manifest(mix, first)
    images = manifest_images(manifest, _folder_name(mix, first))
    if not images:
        raise ConfigError(
            f"the size of an epoch is unknown: source {first!r} of data mix {mix.path} has no manifest.json "
            f"listing its shards here (data.root={mix.root}); set data.samples_per_epoch (ImageNet-1k: 1281167)"
        )
    return images, f"manifest of source {first}"


def stored_view_sizes(mix) -> dict[str, Optional[int]]:
    """The side each source's stored views were written at (offline labels), None where not known here."""
    sizes = {}
    for name in mix.source_names:
        offline = (source_manifest(mix, name) or {}).get("offline_labels") or {}
        side = (offline.get("view") or {}).get("img_size")
        sizes[name] = int(side) if side else None
    return sizes


def check_stored_views(mix, img_size: int) -> None:
    """Stored views train the student at the side they were written at, or not at all: a 224 px view
    upsampled to 384 px has no more detail than at 224 and is not what the teacher labelled."""
    wrong = {name: side for name, side in stored_view_sizes(mix).items() if side and side != img_size}
    if wrong:
        raise ConfigError(
            f"data mix {mix.path}: stored views of {', '.join(f'{n} are {s} px' for n, s in wrong.items())}, but "
            f"data.img_size={img_size}; label views at the student's side (label_views.py view.img_size={img_size}) "
            f"or train at theirs"
        )


def _folder_name(mix, name: str) -> str:
    try:
        return Path(mix.shard_paths(name)[0]).parent.name
    except FileNotFoundError:
        return name


# ---- costs ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def gflops(name: str, img_size: int, num_classes: Optional[int]) -> Optional[float]:
    """Forward GFLOPs of one image (see `count_flops`); None for a model that cannot be built without weights."""
    from distill.models.teacher import count_flops

    try:
        return round(count_flops(name, img_size, num_classes) / 1e9, 3)
    except Exception:  # a plan is still useful without this figure
        return None


def teacher_geometry(tcfg, view_size: int, num_classes: int) -> tuple[int, str, Optional[int]]:
    """(side the teacher runs at, its interpolation, the class count its head is built with), as
    `build_teacher` / `build_frozen` will set it up."""
    from distill.models.teacher import InputAdapter, model_spec, teacher_input_size

    hub = bool(tcfg.pretrained and not tcfg.checkpoint)
    head = None if hub else num_classes
    try:
        spec = model_spec(tcfg.name, head)
    except Exception:  # a model this machine cannot build without its files: the recipe's keys alone
        return tcfg.img_size or view_size, tcfg.interpolation or "bicubic", head
    side = teacher_input_size(spec, hub, tcfg.img_size) or view_size
    return side, InputAdapter(spec, side, tcfg.interpolation).interpolation, head


def shares(mix) -> dict[str, dict[str, float]]:
    return {at: {n: round(float(w), 4) for n, w in zip(mix.source_names, mix.weights_at(p))}
            for at, p in (("start", 0.0), ("middle", 0.5), ("end", 1.0))}


# ---- the plan of a pretraining run ------------------------------------------------------------------------


def plan_run(cfg, processes: int) -> dict:
    from distill.data.mix import DataMix

    if processes < 1:
        raise ConfigError(f"dry_run={processes}: give the number of processes to plan for (at least 1)")
    mix = DataMix.load(cfg.data.mix, cfg.data.root)
    offline = cfg.teacher.mode == "offline"
    total, global_batch, warmup = plan_steps(cfg, mix, processes)
    try:
        images, epoch_from = epoch_images(cfg, mix)
    except ConfigError:  # a run given in steps needs no epoch
        images, epoch_from = None, None
    decay, ema_warmup = cfg.train.ema_decay, cfg.train.ema_warmup
    reached = steps_to_reach(decay, ema_warmup)
    notes = []

    check_labels(cfg, mix, DataMix.load(cfg.teacher.fit_mix, cfg.data.root) if cfg.teacher.fit_mix else None)
    teacher_runs = not offline and bool(cfg.loss.kd_weight or cfg.loss.feature_weight)
    t_side = t_interp = t_gflops = t_gflops_view = features = None
    if teacher_runs:
        t_side, t_interp, head = teacher_geometry(cfg.teacher, cfg.data.img_size, cfg.student.num_classes)
        t_gflops = gflops(cfg.teacher.name, t_side, head)
        t_gflops_view = gflops(cfg.teacher.name, cfg.data.img_size, head)
    samples = total * global_batch
    if cfg.loss.feature_weight:
        from distill.feature_plan import feature_plan

        features = feature_plan(cfg, t_side or cfg.data.img_size, head if teacher_runs else None, images, samples)
    s_gflops = gflops(cfg.student.name, cfg.data.img_size, cfg.student.num_classes)
    if offline:
        for name, side in stored_view_sizes(mix).items():
            if side and side != cfg.data.img_size:
                notes.append(f"source {name}: stored views are {side} px, the student trains at "
                             f"{cfg.data.img_size} px; the run will refuse them")
    if reached >= total:
        notes.append(f"the EMA reaches its decay {decay} only at step {reached:,}, after the run's {total:,} steps")
    return {
        "recipe": cfg.recipe,
        "mode": cfg.teacher.mode,
        "processes": processes,
        "global_batch_size": global_batch,
        "per_process_batch_size": int(cfg.data.batch_size),
        "grad_accum": int(cfg.optim.grad_accum),
        "samples_per_epoch": images,
        "samples_per_epoch_from": epoch_from,
        "epochs": round(samples / images, 4) if images else None,
        "total_steps": total,
        "total_samples": samples,
        "warmup_steps": warmup,
        "ema_decay": decay,
        "ema_decay_reached_at_step": reached,
        "ema_decay_effective": round(decay_at(total - 1, decay, ema_warmup), 6),
        "student": cfg.student.name,
        "student_img_size": int(cfg.data.img_size),
        "student_gflops_per_image": s_gflops,
        "student_train_pflops": None if s_gflops is None else round(3 * s_gflops * samples / 1e6, 1),
        "teacher": cfg.teacher.name if teacher_runs else None,
        "teacher_img_size": t_side,
        "teacher_interpolation": t_interp,
        "teacher_gflops_per_image": t_gflops if teacher_runs else 0.0,
        "teacher_gflops_at_student_size": t_gflops_view,
        "teacher_pflops": round(t_gflops * samples / 1e6, 1) if t_gflops else (0.0 if not teacher_runs else None),
        "data_mix": str(mix.path),
        "source_shares": shares(mix),
        "features": features,
        "notes": notes,
    }


def describe_run(plan: dict) -> list[str]:
    p = plan
    lines = [
        f"plan: {p['recipe']} on {p['processes']} process{'es' if p['processes'] != 1 else ''}, {p['mode']} teacher",
        f"  batch    {p['global_batch_size']:,} a step = {p['processes']} processes x {p['per_process_batch_size']} "
        f"x {p['grad_accum']} accumulation step(s)",
        f"  epoch    {_g(p['samples_per_epoch'])} images ({p['samples_per_epoch_from'] or 'unknown here'})",
        f"  length   {_g(p['epochs'])} epochs = {p['total_steps']:,} steps ({p['total_samples']:,} samples); "
        f"LR warm-up {p['warmup_steps']:,} steps",
        f"  EMA      decay {p['ema_decay']} from step {p['ema_decay_reached_at_step']:,} "
        f"({p['ema_decay_reached_at_step'] / p['total_steps']:.1%} of the run); at the last step {p['ema_decay_effective']}",
        f"  student  {p['student']} at {p['student_img_size']} px: {_g(p['student_gflops_per_image'])} GFLOPs a "
        f"forward pass, ~{_g(p['student_train_pflops'])} PFLOPs to train (3x forward)",
    ]
    if p["teacher"]:
        ratio = (p["teacher_gflops_per_image"] / p["teacher_gflops_at_student_size"]
                 if p["teacher_gflops_per_image"] and p["teacher_gflops_at_student_size"] else None)
        lines.append(
            f"  teacher  {p['teacher']} at {p['teacher_img_size']} px ({p['teacher_interpolation']} from "
            f"{p['student_img_size']} px views): {_g(p['teacher_gflops_per_image'])} GFLOPs an image"
            + (f", {ratio:.2f}x its cost at {p['student_img_size']} px" if ratio else "")
            + f"; {_g(p['teacher_pflops'])} PFLOPs over the run")
    else:
        lines.append("  teacher  none in the loop" + (" (stored labels)" if p["mode"] == "offline" else ""))
    if p.get("features"):
        from distill.feature_plan import describe_features

        lines += describe_features(p["features"], p["teacher_img_size"])
    mix = p["source_shares"]
    lines.append(f"  mix      {p['data_mix']}: " + "; ".join(
        f"{at} " + " ".join(f"{n} {w:.0%}" for n, w in mix[at].items()) for at in ("start", "middle", "end")))
    lines += [f"  note     {n}" for n in p["notes"]]
    return lines


def print_plan(plan: dict, lines: list[str]) -> dict:
    """The readable summary, then the plan as one JSON object on the last line of standard output."""
    print("\n".join(lines))
    print(json.dumps(plan), flush=True)
    return plan


def _g(x) -> str:
    return "?" if x is None else f"{x:,.4g}" if x < 1000 else f"{x:,.0f}"
