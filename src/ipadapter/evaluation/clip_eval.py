"""`ipadapter eval clip`: the protocol of the paper's Table 1, resumable and sharded over processes.

For every (reference image, caption) pair - COCO 2017 val in the paper, any local JSON / JSONL / folder here - the
adapter generates N images (paper: 4) from the image prompt (with an empty text prompt unless `with_text`), and each
is scored against the reference (CLIP-I) and the caption (CLIP-T, and CLIPScore = 2.5 * max(CLIP-T, 0)).

Results go to OUT/results.rank{R}.jsonl, one line per pair and process R (Accelerate decides the processes: run
`accelerate launch --multi_gpu --num_processes 8 -m ipadapter.cli eval clip ... --device cuda` on GPUs, or
`torchrun --nproc_per_node 2 -m ipadapter.cli eval clip ...` on CPUs, to shard the pairs); a rerun skips the pairs
already there. The main process then writes OUT/summary.json and OUT/summary.md over every part.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from ..files import write_text

SUMMARY_KEYS = ("clip_i", "clip_t", "clipscore")
# "ddim": the paper's sampler (§4.1.2: DDIM, 50 steps, guidance 7.5), built from the base's scheduler config (for
# SD1.5's PNDM config: the official demo's DDIM settings); "pipeline": the scheduler saved with the base
SCHEDULERS = ("ddim", "pipeline")
OFFICIAL_DDIM = {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}  # the IP-Adapter demo's DDIM


@dataclass
class ClipEvalConfig:
    """One `ipadapter eval clip` run."""

    data: str = "tinyworld:200:4242"  # pairs: JSON list / JSONL / folder with .txt captions / tinyworld:N:SEED
    image_root: str = ""  # folder the JSON's image_file entries are relative to (default: the JSON's folder)
    base: str = "tinyworld"  # diffusers folder, single file, hub id, or tinyworld
    base_config: str = ""  # with a single-file base: the diffusers folder or hub id of its configs
    adapter: str = "tinyworld-base"  # IP-Adapter file or tinyworld-base / tinyworld-plus
    image_encoder: str = ""  # the adapter's image encoder (default: the base's image_encoder/)
    clip: str = "tinyworld"  # the scoring CLIP (both towers): folder or hub id, e.g. openai/clip-vit-large-patch14
    scale: float = 1.0  # adapter scale
    preset: str = ""  # per-block preset (blocks.PRESETS), optional
    images_per_pair: int = 4  # generated images per pair (paper: 4)
    with_text: bool = False  # also give the caption as the text prompt (the paper's protocol uses none)
    scheduler: str = "ddim"  # "ddim": DDIM from the base's scheduler config (the paper's); "pipeline": the base's own
    steps: int | None = None  # denoising steps (default: the pipeline's)
    guidance: float | None = None  # classifier-free guidance (default: the pipeline's)
    seed: int = 0  # pair i uses torch.Generator("cpu").manual_seed(seed + i)
    limit: int = 0  # evaluate only the first `limit` pairs (0: all)
    save_images: bool = False  # also write the generated images under OUT/images/
    out: str = "eval-clip"  # output folder
    device: str = "cpu"  # where to run
    dtype: str = "float32"  # weights of the generating models (float16 / bfloat16); the scoring CLIP stays float32
    compile: str = ""  # torch.compile backend for the UNet ("inductor"; "" = off): one graph serves every pair

    def __post_init__(self) -> None:
        """Values are checked here, before any model is loaded; files in `check_files`."""
        from ..blocks import PRECISE, PRESETS
        from ..compiling import check_backend
        from ..sources import check_seed, parse_dtype

        for name, low in (("images_per_pair", 1), ("limit", 0), ("steps", 1)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise ValueError(f"{name} must be >= {low}, found {value}" + (" (0: all pairs)" if low == 0 else ""))
        for name in ("scale", "guidance"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, found {value}")
        parse_dtype(self.dtype)
        check_seed(self.seed)  # pair i uses seed + i: taken modulo 2**64 as manual_seed does for negative seeds
        check_backend(self.compile, "--compile")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; expected one of {', '.join(SCHEDULERS)}")
        if self.preset and self.preset not in (*PRESETS, *PRECISE):
            raise ValueError(f"unknown preset {self.preset!r}; expected one of {', '.join((*PRESETS, *PRECISE))}")

    def check_files(self) -> None:
        """The adapter, base and output folder, before any model work (errors name what was expected and found)."""
        from ..sources import check_base, resolve_adapter, resolve_base

        adapter = resolve_adapter(self.adapter)
        if not Path(adapter).is_file():
            raise FileNotFoundError(f"adapter not found: {adapter}")
        check_base(self.base)
        if self.base_config and not Path(resolve_base(self.base)).is_file():
            raise ValueError(f"--base-config goes with a single-file --base; {self.base} is not a file")
        from ..generate import check_local_model

        for flag, value in (("--image-encoder", self.image_encoder),
                            ("--clip", "" if self.clip == "tinyworld" else self.clip),
                            ("--base-config", self.base_config)):  # fmt: skip
            check_local_model(flag, value)
        tiny = Path(resolve_base("tinyworld")).resolve()  # the tiny world's folder, or a single file with its configs
        given = [Path(resolve_base(b)).expanduser().resolve() for b in (self.base, self.base_config) if b]
        if self.clip == "tinyworld" and tiny not in given:
            raise ValueError(f"--clip: the tiny world's scoring CLIP (64 px, trained on its shapes) cannot score "
                             f"images of {self.base}; pass the scoring CLIP (the paper's: "
                             "openai/clip-vit-large-patch14)")  # fmt: skip
        # the adapter's image encoder, from the files alone: a missing or mismatched one failed after the base loaded
        from ..checkpoint import adapter_from_tensors, read_tensors
        from ..encoders import check_encoder_folder
        from ..sources import resolve_image_encoder

        tensors, metadata = read_tensors(Path(adapter), shapes_only=True)
        config = adapter_from_tensors(tensors, metadata, Path(adapter).name).config  # (meta device: shapes only)
        if config.id_embed_dim:  # FaceID (-Plus): face embeddings, which (image, caption) pairs do not hold
            raise ValueError(f"{Path(adapter).name} ({config.variant}) is a FaceID adapter, prompted with face "
                             "embeddings; eval clip prompts with the pairs' images only (FaceID: eval face)")  # fmt: skip
        encoder = resolve_image_encoder(self.base, self.image_encoder)
        if not encoder:
            raise ValueError(f"this adapter ({config.variant}) needs {config.image_encoder_name}; pass --image-encoder "
                             f"(the base {self.base} has no image_encoder/ folder on disk)")  # fmt: skip
        check_encoder_folder(config, encoder)
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise ValueError(f"--out {self.out} is a file; expected a folder (it receives results and the summary)")


def _has_results(out: Path) -> bool:
    """Whether any results.rank*.jsonl in OUT holds a complete result line."""
    return any(_valid(line) for part in out.glob("results.rank*.jsonl")
               for line in part.read_text(encoding="utf-8").splitlines())  # fmt: skip


def _valid(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def _done(out: Path, records: list) -> dict[int, dict]:
    """The results in OUT of this run's pairs, by index: lines of pairs beyond `records` (an earlier, longer
    --limit) or of another key at that index are not this run's; a scored line wins over a skipped one (a reference
    that was missing then and is readable now is redone)."""
    found: dict[int, dict] = {}
    for part in sorted(out.glob("results.rank*.jsonl")):
        for line in part.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    item = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill: that pair is redone
                i = int(item["index"])
                if i >= len(records) or item.get("key") != records[i].key:
                    continue
                if i not in found or "skipped" in found[i]:
                    found[i] = item
    return found


# What the results in OUT depend on: a rerun with other values would mix its pairs with the earlier ones.
RESULT_FIELDS = ("data", "image_root", "base", "base_config", "adapter", "image_encoder", "clip", "scale", "preset",
                 "images_per_pair", "with_text", "scheduler", "steps", "guidance", "seed", "dtype")  # fmt: skip
# what a run.json written before a field existed ran with (other fields: their default)
EARLIER = {"scheduler": "pipeline"}
# fields recorded since, that existed before: what an earlier run.json ran with is unknown, so not compared
UNRECORDED = ("base_config",)


def _check_run(out: Path, cfg: ClipEvalConfig, write: bool) -> None:
    """A rerun into OUT must have the values of OUT/run.json (else it would mix results); `write`: record them
    there on the first run (the main process, after every process has checked)."""
    wanted = {k: getattr(cfg, k) for k in RESULT_FIELDS}
    path = out / "run.json"
    if not path.is_file():
        if any(out.glob("results.rank*.jsonl")):
            raise ValueError(f"{out} holds results of a run that recorded no settings (run.json); use a new --out")
        # (the main process may be writing run.json, through a temporary file beside it)
        others = sorted(p.name for p in out.iterdir() if p.name != "run.json" and not p.name.startswith(".run.json."))
        if others:  # not an evaluation's folder: its summary and images would replace the user's files
            raise ValueError(f"{out} holds other files ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); "
                             "expected a new or empty folder, or one of an earlier evaluation (with its run.json)")  # fmt: skip
        if write:
            write_text(path, json.dumps(wanted, indent=2))  # whole or not at all: a kill leaves no half of it
        return
    saved = json.loads(path.read_text())
    defaults = {**{f.name: f.default for f in fields(ClipEvalConfig)}, **EARLIER}  # (a field added since)
    differ = [f"{k}: {saved.get(k, defaults[k])!r} there, {v!r} now" for k, v in wanted.items()
              if saved.get(k, defaults[k]) != v and (k in saved or k not in UNRECORDED)]  # fmt: skip
    if differ and not _has_results(out):  # a run that failed before its first pair recorded nothing to mix with
        if write:
            write_text(path, json.dumps(wanted, indent=2))
        return
    if differ:
        raise ValueError(f"{out} holds results of another evaluation ({'; '.join(differ)}); resume with its settings "
                         "or use a new --out")  # fmt: skip


class _SingleProcess:
    process_index, num_processes, is_main_process = 0, 1, True

    def wait_for_everyone(self) -> None:
        pass


def _process_state(device: str):
    """Accelerate's view of the processes (several CPU processes: gloo, as torchrun set up); one process without it."""
    try:
        from accelerate import PartialState
    except ImportError:
        import os

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ImportError("sharding eval clip over processes needs accelerate: `pip install accelerate`") from None
        return _SingleProcess()
    return PartialState(cpu=torch.device(device).type == "cpu")


