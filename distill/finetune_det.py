"""RT-DETR fine-tuning of a (distilled) lightweight backbone on COCO-format data.

    accelerate launch distill/finetune_det.py recipe=rtdetr_mnv4_conv_s [key=value ...]
    python distill/finetune_det.py recipe=det_demo            # the generated shapes demo, CPU, minutes

RT-DETRv2's recipe: AdamW with a slower backbone, linear warm-up, gradient clipping, EMA weights, strong
augmentation and multi-scale inputs switched off for the last epochs. DEIM's training, where a recipe turns
it on: Mosaic and batch MixUp in given epochs, the strong augmentations from a later epoch, and the
flat-then-cosine LR schedule (`optim.schedule=flat_cosine`). The run folder holds config.yaml,
metrics.jsonl, checkpoints (last.pt: the newest; best.pt: the weights of the evaluation with the highest AP),
predictions.json, predictions.png, summary.json (AP of the EMA weights, per class too), curves.png and
pr_curves.png.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

if __name__ == "__main__":  # --help and argument mistakes are answered before the imports below
    from distill.cli import check_arguments

    check_arguments("distill.finetune_det")

import torch
from omegaconf import OmegaConf

from distill.cli import command
from distill.config import save_config
from distill.errors import ConfigError
from distill.data.coco import (
    CocoDetection,
    DetectionBatchSampler,
    Phase,
    batches_per_epoch,
    build_eval_loader,
    build_train_loader,
    targets_to,
    to_model_input,
)
from distill.data.det_augment import MosaicSettings
from distill.data.det_layouts import prepare_detection_data
from distill.data.synthetic_coco import ensure_det_demo
from distill.detection.criterion import RTDETRCriterion
from distill.detection.ema import RTDETREma
from distill.detection.evaluate import evaluate_detector, predict
from distill.detection.feature_distill import DetFeatureDistill, build_feature_distill
from distill.detection.postprocess import PostProcessor
from distill.detection.recipe import check_epochs, check_mixup_batch, epoch_window, load_det_config
from distill.detection.report import class_table, write_plots
from distill.detection.rtdetr import RTDETRConfig, build_criterion, build_rtdetr
from distill.detection.run import CATEGORIES_FILE
from distill.detection.schedule import apply_scaled_schedule, explicit_keys
from distill.detection.sync_bn import to_sync_batchnorm
from distill.detection.visualize import save_prediction_grid
from distill.engine.checkpoint import (
    CheckpointWriter,
    atomic_write_text,
    checkpoint_path,
    load_checkpoint,
    load_state_strict,
)
from distill.engine.distributed import (
    broadcast_from_main, gather_from_all, match_gradient_buckets, share_buffers, start_processes,
)
from distill.engine.guards import UpdateGuard, weight_checksums
from distill.engine.run_dir import choose_run_dir
from distill.engine.logging import make_accelerator, process_means, start_trackers
from distill.engine.optim import build_optimizer, flat_cosine, warmup_cosine
from distill.engine.preemption import STOP, StopAgreement, stop_here, timeouts_named
from distill.engine.progress import ProgressBar, banner
from distill.engine.resume import choose_resume, load_everywhere
from distill.engine.rng import capture_rng, restore_rng, seed_everything, seed_process
from distill.engine.threads import set_threads

logger = logging.getLogger("distill")

GENERATORS = {"det_demo": ensure_det_demo}
BEST_FILE, LAST_FILE = "best.pt", "last.pt"


@command("distill.finetune_det")
def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    cfg = load_det_config(argv)
    start_processes(cfg.cluster.timeout_s)
    set_threads(cfg.data.num_workers)  # after Accelerate's process state, which may set its own
    STOP.install(cfg.cluster.stop_signals)
    out = choose_run_dir(cfg.output_dir, Path("runs") / Path(cfg.recipe).stem, cfg.resume, cfg.overwrite)
    cfg.output_dir = str(out)
    accelerator = make_accelerator(cfg.train.precision, cfg.optim.grad_accum, out, cfg.train.trackers)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    seed_everything(cfg.train.seed)  # the same initial weights on every process
    if accelerator.is_main_process and cfg.data.generate:
        GENERATORS[cfg.data.generate](cfg.data.root)
    accelerator.wait_for_everyone()
    started = time.time()

    # ---- build ------------------------------------------------------------------------------------
    root = Path(cfg.data.root)
    data = prepare_detection_data(cfg.data, out, accelerator.is_main_process)  # any layout, as COCO files
    train_set = CocoDetection(data.train.image_dir, data.train.ann_file, True, cfg.data.img_size,
                              mosaic=mosaic_settings(cfg.data))
    val_set = CocoDetection(data.val.image_dir, data.val.ann_file, False, cfg.data.img_size,
                            categories=train_set.categories)  # one label mapping: the training set's
    check_same_data(len(train_set), root)
    if cfg.train.scale_schedule:  # the steps an epoch first, then the schedule they size
        apply_scaled_schedule(cfg, len(train_set), int(plan_steps(cfg, len(train_set), world).steps_per_epoch),
                              explicit_keys(argv))
        if not cfg.train.steps:
            check_epochs(cfg, float(cfg.train.epochs), f"train.epochs={cfg.train.epochs:g} (scaled)")
    plan = plan_steps(cfg, len(train_set), world)
    if cfg.train.eval_every < 0:  # every epoch
        cfg.train.eval_every = max(1, int(plan.steps_per_epoch))
    resume_from = choose_resume(cfg.resume, out)  # the main process's choice, the same on every process
    if not resume_from:  # a resumed run is checked once its step is known, below
        check_mixup_batch(cfg, world, plan.mixup)
    if cfg.model.num_classes is None:
        cfg.model.num_classes = train_set.num_classes
    elif cfg.model.num_classes != train_set.num_classes:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but the training data has "
                          f"{train_set.num_classes} classes ({', '.join(train_set.class_names[:10])}"
                          f"{', ...' if train_set.num_classes > 10 else ''}); leave it unset")
    if accelerator.is_main_process:
        save_config(cfg, out / "config.yaml")
        atomic_write_text(out / CATEGORIES_FILE, json.dumps(train_set.categories, indent=1))
    model = build_rtdetr(model_config(cfg.model))
    if accelerator.is_main_process and model.init_report is not None:
        logger.info("model.init_from=%s:\n%s", cfg.model.init_from, model.init_report.summary())
        atomic_write_text(out / "init_from.json", json.dumps(model.init_report.as_dict(), indent=1))
    mean, std = model.mean, model.std  # the backbone's own normalisation (its timm pretrained_cfg)
    criterion = build_criterion(model.cfg)  # the head's own loss (RT-DETRv2's or D-FINE's)
    postprocess = PostProcessor(num_top=cfg.eval.num_top)
    ema = RTDETREma(model, cfg.train.ema_decay, cfg.train.ema_warmups)  # a plain-batch-norm copy
    model = to_sync_batchnorm(model, world, device, cfg.train.sync_bn)
    # training only, beside the detector: its teacher and projection head never enter the detector's state
    feature_distill = build_feature_distill(cfg, model, accelerator, plan.steps_per_epoch, plan.strong_until)
    groups = param_groups(model, cfg.optim) + (feature_distill.param_groups(cfg.optim) if feature_distill else [])
    optimizer = build_optimizer(groups, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas, cfg.optim.eps)
    scheduler = build_scheduler(optimizer, cfg.optim, plan)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema.to(device)

    progress, rng_state = Progress(), None
    if resume_from:
        progress, rng_state = load_everywhere(
            resume_from, lambda: load_det_checkpoint(resume_from, accelerator, model, ema, optimizer, scheduler,
                                                     plan.total_steps, feature_distill),
            step=lambda loaded: loaded[0].step)
        check_mixup_batch(cfg, world, plan.mixup, progress.step)
        best_ap, best_step = stored_best(out, accelerator)
        if best_ap > progress.best_ap:
            progress.best_ap, progress.best_step = best_ap, best_step
    accum = cfg.optim.grad_accum
    guard = UpdateGuard(accelerator, optimizer, cfg.train.max_bad_steps, progress.bad_steps, progress.bad_in_row)
    sampler = DetectionBatchSampler(
        len(train_set), cfg.data.batch_size, list(cfg.data.multiscale) or [cfg.data.img_size],
        plan.total_steps * accum, cfg.train.seed, plan.strong_until * accum, progress.step * accum, rank, world,
        final_size=cfg.data.img_size, strong_from=plan.strong_from * accum,
        mosaic=Phase(cfg.data.mosaic_prob, plan.mosaic[0] * accum, plan.mosaic[1] * accum),
        mixup=Phase(cfg.data.mixup_prob, plan.mixup[0] * accum, plan.mixup[1] * accum),
        mixup_ratio=list(cfg.data.mixup_ratio),
    )
    batches = iter(build_train_loader(train_set, sampler, cfg.data.num_workers, cfg.train.seed))
    if resume_from:  # DDP's gradient buckets as the uninterrupted run had them (see match_gradient_buckets)
        first = next(batches)
        match_gradient_buckets(model, lambda: model(*model_inputs(first, device, mean, std)))
        batches = itertools.chain([first], batches)
    parts = DetStepParts(accelerator, model, criterion, optimizer, scheduler, ema, guard, mean, std, feature_distill)
    start_trackers(accelerator, cfg)
    banner(accelerator, cfg.recipe, out, steps=plan.total_steps, steps_per_epoch=plan.steps_per_epoch,
           batch_size=cfg.data.batch_size, grad_accum=accum,
           models={f"RT-DETR with backbone {cfg.model.backbone}": accelerator.unwrap_model(model)},
           details={"data": f"{len(train_set)} training / {len(val_set)} validation images from {root}, "
                            f"{cfg.model.num_classes} classes, side {list(cfg.data.multiscale) or cfg.data.img_size}",
                    "backbone weights": cfg.model.backbone_checkpoint
                    or ("hub" if cfg.model.pretrained_backbone else "none (random init)"),
                    "augmentation and LR": schedule_summary(cfg, plan)})

    if rng_state is not None:
        restore_rng(rng_state)
    else:
        seed_process(cfg.train.seed, rank)  # dropout and denoising noise of this process's own

    def checkpoint(best=()):
        progress.bad_steps, progress.bad_in_row = guard.check(progress.step)
        save_det_checkpoint(out, accelerator, model, ema, optimizer, scheduler, progress, plan.total_steps, cfg,
                            writer, feature_distill, best)
        return progress.step

    # ---- loop -------------------------------------------------------------------------------------
    model.train()
    bar = ProgressBar(plan.total_steps, "rt-detr", initial=progress.step, enabled=accelerator.is_main_process)
    writer, stop, saved_at = CheckpointWriter(), StopAgreement(cfg.cluster.timeout_s), progress.step
    with timeouts_named(lambda: progress.step + 1, cfg.cluster.timeout_s):
        while progress.step < plan.total_steps:
            micro_batches = [next(batches) for _ in range(accum)]
            stop.ready(progress.step + 1)
            for batch in micro_batches:
                progress.note_skipped(batch["skipped"])
            losses, grad_norm, side = detection_step(parts, micro_batches, cfg, progress.step)
            progress.step += 1
            bar.update(progress.step, images=cfg.data.batch_size * accum * world)

            if progress.step % cfg.train.log_every == 0 or progress.step == plan.total_steps:
                progress.bad_steps, progress.bad_in_row = guard.check(progress.step)
                metrics = process_means(accelerator, losses)
                metrics |= {"loss": sum(metrics.values()), "lr": scheduler.get_last_lr()[-1],
                            "backbone_lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                            "epoch": progress.step / plan.steps_per_epoch, "input_size": side,
                            "skipped_images": total_skipped(accelerator, progress)}
                accelerator.log(metrics, step=progress.step)
                bar.log(loss=metrics["loss"], lr=metrics["lr"])
            # evaluated before the checkpoint of the same step, which then holds the best AP so far; best.pt goes
            # to the writer in the checkpoint's job (the training thread never waits for one before the other)
            best = []
            if cfg.train.eval_every and progress.step % cfg.train.eval_every == 0 and progress.step < plan.total_steps:
                scores = evaluate(cfg, accelerator, model, ema, val_set, postprocess, mean, std)
                accelerator.log(scores, step=progress.step)
                best = keep_best(out, accelerator, model, ema, progress, scores, cfg)
                model.train()
            if progress.step % cfg.train.ckpt_every == 0 or progress.step == plan.total_steps:
                saved_at = checkpoint(best)
            else:
                write_alone(writer, best)
            if stop.agreed(progress.step):  # a stop signal reached some process: all stop at this step
                if saved_at != progress.step:
                    saved_at = checkpoint()
                stop_here(accelerator, writer, f"at step {progress.step} of {plan.total_steps} ({out})")
        bar.close()
        # the loader's workers end here rather than at exit: they keep the run's stop-signal handler, so exit's
        # SIGTERM would not end them, and a library that keeps a frame (matplotlib keeps its caller's) would keep
        # this one, and so the loader, alive until then: the process would wait for them for ever
        del batches
        if stop.finish(progress.step):  # the last checkpoint is written; a resumed launch evaluates
            stop_here(accelerator, writer, f"after the last step, before the evaluation ({out})")

        # ---- evaluate and summarise ---------------------------------------------------------------
        checksums = weight_checksums(accelerator, model)
        metrics = evaluate(cfg, accelerator, model, ema, val_set, postprocess, mean, std, out / "predictions.json",
                           by_class=True)
        write_alone(writer, keep_best(out, accelerator, model, ema, progress, metrics, cfg))
    per_class, pr50 = metrics.pop("per_class", None), metrics.pop("pr50", None)  # the main process's alone
    accelerator.log(metrics, step=progress.step)
    skipped = total_skipped(accelerator, progress)
    from accelerate.utils import gather_object

    skipped_files = sorted(set(gather_object(list(progress.skipped_files))))
    summary = {
        "recipe": cfg.recipe,
        "backbone": cfg.model.backbone,
        "evaluated": "ema" if cfg.eval.use_ema else "model",
        **{k: metrics[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")},
        "metrics": metrics,
        "best": {"AP": progress.best_ap, "step": progress.best_step},
        "per_class": per_class,
        "steps": progress.step,
        "epochs": progress.step / plan.steps_per_epoch,
        "params": sum(p.numel() for p in accelerator.unwrap_model(model).parameters()),
        "skipped_images": skipped,
        "skipped_files": skipped_files,
        "bad_steps": progress.bad_steps,
        "process_weight_checksums": checksums,
        "wall_time_s": round(time.time() - started, 1),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if accelerator.is_main_process:
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
        if cfg.eval.visualize:
            draw_predictions(cfg, accelerator, ema.module if cfg.eval.use_ema else model, val_set, postprocess,
                             mean, std, out / "predictions.png")
        logger.info("summary: %s", json.dumps({k: summary[k] for k in ("steps", "AP", "AP50", "AP75", "wall_time_s")}))
        if per_class:
            logger.info("AP per class:\n%s", class_table(per_class))
        write_plots(out, per_class, pr50)
    writer.wait()  # the last checkpoint, written while the run was evaluated
    accelerator.end_training()
    return summary


# --------------------------------------------------------------------------------------------------
# The pieces the loop above names
# --------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    total_steps: int  # optimizer steps of the whole run
    steps_per_epoch: float
    warmup: int
    strong_until: int  # the step at which strong augmentation and multi-scale stop
    strong_from: int = 0  # the step at which strong augmentation starts (DEIM: epoch 4)
    mosaic: tuple[int, int] = (0, 0)  # [start, stop) steps of Mosaic (DEIM's training)
    mixup: tuple[int, int] = (0, 0)  # [start, stop) steps of batch MixUp
    flat_until: int = 0  # optim.schedule=flat_cosine: the step the cosine starts at


def check_same_data(num_images: int, root: Path) -> None:
    """Every process counts the training images it reads (a COCO layout is read where it is, on each node): the
    steps, the scaled schedule and the sampler follow from the count, and processes that disagree would train
    different schedules until a collective timed out. Every process raises the same error."""
    counts = gather_from_all(num_images)
    if len(set(counts)) > 1:
        raise ConfigError(f"the processes read different training sets from data.root={root} (images by process: "
                          f"{counts}): every node must hold the same data there")


def plan_steps(cfg, num_images: int, world_size: int) -> Plan:
    """Steps from epochs (one epoch = every training image once, the incomplete last global batch dropped).

    `data.global_batch_size` fixes the total batch on any number of processes (the per-process batch is
    derived here and written back to the saved configuration). Epoch keys become steps here, rounded; a run
    whose length is given in steps has its epoch keys checked against it here (at load for epochs)."""
    accum = cfg.optim.grad_accum
    if cfg.data.global_batch_size:
        if cfg.data.global_batch_size % (world_size * accum):
            raise ConfigError(f"data.global_batch_size={cfg.data.global_batch_size} does not split evenly "
                              f"over {world_size} processes x optim.grad_accum={accum}")
        cfg.data.batch_size = cfg.data.global_batch_size // (world_size * accum)
    try:
        per_epoch = batches_per_epoch(num_images, cfg.data.batch_size, world_size) // accum
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if per_epoch < 1:
        raise ConfigError(f"{num_images} images give less than one step per epoch with grad_accum={accum}")
    total = int(cfg.train.steps) if cfg.train.steps else max(1, math.ceil(cfg.train.epochs * per_epoch))
    if cfg.train.steps:
        check_epochs(cfg, total / per_epoch, f"train.steps={total} ({total / per_epoch:g} epochs)")
    strong_until = max(0, total - int(round(cfg.train.no_aug_epochs * per_epoch)))

    def steps(epochs: float) -> int:
        return min(total, int(round(float(epochs) * per_epoch)))

    strong_from = min(steps(cfg.train.aug_start_epoch), strong_until)

    def window(key: str) -> tuple[int, int]:
        epochs = epoch_window(cfg.data[key], f"data.{key}")
        return (strong_from, strong_until) if epochs is None else (steps(epochs[0]), steps(epochs[1]))

    warmup = min(int(cfg.optim.warmup_steps), total)
    flat_until = 0
    if cfg.optim.schedule == "flat_cosine":
        flat_until = steps(cfg.optim.flat_epochs)
        if warmup > flat_until:
            raise ConfigError(f"optim.warmup_steps={warmup} runs past the flat stretch: optim.flat_epochs="
                              f"{cfg.optim.flat_epochs:g} ends at step {flat_until} ({per_epoch} steps an epoch)")
    return Plan(total, float(per_epoch), warmup, strong_until, strong_from, window("mosaic_epochs"),
                window("mixup_epochs"), flat_until)


def build_scheduler(optimizer, optim_cfg, plan: Plan):
    """RT-DETRv2's warm-up (+ optional cosine), or DEIM's flat-then-cosine whose last flat stretch is the
    epochs without strong augmentation."""
    if optim_cfg.schedule == "flat_cosine":
        return flat_cosine(optimizer, plan.warmup, plan.total_steps, plan.flat_until,
                           plan.total_steps - plan.strong_until, optim_cfg.min_lr_ratio)
    return warmup_cosine(optimizer, plan.warmup, plan.total_steps, optim_cfg.min_lr_ratio)


def schedule_summary(cfg, plan: Plan) -> str:
    """One line of when each augmentation runs and how the LR moves, in steps."""
    parts = [f"strong augmentations in steps [{plan.strong_from}, {plan.strong_until})"
             if plan.strong_from < plan.strong_until else "no strong augmentation"]
    for name, prob, (start, stop) in (("mosaic", cfg.data.mosaic_prob, plan.mosaic),
                                      ("mixup", cfg.data.mixup_prob, plan.mixup)):
        if prob > 0:
            parts.append(f"{name} {prob:g} in [{start}, {stop})")
    if cfg.optim.schedule == "flat_cosine":
        parts.append(f"LR warm-up {plan.warmup}, flat to step {plan.flat_until}, cosine to x{cfg.optim.min_lr_ratio:g} "
                     f"by step {plan.strong_until}")
    elif cfg.optim.min_lr_ratio < 1:
        parts.append(f"LR warm-up {plan.warmup}, then cosine to x{cfg.optim.min_lr_ratio:g}")
    else:
        parts.append(f"LR warm-up {plan.warmup}, then flat")
    return "; ".join(parts)


def mosaic_settings(data_cfg) -> MosaicSettings:
    return MosaicSettings(int(data_cfg.mosaic_size), float(data_cfg.mosaic_rotation),
                          float(data_cfg.mosaic_translate), tuple(float(v) for v in data_cfg.mosaic_scale))


def param_groups(model: torch.nn.Module, optim_cfg) -> list[dict]:
    """Four groups: backbone / rest x decayed / not (1-D parameters: norms and biases, no weight decay)."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        backbone = name.startswith("backbone.")
        decay = p.ndim > 1
        key = (backbone, decay)
        if key not in groups:
            groups[key] = {"params": [], "lr": optim_cfg.backbone_lr if backbone else optim_cfg.lr,
                           "weight_decay": optim_cfg.weight_decay if decay else 0.0,
                           "name": ("backbone" if backbone else "detector") + ("" if decay else "_no_decay")}
        groups[key]["params"].append(p)
    if not any(backbone for backbone, _ in groups):
        raise ValueError(f"{type(model).__name__} has no `backbone` submodule with trainable parameters")
    # the backbone groups first, so the logged `backbone_lr` is group 0 and `lr` the last group
    return [groups[k] for k in sorted(groups, key=lambda k: (not k[0], not k[1]))]


