"""Distillation pretraining: a frozen teacher teaches a student on a weighted, scheduled mix of sources.

    accelerate launch distill/pretrain.py recipe=mnv4_hybrid_l [key=value ...]

Teacher and student see the same view: the batch is augmented on the CPU workers, mixed up once on the
device, and that one tensor goes to both. In offline mode the teacher's distribution for each stored view
comes with the data and no teacher runs.
"""
from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from distill.config import exit_on_user_error, load_pretrain_config, save_config
from distill.data.loader import build_eval_loader, build_train_loader
from distill.data.mix import DataMix
from distill.data.mixup import mixup_batch
from distill.data.synthetic import ensure_demo_dataset
from distill.engine.checkpoint import atomic_write_text, resolve_resume
from distill.engine.evaluate import evaluate_topk
from distill.engine.logging import make_accelerator
from distill.engine.optim import build_optimizer, warmup_cosine
from distill.engine.rng import seed_everything
from distill.engine.state import Progress, load_pretrain_checkpoint, save_pretrain_checkpoint
from distill.engine.teacher_fit import fit_supervised
from distill.losses import NonFiniteLoss, dense_from_topk, distillation_loss, soften
from distill.models.factory import create_model, input_spec, num_outputs
from distill.models.teacher import InputAdapter, create_teacher

logger = logging.getLogger("distill")


def update_is_finite(accelerator, loss, grad_norm) -> bool:
    """Whether to apply this step's update; the same answer on every process.

    One host sync per optimizer step. Without a grad scaler the process-averaged gradient norm decides; with
    fp16's scaler, inf gradients are its own business (it skips and lowers the scale), so the loss decides.
    """
    if accelerator.scaler is None:
        return bool(torch.isfinite(grad_norm))
    return bool(torch.isfinite(accelerator.reduce(loss.detach().float(), reduction="sum")))


def build_teacher(cfg, mix: DataMix, accelerator, out: Path):
    """The configured teacher; with no weights and `teacher.fit_steps`, one trained on labels first."""
    t = cfg.teacher
    checkpoint = t.checkpoint
    if not checkpoint and not t.pretrained:
        if t.fit_steps <= 0:
            raise SystemExit(
                "error: the teacher has no weights: set teacher.checkpoint=PATH, teacher.pretrained=true, "
                "or teacher.fit_steps=N to train one on labels first"
            )
        checkpoint = str(out / "teacher.pt")
        if not Path(checkpoint).exists():
            model = create_model(t.name, num_classes=cfg.student.num_classes)
            loader = build_train_loader(
                mix, cfg.data.img_size, cfg.data.batch_size, cfg.data.num_workers, cfg.train.seed + 1,
                total_samples=t.fit_steps * cfg.data.batch_size * accelerator.num_processes,
                rank=accelerator.process_index, world_size=accelerator.num_processes,
            )
            fit_supervised(model, loader, t.fit_steps, t.fit_lr, accelerator, Path(checkpoint))
    teacher = create_teacher(t.name, t.pretrained and not checkpoint, checkpoint, cfg.student.num_classes,
                             t.img_size, t.mean, t.std)
    if teacher.num_classes != cfg.student.num_classes:
        raise SystemExit(
            f"error: the teacher {t.name} predicts {teacher.num_classes} classes but student.num_classes="
            f"{cfg.student.num_classes}; they must agree"
        )
    if t.channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    if t.compile:
        teacher = torch.compile(teacher)
    return teacher.to(accelerator.device)


def plan_steps(cfg, mix: DataMix, world_size: int) -> tuple[int, int, int]:
    """Total optimizer steps, the global batch (samples per optimizer step) and the warm-up steps.

    A recipe that names `data.global_batch_size` keeps it on any number of processes: the per-process batch
    is derived from it here (and written back to the saved configuration). An epoch is one pass over the
    mix's first source unless `data.samples_per_epoch` says otherwise."""
    if cfg.data.global_batch_size:
        share = world_size * cfg.optim.grad_accum
        if cfg.data.global_batch_size % share:
            raise SystemExit(
                f"error: data.global_batch_size={cfg.data.global_batch_size} does not split evenly over "
                f"{world_size} processes x optim.grad_accum={cfg.optim.grad_accum}"
            )
        cfg.data.batch_size = cfg.data.global_batch_size // share
    global_batch = cfg.data.batch_size * world_size * cfg.optim.grad_accum
    per_epoch = cfg.data.samples_per_epoch or mix.num_samples(mix.source_names[0])
    steps_per_epoch = per_epoch / global_batch
    total = int(cfg.train.steps) if cfg.train.steps else max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    warmup = cfg.optim.warmup_steps if cfg.optim.warmup_steps is not None else cfg.optim.warmup_epochs * steps_per_epoch
    return total, global_batch, min(int(warmup), total)