def summarize(items: list[dict], cfg: ClipEvalConfig) -> dict:
    """Means over the scored pairs; CLIP-T and CLIPScore over those with a caption (`captioned`)."""
    n = len(items)
    means = {}
    for k in SUMMARY_KEYS:
        values = [float(it[k]) for it in items if it.get(k) is not None]
        means[k] = sum(values) / len(values) if values else None
    captioned = sum(1 for it in items if it.get("clip_t") is not None)
    return {"pairs": n, "captioned": captioned, "images_per_pair": cfg.images_per_pair, **means, "config": asdict(cfg)}


def markdown(summary: dict) -> str:
    cfg = summary["config"]
    def f(x):
        return "-" if x is None else f"{x:.4f}"

    return "\n".join([
        "# CLIP-I / CLIP-T (IP-Adapter paper, Table 1 protocol)",
        "",
        f"adapter `{cfg['adapter']}` on `{cfg['base']}`, scale {cfg['scale']}"
        + (f", preset {cfg['preset']}" if cfg["preset"] else "")
        + f"; scoring CLIP `{cfg['clip']}`; data `{cfg['data']}`; "
        + f"{cfg['images_per_pair']} images per pair; text prompt: {'the caption' if cfg['with_text'] else 'none'}; "
        + "sampler: " + ("DDIM" if cfg.get("scheduler", "ddim") == "ddim" else "the base's own"),
        "",
        "| pairs | CLIP-I | CLIP-T (cosine) | CLIPScore = 2.5 max(cos, 0), the paper's CLIP-T |",
        "|---|---|---|---|",
        f"| {summary['pairs']} | {f(summary['clip_i'])} | {f(summary['clip_t'])} | {f(summary['clipscore'])} |",
        "",
        *([f"CLIP-T and CLIPScore over the {summary['captioned']} pair(s) with a caption; "
           f"{summary['pairs'] - summary['captioned']} have none.", ""]
          if summary.get("captioned", summary["pairs"]) != summary["pairs"] else []),
        *([(f"{summary['skipped']} pair(s) skipped: reference image missing or unreadable (listed in "
            "results.rank*.jsonl)."), ""] if summary.get("skipped") else []),
    ])  # fmt: skip


