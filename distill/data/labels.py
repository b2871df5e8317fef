"""Which parts of a pretraining run read class labels, and the check, before any work, that their sources have
them. A teacher's soft labels and feature maps need none; a label term (`loss.ce_weight`), the labels-only
baseline and a teacher fitted on labels first (`teacher.fit_steps`) do. Samples of a source declared
`labelled: false` carry label -1, which a cross-entropy would take for an index."""
from __future__ import annotations

from distill.errors import ConfigError


def label_uses(cfg) -> list[str]:
    """The keys of `cfg` that make the run read labels from its training mix, with their values."""
    uses = []
    if cfg.loss.ce_weight:
        uses.append(f"loss.ce_weight={cfg.loss.ce_weight}")
    if cfg.baseline == "labels":
        uses.append("baseline=labels")
    return uses


def fits_teacher_on_labels(cfg) -> bool:
    t = cfg.teacher
    return t.mode == "online" and not t.checkpoint and not t.pretrained and t.fit_steps > 0


def check_labels(cfg, mix, fit_mix=None) -> None:
    """ConfigError, in one line naming the source, when a part of the run that reads labels would read those of
    an unlabelled source. `fit_mix` is the mix a teacher is fitted on (default: the run's own)."""
    unlabelled = mix.unlabelled_sources
    uses = label_uses(cfg)
    if unlabelled and uses:
        raise ConfigError(
            f"{' and '.join(uses)} trains on class labels, but source {unlabelled[0]!r} of data mix {mix.path} is "
            f"declared unlabelled (labelled: false); set loss.ce_weight=0 / no baseline, or use labelled sources"
        )
    fit_mix = fit_mix or mix
    if fits_teacher_on_labels(cfg) and fit_mix.unlabelled_sources:
        raise ConfigError(
            f"teacher.fit_steps={cfg.teacher.fit_steps} fits the teacher on class labels, but source "
            f"{fit_mix.unlabelled_sources[0]!r} of data mix {fit_mix.path} is declared unlabelled (labelled: false); "
            f"give the teacher weights or a labelled teacher.fit_mix"
        )
