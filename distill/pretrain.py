"""Distillation pretraining: a frozen teacher teaches a student on a weighted, scheduled mix of sources.

    accelerate launch distill/pretrain.py recipe=mnv4_hybrid_l [key=value ...]

Teacher and student see the same view: the batch is augmented on the CPU workers, mixed up once on the
device, and that one tensor goes to both. In offline mode the teacher's distribution for each stored view
comes with the data and no teacher runs. With `baseline=labels` the same student is then trained on labels
alone in `<run>/baseline/` (`distill/baseline.py`), for comparison.
"""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__":  # --help and argument mistakes are answered before the imports below
    from distill.cli import check_arguments

    check_arguments("distill.pretrain")

import numpy as np
import torch

from accelerate import PartialState

from distill.baseline import Beside, add_baseline, baseline_config, end_with_parent, print_outcome, trains_beside
from distill.cli import command, user_errors
from distill.config import ConfigError, load_pretrain_config, save_config
from distill.data.labels import check_labels
from distill.data.loader import build_eval_loader, build_train_loader
from distill.data.mix import DataMix
from distill.data.mixup import mixup_batch
from distill.data.synthetic import ensure_generated
from distill.engine.checkpoint import CheckpointWriter, atomic_write_text
from distill.engine.distributed import end_processes, match_gradient_buckets, share_buffers, start_processes
from distill.engine.evaluate import evaluate_topk
from distill.engine.guards import UpdateGuard, weight_checksums
from distill.engine.logging import finish_trackers, logged_trend, make_accelerator, process_means, start_trackers
from distill.engine.optim import build_optimizer, warmup_cosine
from distill.engine.preemption import STOP, Preempted, StopAgreement, stop_agreed, stop_here, timeouts_named
from distill.engine.ema import build_ema
from distill.plan import check_stored_views, describe_run, epoch_steps, plan_run, plan_steps, print_plan
from distill.engine.progress import ProgressBar, banner, describe_mix
from distill.engine.resume import choose_resume, load_everywhere
from distill.engine.rng import restore_rng, seed_everything, seed_process
from distill.engine.run_dir import choose_run_dir
from distill.engine.speed import auto_on_gpu
from distill.engine.threads import set_threads
from distill.engine.state import ProcessState, Progress, load_pretrain_checkpoint, save_pretrain_checkpoint
from distill.feature_objective import build_feature_objective, check_feature_config
from distill.losses import distillation_loss, soften, stored_targets
from distill.models.factory import create_model, input_spec, zero_classifier
from distill.models.teacher import InputAdapter
from distill.models.teacher_fit import build_teacher, describe_teacher

logger = logging.getLogger("distill")


@command("distill.pretrain")
def main(argv=None) -> dict:
    cfg = load_pretrain_config(sys.argv[1:] if argv is None else argv)
    if cfg.dry_run is not None:  # the plan only: no processes started, no data read or generated
        plan = plan_run(cfg, cfg.dry_run)
        return print_plan(plan, describe_run(plan))
    cfg.student.channels_last = auto_on_gpu(cfg.student.channels_last)
    start_processes(cfg.cluster.timeout_s)
    beside = trains_beside(cfg)  # the baseline in a second process, at once (distill/baseline.py)
    set_threads(cfg.data.num_workers, processes=2 if beside else None)  # after Accelerate's process state
    STOP.install(cfg.cluster.stop_signals)
    writer = CheckpointWriter()  # the launch's: its runs go on while their checkpoints are written
    choose_folder(cfg)
    prepare_data(cfg)
    baseline = Beside(choose_folder(baseline_config(cfg)), train_beside) if beside else None
    try:
        summary = train(cfg, writer)
        if baseline:
            summary = add_baseline(cfg, summary, baseline.result())
        elif cfg.baseline:
            if stop_agreed(cfg.cluster.timeout_s):  # the distilled run is complete; a resume goes on with the baseline
                raise Preempted(f"before the baseline run ({cfg.output_dir}/baseline)")
            summary = add_baseline(cfg, summary, train(choose_folder(baseline_config(cfg)), writer, label="baseline"))
    finally:
        if baseline:
            baseline.stop(cfg.cluster.timeout_s)
    writer.wait()
    print_outcome(cfg, summary)
    end_processes()
    return summary