def model_config(model_cfg) -> RTDETRConfig:
    fields = OmegaConf.to_container(model_cfg)
    return RTDETRConfig(**{**fields, "out_strides": tuple(fields["out_strides"])})


@dataclass
class DetStepParts:
    accelerator: object
    model: torch.nn.Module
    criterion: RTDETRCriterion
    optimizer: object
    scheduler: object
    ema: RTDETREma
    guard: UpdateGuard
    mean: object
    std: object
    feature_distill: Optional[DetFeatureDistill] = None  # the encoder's distillation term (distill.teacher)


def model_inputs(batch: dict, device, mean, std) -> tuple[torch.Tensor, list[dict]]:
    """(normalised images, targets) of a loader batch, on the device."""
    return to_model_input(batch["images"].to(device, non_blocking=True), mean, std), targets_to(batch["targets"], device)


def detection_step(p: DetStepParts, micro_batches: list[dict], cfg, step: int) -> tuple[dict, torch.Tensor, int]:
    """One optimizer step over `grad_accum` micro-batches: forward, matching and losses in full precision,
    backward, clipping, a guarded update, schedule and EMA. The host waits for the device once per micro-batch,
    when the matcher takes every cost matrix of the batch in one transfer (the assignment runs on the CPU)."""
    accelerator, device, distill = p.accelerator, p.accelerator.device, p.feature_distill
    for batch in micro_batches:
        images, targets = model_inputs(batch, device, p.mean, p.std)
        with accelerator.accumulate(p.model):
            with accelerator.autocast(), distill.capturing() if distill else nullcontext():
                outputs = p.model(images, targets)
            with torch.autocast(device.type, enabled=False):  # matching and losses in full precision
                losses = p.criterion(fp32(outputs), targets)
            if distill is not None:
                with accelerator.autocast():
                    losses |= distill.loss(images)
            loss = sum(losses.values())
            accelerator.backward(loss)
    trained = list(p.model.parameters())
    if distill is not None:
        distill.after_backward()
        trained += distill.parameters()  # the head's gradient is clipped with the detector's, as in RT-DETRv4
    grad_norm = accelerator.clip_grad_norm_(trained, cfg.optim.clip_grad or float("inf"))
    p.guard.step(loss, grad_norm)
    p.optimizer.zero_grad(set_to_none=True)
    p.scheduler.step()
    p.ema.update(accelerator.unwrap_model(p.model), step=step)
    if distill is not None:
        distill.end_step(step + 1)
    return losses, grad_norm, images.shape[-1]


