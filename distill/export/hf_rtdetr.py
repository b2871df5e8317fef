"""Hugging Face transformers' RT-DETR (v1 or v2) around the distilled timm backbone, ready to fine-tune there:

    model = RTDetrForObjectDetection.from_pretrained("<folder>")     # or RTDetrV2ForObjectDetection
    processor = RTDetrImageProcessor.from_pretrained("<folder>")

The backbone is transformers' `TimmBackbone` (timm's `features_only` model at strides 8/16/32) holding the
student's weights; the encoder and decoder are freshly initialised. Two settings matter:
- `freeze_backbone_batch_norms=False`: transformers' freezing swaps every `BatchNorm2d` for a plain frozen
  batch norm, and timm's fused norm + activation layers (MobileNetV4, EfficientNet) are `BatchNorm2d`
  subclasses, so their activations silently disappear. To freeze, use timm's own freezing instead
  (`backbone_config.freeze_batch_norm_2d=True`), which keeps them.
- the image processor normalises with the student's mean/std (transformers' RT-DETR default feeds [0, 1]
  pixels unnormalised, as the ResNet backbones of the original checkpoints expect).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from timm.utils.model import freeze_batch_norm_2d
from torch import nn

from distill.engine.checkpoint import load_state_strict
from distill.export.card import backbone_card, feature_levels, write_card
from distill.export.source import StudentRun
from distill.export.timm_features import timm_features
from distill.models.factory import split_name

# transformers' defaults are RT-DETR-R50's; these make the v2-S neck and decoder this project's recipes use
SMALL_DETECTOR = {"hidden_expansion": 0.5, "decoder_layers": 3}


def _architectures() -> dict:
    import transformers as tf

    return {
        "rtdetr": (tf.RTDetrConfig, tf.RTDetrForObjectDetection),
        "rtdetr_v2": (tf.RTDetrV2Config, tf.RTDetrV2ForObjectDetection),
    }


def hf_detector_config(run: StudentRun, arch: str = "rtdetr", num_labels: int = 80, **overrides):
    """The transformers config for `arch` with the student as a timm backbone at strides 8/16/32."""
    from transformers import TimmBackboneConfig

    archs = _architectures()
    if arch not in archs:
        raise ValueError(f"arch={arch!r} is not one of {', '.join(archs)}")
    if split_name(run.name)[0] != "timm":
        raise ValueError(f"{run.name} is not a timm model; transformers' RT-DETR takes timm backbones only")
    levels = feature_levels(run)
    # use_pretrained_backbone=False: transformers 4.x would otherwise fetch timm's hub weights on every build
    backbone = TimmBackboneConfig(backbone=run.name, out_indices=levels.out_indices, features_only=True,
                                  use_pretrained_backbone=False)
    kwargs = {
        **SMALL_DETECTOR,
        "backbone_config": backbone,
        "freeze_backbone_batch_norms": False,
        "encoder_in_channels": levels.channels,
        "feat_strides": levels.strides,
        "num_labels": num_labels,
        **overrides,
    }
    return archs[arch][0](**kwargs)


def backbone_module(detector: nn.Module, like: nn.Module) -> tuple[str, nn.Module]:
    """The timm features model inside a transformers detector: the one submodule of `like`'s type."""
    found = [(name, m) for name, m in detector.named_modules() if type(m) is type(like)]
    if len(found) != 1:
        raise ValueError(f"expected one {type(like).__name__} inside {type(detector).__name__}, found {len(found)}")
    return found[0]


def export_hf_rtdetr(
    run: StudentRun,
    out: Path,
    arch: str = "rtdetr",
    num_labels: int = 80,
    det_size: int = 640,
    freeze_bn: bool = False,
    hf_overrides: Optional[dict] = None,
) -> Path:
    from transformers import RTDetrImageProcessor

    config = hf_detector_config(run, arch, num_labels, **(hf_overrides or {}))
    detector = _architectures()[arch][1](config)
    ours = timm_features(run, config.backbone_config.out_indices)
    prefix, target = backbone_module(detector, ours)
    load_state_strict(target, ours.state_dict(), source=f"{run.checkpoint} as {prefix}")
    if freeze_bn:  # after loading: frozen norms have no `num_batches_tracked`, and the saved layout must match
        freeze_batch_norm_2d(target)
        detector.config.backbone_config.freeze_batch_norm_2d = True
    detector.save_pretrained(str(out))

    card = backbone_card(run, f"hf-{arch}")
    card["hf"] = {"architecture": type(detector).__name__, "backbone_prefix": prefix + ".", "num_labels": num_labels}
    processor = RTDetrImageProcessor(do_normalize=True, image_mean=card["input"]["mean"],
                                     image_std=card["input"]["std"], size={"height": det_size, "width": det_size})
    processor.save_pretrained(str(out))
    write_card(out, card)
    return Path(out)