def train_beside(cfg) -> None:
    """The baseline's run in its second process (`distill.baseline.Beside`), with half the cores, ending as a
    launch ends: a stop signal stops it with a checkpoint (also when the launch's process ends first)."""
    import multiprocessing

    end_with_parent(cfg)
    multiprocessing.set_start_method("fork", force=True)  # loader workers as in a launch's process: forked
    code = 0
    try:
        with user_errors():
            start_processes(cfg.cluster.timeout_s)
            set_threads(cfg.data.num_workers, processes=2)
            STOP.install(cfg.cluster.stop_signals)
            writer = CheckpointWriter()
            train(cfg, writer, label="baseline")
            writer.wait()
    except SystemExit as end:  # out of the run's frames first, so that its loader workers end before the process
        code = end.code
    sys.exit(code)


def choose_folder(cfg):
    """`cfg` with the run's folder chosen (the same on every process) and written back to `output_dir`."""
    cfg.output_dir = str(choose_run_dir(cfg.output_dir, Path("runs") / Path(cfg.recipe).stem, cfg.resume,
                                        cfg.overwrite))
    return cfg


def prepare_data(cfg) -> None:
    """The generated data (`data.generate`), written once by the main process before any run reads it."""
    state = PartialState()
    if state.is_main_process and cfg.data.generate:
        ensure_generated(cfg.data.generate, cfg.data.root)
    state.wait_for_everyone()