def fp32(outputs):
    """Model outputs (nested dicts / lists of tensors) in float32 for the loss."""
    if torch.is_tensor(outputs):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, dict):
        return {k: fp32(v) for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(fp32(v) for v in outputs)
    return outputs


def evaluate(cfg, accelerator, model, ema, val_set, postprocess, mean, std, out_json=None,
             by_class=False) -> dict:
    """COCO AP over the validation images, split over the processes; the bare model runs (no collective in
    its forward), with process 0's batch-norm statistics on every process (see `share_buffers`)."""
    net = ema.module if cfg.eval.use_ema else accelerator.unwrap_model(model)
    share_buffers(accelerator, net)
    loader = build_eval_loader(val_set, cfg.data.val_batch_size, cfg.data.num_workers,
                               accelerator.process_index, accelerator.num_processes)
    return evaluate_detector(net, loader, postprocess, mean, std, val_set.category_ids, val_set.ann_file,
                             accelerator, out_json, by_class)


def draw_predictions(cfg, accelerator, model, val_set, postprocess, mean, std, path: Path) -> None:
    loader = build_eval_loader(val_set, cfg.eval.visualize, 0, limit=cfg.eval.visualize)
    results, image_ids, _ = predict(accelerator.unwrap_model(model), loader, postprocess, mean, std,
                                    accelerator.device, accelerator.autocast)
    try:
        save_prediction_grid(val_set, dict(zip(image_ids, results)), path, cfg.eval.visualize,
                             cfg.eval.score_threshold)
    except ValueError as e:
        logger.warning("no picture of the predictions: %s", e)


# --------------------------------------------------------------------------------------------------
# What a run carries across an interruption
# --------------------------------------------------------------------------------------------------


@dataclass
class Progress:
    step: int = 0  # optimizer steps taken (skipped non-finite steps included: they consumed data)
    skipped_images: int = 0  # undecodable training images met by this process
    skipped_files: list[str] = field(default_factory=list)  # their names (the first 100)
    bad_steps: int = 0
    bad_in_row: int = 0
    best_ap: float = -1.0  # the highest COCO AP of the run's evaluations so far (best.pt), and its step
    best_step: int = 0

    def note_skipped(self, names: list[str]) -> None:
        self.skipped_images += len(names)
        self.skipped_files += names[: max(0, 100 - len(self.skipped_files))]


def total_skipped(accelerator, progress: Progress) -> int:
    count = torch.tensor(progress.skipped_images, device=accelerator.device)
    return int(accelerator.reduce(count, reduction="sum"))


def save_det_checkpoint(folder: Path, accelerator, model, ema, optimizer, scheduler, progress: Progress,
                        total_steps: int, cfg, writer: CheckpointWriter,
                        feature_distill: Optional[DetFeatureDistill] = None, best: list = ()) -> None:
    """All processes call this; the main one hands the checkpoint to `writer` (nobody waits for the disk).
    Every process's RNG state and progress go in; feature distillation's head and weight beside the model's.
    `best`: best.pt of the same step (`keep_best`), written by the same job."""
    from accelerate.utils import gather_object

    rng = gather_object([capture_rng()])
    per_process = gather_object([asdict(progress)])
    if accelerator.is_main_process:
        state = {
            "model": accelerator.unwrap_model(model).state_dict(),
            "ema": ema.module.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            "feature_distill": feature_distill.state_dict() if feature_distill is not None else None,
            "progress": per_process,
            "total_steps": total_steps,
            "rng": rng,
            "config": OmegaConf.to_container(cfg, resolve=True),
        }
        writer.submit(state, checkpoint_path(folder, progress.step), cfg.train.keep_ckpts, also_as=folder / LAST_FILE,
                      before=best)


def keep_best(folder: Path, accelerator, model, ema, progress: Progress, metrics: dict, cfg) -> list[tuple[dict, Path]]:
    """best.pt: the weights of the evaluation with the highest COCO AP so far (the first of equals), for
    distill.predict, distill.export and model.init_from; never pruned, and not a resume point (no optimizer).
    Every process holds the same metrics and so decides alike; the main one gets [(state, path)] to write
    (with the checkpoint of the same step, or `write_alone`), the others []."""
    if metrics["AP"] <= progress.best_ap:
        return []
    progress.best_ap, progress.best_step = metrics["AP"], progress.step
    if not accelerator.is_main_process:
        return []
    state = {
        "model": accelerator.unwrap_model(model).state_dict(),
        "ema": ema.module.state_dict(),
        "step": progress.step,
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    logger.info("best AP %.4f at step %d: %s", progress.best_ap, progress.step, folder / BEST_FILE)
    return [(state, folder / BEST_FILE)]


def write_alone(writer: CheckpointWriter, best: list[tuple[dict, Path]]) -> None:
    for state, path in best:
        writer.submit(state, path, keep=0)


def stored_best(folder: Path, accelerator) -> tuple[float, int]:
    """(AP, step) of the run's best.pt, on every process ((-1, 0) without one). An evaluation after the
    checkpoint a run resumes from may have written a better best.pt than that checkpoint records; the
    resumed run must not replace it with a worse one. Memory-mapped: the weights are not read."""
    found = (-1.0, 0)
    path = Path(folder) / BEST_FILE
    if accelerator.is_main_process and path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            found = (float(state["metrics"]["AP"]), int(state["step"]))
        except Exception as e:  # an unreadable best.pt is replaced by the next evaluation
            logger.warning("%s not read (%s: %s); the next evaluation replaces it", path, type(e).__name__, e)
    return broadcast_from_main(found)


def load_det_checkpoint(path: Path, accelerator, model, ema, optimizer, scheduler, total_steps: int,
                        feature_distill: Optional[DetFeatureDistill] = None) -> tuple[Progress, dict]:
    """Weights, optimizer, schedule and progress in place; this process's RNG state is returned for the
    caller to restore once nothing else will draw from it."""
    state = load_checkpoint(path)
    if state.get("total_steps") != total_steps:
        raise ConfigError(f"{path} belongs to a run of {state.get('total_steps')} steps but this recipe plans "
                          f"{total_steps}; resume with the same recipe, epochs/steps and batch size")
    load_state_strict(accelerator.unwrap_model(model), state["model"], f"checkpoint {path} (model)")
    if (feature_distill is not None) != (state.get("feature_distill") is not None):
        raise ConfigError(f"{path} was saved {'with' if state.get('feature_distill') else 'without'} feature "
                          f"distillation (distill.teacher); resume with the recipe it was saved with")
    if feature_distill is not None:
        feature_distill.load_state_dict(state["feature_distill"])
    ema.module.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if accelerator.scaler is not None and state.get("scaler"):
        accelerator.scaler.load_state_dict(state["scaler"])
    rank = accelerator.process_index
    rng = state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0]
    mine = state["progress"][rank] if rank < len(state["progress"]) else state["progress"][0]
    return Progress(**mine), rng


if __name__ == "__main__":
    main()
