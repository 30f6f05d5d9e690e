"""Training data: the official JSON list, JSON Lines, a folder with .txt captions, or WebDataset tar shards.

Every source yields `Record`s; `TrainDataset` turns one into tensors (target pixels, CLIP pixels, token ids).
A record that cannot be used (an unreadable, missing or oversized image, a malformed caption or face embedding) is
skipped and counted by `collate`, with a warning naming it, so a long run never dies on one bad file. What is wrong
with a whole finite dataset (a file that is not JSON, an item without 'image_file', a caption that is not UTF-8) is an
error up front instead, naming the file and the item.

WebDataset members are grouped by key as WebDataset does (`dir/000001.face.npy`: key `dir/000001`, extension
`face.npy`; a leading `./` is ignored). A record's members:
- image: `jpg`, `jpeg`, `png` or `webp` (required);
- caption: `txt` (UTF-8), else `json` with a "text" (or "caption") string; none gives "";
- face embedding (FaceID variants): `face.npy` (or `npy`), a float .npy array of shape (512,) or (1, 512) holding one
  ArcFace embedding, as the finite sources' 'id_embed_file'.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import pickle
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset

from ..images import to_8bit, upright

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
WEBDATASET_IMAGES = ("jpg", "jpeg", "png", "webp")  # image members, in order of preference
WEBDATASET_FACES = ("face.npy", "npy")  # face-embedding members, in order of preference
FACE_ID_DIM = 512  # ArcFace embedding width, what every FaceID variant reads (Variant.id_embed_dim)
MEMBER_NAME = re.compile(r"^((?:.*/|)[^.]+)\.([^/]*)$")  # WebDataset: (folder + basename up to its first dot, rest)
# what decoding a broken, truncated or oversized image can raise (PIL's decompression-bomb guard is no OSError)
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
WARN_SKIPS = 20  # skipped records named in a warning per process; later ones are only counted
_warned = 0


@dataclass
class Record:
    """One training example before decoding."""

    key: str  # stable identifier (relative path or WebDataset key)
    text: str  # caption ("" if none)
    image_path: str = ""  # file to read, or
    image_bytes: bytes = b""  # encoded image bytes (WebDataset)
    face_id_path: str = ""  # FaceID: file with a precomputed 512-d face embedding (.safetensors, .npy or .pt)
    face_id_bytes: bytes = b""  # or its .npy bytes (WebDataset; face_id_path then names it 'shard:key.face.npy')
    problem: str = ""  # why this record cannot be used (it is then skipped and counted); "" if none


def warn_skipped(reason: str) -> None:
    """Names a skipped record in a warning, the first `WARN_SKIPS` times in this process."""
    global _warned
    _warned += 1
    if _warned <= WARN_SKIPS:
        more = " (further skipped records are counted, not named)" if _warned == WARN_SKIPS else ""
        logger.warning("skipping a training record: %s%s", reason, more)


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


def read_utf8(path: Path) -> str:
    """The text of `path`; a file that is not UTF-8 is named, with the offending byte's position."""
    try:
        return path.read_text(encoding="utf-8-sig")  # (a byte-order mark, as some editors write, is not text)
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: expected UTF-8 text, found byte 0x{error.object[error.start]:02x} at offset "
                         f"{error.start} (re-save the file as UTF-8)") from error  # fmt: skip