@exit_on_user_error
def main(argv=None) -> dict:
    cfg = load_pretrain_config(sys.argv[1:] if argv is None else argv)
    out = Path(cfg.output_dir)
    accelerator = make_accelerator(cfg.train.precision, cfg.optim.grad_accum, out, cfg.train.trackers)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    seed_everything(cfg.train.seed)  # the same initial weights on every process
    if accelerator.is_main_process and cfg.data.generate == "demo":
        ensure_demo_dataset(Path(cfg.data.root) / "demo")
    accelerator.wait_for_everyone()

    # ---- build ------------------------------------------------------------------------------------
    mix = DataMix.load(cfg.data.mix, cfg.data.root)
    total_steps, global_batch, warmup = plan_steps(cfg, mix, world)
    if accelerator.is_main_process:
        save_config(cfg, out / "config.yaml")
    offline = cfg.teacher.mode == "offline"
    teacher = None if offline or not cfg.loss.kd_weight else build_teacher(cfg, mix, accelerator, out)
    student = create_model(
        cfg.student.name, cfg.student.num_classes, cfg.student.pretrained,
        cfg.student.drop_rate, cfg.student.drop_path_rate, cfg.student.checkpoint,
    )
    student_input = InputAdapter(input_spec(student)).to(device)
    if cfg.student.channels_last:
        student = student.to(memory_format=torch.channels_last)
    from timm.utils import ModelEmaV3

    ema = ModelEmaV3(student, decay=cfg.train.ema_decay, use_warmup=cfg.train.ema_warmup)
    optimizer = build_optimizer(student, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas, cfg.optim.eps)
    scheduler = warmup_cosine(optimizer, warmup, total_steps, cfg.optim.min_lr / cfg.optim.lr)
    student, optimizer = accelerator.prepare(student, optimizer)
    ema.to(device)
    if cfg.student.compile:
        student = torch.compile(student)

    progress = Progress(source_counts=[0] * len(mix.source_names))
    resume_from = resolve_resume(cfg.resume, out)
    if resume_from:
        progress = load_pretrain_checkpoint(resume_from, accelerator, student, ema, optimizer, scheduler)
    loader = build_train_loader(
        mix, cfg.data.img_size, cfg.data.batch_size, cfg.data.num_workers, cfg.train.seed,
        total_samples=total_steps * global_batch, start_sample=progress.samples, rank=rank, world_size=world,
        with_keys=cfg.data.record_keys, soft_labels=offline,
    )
    key_log = (out / f"keys-rank{rank}.tsv").open("a") if cfg.data.record_keys else None
    mixup_sources = torch.tensor(mix.mixup_flags, device=device)
    accelerator.init_trackers("pretrain")

    # ---- loop -------------------------------------------------------------------------------------
    student.train()
    bar = tqdm(total=total_steps, initial=progress.step, desc="distill", disable=not accelerator.is_main_process)
    source_counts = torch.tensor(progress.source_counts, device=device, dtype=torch.long)
    skipped = torch.zeros((), device=device, dtype=torch.long)
    batches = iter(loader)
    while progress.step < total_steps:
        for _ in range(cfg.optim.grad_accum):
            batch = next(batches)
            images = batch["image"].to(device, non_blocking=True).float().div_(255)
            labels = batch["label"].to(device, non_blocking=True)
            sources = batch["source"].to(device, non_blocking=True)
            source_counts += torch.bincount(sources, minlength=len(source_counts))
            skipped += batch["skipped"].to(device).sum()
            if key_log:
                key_log.writelines(f"{mix.source_names[s]}\t{k}\n" for s, k in zip(batch["source"].tolist(), batch["key"]))
            images, partner, lam = mixup_batch(images, mixup_sources[sources])
            if cfg.student.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with accelerator.accumulate(student):
                if offline:
                    targets = dense_from_topk(batch["soft_idx"].to(device), batch["soft_prob"].to(device),
                                              cfg.student.num_classes)
                elif teacher is not None:
                    with accelerator.autocast():
                        targets = soften(teacher(images), cfg.loss.temperature)
                else:
                    targets = None
                with accelerator.autocast():
                    logits = student(student_input(images))
                terms = distillation_loss(
                    logits, targets, labels, partner, lam, cfg.loss.temperature,
                    cfg.loss.kd_weight, cfg.loss.ce_weight, cfg.loss.label_smoothing,
                )
                accelerator.backward(terms["loss"])
        grad_norm = accelerator.clip_grad_norm_(student.parameters(), cfg.optim.clip_grad or float("inf"))
        if update_is_finite(accelerator, terms["loss"], grad_norm):
            optimizer.step()
            progress.bad_in_row = 0
        else:
            progress.bad_steps += 1
            progress.bad_in_row += 1
            logger.warning("non-finite loss at step %d: update skipped (%d in a row)", progress.step, progress.bad_in_row)
            if progress.bad_in_row >= cfg.train.max_bad_steps:
                raise NonFiniteLoss(
                    f"{progress.bad_in_row} non-finite losses in a row at step {progress.step}; stopping "
                    f"(train.max_bad_steps={cfg.train.max_bad_steps}). Lower optim.lr or check the data."
                )
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        ema.update(accelerator.unwrap_model(student), step=progress.step)
        progress.step += 1
        progress.samples += global_batch
        bar.update(1)

        if progress.step % cfg.train.log_every == 0 or progress.step == total_steps:
            metrics = {k: accelerator.reduce(v.detach().float(), reduction="mean").item() for k, v in terms.items()}
            counts = accelerator.reduce(source_counts.clone(), reduction="sum")
            weights = mix.weights_at(progress.samples / (total_steps * global_batch))
            for i, name in enumerate(mix.source_names):
                metrics[f"share/{name}"] = (counts[i] / counts.sum().clamp_min(1)).item()
                metrics[f"weight/{name}"] = float(weights[i])
            metrics |= {"lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm), "bad_steps": progress.bad_steps,
                        "skipped_samples": int(accelerator.reduce(skipped.clone(), reduction="sum"))}
            accelerator.log(metrics, step=progress.step)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
        if progress.step % cfg.train.ckpt_every == 0 or progress.step == total_steps:
            progress.source_counts = accelerator.reduce(source_counts.clone(), reduction="sum").tolist()
            progress.skipped_samples = int(accelerator.reduce(skipped.clone(), reduction="sum"))
            save_pretrain_checkpoint(out, accelerator, student, ema, optimizer, scheduler, progress, cfg,
                                     cfg.train.keep_ckpts)
        if cfg.train.eval_every and progress.step % cfg.train.eval_every == 0 and progress.step < total_steps:
            accelerator.log(evaluate(cfg, accelerator, student, student_input, ema, teacher), step=progress.step)
            student.train()
    bar.close()

    # ---- evaluate and summarise -------------------------------------------------------------------
    checksums = weight_checksums(accelerator, student)
    results = evaluate(cfg, accelerator, student, student_input, ema, teacher)
    accelerator.log(results, step=progress.step)
    summary = {
        "recipe": cfg.recipe,
        "steps": progress.step,
        "samples": progress.samples,
        "teacher_top1": results.get("teacher_top1"),
        "student_top1": results["student_top1"],
        "student_ema_top1": results["student_ema_top1"],
        **results,
        "skipped_samples": progress.skipped_samples,
        "bad_steps": progress.bad_steps,
        "source_counts": dict(zip(mix.source_names, progress.source_counts)),
        "process_weight_checksums": checksums,
    }
    if accelerator.is_main_process:
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
        logger.info("summary: %s", json.dumps({k: summary[k] for k in ("steps", "teacher_top1", "student_top1", "student_ema_top1")}))
    accelerator.end_training()
    return summary


