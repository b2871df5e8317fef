"""Classification shards: webdataset tar files plus a `manifest.json` that says what is in them.

A sample is `__key__`, `jpg` (JPEG bytes, RGB) and `cls` (the class index as ASCII); stored views with
offline teacher labels add `soft.npy` (the teacher's top-k classes and probabilities). The manifest next
to the shards records sample and per-class counts, so sizes are known without reading the tars:

    {"num_samples": N, "num_classes": C, "class_counts": {"0": n0, ...},
     "shards": [{"name": "shard-000000.tar", "num_samples": n}, ...], ...extra fields}
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import cv2
import numpy as np
import webdataset as wds
from braceexpand import UnbalancedBracesError, braceexpand
from webdataset.tariterators import tarfile_samples

from distill.errors import ConfigError

from distill.data.decode import DecodeError, decode_rgb

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SOFT_LABELS = "soft.npy"  # offline teacher labels: one record, see distill.data.soft_labels
UNLABELLED = -1  # the label of a sample from a source declared without classes (`labelled: false` in a mix)


class CorruptSampleError(ValueError):
    """A sample whose image or label cannot be decoded; the message names its key and shard."""


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    """HWC uint8 RGB -> JPEG bytes."""
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(image[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError(f"could not JPEG-encode an image of shape {image.shape}")
    return buf.tobytes()


def write_shards(
    samples: Iterable[tuple[str, Union[np.ndarray, bytes], int]],
    out_dir: Union[str, Path],
    prefix: str = "shard",
    maxcount: int = 1000,
    quality: int = 95,
    extra_manifest: Optional[dict[str, Any]] = None,
    mtime: Optional[float] = None,
) -> list[Path]:
    """Write (key, image, label) samples to `out_dir/{prefix}-%06d.tar` and a manifest next to them.

    `image` is an HWC uint8 RGB array (JPEG-encoded here) or already-encoded JPEG bytes (stored as is).
    `extra_manifest` adds fields to the manifest (e.g. class names, generator parameters). A fixed `mtime`
    for the tar entries makes the shards byte-identical across runs (default: the current second; a
    fractional time would cost every tar member an extra 1 KB header).
    Returns the shard paths in order.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pattern = str(out_dir / f"{prefix}-%06d.tar")
    per_shard: dict[str, int] = {}  # shard path -> samples, in writing order
    class_counts: Counter = Counter()
    mtime = int(time.time()) if mtime is None else mtime
    with wds.ShardWriter(pattern, maxcount=maxcount, verbose=0, mtime=mtime) as sink:
        first = sink.fname  # opened eagerly; removed below if nothing is written
        for key, image, label in samples:
            data = image if isinstance(image, (bytes, bytearray)) else encode_jpeg(image, quality)
            sink.write({"__key__": str(key), "jpg": bytes(data), "cls": str(int(label)).encode()})
            per_shard[sink.fname] = per_shard.get(sink.fname, 0) + 1
            if int(label) != UNLABELLED:
                class_counts[int(label)] += 1
    if not per_shard:
        Path(first).unlink(missing_ok=True)
    shards = [Path(p) for p in per_shard]
    labels = list(class_counts)
    manifest = {
        "num_samples": int(sum(per_shard.values())),
        "num_classes": (max(labels) + 1) if labels else 0,
        "class_counts": {str(c): int(n) for c, n in sorted(class_counts.items())},
        "shards": [{"name": p.name, "num_samples": n} for p, n in zip(shards, per_shard.values())],
    }
    manifest.update(extra_manifest or {})
    tmp = out_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out_dir / MANIFEST)
    return shards


# --------------------------------------------------------------------------------------------------
# Finding shards
# --------------------------------------------------------------------------------------------------


def expand_shards(spec: Union[str, Sequence[str]], root: Union[str, Path]) -> list[str]:
    """Shard paths for a spec: brace patterns (`train-{000000..000127}.tar`), folders (every *.tar in
    them, sorted) or lists of either; relative entries resolve against `root`. Every path must exist."""
    root = Path(root)
    entries = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    paths: list[str] = []
    for entry in entries:
        try:
            items = list(braceexpand(str(entry)))
        except UnbalancedBracesError:
            raise ConfigError(f"shard spec {entry!r}: unbalanced braces (a range is written {{000000..000127}})") from None
        for item in items:
            path = Path(item) if os.path.isabs(item) else root / item
            if path.is_dir():
                found = sorted(str(p) for p in path.glob("*.tar"))
                if not found:
                    raise FileNotFoundError(f"shard spec {spec!r}: folder {path} holds no *.tar files")
                paths.extend(found)
            else:
                paths.append(str(path))
    if not paths:
        raise FileNotFoundError(f"shard spec {spec!r} (root {root}) names no shards")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"shard spec {spec!r} (root {root}): {len(missing)} of {len(paths)} shards missing, "
            f"first: {missing[:3]}"
        )
    return paths


