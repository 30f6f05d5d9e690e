"""Where models come from: the shipped tiny world (the offline default), diffusers folders, single files, hub ids."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

# The shipped tiny world; IPADAPTER_TINYWORLD_DIR points everything at another build's assets (e.g. to measure a
# fresh build with benchmarks/tinyworld_targets.py before shipping it).
TINYWORLD_DIR = Path(os.environ.get("IPADAPTER_TINYWORLD_DIR") or Path(__file__).resolve().parent / "tinyworld" / "assets")
TINYWORLD_ADAPTERS = {"base": "adapters/base.safetensors", "plus": "adapters/plus.safetensors"}


def resolve_base(base: str) -> str:
    """'tinyworld' -> the shipped tiny Stable Diffusion folder; anything else unchanged."""
    if base == "tinyworld":
        return str(TINYWORLD_DIR / "sd")
    return base


def hub_ids(flags: dict[str, str]) -> list[str]:
    """"FLAG VALUE" for each value that can only be a hub id (owner/name, optionally ::subfolder): not a path that
    exists, not "tinyworld", not starting like a path."""
    found = []
    for flag, value in flags.items():
        repo = str(value or "").split("::")[0]
        if repo and repo.count("/") == 1 and not repo.startswith(("/", "./", "../", "~")) and not Path(repo).exists():
            found.append(f"{flag} {value}")
    return found


def unreachable_hub(error: BaseException, flags: dict[str, str] | None = None) -> str:
    """For an error raised while loading a hub id that is neither local nor cached where the Hugging Face Hub cannot
    be reached (no network, or HF_HUB_OFFLINE set): a sentence that says so, naming the hub ids among `flags`
    ({"--base": value, ...}); diffusers itself then reports only "X does not appear to have a file named
    config.json", as if the repository lacked it. "" for any other error."""
    chain, seen = [], set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:  # __cause__ / __context__ links, each once
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or current.__context__
    if not {type(e).__name__ for e in chain} & {"LocalEntryNotFoundError", "OfflineModeIsEnabled"}:
        return ""
    from huggingface_hub import constants

    ids = hub_ids(flags or {})
    named = (f"{', '.join(ids)} {'is a hub id' if len(ids) == 1 else 'are hub ids'} not found locally nor in the "
             "Hugging Face cache" if ids else "a hub id was not found locally nor in the Hugging Face cache")  # fmt: skip
    why = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE
           else f"the Hugging Face Hub could not be reached ({chain[-1]})")  # fmt: skip
    return (f"{named}, and {why}: download it once on a connected machine (`huggingface-cli download ID`, or copy "
            "a Hugging Face cache and point HF_HOME at it), or pass a local folder")


def error_line(error: BaseException, flags: dict[str, str] | None = None) -> str:
    """The CLI's one-line error: the exception's text, and `unreachable_hub`'s explanation when there is one."""
    hub = unreachable_hub(error, flags)
    return f"{error} ({hub})" if hub else str(error)


def resolve_image_encoder(base: str, image_encoder: str = "") -> str:
    """The image encoder to use: the one given, else an image_encoder/ folder inside or beside the base folder."""
    if image_encoder:
        return image_encoder
    root = Path(resolve_base(base))
    for candidate in (root / "image_encoder", root.parent / "image_encoder"):
        if (candidate / "config.json").is_file():
            return str(candidate)
    return ""


def resolve_adapter(adapter: str) -> str:
    """'tinyworld' / 'tinyworld-base' / 'tinyworld-plus' -> the shipped tiny-world adapters; a training checkpoint
    folder -> its adapter.safetensors; another path unchanged."""
    name = {"tinyworld": "base", "tinyworld-base": "base", "tinyworld-plus": "plus"}.get(adapter)
    if name is None:
        from .checkpoint import adapter_file

        found = adapter_file(adapter)  # a training checkpoint folder: its adapter.safetensors
        return str(found) if found != Path(adapter) else adapter
    path = TINYWORLD_DIR / TINYWORLD_ADAPTERS[name]
    if not path.is_file():
        raise FileNotFoundError(f"the tiny world's {name} adapter is missing from the package: expected {path}")
    return str(path)


SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def _t2i_adapter_class(path: str, config: str = ""):
    """diffusers' T2I-Adapter pipeline class for a base: SDXL's for an SDXL folder or single file, else SD's."""
    from diffusers import StableDiffusionAdapterPipeline, StableDiffusionXLAdapterPipeline

    p = Path(path)
    if p.is_dir() and (p / "model_index.json").is_file():
        sdxl = "XL" in json.loads((p / "model_index.json").read_text()).get("_class_name", "")
    elif p.is_file():
        sdxl = single_file_is_sdxl(p, config)
    else:  # a hub id: its model_index.json through diffusers' cache
        from diffusers import DiffusionPipeline

        sdxl = "XL" in DiffusionPipeline.load_config(path).get("_class_name", "")
    return StableDiffusionXLAdapterPipeline if sdxl else StableDiffusionAdapterPipeline


def looks_local(name: str) -> bool:
    """Whether a model argument is written as a path rather than a hub id (owner/name): absolute, relative with
    ./ or ../, from ~, with a trailing slash, or more than two parts (a "::subfolder" suffix aside)."""
    name = name.split("::")[0]
    return name.startswith(("/", "./", "../", "~")) or name.endswith(("/", "\\")) or name.count("/") > 1


def check_base(base: str, must_exist: bool = True) -> None:
    """Raises a clear error if a local `base` cannot be a Stable Diffusion model: a folder without model_index.json,
    a file that is not a single-file checkpoint (.safetensors / .ckpt) or one without the original layout's UNet
    tensors (`model.diffusion_model.*`). Hub ids and "tinyworld" pass. Reads only a safetensors header."""
    p = Path(resolve_base(base))
    text = str(resolve_base(base))
    if must_exist and not p.exists() and (looks_local(text) or p.suffix in SINGLE_FILE_SUFFIXES):
        raise FileNotFoundError(f"base model not found: {p} (expected a diffusers folder, a single-file checkpoint "
                                "or a hub id owner/name)")  # fmt: skip
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise FileNotFoundError(f"{p} is not a diffusers pipeline folder: model_index.json missing")
        try:
            index = json.loads((p / "model_index.json").read_text())
        except ValueError as error:
            raise ValueError(f"{p / 'model_index.json'} is not readable JSON: {error}") from error
        for component in ("unet", "vae", "text_encoder"):  # what every SD / SDXL pipeline loads
            entry = index.get(component) if isinstance(index, dict) else None
            if isinstance(entry, list) and entry and entry[0] is not None and not (p / component / "config.json").is_file():
                raise FileNotFoundError(f"{p} is missing its {component}: expected {p / component / 'config.json'}")
    elif p.is_file():
        if p.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ValueError(f"{p} is neither a diffusers pipeline folder nor a single-file checkpoint "
                             f"({' / '.join(SINGLE_FILE_SUFFIXES)})")  # fmt: skip
        if p.suffix.lower() == ".ckpt":
            with open(p, "rb") as f:
                head = f.read(4)
            if head != b"PK\x03\x04" and head[:1] != b"\x80":  # torch.save's zip archive, or a legacy pickle
                raise ValueError(f"{p} is not a readable .ckpt checkpoint (expected a torch.save archive; found a file "
                                 f"starting with {head!r})")  # fmt: skip
        if p.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(p), framework="pt") as f:
                    keys = list(f.keys())
            except Exception as error:  # safetensors raises several types for a bad header
                raise ValueError(f"{p} is not a readable safetensors file (truncated or corrupt?): {error}") from error
            if not any(k.startswith("model.diffusion_model.") for k in keys):
                raise ValueError(f"{p} is not a single-file Stable Diffusion checkpoint: expected model.diffusion_model.* "
                                 f"tensors (the original layout), found {len(keys)} tensors such as {sorted(keys)[:3]}")  # fmt: skip


def check_seed(seed: int, count: int = 1, flag: str = "--seed") -> None:
    """`seed` .. `seed + count - 1` are seeds torch.Generator.manual_seed takes ([-2**63, 2**64)); else a ValueError
    naming the flag (torch says only "Overflow when unpacking long", after the models load)."""
    if not (-(2**63) <= seed and seed + count - 1 < 2**64):
        extra = f" (and {flag} + {count - 1} for the later ones)" if count > 1 else ""
        raise ValueError(f"{flag} must be within [-2**63, 2**64){extra}, found {seed}")


# what `--dtype` accepts: the weights' dtype of the models that generate (scoring models stay float32)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    """"float16" -> torch.float16 (also "fp16", "bf16", "fp32"); a ValueError names the choices."""
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
    found = DTYPES.get(aliases.get(name, name))
    if found is None:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return found


