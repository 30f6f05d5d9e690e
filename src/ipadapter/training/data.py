"""Training data: the official JSON list, JSON Lines, a folder with .txt captions, or WebDataset tar shards.

Every source yields `Record`s; `TrainDataset` turns one into tensors (target pixels, CLIP pixels, token ids).
Unreadable or missing images become `None` and are skipped and counted by `collate`, so a long run never dies on one
bad file.
"""

from __future__ import annotations

import io
import json
import logging
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class Record:
    """One training example before decoding."""

    key: str  # stable identifier (relative path or WebDataset key)
    text: str  # caption ("" if none)
    image_path: str = ""  # file to read, or
    image_bytes: bytes = b""  # encoded image bytes (WebDataset)
    face_id_path: str = ""  # FaceID: file with a precomputed 512-d face embedding (.safetensors, .npy or .pt)


def expand_braces(pattern: str) -> list[str]:
    """'shard-{000..002}.tar' -> ['shard-000.tar', 'shard-001.tar', 'shard-002.tar'] (WebDataset notation)."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
    return [s for i in range(lo, hi + 1) for s in expand_braces(pattern[: m.start()] + str(i).zfill(width) + pattern[m.end():])]


def is_webdataset(data: str) -> bool:
    return data.endswith(".tar") or "{" in data and ".tar" in data or Path(data).is_dir() and any(Path(data).glob("*.tar"))


def tinyworld_records(spec: str) -> list[Record]:
    """'tinyworld:N[:SEED]' -> N rendered tiny-world images (64 px, PNG in memory) with random-subset captions."""
    from ..tinyworld.world import make_dataset

    parts = spec.split(":")
    try:
        n, seed = int(parts[1]), int(parts[2]) if len(parts) > 2 else 0
    except (IndexError, ValueError) as e:
        raise ValueError(f"expected tinyworld:N[:SEED] (e.g. tinyworld:20000:0), found {spec!r}") from e
    records = []
    for i, sample in enumerate(make_dataset(n, seed=seed)):
        buffer = io.BytesIO()
        sample.image.save(buffer, format="PNG")
        records.append(Record(key=f"tinyworld-{seed}-{i}", text=sample.caption, image_bytes=buffer.getvalue()))
    return records


def read_records(data: str, image_root: str = "") -> list[Record]:
    """Records of a finite source: JSON list, JSON Lines, a folder of images with same-named .txt captions, or
    `tinyworld:N[:SEED]` (rendered on the fly)."""
    if data.startswith("tinyworld:"):
        return tinyworld_records(data)
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"training data not found: {path} (expected a .json/.jsonl file or a folder of images)")
    root = Path(image_root) if image_root else path.parent
    if path.is_dir():
        images = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise ValueError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        records = []
        for image in images:
            caption = image.with_suffix(".txt")
            text = caption.read_text(encoding="utf-8").strip() if caption.is_file() else ""
            records.append(Record(key=str(image.relative_to(path)), text=text, image_path=str(image)))
        return records
    if path.suffix == ".jsonl":
        items = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}, line {number}: not a JSON object ({error.msg}): {line!r:.80}") from error
    elif path.suffix == ".json":
        try:
            items = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})") from error
        if not isinstance(items, list):
            raise ValueError(f"{path}: expected a JSON list of {{'image_file': ..., 'text': ...}}, found {type(items).__name__}")
    else:
        raise ValueError(f"unsupported training data {path}: expected .json, .jsonl, a folder, or .tar shards")
    records = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "image_file" not in item:
            raise ValueError(f"{path}: item {i} must be an object with 'image_file' (and 'text'), found {item!r:.80}")
        face = item.get("id_embed_file", "")
        records.append(
            Record(
                key=str(item["image_file"]),
                text=str(item.get("text", "")),
                image_path=str(root / item["image_file"]),
                face_id_path=str(root / face) if face else "",
            )
        )
    return records


def iter_webdataset(data: str) -> Iterator[Record]:
    """Streams records from WebDataset shards: members grouped by key, image from jpg/png/webp, text from txt/json.

    A shard that cannot be read (corrupt, or truncated part-way) is left with a warning after the records read from
    it so far, so one bad file does not end a long streaming run; a missing shard is an error (a wrong pattern)."""
    shards = sorted(str(p) for p in Path(data).glob("*.tar")) if Path(data).is_dir() else expand_braces(data)
    for shard in shards:
        if not Path(shard).is_file():
            raise FileNotFoundError(f"WebDataset shard not found: {shard}")
        group: dict[str, bytes] = {}
        current = None
        try:
            with tarfile.open(shard) as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, _, ext = member.name.partition(".")
                    if key != current and current is not None:
                        if record := _record_from_group(current, group):
                            yield record
                        group = {}
                    current = key
                    data_bytes = tar.extractfile(member)
                    group[ext.lower()] = data_bytes.read() if data_bytes else b""
        except (tarfile.TarError, OSError, EOFError) as error:
            logger.warning("skipping the rest of unreadable WebDataset shard %s: %s", shard, str(error).splitlines()[0])
            group, current = {}, None  # the group being read may be cut short
        if current is not None and (record := _record_from_group(current, group)):
            yield record


def _record_from_group(key: str, group: dict[str, bytes]) -> Record | None:
    image = next((group[e] for e in ("jpg", "jpeg", "png", "webp") if e in group), None)
    if image is None:
        return None
    text = ""
    if "txt" in group:
        text = group["txt"].decode("utf-8", "replace").strip()
    elif "json" in group:
        text = str(json.loads(group["json"]).get("text", ""))
    return Record(key=key, text=text, image_bytes=image)


def open_image(record: Record) -> Image.Image | None:
    """The record's image as RGB, or None if it is missing or unreadable."""
    try:
        source = io.BytesIO(record.image_bytes) if record.image_bytes else record.image_path
        with Image.open(source) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError):
        return None


