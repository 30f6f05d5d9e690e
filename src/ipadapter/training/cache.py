"""Embedding cache: the frozen encoders' outputs computed once, so training steps run only the UNet.

Per sample it stores the VAE latent distribution (mean, std), the image-encoder features the variant reads, and the
text-encoder states (plus SDXL's pooled text embedding and micro-conditioning). Once per cache it stores the
unconditional image features and the empty caption's text states, which the recipe's dropout substitutes.
Shards are float16 safetensors; `index.json` records what was cached so a mismatched cache is refused.

Building is resumable: every full shard is written atomically with the settings it was built for and the samples it
holds in its metadata, so a build that was killed (a preemption during hours of encoding) continues after its last
full shard instead of starting over.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset, Subset

from ..files import save_safetensors, write_text
from .data import collate
from .models import FrozenModels, encode_text

SHARD = 512  # samples per shard file


@torch.no_grad()
def encode_batch(models: FrozenModels, batch: dict, feature: str) -> dict[str, torch.Tensor]:
    """The frozen models' outputs for one collated batch."""
    vae = models.vae
    dist = vae.encode(batch["pixels"].to(vae.device, vae.dtype)).latent_dist
    out = {"latent_mean": dist.mean, "latent_std": dist.std}
    text, pooled = encode_text(models, batch["input_ids"])
    out["text"] = text
    if pooled is not None:
        out["text_pooled"] = pooled
    if models.image_encoder is not None and feature != "none":
        out["image"] = models.image_encoder.encode(batch["clip_pixels"], feature)
    if "face_id" in batch:
        out["face_id"] = batch["face_id"]
    return out


@torch.no_grad()
def unconditional(models: FrozenModels, feature: str, tokenize) -> dict[str, torch.Tensor]:
    """Empty-caption text states and unconditional image features (what dropped samples get)."""
    ids = tuple(t[None] for t in tokenize(""))
    text, pooled = encode_text(models, ids)
    out = {"text": text[0]}
    if pooled is not None:
        out["text_pooled"] = pooled[0]
    if models.image_encoder is not None and feature != "none":
        out["image"] = models.image_encoder.unconditional(feature, 1)[0]
    return out


def fingerprint(**parts) -> dict:
    return {k: str(v) for k, v in parts.items()}


def differences(cached: dict, wanted: dict) -> dict:
    """{setting: (cached, wanted)} where they differ; a setting the cache lacks reads "(not recorded: an older
    ipadapter built it)"."""
    absent = "(not recorded: an older ipadapter built it)"
    return {k: (cached.get(k, absent), v) for k, v in wanted.items() if cached.get(k) != v}


