"""torchvision students (ShuffleNetV2): a plain state dict torchvision's own constructor loads strictly.

    model = torchvision.models.shufflenet_v2_x1_0(num_classes=N)
    model.load_state_dict(torch.load("<folder>/model.pth"), strict=True)

The same tensors go to `model.safetensors`, the form `distill.models` and the detector read from a folder.
"""
from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from distill.engine.checkpoint import atomic_save
from distill.export.card import backbone_card, write_card
from distill.export.source import StudentRun
from distill.models.factory import split_name

STATE_FILE = "model.pth"


def export_torchvision(run: StudentRun, out: Path) -> Path:
    source, arch = split_name(run.name)
    if source != "torchvision":
        raise ValueError(f"{run.name} is not a torchvision model; export it with --to timm")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in run.model.state_dict().items()}
    atomic_save(state, out / STATE_FILE)
    save_file(state, str(out / "model.safetensors"))
    card = backbone_card(run, "torchvision")
    card["torchvision"] = {"builder": f"torchvision.models.{arch}", "kwargs": {"num_classes": run.num_classes}}
    write_card(out, card)
    return out

