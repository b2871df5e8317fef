"""Wheels for a GPU machine that has PyTorch but no package index: the project's dependencies its image lacks.

    python scripts/gpu_wheels.py                 # download into wheels/ (ignored), check size and completeness
    python scripts/gpu_wheels.py --check-only    # check an existing folder

The GPU image (Python 3.12, manylinux x86_64) holds torch, torchvision, timm, accelerate, OpenCV, SciPy, NumPy
and the rest of IMAGE below, but not webdataset, albumentations, omegaconf, braceexpand, simplejpeg,
faster-coco-eval or torchdata. Each of those, and each of their own dependencies the image lacks, is fetched as
a binary wheel pinned to the version tested with this project (inside pyproject's ranges), without
dependencies, so nothing the image already holds (torch above all) travels. The folder also gets
`requirements.txt`, the project's top-level pins, which the GPU machine installs with

    python3 -m pip install --no-index --find-links wheels -r wheels/requirements.txt

Completeness is checked here by the same resolution against a stand-in for the image: a Python 3.12
environment whose only "installed" packages are IMAGE's names at IMAGE's versions (metadata alone). A plain
`pip install --target` dry run cannot stand in for the image: --target ignores what is installed, so it would
ask for torch, NumPy and OpenCV as wheels too.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Binary wheels only, for the image's interpreter and platform (pip matches each manylinux tag exactly)
TARGET = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
          "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
          "--platform", "manylinux_2_27_x86_64", "--platform", "manylinux_2_28_x86_64"]
LIMIT_MIB = 50  # a call carries 64 MiB in all, the checkout included

# The dependencies the image lacks, at the versions this project is tested with
WHEELS = {
    "webdataset": "1.0.2", "braceexpand": "0.1.7", "torchdata": "0.11.0", "omegaconf": "2.4.0",
    "simplejpeg": "1.9.0", "faster-coco-eval": "1.8.0",
    "albumentations": "2.0.8", "albucore": "0.0.24", "stringzilla": "5.3.2", "simsimd": "6.5.16",
    "pydantic": "2.13.4", "pydantic-core": "2.46.4", "annotated-types": "0.7.0", "typing-inspection": "0.4.2",
    # the image has it, maybe older than pydantic's floor (4.14.1): pip takes this one only if it must
    "typing-extensions": "4.16.0",
}
# What the image holds that the project or WHEELS need; the version the stand-in gives each (None: this
# machine's). Versions are the image's where known; typing-extensions at torch's own floor, the oldest the
# image can hold, so the check shows the carried wheel stepping in.
IMAGE = {
    "torch": "2.11.0", "torchvision": "0.26.0", "numpy": "2.5.2", "accelerate": "1.15.0", "safetensors": "0.8.0",
    "timm": None, "opencv-python-headless": None, "scipy": None, "pyyaml": None, "tensorboard": None,
    "tqdm": None, "pillow": None, "requests": None, "urllib3": None, "typing-extensions": "4.10.0",
}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements() -> list[str]:
    """pyproject's dependencies that travel as wheels, pinned: what the GPU machine installs."""
    import tomllib  # Python 3.11+, where this script runs

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = [canonical(re.match(r"[A-Za-z0-9_.-]+", d).group()) for d in deps]
    return [f"{n}=={WHEELS[n]}" for n in names if n in WHEELS]


def pip(*args: str) -> None:
    # --isolated: this machine's pip configuration (find-links, extra indexes) plays no part
    subprocess.run([sys.executable, "-m", "pip", "--isolated", "--disable-pip-version-check", *args], check=True)


def download(folder: Path) -> None:
    """WHEELS into `folder`, replacing what an earlier download left (two versions of one package would leave
    the choice to pip)."""
    folder.mkdir(exist_ok=True)
    for old in folder.glob("*.whl"):
        old.unlink()
    pip("download", "--quiet", "--no-deps", *TARGET, "--dest", str(folder),
        *(f"{n}=={v}" for n, v in WHEELS.items()))
    (folder / "requirements.txt").write_text("\n".join(requirements()) + "\n")


def check_size(folder: Path) -> None:
    mib = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
    print(f"{folder}: {len(list(folder.glob('*.whl')))} wheels, {mib:.1f} MiB")
    if mib > LIMIT_MIB:
        sys.exit(f"error: {folder} holds {mib:.1f} MiB, over the {LIMIT_MIB} MiB a GPU call can carry")


def stand_in(folder: Path, python: str) -> Path:
    """A Python 3.12 environment 'holding' IMAGE's packages: metadata only, enough for pip's resolver."""
    env = folder / "image"
    subprocess.run([python, "-m", "venv", "--without-pip", str(env)], check=True)
    site = Path(subprocess.run([str(env / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path("
                                "'purelib'))"], check=True, capture_output=True, text=True).stdout.strip())
    for name, version in IMAGE.items():
        version = version or importlib.metadata.version(name)
        info = site / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (info / "INSTALLER").write_text("stand-in\n")
    return env


def check_complete(folder: Path, python: str) -> None:
    """The GPU machine's install, resolved here against the stand-in: fails if a wheel is missing."""
    with tempfile.TemporaryDirectory() as tmp:
        env = stand_in(Path(tmp), python)
        # the stand-in is a Python 3.12 on x86-64 Linux: pip takes the wheel tags from it
        pip("--python", str(env / "bin" / "python"), "install", "--dry-run", "--no-index", "--only-binary=:all:",
            "--find-links", str(folder), "-r", str(folder / "requirements.txt"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", type=Path, default=ROOT / "wheels")
    ap.add_argument("--python", default="python3.12", help="a Python 3.12 here, for the completeness check")
    ap.add_argument("--check-only", action="store_true")
    args = ap.parse_args(argv)
    if shutil.which(args.python) is None or subprocess.run(
            [args.python, "-c", "import sys; assert sys.version_info[:2] == (3, 12)"], capture_output=True).returncode:
        sys.exit(f"error: {args.python} is no working Python 3.12 for the completeness check (--python names one)")
    if not args.check_only:
        download(args.folder)
    check_size(args.folder)
    try:
        check_complete(args.folder, args.python)
    except subprocess.CalledProcessError:
        sys.exit(f"error: the wheels in {args.folder} leave a requirement unmet on the image (pip says which above)")


if __name__ == "__main__":
    main()