def read_manifest(folder_or_shard_paths: Union[str, Path, Sequence[Union[str, Path]]]) -> Optional[dict]:
    """The manifest of a shard folder, or the combined counts of the listed shards from the manifests
    in their folders. None when some shard is not in a manifest (its size is then unknown)."""
    if isinstance(folder_or_shard_paths, (str, os.PathLike)) and Path(folder_or_shard_paths).is_dir():
        path = Path(folder_or_shard_paths) / MANIFEST
        return json.loads(path.read_text()) if path.is_file() else None
    single = isinstance(folder_or_shard_paths, (str, os.PathLike))
    shard_paths = [folder_or_shard_paths] if single else folder_or_shard_paths
    by_folder: dict[Path, dict] = {}
    total, shards = 0, []
    for shard in map(Path, shard_paths):
        folder = shard.parent
        if folder not in by_folder:
            path = folder / MANIFEST
            if not path.is_file():
                return None
            manifest = json.loads(path.read_text())
            by_folder[folder] = {s["name"]: s["num_samples"] for s in manifest.get("shards", [])}
        count = by_folder[folder].get(shard.name)
        if count is None:
            return None
        total += count
        shards.append({"name": str(shard), "num_samples": count})
    return {"num_samples": total, "shards": shards}


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


class SkipCounter:
    """An error handler for `iter_shard` and decoding: counts corrupt samples and unreadable shards, warns
    about the first few, and lets reading go on."""

    def __init__(self, max_warnings: int = 5):
        self.count = 0
        self.warned = 0
        self.max_warnings = max_warnings

    def __call__(self, exc: Exception) -> bool:  # a webdataset error handler: go on
        self.count += 1
        if self.warned < self.max_warnings:
            self.warned += 1
            more = " (further ones are counted, not logged)" if self.warned == self.max_warnings else ""
            logger.warning("skipping unreadable data: %s%s", exc, more)
        return True


# A tar header is 512 bytes; member data follows, padded to 512. The plain ustar layout is parsed here, which
# is ten times faster than `tarfile` and lets a reader seek to the n-th sample of a shard; archives with
# extended (pax / GNU long-name) headers go through `tarfile` instead.
_BLOCK = 512
_PLAIN_TYPES = (b"0", b"\0", b"")
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's split: the key ends at the basename's first dot


def _plain_members(f, offset: int = 0) -> Iterator[tuple[int, str, int, int]]:
    """(header offset, name, data offset, data size) of the regular files of an open tar, from `offset` on.
    Raises _NotPlain at a header this parser does not handle, OSError / ValueError on a damaged archive."""
    while True:
        f.seek(offset)
        header = f.read(_BLOCK)
        if len(header) < _BLOCK:
            if header:
                raise OSError(f"truncated tar header at byte {offset}")
            return
        if header.count(0) == _BLOCK:
            return
        kind = header[156:157]
        size_field = header[124:136]
        if size_field[:1] == b"\x80":  # base-256 size (members over 8 GB)
            size = int.from_bytes(size_field[1:], "big")
        else:
            size = int(size_field.rstrip(b"\0 ") or b"0", 8)
        if kind not in _PLAIN_TYPES and kind != b"5":
            raise _NotPlain(kind)
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
        if prefix:
            name = prefix.decode("utf-8", "surrogateescape") + "/" + name
        data = offset + _BLOCK
        if kind != b"5":
            yield offset, name, data, size
        offset = data + (size + _BLOCK - 1) // _BLOCK * _BLOCK


class _NotPlain(Exception):
    pass


def _members(f, path: str, offset: int = 0) -> Iterator[tuple[int, str, int, int]]:
    try:
        yield from _plain_members(f, offset)
    except _NotPlain:
        import tarfile

        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if m.isfile() and m.offset >= offset:
                    yield m.offset, m.name, m.offset_data, m.size


def _split_name(name: str) -> Optional[tuple[str, str]]:
    match = _KEY_EXT.match(name)
    return (match.group(1), match.group(2).lower()) if match else None


def sample_offsets(path: str) -> np.ndarray:
    """Byte offsets of the first header of each sample of a shard, in order (a sample: consecutive members
    that share a key). A damaged shard gives the samples before the damage."""
    starts, last = [], None
    try:
        with open(path, "rb") as f:
            for header, name, _, _ in _members(f, path):
                parts = _split_name(name)
                if parts and parts[0] != last:
                    starts.append(header)
                    last = parts[0]
    except (OSError, ValueError, EOFError) as exc:
        logger.warning("shard %s: readable up to sample %d (%s)", path, len(starts), exc)
    return np.asarray(starts, dtype=np.int64)


