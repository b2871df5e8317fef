"""One data layout under data.root: the MobileNetV4 mixes, recipes, README and the conversion script agree."""
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def load(path: str) -> dict:
    return yaml.safe_load((ROOT / path).read_text())


def test_mixes_name_folders_that_the_writers_write():
    mnv4, offline = load("data_mixes/mnv4.yaml"), load("data_mixes/mnv4_offline.yaml")
    shards = {name: src["shards"] for name, src in mnv4["sources"].items()}
    assert shards == {"d1": "imagenet/train", "d2": "imagenet/train", "d3": load("recipes/curate_d3.yaml")["output_dir"]}
    assert load("recipes/mnv4_base.yaml")["data"]["val_shards"] == "imagenet/val"
    out = load("recipes/label_mnv4.yaml")["output_dir"]
    assert {n: s["shards"] for n, s in offline["sources"].items()} == {n: f"{out}/{n}" for n in shards}
    for text in (ROOT / "data_mixes").glob("*.yaml"):  # folders, not brace patterns tied to a shard count
        for src in yaml.safe_load(text.read_text())["sources"].values():
            assert not re.search(r"[{}]|\.tar$", src["shards"]), (text.name, src["shards"])


def test_readme_converts_into_the_folders_the_recipes_read():
    readme = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    root = load("recipes/mnv4_base.yaml")["data"]["root"]
    outs = re.findall(r"python scripts/folder_to_shards\.py /\S+ (/\S+)", readme)
    assert outs == [f"{root}/imagenet/train", f"{root}/imagenet/val"]
    assert set(re.findall(r"recipe=mnv4_\w+ .*?data\.root=([^\s`]+)", readme)) == {root}
    script = (ROOT / "scripts" / "folder_to_shards.py").read_text()
    assert re.findall(r"python scripts/folder_to_shards\.py \S+ (\S+)", script) == outs