def diffusers_dtype(dtype: torch.dtype) -> dict:
    """The dtype keyword for diffusers' `from_pretrained` / `from_single_file`: `dtype` where diffusers takes it (it
    deprecates `torch_dtype` since mid-2026 and warns on every load), `torch_dtype` in older releases."""
    import diffusers
    from diffusers.utils import deprecation_utils

    major = int(diffusers.__version__.split(".")[0])
    return {"dtype" if hasattr(deprecation_utils, "_resolve_dtype") or major >= 1 else "torch_dtype": dtype}


def single_file_is_sdxl(path: Path, config: str = "") -> bool:
    """Whether a single-file checkpoint is an SDXL one: from its config folder's pipeline class when one is given
    and local, else from its tensors (SDXL's two text encoders sit under `conditioner.embedders.*`, SD1.5's under
    `cond_stage_model.*`; only a safetensors header is read); a .ckpt without a config: from its name, as
    nothing can be read from a pickle without loading all of it."""
    model_index = Path(config) / "model_index.json" if config else None
    if model_index is not None and model_index.is_file():
        return "XL" in json.loads(model_index.read_text()).get("_class_name", "")
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return any(k.startswith("conditioner.embedders.") for k in f.keys())
    return "xl" in path.name.lower()


def load_pipeline(base: str = "tinyworld", dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  kind: str = "text2image", controlnet=None, config: str = "", **kwargs):
    """A diffusers Stable Diffusion / SDXL pipeline from a folder, a single .safetensors/.ckpt file or a hub id.

    Args:
        base: "tinyworld", a diffusers folder, a single checkpoint file, or a hub id.
        dtype: weights dtype (float32 on CPU by default).
        device: where the pipeline runs.
        kind: "text2image", "image2image" or "inpaint".
        controlnet: an optional ControlNetModel (or a list of them).
        config: for a single checkpoint file, the diffusers folder or hub id whose component configs it follows
            (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5); needed offline, where diffusers cannot fetch them.
        **kwargs: passed to `from_pretrained` / `from_single_file`.
    """
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image

    path = resolve_base(base)
    classes = {"text2image": AutoPipelineForText2Image, "image2image": AutoPipelineForImage2Image,
               "inpaint": AutoPipelineForInpainting}
    if kind not in classes:
        raise ValueError(f"kind must be one of {sorted(classes)}, found {kind!r}")
    extra = {"controlnet": controlnet} if controlnet is not None else {}
    # AutoPipeline's own options (e.g. enable_pag, pag_applied_layers: the PAG variant of the pipeline) choose the
    # class, so they go where the class is chosen: from_pipe for a single file
    extra.update({k: kwargs.pop(k) for k in ("enable_pag", "pag_applied_layers") if k in kwargs})
    t2i_adapter = kwargs.pop("t2i_adapter", None)  # a T2IAdapter: diffusers' (SD / SDXL) T2I-Adapter pipeline
    if t2i_adapter is not None:
        if kind != "text2image" or controlnet is not None:
            raise ValueError("a T2I-Adapter pipeline generates from text, without a ControlNet")
        classes = {"text2image": _t2i_adapter_class(path, config)}
        extra["adapter"] = t2i_adapter
    p = Path(path)
    check_base(path)
    if p.is_file():
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        single = StableDiffusionXLPipeline if single_file_is_sdxl(p, config) else StableDiffusionPipeline
        extra_single = {"config": config} if config else {}
        try:
            pipe = single.from_single_file(str(p), **diffusers_dtype(dtype), **extra_single, **kwargs)
        except (OSError, ValueError) as error:
            if config:
                raise
            example = ("stabilityai/stable-diffusion-xl-base-1.0" if single is StableDiffusionXLPipeline
                       else "stable-diffusion-v1-5/stable-diffusion-v1-5")  # fmt: skip
            raise ValueError(
                f"{p}: diffusers could not get the configs this single file needs ({error}); pass --base-config with "
                f"the diffusers folder or hub id it follows (e.g. {example}), which must be local when offline"
            ) from error
        pipe = classes[kind].from_pipe(pipe, **extra)
    else:
        pipe = classes[kind].from_pretrained(path, **diffusers_dtype(dtype), **extra, **kwargs)
    return pipe.to(device)
