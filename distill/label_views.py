"""Offline teacher labels: for every source of a data mix, R augmented views of every image (the source's
augmentation, mixup included), stored as JPEG, each with the teacher's distribution on the decoded JPEG,
i.e. on exactly the pixels the student will read: all of it in float16 (`view.targets=full`, the paper's) or
its top k (`view.targets=topk`), with the mixup partner's class and weight.

    accelerate launch distill/label_views.py recipe=label_demo [key=value ...]
    python distill/label_views.py recipe=label_mnv4 dry_run=64        # views, bytes and teacher PFLOPs first

Writes <output_dir>/<source>/<source>-r<replica>-<shard>.tar (+ manifest.json per source) and
<output_dir>/mix.yaml, the same mix over the views with `flip` as the only augmentation; train on it with
`distill/pretrain.py teacher.mode=offline data.mix=<that mix>`. Resumable: finished units (source, shard,
replica) are recorded and not labelled again; raising the replica count later adds only the new replicas.

Views are stored encoded rather than as replay parameters: see `distill.passes.view_cost` and
`scripts/bench_offline.py` for the measured trade-off.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

if __name__ == "__main__":  # --help and argument mistakes are answered before the imports below
    from distill.cli import check_arguments

    check_arguments("distill.label_views")

from accelerate.utils import gather_object
from omegaconf import OmegaConf

from distill.cli import command
from distill.config import ConfigError, save_config
from distill.data.mix import DataMix
from distill.data.synthetic import ensure_demo_dataset
from distill.engine.checkpoint import atomic_write_text
from distill.engine.distributed import start_processes
from distill.engine.logging import make_accelerator
from distill.engine.preemption import STOP, Preempted, stop_agreed
from distill.engine.progress import banner, describe_mix
from distill.engine.threads import set_threads
from distill.plan import print_plan
from distill.passes.fingerprint import fingerprint
from distill.passes.frozen import build_frozen
from distill.passes.labelling import label_units
from distill.passes.offline_mix import offline_mix, write_mix, write_source_manifests
from distill.passes.plan import describe_labelling, plan_labelling
from distill.passes.recipe import load_label_config
from distill.passes.units import rank_share
from distill.passes.view_writer import LabelRecords
from distill.passes.views import ViewRender, ViewUnit

logger = logging.getLogger("distill")


def plan_units(mix: DataMix, sources: list[str], replicas: dict[str, int]) -> list[ViewUnit]:
    """Replica-major: every image gets its first view before any gets its second."""
    units = []
    for r in range(max(replicas.values())):
        for source in sources:
            if r < replicas[source]:
                for i, shard in enumerate(mix.shard_paths(source)):
                    units.append(ViewUnit(len(units), source, shard, i, r))
    return units


@command("distill.label_views")
def main(argv=None, teacher=None) -> dict:
    """`teacher` replaces the configured model (any callable from a [0, 1] batch to logits)."""
    cfg = load_label_config(sys.argv[1:] if argv is None else argv)
    if cfg.dry_run is not None:  # the plan only: no accelerator, no data read or generated
        plan = plan_labelling(cfg, cfg.dry_run)
        return print_plan(plan, describe_labelling(plan))
    out = Path(cfg.output_dir)
    start_processes(cfg.cluster.timeout_s)
    set_threads(cfg.num_workers)  # after Accelerate's process state, which may set its own
    STOP.install(cfg.cluster.stop_signals)
    accelerator = make_accelerator(cfg.precision, 1, out, trackers=[])
    rank, world = accelerator.process_index, accelerator.num_processes
    if accelerator.is_main_process and cfg.generate == "demo":
        ensure_demo_dataset(Path(cfg.data_root) / "demo")
    accelerator.wait_for_everyone()

    mix = DataMix.load(cfg.mix, cfg.data_root)
    sources = list(cfg.sources) or mix.source_names
    unknown = sorted(set(sources) - set(mix.source_names)) + sorted(set(cfg.view.replicas_per_source) - set(sources))
    if unknown:
        raise ConfigError(f"sources {unknown} are not in mix {cfg.mix} (its sources: {mix.source_names})")
    replicas = {s: int(cfg.view.replicas_per_source.get(s, cfg.view.replicas)) for s in sources}
    settings = check_settings(cfg, mix, sources, out, accelerator)
    units = plan_units(mix, sources, replicas)

    if teacher is None:
        teacher = build_frozen(cfg.teacher, "teacher", accelerator, out, cfg.data_root, seed=cfg.seed)
    done = LabelRecords.finished(out)
    todo = rank_share([u for u in units if u.name not in done], rank, world)
    if done:
        logger.info("resuming: %d of %d units already labelled", sum(u.name in done for u in units), len(units))
    banner(accelerator, cfg.recipe, out, batch_size=cfg.batch_size, models={f"teacher {cfg.teacher.name}": teacher},
           details={"mix": describe_mix(mix), "views": f"{len(units)} units ({len(todo)} on this process), replicas "
                    f"{replicas}, {cfg.view.img_size} px, JPEG quality {cfg.view.quality}, top-{cfg.view.topk}"})
    render = ViewRender({s.name: s.augment for s in mix.sources}, {s.name: s.mixup for s in mix.sources},
                        cfg.view.img_size, cfg.view.quality, cfg.batch_size, cfg.seed,
                        {s.name: s.labelled for s in mix.sources})
    work = label_units(todo, render, teacher, accelerator, out, LabelRecords(out, rank), cfg.view.topk,
                       cfg.teacher.num_classes, cfg.num_workers, cfg.view.meta, cfg.view.targets)
    work = gather_object([work])  # also waits for every process
    if stop_agreed(cfg.cluster.timeout_s):  # finished units are recorded: a resumed launch labels the rest
        raise Preempted(f"after {sum(w['views'] for w in work)} views ({out})", "finished units are kept: the same command continues")

    summary = {}
    if accelerator.is_main_process:
        planned = {u.name for u in units}  # a later run with fewer replicas leaves the extra ones out
        records = {name: r for name, r in LabelRecords.finished(out).items() if name in planned}
        missing = [u.name for u in units if u.name not in records]
        if missing:
            raise RuntimeError(f"{len(missing)} units were not labelled, first: {missing[:3]}")
        manifests = write_source_manifests(out, records, sources, cfg.teacher.num_classes,
                                           {"offline_labels": {**settings, "replicas": replicas}})
        write_mix(out / "mix.yaml", offline_mix(mix, sources, out, Path(cfg.data_root)))
        summary = {
            "sources": {s: {"views": m["num_samples"], "shards": len(m["shards"]), "replicas": replicas[s],
                            "bytes_per_view": round(m["bytes"] / max(m["num_samples"], 1), 1)}
                        for s, m in manifests.items()},
            "offline_mix": str(out / "mix.yaml"),
            "views_this_run": sum(w["views"] for w in work),
            "views_per_s": round(sum(w["views"] for w in work) / max(max(w["seconds"] for w in work), 1e-9), 2),
        }
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
        logger.info("labelled views: %s", json.dumps(summary["sources"]))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def check_settings(cfg, mix: DataMix, sources: list[str], out: Path, accelerator) -> dict:
    """Everything that decides a view and its label. A folder labelled with other settings is refused rather
    than mixed; the replica count may grow (new replicas are added)."""
    settings = {
        "teacher": OmegaConf.to_container(cfg.teacher),
        "view": {k: cfg.view[k] for k in ("img_size", "quality", "targets")}
                | ({"topk": cfg.view.topk} if cfg.view.targets == "topk" else {}),
        "seed": cfg.seed,
        "sources": {s.name: {"shards": s.shards, "augment": s.augment, "mixup": s.mixup}
                    for s in mix.sources if s.name in sources},
    }
    digest = fingerprint(**settings)
    path = out / ".progress" / "settings.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("fingerprint") != digest:
            raise ConfigError(f"{out} holds views labelled with other settings ({path}); use another output_dir "
                              f"or delete that folder")
    elif accelerator.is_main_process:
        atomic_write_text(path, json.dumps({"fingerprint": digest, **settings}, indent=2, default=str))
        save_config(cfg, out / "config.yaml")
    accelerator.wait_for_everyone()
    return {"fingerprint": digest, **settings}


if __name__ == "__main__":
    main()