class EmbeddingCache(Dataset):
    """Reads a built cache; item i holds the tensors of sample i (plus 'index', 'original_size', 'crop_top_left')."""

    def __init__(self, folder: str | Path, expected: dict) -> None:
        self.folder = Path(folder)
        index_path = self.folder / "index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"no embedding cache in {self.folder} (index.json missing)")
        try:
            index = json.loads(index_path.read_text())
        except ValueError as error:
            raise ValueError(f"{index_path} is not an embedding cache's index (unreadable JSON: {error})") from error
        if not isinstance(index, dict) or not {"fingerprint", "count", "keys"} <= set(index):
            raise ValueError(f"{index_path} is not an embedding cache's index (expected fingerprint, count and keys); "
                             "use another --cache-dir")  # fmt: skip
        if index["fingerprint"] != expected:
            raise ValueError(f"the embedding cache in {self.folder} was built for other settings (cached, wanted): "
                             f"{differences(index['fingerprint'], expected)}; use another --cache-dir, or delete that "
                             "one to rebuild it")  # fmt: skip
        self.count = int(index["count"])
        self.skipped = int(index.get("skipped", 0))  # unreadable images left out when the cache was built
        self.keys = index["keys"]
        self.uncond = {k: v.float() for k, v in load_file(str(self.folder / "uncond.safetensors")).items()}
        self._shards: dict[int, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return self.count

    def _shard(self, n: int) -> dict[str, torch.Tensor]:
        if n not in self._shards:
            self._shards = {n: load_file(str(self.folder / f"shard-{n:05d}.safetensors"))}  # keep one in memory
        return self._shards[n]

    def __getitem__(self, i: int) -> dict:
        shard = self._shard(i // SHARD)
        j = i % SHARD
        item = {k: (v[j].float() if v.is_floating_point() else v[j]) for k, v in shard.items()}
        item["index"] = i
        return item


def finished_shards(folder: Path, expected: dict) -> list[str]:
    """The sample keys (dataset indices) of the full shards an interrupted build left, in order: those built for
    `expected` and numbered without a gap. Later or other files are deleted (they will be written again)."""
    from safetensors import safe_open

    keys: list[str] = []
    wanted = json.dumps(expected, sort_keys=True)
    n = 0
    while (folder / f"shard-{n:05d}.safetensors").is_file():
        try:
            with safe_open(str(folder / f"shard-{n:05d}.safetensors"), framework="pt") as handle:
                meta = handle.metadata() or {}
            shard_keys = json.loads(meta.get("keys", "[]"))
        except Exception:  # unreadable: written again
            break
        if meta.get("fingerprint") != wanted and meta.get("fingerprint"):
            # an unfinished cache of other settings (another run sharing --cache-dir): not ours to delete
            raise ValueError(f"{folder} holds an unfinished embedding cache of other settings (cached, wanted): "
                             f"{differences(json.loads(meta['fingerprint']), expected)}; use another --cache-dir (or "
                             "delete that one to rebuild it)")  # fmt: skip
        if len(shard_keys) != SHARD:  # the short last shard: written again
            break
        keys += shard_keys
        n += 1
    for stale in folder.glob("shard-*.safetensors"):
        number = stale.stem.removeprefix("shard-")
        if not number.isdigit() or int(number) >= n:  # by number: names grow past 5 digits on huge datasets
            stale.unlink()
    return keys


def build_cache(folder: str | Path, dataset: Dataset, models: FrozenModels, feature: str, tokenize, expected: dict,
                batch_size: int = 32, num_workers: int = 0, show_progress: bool = True) -> EmbeddingCache:
    """Encodes every sample of `dataset` once (in order) and writes the shards; an existing complete cache is reused
    (after its fingerprint is checked), an interrupted build continues after its last full shard."""
    from tqdm.auto import tqdm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "index.json").is_file():
        return EmbeddingCache(folder, expected)
    save_safetensors({k: v.half().contiguous().cpu() for k, v in unconditional(models, feature, tokenize).items()},
                     folder / "uncond.safetensors")
    keys = finished_shards(folder, expected)
    start = int(keys[-1]) + 1 if keys else 0  # the dataset in order: everything before `start` is cached or skipped
    shard, count, skipped = len(keys) // SHARD, len(keys), start - len(keys)
    if start:
        print(f"embedding cache: continuing an interrupted build after {start} samples ({shard} shards)",
              file=sys.stderr)  # fmt: skip
    remaining = Subset(dataset, range(start, len(dataset)))  # type: ignore[arg-type]
    loader = DataLoader(remaining, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
    buffer: dict[str, list[torch.Tensor]] = {}
    fingerprint_json = json.dumps(expected, sort_keys=True)

    def flush() -> None:
        nonlocal shard, buffer
        if not buffer:
            return
        tensors = {k: torch.cat(v).contiguous() for k, v in buffer.items()}
        rows = len(tensors["text"])
        meta = {"fingerprint": fingerprint_json, "keys": json.dumps(keys[shard * SHARD : shard * SHARD + rows])}
        save_safetensors(tensors, folder / f"shard-{shard:05d}.safetensors", meta)
        shard, buffer = shard + 1, {}

    for batch in tqdm(loader, desc="caching embeddings", disable=not show_progress):
        skipped += batch["skipped"]
        if "pixels" not in batch:
            continue
        out = encode_batch(models, batch, feature)
        out = {k: v.half().cpu() if v.is_floating_point() else v.cpu() for k, v in out.items()}
        out["original_size"], out["crop_top_left"] = batch["original_size"], batch["crop_top_left"]
        for k, v in out.items():
            buffer.setdefault(k, []).append(v)
        keys.extend(str(i) for i in batch["index"].tolist())
        count += len(batch["index"])
        while buffer and sum(len(t) for t in buffer["text"]) >= SHARD:  # full shards only, however large the batch
            rows = {k: torch.cat(v) for k, v in buffer.items()}
            buffer = {k: [v[:SHARD]] for k, v in rows.items()}
            rest = {k: v[SHARD:] for k, v in rows.items()}
            flush()
            buffer = {k: [v] for k, v in rest.items() if len(v)}
    flush()
    index = {"fingerprint": expected, "count": count, "skipped": skipped, "keys": keys}
    write_text(folder / "index.json", json.dumps(index))  # last, whole or not at all: it marks the cache complete
    return EmbeddingCache(folder, expected)