def train(cfg, writer: CheckpointWriter, label: str = "distill") -> dict:
    """One run into its folder (`choose_folder`), its progress shown as `label`: build, loop, evaluate."""
    out = Path(cfg.output_dir)
    accelerator = make_accelerator(cfg.train.precision, cfg.optim.grad_accum, out, cfg.train.trackers)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes

    # ---- build ------------------------------------------------------------------------------------
    mix = DataMix.load(cfg.data.mix, cfg.data.root)
    offline = cfg.teacher.mode == "offline"
    if offline and any(mix.mixup_flags):
        raise ConfigError(f"teacher.mode=offline: the stored views are mixed already; {cfg.data.mix} must not "
                          f"set mixup on {[n for n, m in zip(mix.source_names, mix.mixup_flags) if m]}")
    if offline:
        check_stored_views(mix, cfg.data.img_size)
    check_labels(cfg, mix, DataMix.load(cfg.teacher.fit_mix, cfg.data.root) if cfg.teacher.fit_mix else None)
    check_feature_config(cfg)
    total_steps, global_batch, warmup = plan_steps(cfg, mix, world)
    if accelerator.is_main_process:
        save_config(cfg, out / "config.yaml")
    seed_everything(cfg.train.seed)
    teacher = None if offline or not cfg.loss.kd_weight else build_teacher(cfg, mix, accelerator, out)
    feature_teacher = teacher or (build_teacher(cfg, mix, accelerator, out) if cfg.loss.feature_weight else None)
    seed_everything(cfg.train.seed)  # the student starts alike on every process, however the teacher was made
    student = create_model(
        cfg.student.name, cfg.student.num_classes, cfg.student.pretrained,
        cfg.student.drop_rate, cfg.student.drop_path_rate, cfg.student.checkpoint,
    )
    if not (cfg.student.pretrained or cfg.student.checkpoint):
        zero_classifier(student)
    features = build_feature_objective(cfg, student, feature_teacher)  # its heads join the student here
    student_input = InputAdapter(input_spec(student)).to(device)
    if cfg.student.channels_last:
        student = student.to(memory_format=torch.channels_last)
    if cfg.student.compile:  # in place: DDP then wraps the compiled module and state-dict keys stay plain
        student.compile(backend=cfg.student.compile_backend, mode=cfg.student.compile_mode)
    ema = build_ema(student, cfg.train.ema_decay, cfg.train.ema_warmup)
    optimizer = build_optimizer(student, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas, cfg.optim.eps)
    scheduler = warmup_cosine(optimizer, warmup, total_steps, cfg.optim.min_lr / cfg.optim.lr)
    student, optimizer = accelerator.prepare(student, optimizer)
    ema.to(device)

    loader_shape = [world, cfg.data.num_workers]
    progress, mine = Progress(), ProcessState([0] * len(mix.source_names), loader_shape=loader_shape)
    resume_from = choose_resume(cfg.resume, out)  # the main process's choice, the same on every process
    if resume_from:
        progress, mine = load_everywhere(
            resume_from, lambda: load_pretrain_checkpoint(resume_from, accelerator, student, ema, optimizer,
                                                          scheduler, loader_shape), step=lambda loaded: loaded[0].step)
        mine.loader_shape = loader_shape
        match_gradient_buckets(student, lambda: features.example_outputs(student, example_batch(cfg, device))
                               if features else student(example_batch(cfg, device)))
    loader = build_train_loader(
        mix, cfg.data.img_size, cfg.data.batch_size, cfg.data.num_workers, cfg.train.seed,
        total_samples=total_steps * global_batch, origin=progress.samples, rank=rank, world_size=world,
        with_keys=cfg.data.record_keys, soft_labels=offline,
    )
    if mine.loader:
        loader.load_state_dict(mine.loader)
    step_parts = StepParts(accelerator, student, student_input, teacher, optimizer, scheduler, ema,
                           UpdateGuard(accelerator, optimizer, cfg.train.max_bad_steps, progress.bad_steps,
                                       progress.bad_in_row),
                           torch.tensor(mix.mixup_flags, device=device), offline, features)
    key_log = (out / f"keys-rank{rank}.tsv").open("a") if cfg.data.record_keys else None
    start_trackers(accelerator, cfg)
    banner(accelerator, cfg.recipe, out, steps=total_steps, steps_per_epoch=epoch_steps(cfg, mix, global_batch),
           batch_size=cfg.data.batch_size, grad_accum=cfg.optim.grad_accum,
           models={f"student {cfg.student.name}": student, f"teacher {cfg.teacher.name}": feature_teacher},
           details={"data": f"mix {describe_mix(mix)}; {cfg.data.img_size} px", "teacher": describe_teacher(cfg)})
    if mine.rng:
        restore_rng(mine.rng)
    else:
        seed_process(cfg.train.seed, rank)  # dropout, drop-path and mixup draws of this process's own

    def checkpoint():
        progress.bad_steps, progress.bad_in_row = step_parts.guard.check(progress.step)
        mine.loader = loader.state_dict()
        if key_log:
            key_log.flush()
        save_pretrain_checkpoint(out, accelerator, student, ema, optimizer, scheduler, progress, mine, cfg,
                                 cfg.train.keep_ckpts, writer)
        return progress.step

    # ---- loop -------------------------------------------------------------------------------------
    student.train()
    bar = ProgressBar(total_steps, label, initial=progress.step, enabled=accelerator.is_main_process)
    batches = iter(loader)
    stop, saved_at = StopAgreement(cfg.cluster.timeout_s), progress.step
    with timeouts_named(lambda: progress.step + 1, cfg.cluster.timeout_s):
        while progress.step < total_steps:
            micro_batches = [next(batches) for _ in range(cfg.optim.grad_accum)]
            stop.ready(progress.step + 1)
            tally(mine, micro_batches, mix, key_log)  # host-side bookkeeping of the CPU batches
            terms, grad_norm = distill_step(step_parts, micro_batches, cfg, progress.step)
            progress.step += 1
            progress.samples += global_batch
            bar.update(progress.step, images=global_batch)

            if progress.step % cfg.train.log_every == 0 or progress.step == total_steps:
                progress.bad_steps, progress.bad_in_row = step_parts.guard.check(progress.step)
                metrics = log_metrics(accelerator, mix, terms, grad_norm, scheduler, mine, progress,
                                      progress.samples / (total_steps * global_batch))
                bar.log(loss=metrics["loss"], lr=metrics["lr"])
            if progress.step % cfg.train.ckpt_every == 0 or progress.step == total_steps:
                saved_at = checkpoint()
            if cfg.train.eval_every and progress.step % cfg.train.eval_every == 0 and progress.step < total_steps:
                accelerator.log(evaluate(cfg, accelerator, student, student_input, ema, teacher), step=progress.step)
                student.train()
            if stop.agreed(progress.step):  # a stop signal reached some process: all stop at this step
                if saved_at != progress.step:
                    saved_at = checkpoint()
                stop_here(accelerator, writer, f"at step {progress.step} of {total_steps} ({out})")
        bar.close()
        if stop.finish(progress.step):  # the last checkpoint is written; a resumed launch evaluates
            stop_here(accelerator, writer, f"after the last step, before the evaluation ({out})")

        # ---- evaluate and summarise ---------------------------------------------------------------
        checksums = weight_checksums(accelerator, student)
        results = evaluate(cfg, accelerator, student, student_input, ema, teacher)
    accelerator.log(results, step=progress.step)
    source_counts = summed(accelerator, mine.source_counts)
    summary = {
        "recipe": cfg.recipe,
        "steps": progress.step,
        "samples": progress.samples,
        "teacher_top1": results.get("teacher_top1"),
        "student_top1": results["student_top1"],
        "student_ema_top1": results["student_ema_top1"],
        **results,
        "skipped_samples": summed(accelerator, [mine.skipped_samples])[0],
        "bad_steps": progress.bad_steps,
        "source_counts": dict(zip(mix.source_names, source_counts)),
        "process_weight_checksums": checksums,
    }
    if accelerator.is_main_process:
        if features:  # as logged (metrics.jsonl is the main process's)
            summary["feature_loss"] = logged_trend(out / "metrics.jsonl", "feature")
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
        logger.info("summary: %s", json.dumps({k: summary[k] for k in ("steps", "teacher_top1", "student_top1", "student_ema_top1")}))
    finish_trackers(accelerator)  # the processes stay one group: a baseline run may follow
    return summary