def read_samples(path: str, offset: int, count: int) -> Iterator[dict]:
    """Up to `count` raw samples (`__key__`, `__url__`, one bytes entry per extension) of a shard, from the
    sample whose first header is at byte `offset`. Stops early, raising OSError, where the file is damaged."""
    with open(path, "rb") as f:
        sample: dict = {}
        for _, name, data, size in _members(f, path, offset):
            parts = _split_name(name)
            if parts is None:
                continue
            key, ext = parts
            if sample and sample["__key__"] != key:
                yield sample
                count -= 1
                sample = {}
            if count <= 0:
                return
            if not sample:
                sample = {"__key__": key, "__url__": path}
            f.seek(data)
            sample[ext] = f.read(size)
            if len(sample[ext]) != size:
                raise OSError(f"{path}: member {name} is cut short")
        if sample and count > 0:
            yield sample


def shard_sizes(paths: Sequence[str]) -> list[int]:
    """Samples per shard: from the manifests beside them, else by reading the shard's headers (slower)."""
    manifest = read_manifest(list(paths))
    if manifest is not None:
        return [int(s["num_samples"]) for s in manifest["shards"]]
    sizes = []
    for path in paths:
        counts = read_manifest([path])
        sizes.append(int(counts["num_samples"]) if counts else len(sample_offsets(path)))
    return sizes


def iter_shard(url: str, on_error: Callable[[Exception], bool]) -> Iterator[dict]:
    """Raw samples (dicts of bytes) of one shard. A missing or truncated shard and broken tar members go to
    `on_error` (return True to go on) instead of raising, so one bad file never ends a long run."""
    return tarfile_samples([{"url": url}], handler=on_error)


def sample_image(sample: dict, labelled: bool = True) -> tuple[bytes, int]:
    """A raw sample -> (encoded image bytes, class index). Raises CorruptSampleError naming the sample.
    From an unlabelled source every label is UNLABELLED, whether or not the sample has a `cls` entry: the
    source was declared to carry no classes, so none is read."""
    data = sample.get("jpg", sample.get("jpeg", sample.get("png")))
    if data is None:
        entries = sorted(k for k in sample if not k.startswith("__"))
        raise CorruptSampleError(f"{_where(sample)}: no jpg/png entry (has {entries})")
    if not labelled:
        return data, UNLABELLED
    try:
        label = int(sample["cls"])
    except (KeyError, ValueError) as exc:
        raise CorruptSampleError(f"{_where(sample)}: missing or non-integer 'cls' ({exc!r})") from None
    return data, label


def decode_sample(sample: dict, labelled: bool = True) -> tuple[np.ndarray, int]:
    """A raw sample -> (HWC uint8 RGB image, class index). Raises CorruptSampleError naming the sample."""
    data, label = sample_image(sample, labelled)
    try:
        return decode_rgb(data), label
    except DecodeError as exc:
        raise CorruptSampleError(f"{_where(sample)}: {exc}") from None


def decode_augmented(sample: dict, augment: Callable[[bytes], np.ndarray], labelled: bool = True
                     ) -> tuple[np.ndarray, int]:
    """A raw sample -> (augmented CHW uint8 image, class index), letting `augment` (a
    `distill.data.augment.Augment`) decode only what its crop needs. Same output as
    `augment(decode_sample(sample)[0])` except where the crop allowed a reduced-scale decode.
    Raises CorruptSampleError naming the sample."""
    data, label = sample_image(sample, labelled)
    try:
        return augment(data), label
    except DecodeError as exc:
        raise CorruptSampleError(f"{_where(sample)}: {exc}") from None


def _where(sample: dict) -> str:
    return f"sample {sample.get('__key__')!r} in {sample.get('__url__', '?')}"


def decode_soft_labels(sample: dict) -> dict:
    """A sample's stored teacher label -> {"soft_idx" int64 (k,), "soft_prob" float32 (k,), "partner_label",
    "lam"} (see `distill.data.soft_labels`)."""
    from distill.data.soft_labels import decode_record

    where = _where(sample)
    data = sample.get(SOFT_LABELS)
    if data is None:
        raise CorruptSampleError(f"{where}: no {SOFT_LABELS} entry (offline teacher labels)")
    try:
        return decode_record(data, int(sample.get("cls", b"-1")))
    except (ValueError, KeyError, OSError) as exc:
        raise CorruptSampleError(f"{where}: unreadable {SOFT_LABELS} ({exc})") from None
