"""The detection data layouts `data.format` names (read by `distill.data.det_layouts`), without the readers:
the recipe's schema checks against them without loading torch."""
from __future__ import annotations

FORMATS = ("auto", "coco", "yolo", "roboflow", "cvat", "labelstudio")