# --------------------------------------------------------------------------------------------------
# The pieces the loop above names
# --------------------------------------------------------------------------------------------------


@dataclass
class StepParts:
    accelerator: object
    student: torch.nn.Module
    student_input: torch.nn.Module
    teacher: object  # FrozenTeacher, or None (offline mode, or no KD term)
    optimizer: object
    scheduler: object
    ema: object
    guard: UpdateGuard
    mixup_sources: torch.Tensor  # bool per source: mixup applies to its samples
    offline: bool
    features: object = None  # FeatureObjective (loss.feature_weight > 0), with its own teacher, or None


def distill_step(p: StepParts, micro_batches: list[dict], cfg, step: int) -> tuple[dict, torch.Tensor]:
    """One optimizer step over `grad_accum` micro-batches: mixup, teacher targets, student loss, backward,
    clipping, a guarded update, schedule and EMA. Nothing here waits for the device (no host sync)."""
    accelerator, device = p.accelerator, p.accelerator.device
    for batch in micro_batches:
        images = batch["image"].to(device, non_blocking=True).float().div_(255)
        labels = batch["label"].to(device, non_blocking=True)
        sources = batch["source"].to(device, non_blocking=True)
        images, partner, lam = mixup_batch(images, p.mixup_sources[sources])
        partner_labels = labels[partner]
        if cfg.student.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with accelerator.accumulate(p.student):
            if p.offline:  # stored views were mixed when labelled: their partner's label and weight come along
                targets, partner_labels, lam = stored_targets(batch, cfg.student.num_classes, cfg.loss.temperature,
                                                              device)
            elif p.features is not None:  # one teacher pass: its maps, and its logits for a logit term
                with accelerator.autocast():
                    teacher_logits, teacher_maps = p.features.teacher_forward(images)
                targets = soften(teacher_logits, cfg.loss.temperature) if p.teacher is not None else None
            elif p.teacher is not None:
                with accelerator.autocast():
                    targets = soften(p.teacher(images), cfg.loss.temperature)
            else:
                targets = None
            with accelerator.autocast():
                if p.features is None:
                    logits = p.student(p.student_input(images))
                else:
                    logits, student_maps = p.features.student_forward(p.student, p.student_input(images))
            terms = distillation_loss(
                logits, targets, labels, partner_labels, lam, cfg.loss.temperature,
                cfg.loss.kd_weight, cfg.loss.ce_weight, cfg.loss.label_smoothing,
            )
            if p.features is not None:
                with accelerator.autocast():
                    terms = p.features.add_term(terms, logits, student_maps, teacher_maps)
            accelerator.backward(terms["loss"])
    grad_norm = accelerator.clip_grad_norm_(p.student.parameters(), cfg.optim.clip_grad or float("inf"))
    p.guard.step(terms["loss"], grad_norm)
    p.optimizer.zero_grad(set_to_none=True)
    p.scheduler.step()
    p.ema.update(accelerator.unwrap_model(p.student), step=step)
    return terms, grad_norm