def read_records(data: str, image_root: str = "", what: str = "training data", shards: bool = True) -> list[Record]:
    """Records of a finite source: JSON list, JSON Lines, a folder of images with same-named .txt captions, or
    `tinyworld:N[:SEED]` (rendered on the fly). `what` names the data in errors; `shards`: whether the caller reads
    WebDataset .tar shards (elsewhere), as the error for another kind of file says."""
    path = Path(data)
    if image_root and (data.startswith("tinyworld:") or path.is_dir()):
        raise ValueError(f"--image-root is the folder of a JSON / JSONL list's image_file paths; --data {data} is "
                         f"{'rendered' if data.startswith('tinyworld:') else 'a folder of images'} and has none")  # fmt: skip
    if data.startswith("tinyworld:"):
        return tinyworld_records(data)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path} (expected a .json/.jsonl file or a folder of images)")
    root = Path(image_root) if image_root else path.parent
    if path.is_dir():
        # os.walk(followlinks=True): Path.rglob (Python < 3.13) does not descend into linked folders, so a dataset
        # assembled from linked sub-folders lost them silently; `seen` stops at a link back to a folder already read
        images, seen = [], set()
        for folder, dirs, files in os.walk(path, followlinks=True):
            real = os.path.realpath(folder)
            if real in seen:
                dirs[:] = []
                continue
            seen.add(real)
            images += [Path(folder) / f for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES]
        images.sort()
        if not images:
            tars = not shards and any(path.glob("*.tar"))
            raise ValueError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)})"
                             + (": its .tar shards (WebDataset) are read by training only" if tars else ""))  # fmt: skip
        records = []
        for image in images:
            caption = image.with_suffix(".txt")
            text = read_utf8(caption).strip() if caption.is_file() else ""
            records.append(Record(key=str(image.relative_to(path)), text=text, image_path=str(image)))
        return records
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        items, where = [], []  # each item and how errors name it (its line)
        for number, line in enumerate(read_utf8(path).splitlines(), start=1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}, line {number}: not a JSON object ({error.msg}): {line!r:.80}") from error
                where.append(f"line {number}")
    elif suffix == ".json":
        try:
            items = json.loads(read_utf8(path))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})") from error
        if not isinstance(items, list):
            raise ValueError(f"{path}: expected a JSON list of {{'image_file': ..., 'text': ...}}, found {type(items).__name__}")
        where = [f"item {i}" for i in range(len(items))]
    else:
        raise ValueError(f"unsupported {what} {path}: expected .json, .jsonl, a folder"
                         + (", or .tar shards" if shards else " of images, or tinyworld:N:SEED (WebDataset .tar shards "
                            "are read by training only)"))  # fmt: skip
    records = []
    for item, at in zip(items, where):
        if not isinstance(item, dict) or "image_file" not in item:
            raise ValueError(f"{path}: {at} must be an object with 'image_file' (and 'text'), found {item!r:.80}")
        image, face, text = item["image_file"], item.get("id_embed_file") or "", item.get("text")
        for name, value in (("image_file", image), ("id_embed_file", face)):
            if not isinstance(value, str) or name == "image_file" and not value:
                raise ValueError(f"{path}: {at}: '{name}' must be a file path (a non-empty string), found "
                                 f"{value!r:.80}")  # fmt: skip
        if text is not None and not isinstance(text, str):  # (a list or number would be trained on as its repr)
            raise ValueError(f"{path}: {at}: 'text' must be a string (or null: no caption), found {text!r:.80}")
        records.append(
            Record(
                key=image,
                text="" if text is None else text,  # JSON null: no caption
                image_path=str(root / image),
                face_id_path=str(root / face) if face else "",
            )
        )
    return records


def list_shards(data: str) -> list[str]:
    """The shard files of `data` (a folder of .tar files, one .tar, or a {a..b} pattern), every one checked to exist
    up front: a shard missing from a pattern is a wrong pattern, better found now than when the stream reaches it."""
    if Path(data).is_dir():
        shards = sorted(str(p) for p in Path(data).glob("*.tar"))
        if not shards:
            raise FileNotFoundError(f"no WebDataset shards (*.tar) in {data}")
        return shards
    shards = expand_braces(data)
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        listed = ", ".join(missing[:10]) + (f", ... ({len(missing) - 10} more)" if len(missing) > 10 else "")
        raise FileNotFoundError(f"{len(missing)} of {len(shards)} WebDataset shards of {data} not found: {listed}")
    return shards


def split_member_name(name: str) -> tuple[str, str] | None:
    """A tar member's (key, extension) by WebDataset's rule: 'a/b.v1/000001.face.npy' -> ('a/b.v1/000001',
    'face.npy'); a leading './' is dropped. None for a name whose basename has no dot (no extension)."""
    while name.startswith("./"):
        name = name[2:]
    m = MEMBER_NAME.match(name)
    return (m.group(1), m.group(2).lower()) if m else None


def iter_webdataset(data: str, seed: int | None = None, epoch: int = 0) -> Iterator[Record]:
    """Streams records from WebDataset shards: members grouped by key (see the module docstring for their names).

    `seed`: read the shards in an order drawn from (seed, epoch) (within a shard, records keep their order); None reads
    them sorted. A group that is no usable record (no image, a malformed caption) is yielded with `problem` set, so
    that it is counted like an unreadable image. A shard that cannot be read (corrupt, or truncated part-way) is left
    with a warning after the records read from it so far, so one bad file does not end a long streaming run; a missing
    shard is an error before any record (a wrong pattern)."""
    shards = list_shards(data)
    if seed is not None:
        order = torch.randperm(len(shards), generator=torch.Generator().manual_seed((seed + 7919 * epoch) % 2**64)).tolist()
        shards = [shards[i] for i in order]
    for shard in shards:
        group: dict[str, bytes] = {}
        current = None
        try:
            with tarfile.open(shard) as tar:
                for member in tar:
                    if not member.isfile() or (parts := split_member_name(member.name)) is None:
                        continue
                    key, ext = parts
                    if key != current and current is not None:
                        yield _record_from_group(shard, current, group)
                        group = {}
                    current = key
                    data_bytes = tar.extractfile(member)
                    group[ext] = data_bytes.read() if data_bytes else b""
        except (tarfile.TarError, OSError, EOFError) as error:
            logger.warning("skipping the rest of unreadable WebDataset shard %s: %s", shard, str(error).splitlines()[0])
            group, current = {}, None  # the group being read may be cut short
        if current is not None:
            yield _record_from_group(shard, current, group)