def resize_center_crop(image: Image.Image, size: int) -> tuple[Image.Image, tuple[int, int]]:
    """Short side -> size (bilinear, as the official trainer), centre crop; returns the crop and its top-left."""
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), Image.BILINEAR)
    top, left = (nh - size) // 2, (nw - size) // 2
    return image.crop((left, top, left + size, top + size)), (top, left)


def load_face_id(path: str) -> torch.Tensor:
    """A precomputed face embedding (512-d) from .safetensors, .npy or a tensor .pt/.bin (weights_only)."""
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(p))
        return next(iter(tensors.values())).float().flatten()
    if p.suffix == ".npy":
        return torch.from_numpy(np.load(p, allow_pickle=False)).float().flatten()
    return torch.as_tensor(torch.load(p, map_location="cpu", weights_only=True)).float().flatten()


class TrainDataset(Dataset):
    """Decodes records into model inputs; returns None for unreadable images."""

    def __init__(self, records: list[Record], resolution: int, clip_processor=None, tokenize: Callable | None = None):
        self.records = records
        self.resolution = resolution
        self.clip_processor = clip_processor
        self.tokenize = tokenize

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict | None:
        return encode_record(self.records[index], index, self.resolution, self.clip_processor, self.tokenize)


class StreamingDataset(IterableDataset):
    """WebDataset shards, streamed; `skip` resumes after that many records."""

    def __init__(self, data: str, resolution: int, clip_processor=None, tokenize: Callable | None = None, skip: int = 0):
        self.data, self.resolution, self.clip_processor, self.tokenize, self.skip = data, resolution, clip_processor, tokenize, skip

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        for i, record in enumerate(iter_webdataset(self.data)):
            if i < self.skip or (info is not None and i % info.num_workers != info.id):
                continue
            yield encode_record(record, i, self.resolution, self.clip_processor, self.tokenize)


def encode_record(record: Record, index: int, resolution: int, clip_processor, tokenize) -> dict | None:
    image = open_image(record)
    if image is None:
        return {"skipped": record.key}
    original = (image.height, image.width)
    crop, top_left = resize_center_crop(image, resolution)
    pixels = torch.from_numpy(np.asarray(crop, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1  # (3, S, S)
    item = {
        "index": index,
        "pixels": pixels,
        "original_size": torch.tensor(original),
        "crop_top_left": torch.tensor(top_left),
        "text": record.text,
    }
    if clip_processor is not None:
        item["clip_pixels"] = clip_processor(images=image, return_tensors="pt").pixel_values[0]  # (3, 224, 224)
    if tokenize is not None:
        item["input_ids"] = tokenize(record.text)
    if record.face_id_path:
        try:
            item["face_id"] = load_face_id(record.face_id_path)
        except (OSError, ValueError, RuntimeError):
            return {"skipped": record.key}
    return item


def collate(items: list[dict | None]) -> dict:
    """Stacks the good items; counts the skipped ones in `batch['skipped']`."""
    good = [i for i in items if i is not None and "skipped" not in i]
    batch: dict = {"skipped": len(items) - len(good)}
    if not good:
        return batch
    for key in good[0]:
        values = [g[key] for g in good]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], int):
            batch[key] = torch.tensor(values)
        elif isinstance(values[0], tuple):  # several tokenizers (SDXL)
            batch[key] = tuple(torch.stack(v) for v in zip(*values))
        else:
            batch[key] = values
    return batch
