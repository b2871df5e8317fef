"""Class-balanced extra data (the paper's D3): score an image pool with a small classifier, keep the images
whose top-class probability is above a threshold under that class, at most K per class, most confident
first, and fill short classes by repeating their images.

    accelerate launch distill/curate.py recipe=curate_d3 [key=value ...]

    python distill/curate.py recipe=curate_d3 dry_run=64          # images to score, scorer PFLOPs, output

Pass 1 scores every image (eval preprocessing) and keeps only per-class top-K references (confidence, unit,
position), never images; it checkpoints every `checkpoint_every` units and resumes where it stopped. Pass 2
re-reads the pool and writes the selection as `shard-%06d.tar` + `manifest.json` (a normal mix source), with
`report.csv`, `report.png` and `summary.json`; each process streams its share of the selection from disk
(`distill.passes.curation_writer`) and an interrupted pass 2 resumes after its last complete shard. Units are
split across processes; their top-Ks merge on the main process.
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

if __name__ == "__main__":  # --help and argument mistakes are answered before the imports below
    from distill.cli import check_arguments

    check_arguments("distill.curate")

from accelerate.utils import gather_object
from omegaconf import OmegaConf

from distill.cli import command
from distill.config import save_config
from distill.data.mix import DataMix
from distill.data.shards import read_manifest
from distill.data.synthetic import ensure_demo_dataset
from distill.engine.distributed import start_processes
from distill.engine.logging import make_accelerator
from distill.engine.preemption import STOP, Preempted, stop_agreed
from distill.engine.progress import banner
from distill.engine.threads import set_threads
from distill.plan import print_plan
from distill.passes import curation_state as state
from distill.passes.curation_report import write_report
from distill.passes.curation_writer import assemble, clear_output, plan_matches, write_fill, write_kept, write_plan
from distill.passes.fingerprint import fingerprint
from distill.passes.frozen import build_frozen, eval_geometry
from distill.passes.recipe import load_curate_config
from distill.passes.plan import describe_curation, plan_curation
from distill.passes.scoring import EvalRender, score_units
from distill.passes.selection import plan_selection
from distill.passes.units import pool_units, rank_share

logger = logging.getLogger("distill")

DEMO_POOL = dict(extra_per_class=150)  # the demo's pool: a skewed class mix plus object-free images


@command("distill.curate", requires={"matplotlib": ("plot", "the curation report (report.png)")})
def main(argv=None, scorer=None) -> dict:
    """`scorer` replaces the configured model (any callable from a [0, 1] batch to logits)."""
    cfg = load_curate_config(sys.argv[1:] if argv is None else argv)
    if cfg.dry_run is not None:  # the plan only: no accelerator, no data read or generated
        plan = plan_curation(cfg, cfg.dry_run)
        return print_plan(plan, describe_curation(plan))
    out = Path(cfg.output_dir)
    start_processes(cfg.cluster.timeout_s)
    set_threads(cfg.num_workers)  # after Accelerate's process state, which may set its own
    STOP.install(cfg.cluster.stop_signals)
    accelerator = make_accelerator(cfg.precision, 1, out, trackers=[])
    rank, world = accelerator.process_index, accelerator.num_processes
    if accelerator.is_main_process:
        if cfg.generate == "demo":
            ensure_demo_dataset(Path(cfg.data_root) / "demo")
            ensure_demo_dataset(Path(cfg.data_root) / "demo_pool", **DEMO_POOL)
        save_config(cfg, out / "config.yaml")
    accelerator.wait_for_everyone()

    # ---- pass 1: score ----------------------------------------------------------------------------
    units = pool_units(cfg.pool.shards, cfg.pool.folder, cfg.data_root, cfg.pool.folder_chunk)
    if scorer is None:
        scorer = build_frozen(cfg.scorer, "scorer", accelerator, out, cfg.data_root, seed=cfg.seed)
        img_size, crop_pct = eval_geometry(scorer, cfg.scorer.img_size, cfg.crop_pct)
    else:
        img_size, crop_pct = cfg.scorer.img_size or 224, cfg.crop_pct or 0.875
    scoring = scoring_fingerprint(cfg, units, img_size, crop_pct)
    progress, resumed = state.resume_or_start(out, rank, world, scoring,
                                              cfg.scorer.num_classes, cfg.select.per_class, cfg.select.hist_bins,
                                              cfg.select.threshold)
    banner(accelerator, cfg.recipe, out, batch_size=cfg.batch_size, models={f"scorer {cfg.scorer.name}": scorer},
           details={"pool": f"{len(units)} units of {cfg.pool.shards or cfg.pool.folder} under {cfg.data_root}",
                    "selection": f"top-class probability above {cfg.select.threshold}, at most "
                                 f"{cfg.select.per_class} per class, short classes: {cfg.select.fill}"})
    render = EvalRender(img_size, crop_pct, cfg.batch_size)
    scored = score_units(rank_share(units, rank, world), render, scorer, progress, accelerator,
                         state.progress_path(out, rank, world), cfg.checkpoint_every, cfg.num_workers)
    scored = sum(gather_object([scored]))
    if stop_agreed(cfg.cluster.timeout_s):  # scored units are saved: a resumed launch scores the rest
        raise Preempted(f"in the scoring pass, after {scored} images ({out})", "finished units are kept: the same command continues")

    # ---- merge and plan the writing (main), then pass 2: write --------------------------------------
    plan_dir = out / ".progress" / "write"
    if accelerator.is_main_process:
        top, stats, done = state.merged(state.load_all(out, world))
        if len(done) != len(units):
            raise RuntimeError(f"{len(units) - len(done)} of {len(units)} units were not scored")
        selection = plan_selection(top, cfg.select.fill, cfg.seed)
        digest = fingerprint(scoring=scoring, fill=cfg.select.fill, seed=cfg.seed, world=world,
                             maxcount=cfg.maxcount, quality=cfg.quality)
        if plan_matches(plan_dir, digest) and (out / ".parts").is_dir():
            logger.info("resuming the write pass after its complete shards")
        else:
            clear_output(out)
            write_plan(selection, world, plan_dir, digest)
    accelerator.wait_for_everyone()
    parts = out / ".parts"
    write_kept(plan_dir, units, rank, parts, cfg.maxcount, cfg.quality)
    if stop_agreed(cfg.cluster.timeout_s):  # complete shards are kept: a resumed launch writes the rest
        raise Preempted(f"in the write pass ({out})", "complete shards are kept: the same command continues")
    write_fill(plan_dir, rank, world, parts, cfg.maxcount)
    accelerator.wait_for_everyone()

    summary = {}
    if accelerator.is_main_process:
        names = class_names(cfg)
        manifest = assemble(out, world, selection, cfg.scorer.num_classes, {
            "classes": names, "curation": {"scorer": cfg.scorer.name, "threshold": cfg.select.threshold,
                                           "per_class": cfg.select.per_class, "fill": cfg.select.fill,
                                           "pool": cfg.pool.shards or cfg.pool.folder},
        })
        summary = write_report(out, stats, selection, cfg.select.threshold, names,
                               {"shards": len(manifest["shards"]), "resumed": resumed,
                                "scored_this_run": scored})
        (out / "pool_units.txt").write_text("".join(f"{u.index}\t{u.name}\n" for u in units))
        shutil.rmtree(plan_dir, ignore_errors=True)
        logger.info("curation: %s", json.dumps({k: summary[k] for k in ("scored", "candidates", "kept", "repeated", "written")}))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def scoring_fingerprint(cfg, units, img_size: int, crop_pct: float) -> str:
    """Everything that decides the scores and the top-K; saved progress must match it to be resumed."""
    scorer = OmegaConf.to_container(cfg.scorer)
    return fingerprint(
        units=[u.name for u in units], img_size=img_size, crop_pct=crop_pct, threshold=cfg.select.threshold,
        k=cfg.select.per_class, bins=cfg.select.hist_bins,
        scorer={k: scorer[k] for k in ("name", "pretrained", "checkpoint", "num_classes", "mean", "std")},
    )


def class_names(cfg) -> list[str] | None:
    """Names of the scorer's classes for the report: ImageNet's for a 1000-class hub model, else those in the
    manifest of the data it was fitted on (the demos), else none."""
    if cfg.scorer.pretrained and not cfg.scorer.checkpoint and cfg.scorer.num_classes == 1000:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(1000)]
    if cfg.scorer.fit_steps > 0:
        try:
            mix = DataMix.load(cfg.scorer.fit_mix, cfg.data_root)
            return (read_manifest(Path(mix.shard_paths(mix.source_names[0])[0]).parent) or {}).get("classes")
        except (ValueError, FileNotFoundError):
            return None
    return None


if __name__ == "__main__":
    main()