def example_batch(cfg, device) -> torch.Tensor:
    """A normalised input batch of the training shape (its values do not matter)."""
    shape = (cfg.data.batch_size, 3, cfg.data.img_size, cfg.data.img_size)
    memory_format = torch.channels_last if cfg.student.channels_last else torch.contiguous_format
    return torch.zeros(shape, device=device).contiguous(memory_format=memory_format)


def tally(mine: ProcessState, micro_batches: list[dict], mix: DataMix, key_log) -> None:
    """Per-source draws and skipped samples of this process, counted on the CPU batches before they move."""
    for batch in micro_batches:
        counts = np.bincount(batch["source"].numpy(), minlength=len(mine.source_counts))
        mine.source_counts = [a + int(b) for a, b in zip(mine.source_counts, counts)]
        mine.skipped_samples += int(batch["skipped"].sum())
        if key_log:
            key_log.writelines(f"{mix.source_names[s]}\t{k}\n" for s, k in zip(batch["source"].tolist(), batch["key"]))


def summed(accelerator, values: list[int]) -> list[int]:
    """Integer tallies summed over processes."""
    return accelerator.reduce(torch.tensor(values, device=accelerator.device), reduction="sum").tolist()


def log_metrics(accelerator, mix, terms, grad_norm, scheduler, mine: ProcessState, progress: Progress,
                at: float) -> dict:
    metrics = process_means(accelerator, terms)
    counts = summed(accelerator, mine.source_counts + [mine.skipped_samples])
    drawn, weights = counts[:-1], mix.weights_at(at)
    for i, name in enumerate(mix.source_names):
        metrics[f"share/{name}"] = drawn[i] / max(1, sum(drawn))
        metrics[f"weight/{name}"] = float(weights[i])
    metrics |= {"lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm), "bad_steps": progress.bad_steps,
                "skipped_samples": counts[-1]}
    accelerator.log(metrics, step=progress.step)
    return metrics


def evaluate(cfg, accelerator, student, student_input, ema, teacher) -> dict:
    """Top-1/5 of student, EMA student and teacher on the validation shards, split by samples over the
    processes. The bare student runs, not its DDP wrapper, whose forward would be a collective: a process with
    fewer batches than another would then wait for ever."""
    if not cfg.data.val_shards:
        return {"student_top1": None, "student_ema_top1": None}
    student.eval()
    bare = accelerator.unwrap_model(student)
    share_buffers(accelerator, bare, ema.module)
    models = {"student": lambda x: bare(student_input(x)), "student_ema": lambda x: ema.module(student_input(x))}
    if teacher is not None:
        models["teacher"] = teacher
    loader = build_eval_loader(
        cfg.data.val_shards, cfg.data.root, cfg.data.img_size, cfg.data.val_crop_pct, cfg.data.val_batch_size,
        cfg.data.num_workers, accelerator.process_index, accelerator.num_processes,
    )
    return evaluate_topk(models, loader, accelerator, total_images=loader.dataset.share_size)


if __name__ == "__main__":
    main()