def run_clip_eval(cfg: ClipEvalConfig, show_progress: bool = True) -> dict:
    """Runs (or resumes) the evaluation; returns the summary (on every process)."""
    from tqdm.auto import tqdm

    from ..adapter import IPAdapter
    from ..compiling import check_requirements
    from ..encoders import ImageEncoder
    from ..prompter import ImagePrompter
    from ..sources import load_pipeline, parse_dtype, resolve_adapter, resolve_image_encoder
    from ..training.data import open_image, read_records
    from .clip_score import ClipScorer, clipscore

    cfg.check_files()
    records = read_records(cfg.data, cfg.image_root, what="--data pairs", shards=False)
    if cfg.limit:
        records = records[: cfg.limit]
    if not records:
        raise ValueError(f"no (image, caption) pairs in {cfg.data}")
    paths = [r.image_path for r in records if not r.image_bytes]
    if len(paths) == len(records) and not any(Path(p).is_file() for p in paths):  # before any model loads
        raise FileNotFoundError(f"none of the {len(paths)} reference images of {cfg.data} exists (first: {paths[0]}); "
                                "check --image-root")  # fmt: skip
    adapter_path = resolve_adapter(cfg.adapter)
    check_requirements(cfg.compile, torch.device(cfg.device).type)
    state = _process_state(cfg.device)  # first: under accelerate launch --multi_gpu it sets this process's GPU
    scorer = ClipScorer.from_pretrained(cfg.clip, device=cfg.device)  # fails early on a missing scoring model
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    _check_run(out, cfg, write=state.is_main_process)  # every process refuses alike, before any waits for another
    state.wait_for_everyone()
    done = {i: it for i, it in _done(out, records).items() if "skipped" not in it}  # a skipped pair is tried again
    mine = [i for i in range(len(records)) if i % state.num_processes == state.process_index and i not in done]
    if mine:
        dtype = parse_dtype(cfg.dtype)
        pipe = load_pipeline(cfg.base, dtype=dtype, device=cfg.device, config=cfg.base_config)
        pipe.set_progress_bar_config(disable=True)
        if getattr(pipe, "safety_checker", None) is not None:  # it replaces flagged images by black ones, then scored
            pipe.register_modules(safety_checker=None)  # (the official evaluation and our validation run without it)
        if cfg.scheduler == "ddim":
            from diffusers import DDIMScheduler

            config = pipe.scheduler.config
            if "sigma_data" in config or "shift" in config:  # EDM / flow-matching bases: no DDPM betas to build on
                raise ValueError(f"--scheduler ddim: the base's {type(pipe.scheduler).__name__} is not a DDPM-schedule "
                                 "scheduler to build DDIM from; pass --scheduler pipeline")  # fmt: skip
            # DDIM-only settings a base's other scheduler config may lack (a community DPM-Solver config has no
            # clip_sample, and DDIM's default True clamps the predicted latents to [-1, 1]): the official demo's
            pipe.scheduler = DDIMScheduler.from_config(config, **{k: v for k, v in OFFICIAL_DDIM.items() if k not in config})
        adapter = IPAdapter.from_file(adapter_path, dtype=dtype, unet=pipe.unet)
        encoder_path = resolve_image_encoder(cfg.base, cfg.image_encoder)  # (there: `check_files`)
        prompter = ImagePrompter(pipe, adapter, ImageEncoder.from_pretrained(encoder_path, dtype=dtype, device=cfg.device))
        if cfg.compile:  # every pair has the same settings: one graph for all (docs/controls.md, torch.compile)
            pipe.unet = torch.compile(pipe.unet, backend=cfg.compile)
        kwargs = {}
        if cfg.steps is not None:
            kwargs["num_inference_steps"] = cfg.steps
        part = out / f"results.rank{state.process_index}.jsonl"
        if part.exists():  # drop a line a kill cut short, so appended results start on a line of their own
            kept = [line for line in part.read_text(encoding="utf-8").splitlines() if _valid(line)]
            write_text(part, "".join(line + "\n" for line in kept))  # atomic: a kill now keeps the results
        with part.open("a", encoding="utf-8") as results:
            for i in tqdm(mine, disable=not (show_progress and state.is_main_process), desc="eval clip"):
                reference = open_image(records[i])
                if reference is None:
                    item = {"index": i, "key": records[i].key, "skipped": "unreadable image"}
                else:
                    images = prompter(image=reference, prompt=records[i].text if cfg.with_text else "",
                                      scale=cfg.scale, preset=cfg.preset or None, guidance_scale=cfg.guidance,
                                      num_images_per_prompt=cfg.images_per_pair,
                                      generator=torch.Generator("cpu").manual_seed((cfg.seed + i) % 2**64), **kwargs).images  # fmt: skip
                    ci = scorer.clip_i(images, reference)
                    item = {"index": i, "key": records[i].key, "text": records[i].text, "clip_i": float(ci.mean()),
                            "clip_t": None, "clipscore": None, "per_image_clip_i": [round(float(x), 5) for x in ci]}
                    if records[i].text.strip():  # no caption: no CLIP-T (against "" it would be a number, and high)
                        ct = scorer.clip_t(images, records[i].text)
                        item.update(clip_t=float(ct.mean()), clipscore=float(clipscore(ct).mean()))
                    if cfg.save_images:
                        (out / "images").mkdir(exist_ok=True)
                        for j, image in enumerate(images):
                            image.save(out / "images" / f"{i:06d}-{j}.png")
                results.write(json.dumps(item) + "\n")
                results.flush()
        prompter.detach()
    state.wait_for_everyone()
    results = _done(out, records)
    items = [it for it in results.values() if "clip_i" in it]
    summary = summarize(items, cfg)
    summary["skipped"] = sum(1 for it in results.values() if "skipped" in it)
    if state.is_main_process:
        write_text(out / "summary.json", json.dumps(summary, indent=2))
        write_text(out / "summary.md", markdown(summary))
    return summary
