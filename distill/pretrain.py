"""Distillation pretraining: a frozen teacher teaches a student on a weighted, scheduled mix of sources.

    accelerate launch distill/pretrain.py recipe=mnv4_hybrid_l [key=value ...]

Teacher and student see the same view: the batch is augmented on the CPU workers, mixed up once on the
device, and that one tensor goes to both. In offline mode the teacher's distribution for each stored view
comes with the data and no teacher runs.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from distill.config import ConfigError, exit_on_user_error, load_pretrain_config, save_config
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
from distill.engine.teachers import build_teacher
from distill.engine.guards import update_is_finite, weight_checksums
from distill.engine.ema import build_ema
from distill.engine.plan import check_stored_views, describe_run, plan_run, plan_steps, print_plan
from distill.losses import NonFiniteLoss, distillation_loss, soften, stored_targets
from distill.models.factory import create_model, input_spec
from distill.models.teacher import InputAdapter

logger = logging.getLogger("distill")


@exit_on_user_error
def main(argv=None) -> dict:
    cfg = load_pretrain_config(sys.argv[1:] if argv is None else argv)
    if cfg.dry_run is not None:  # the plan only: no accelerator, no data read or generated
        plan = plan_run(cfg, cfg.dry_run)
        return print_plan(plan, describe_run(plan))
    out = Path(cfg.output_dir)
    accelerator = make_accelerator(cfg.train.precision, cfg.optim.grad_accum, out, cfg.train.trackers)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    seed_everything(cfg.train.seed)  # the same initial weights on every process
    if accelerator.is_main_process and cfg.data.generate == "demo":
        ensure_demo_dataset(Path(cfg.data.root) / "demo")
    accelerator.wait_for_everyone()

    # ---- build ------------------------------------------------------------------------------------
    mix = DataMix.load(cfg.data.mix, cfg.data.root)
    offline = cfg.teacher.mode == "offline"
    if offline and any(mix.mixup_flags):
        raise ConfigError(f"teacher.mode=offline: the stored views are mixed already; {cfg.data.mix} must not "
                          f"set mixup on {[n for n, m in zip(mix.source_names, mix.mixup_flags) if m]}")
    if offline:
        check_stored_views(mix, cfg.data.img_size)
    total_steps, global_batch, warmup = plan_steps(cfg, mix, world)
    if accelerator.is_main_process:
        save_config(cfg, out / "config.yaml")
    teacher = None if offline or not cfg.loss.kd_weight else build_teacher(cfg, mix, accelerator, out)
    student = create_model(
        cfg.student.name, cfg.student.num_classes, cfg.student.pretrained,
        cfg.student.drop_rate, cfg.student.drop_path_rate, cfg.student.checkpoint,
    )
    student_input = InputAdapter(input_spec(student)).to(device)
    if cfg.student.channels_last:
        student = student.to(memory_format=torch.channels_last)
    ema = build_ema(student, cfg.train.ema_decay, cfg.train.ema_warmup)
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
            partner_labels = labels[partner]
            if cfg.student.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with accelerator.accumulate(student):
                if offline:  # stored views were mixed when labelled: their partner's label and weight come along
                    targets, partner_labels, lam = stored_targets(batch, cfg.student.num_classes,
                                                                  cfg.loss.temperature, device)
                elif teacher is not None:
                    with accelerator.autocast():
                        targets = soften(teacher(images), cfg.loss.temperature)
                else:
                    targets = None
                with accelerator.autocast():
                    logits = student(student_input(images))
                terms = distillation_loss(
                    logits, targets, labels, partner_labels, lam, cfg.loss.temperature,
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