def weight_checksums(accelerator, student) -> list[float]:
    """One number per process summarising its student weights; DDP keeps them equal, and a run whose
    processes drifted apart says so rather than saving one process's weights as the result."""
    with torch.no_grad():
        local = sum(p.double().sum() + (p.double() ** 2).sum() for p in accelerator.unwrap_model(student).parameters())
    sums = accelerator.gather(local.reshape(1)).tolist()
    if max(sums) - min(sums) > 1e-6 * max(1.0, abs(max(sums))):
        logger.warning("student weights differ across processes: %s", sums)
    return sums


def evaluate(cfg, accelerator, student, student_input, ema, teacher) -> dict:
    if not cfg.data.val_shards:
        return {"student_top1": None, "student_ema_top1": None}
    student.eval()
    models = {"student": lambda x: student(student_input(x)), "student_ema": lambda x: ema.module(student_input(x))}
    if teacher is not None:
        models["teacher"] = teacher
    loader = build_eval_loader(
        cfg.data.val_shards, cfg.data.root, cfg.data.img_size, cfg.data.val_crop_pct, cfg.data.val_batch_size,
        cfg.data.num_workers, accelerator.process_index, accelerator.num_processes,
    )
    return evaluate_topk(models, loader, accelerator)


if __name__ == "__main__":
    main()