def _record_from_group(shard: str, key: str, group: dict[str, bytes]) -> Record:
    """One WebDataset record from its members ({extension: bytes}); `problem` says what makes it unusable."""
    image = next((e for e in WEBDATASET_IMAGES if e in group), "")
    face = next((e for e in WEBDATASET_FACES if e in group), "")
    record = Record(key=key, text="", image_bytes=group[image] if image else b"",
                    face_id_path=f"{shard}:{key}.{face}" if face else "", face_id_bytes=group[face] if face else b"")
    if not image:
        record.problem = (f"{shard}: {key}: expected an image member ({', '.join(WEBDATASET_IMAGES)}), found "
                          f"{', '.join(sorted(group)) or 'none'}")  # fmt: skip
    elif face and not group[face]:
        record.problem = f"{shard}: {key}.{face}: an empty face-embedding member"
    elif "txt" in group:
        record.text = group["txt"].decode("utf-8", "replace").strip()
    elif "json" in group:
        try:
            meta = json.loads(group["json"])
        except ValueError as error:  # JSONDecodeError, or bytes in no JSON encoding
            record.problem = f"{shard}: {key}.json: not valid JSON ({error})"
            return record
        text = meta.get("text", meta.get("caption")) if isinstance(meta, dict) else None
        if not isinstance(meta, dict) or not isinstance(text, str | None):
            found = type(meta).__name__ if not isinstance(meta, dict) else f"\"text\": {text!r:.40}"
            record.problem = f"{shard}: {key}.json: expected an object with a \"text\" string, found {found}"
        else:
            record.text = (text or "").strip()
    return record


def open_image(record: Record) -> Image.Image | None:
    """The record's image as RGB, or None if it is missing, unreadable or over PIL's decompression-bomb limit."""
    try:
        source = io.BytesIO(record.image_bytes) if record.image_bytes else record.image_path
        with Image.open(source) as image:
            image.load()
            # upright as shown (EXIF orientation), as generation reads references; 16-bit / float images over their
            # range (PIL's convert clips)
            return to_8bit(upright(image)).convert("RGB")
    except IMAGE_ERRORS:
        return None


def resize_center_crop(image: Image.Image, size: int) -> tuple[Image.Image, tuple[int, int]]:
    """Short side -> size (bilinear, as the official trainer), centre crop; returns the crop and its top-left."""
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), Image.BILINEAR)
    top, left = (nh - size) // 2, (nw - size) // 2
    return image.crop((left, top, left + size, top + size)), (top, left)


def check_face_id(tensor: torch.Tensor, source: str) -> torch.Tensor:
    """One (512,) face embedding from (512,) or (1, 512). Several faces (K, 512) are refused by name: the trainer
    takes one embedding per record ((B, 512) batches; FaceID-Portrait too, 16 tokens from its one face)."""
    shape = tuple(tensor.shape)
    if shape in ((FACE_ID_DIM,), (1, FACE_ID_DIM)):
        return tensor.reshape(FACE_ID_DIM)
    if tensor.ndim == 2 and shape[1] == FACE_ID_DIM:
        raise ValueError(f"{source}: holds {shape[0]} face embeddings {shape}; training takes one {FACE_ID_DIM}-d "
                         f"embedding per record (keep the main face's)")  # fmt: skip
    raise ValueError(f"{source}: expected one {FACE_ID_DIM}-d ArcFace embedding, (512,) or (1, 512), found shape {shape}")


def load_face_id(path: str) -> torch.Tensor:
    """A precomputed face embedding (512,) from .safetensors (its only tensor, or "face_id"), .npy or a tensor .pt/.bin
    (weights_only). ValueError, naming the file, for one that cannot be read or has another shape."""
    from safetensors import SafetensorError

    p = Path(path)
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded = load_file(str(p))
        elif p.suffix == ".npy":
            loaded = torch.from_numpy(np.asarray(np.load(p, allow_pickle=False), dtype=np.float32))
        else:
            loaded = torch.load(p, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{p}: cannot read a face embedding ({reason})") from error
    if isinstance(loaded, dict):  # safetensors
        if "face_id" not in loaded and len(loaded) != 1:
            raise ValueError(f"{p}: expected one tensor or one named 'face_id', found {sorted(loaded)}")
        loaded = loaded.get("face_id", next(iter(loaded.values())))
    if not isinstance(loaded, torch.Tensor):
        raise ValueError(f"{p}: expected a tensor, found {type(loaded).__name__}")
    return check_face_id(loaded.float(), str(p))


def read_face_id(record: Record) -> torch.Tensor:
    """The record's face embedding (512,): from its .npy bytes (WebDataset) or its file."""
    if not record.face_id_bytes:
        return load_face_id(record.face_id_path)
    try:
        array = np.asarray(np.load(io.BytesIO(record.face_id_bytes), allow_pickle=False), dtype=np.float32)
    except (OSError, ValueError, EOFError) as error:
        raise ValueError(f"{record.face_id_path}: cannot read a .npy face embedding ({error})") from error
    return check_face_id(torch.from_numpy(array), record.face_id_path)


class TrainDataset(Dataset):
    """Decodes records into model inputs; unusable ones become {"skipped": key}."""

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
    """WebDataset shards, streamed in record order whatever the number of DataLoader workers.

    `skip` resumes after that many records. `batch_size` must be the DataLoader's: each worker decodes whole batches
    (after the skip, records [k*B, (k+1)*B) go to worker k % num_workers), and the DataLoader takes batches from its
    workers in turn, so the records it yields are the stream's in order and `skip` drops exactly those consumed.
    `max_samples` (0: all) ends the stream after that many records. `seed`/`epoch`: the shard order of
    `iter_webdataset`, unless `max_samples` is set (the subset is then the first records in file order)."""

    def __init__(self, data: str, resolution: int, clip_processor=None, tokenize: Callable | None = None, skip: int = 0,
                 batch_size: int = 1, max_samples: int = 0, seed: int | None = None, epoch: int = 0) -> None:  # fmt: skip
        if batch_size < 1 or skip < 0 or max_samples < 0:
            raise ValueError(f"expected batch_size >= 1, skip >= 0 and max_samples >= 0, found {batch_size}, {skip} "
                             f"and {max_samples}")  # fmt: skip
        list_shards(data)  # a missing shard is named now, not when the stream reaches it
        self.data, self.resolution, self.clip_processor, self.tokenize = data, resolution, clip_processor, tokenize
        self.skip, self.batch_size, self.max_samples = skip, batch_size, max_samples
        self.seed, self.epoch = (None, 0) if max_samples else (seed, epoch)

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        records = iter_webdataset(self.data, self.seed, self.epoch)
        records = itertools.islice(records, self.skip, self.max_samples or None)
        for i, record in enumerate(records, start=self.skip):
            if (i - self.skip) // self.batch_size % workers == worker:
                yield encode_record(record, i, self.resolution, self.clip_processor, self.tokenize)


def encode_record(record: Record, index: int, resolution: int, clip_processor, tokenize) -> dict:
    """The model inputs of one record, or {"skipped": key} (with a warning naming it) if it cannot be used."""
    if record.problem:
        warn_skipped(record.problem)
        return {"skipped": record.key}
    image = open_image(record)
    if image is None:
        where = record.image_path or f"{len(record.image_bytes)} bytes"
        warn_skipped(f"{record.key}: missing, unreadable or oversized image ({where})")
        return {"skipped": record.key}
    face_id = None
    if record.face_id_path:
        try:
            face_id = read_face_id(record)  # (512,)
        except ValueError as error:
            warn_skipped(f"{record.key}: {error}")
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
    if face_id is not None:
        item["face_id"] = face_id
    return item


def _shapes(item: dict) -> tuple:
    """What must agree across a batch to stack it: the item's keys and its tensors' shapes."""

    def shape(value):
        if isinstance(value, tuple):
            return tuple(shape(v) for v in value)
        return tuple(value.shape) if isinstance(value, torch.Tensor) else None

    return tuple(sorted((k, shape(v)) for k, v in item.items()))


def collate(items: list[dict | None]) -> dict:
    """Stacks the good items; counts the skipped ones in `batch['skipped']`.

    An item that does not fit the batch is skipped and counted too: one whose keys are not the most common set (a
    WebDataset record without the face embedding its neighbours carry), or whose tensors' shapes differ from the most
    common."""
    good = [i for i in items if i is not None and "skipped" not in i]
    if good:
        keys = Counter(frozenset(g) for g in good).most_common(1)[0][0]  # the batch's usual keys
        complete = [g for g in good if g.keys() == keys]
        common = Counter(_shapes(g) for g in complete).most_common(1)[0][0]
        fitting = [g for g in complete if _shapes(g) == common]
        want = dict(common)
        for g in good:
            if not any(g is f for f in fitting):
                mine = dict(_shapes(g))
                misfits = [f"no {k}" if k not in mine else f"{k} of shape {mine[k]} (the batch's: {want[k]})"
                           for k in sorted(want) if mine.get(k, ()) != want[k]]  # fmt: skip
                warn_skipped(f"record {g.get('index')} does not fit its batch: {', '.join(misfits)}")
        good = fitting
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
