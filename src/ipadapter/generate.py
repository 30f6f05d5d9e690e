"""`ipadapter generate`: image-prompted generation from the command line, with every input checked first.

The library function `generate()` does what the CLI does: check inputs, load the pipeline (the tiny world unless a
base is given), the adapter and its image encoder, run, and save PNGs whose text metadata holds every parameter.
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin

from .images import load_alpha, load_image


@dataclass
class GenerateConfig:
    """One `ipadapter generate` call."""

    images: list[str] = field(default_factory=list)  # reference image files, combined into one image prompt
    embeds: str = ""  # precomputed reference features (ipadapter embeddings .safetensors) instead of --image
    save_embeds: str = ""  # write the references' encoder features here (reusable with --embeds)
    combine: str = "concat"  # several references: concat / average / norm_average / add / subtract / max / min
    weights: list[float] = field(default_factory=list)  # one weight per reference
    prep: str = "center_crop"  # reference preparation: center_crop / pad / squash / tiles
    prompt: str = ""  # text prompt ("" = image-only prompting)
    negative_prompt: str = ""  # negative text prompt (default empty, as diffusers)
    negative_images: list[str] = field(default_factory=list)  # images used as the unconditional image prompt
    scale: float = 1.0  # image prompt weight lambda
    preset: str = ""  # per-block preset: style, composition, style_and_composition, ease_in, ... (blocks.PRESETS)
    composition_scale: float | None = None  # composition weight of style_and_composition presets
    boost: float | None = None  # style_precise / composition_precise: weight of the reference as a negative
    scaling: str = "v"  # where the scale acts: v (output), kv, kv_penalty, k_mean_v_penalty
    composition_image: str = ""  # style_and_composition with two images: the layout reference
    mask: str = ""  # mask image: the image prompt acts only where it is white
    image_masks: list[str] = field(default_factory=list)  # what of each reference the encoder sees (white)
    content_text: str = ""  # InstantStyle: remove this text's embedding from the image embedding (pooled adapters)
    content_scale: float = 1.0  # ... times this
    content_text_encoder: str = ""  # text tower paired with the image encoder (default: the tiny world's pair; SDXL:
    # the base's own text_encoder_2, the bigG adapters' pair)
    negative_noise: float = 0.0  # > 0: the unconditional image prompt is the reference with this much noise
    face_id: str = ""  # FaceID adapters: a .safetensors / .npy file with (512,) or (N, 512) ArcFace embeddings
    face_image: str = ""  # FaceID adapters: an image whose largest face insightface embeds (local model pack)
    insightface_root: str = ""  # insightface root holding models/buffalo_l (default: ~/.insightface)
    s_scale: float | None = None  # FaceID-PlusV2: weight of the face-structure branch (default 1.0)
    start: float = 0.0  # the image prompt acts from this fraction of the denoising ...
    end: float = 1.0  # ... up to this fraction
    steps: int | None = None  # denoising steps (default: the pipeline's)
    guidance: float | None = None  # classifier-free guidance (default: the pipeline's)
    pag_scale: float = 0.0  # > 0: perturbed-attention guidance of this scale (diffusers' PAG pipeline of the base)
    pag_layers: list[str] = field(default_factory=list)  # self-attention layers PAG perturbs (default: diffusers' mid)
    width: int | None = None  # image width in pixels, a multiple of 8 (default: the pipeline's; not for --init-image)
    height: int | None = None  # image height in pixels, a multiple of 8 (default: the pipeline's; not for --init-image)
    seed: int = 0  # torch.Generator("cpu").manual_seed(seed), as diffusers users write it
    num_images: int = 1  # images per reference
    base: str = "tinyworld"  # diffusers folder, single checkpoint file, hub id, or tinyworld
    base_config: str = ""  # single checkpoint file: the diffusers folder / hub id with its configs (needed offline)
    adapter: str = "tinyworld-base"  # IP-Adapter file (official layout or ours), or tinyworld-base / tinyworld-plus
    image_encoder: str = ""  # CLIP image encoder folder or hub id (default: the base's image_encoder/)
    init_image: str = ""  # image-to-image: the starting image
    strength: float = 0.6  # image-to-image: how much of the starting image is replaced
    inpaint_mask: str = ""  # inpainting (with init_image): white where the image is repainted
    controlnet: str = ""  # ControlNet folder or hub id (it sees the text tokens only)
    control_image: str = ""  # the ControlNet's condition image
    controlnet_scale: float = 1.0  # controlnet_conditioning_scale
    t2i_adapter: str = ""  # T2I-Adapter folder or hub id (text-to-image; it sees the condition image, not the prompt)
    t2i_adapter_scale: float = 1.0  # adapter_conditioning_scale
    out: str = "outputs"  # output folder
    device: str = "cpu"  # where to run
    dtype: str = "float32"  # weights of the pipeline, ControlNet, adapter and image encoder (float16 / bfloat16)
    show_progress: bool = True  # denoising progress bar


def check_inputs(cfg: GenerateConfig) -> None:
    """Every file and value is checked before any model is loaded (errors name what was expected and found)."""
    from .blocks import PRECISE, PRESETS
    from .combine import COMBINE_MODES
    from .references import PREP_MODES
    from .sources import check_seed, resolve_adapter, resolve_base

    alpha = cfg.image_masks == ["alpha"]  # each reference's own transparency
    images = [*cfg.images, *cfg.negative_images, *([] if alpha else cfg.image_masks)]
    for name in ("init_image", "composition_image", "mask", "inpaint_mask", "control_image", "face_image"):
        if getattr(cfg, name):
            images.append(getattr(cfg, name))
    for path in images:
        load_image(path)  # FileNotFoundError / ValueError with the path
    for path in (cfg.embeds, cfg.face_id):
        if path and not Path(path).is_file():
            raise FileNotFoundError(f"not found: {path}")
    if not cfg.images and not cfg.embeds and not cfg.face_id and not cfg.face_image:
        raise ValueError("expected at least one reference image (--image), embeddings (--embeds), --face-id or "
                         "--face-image; found none")  # fmt: skip
    if cfg.face_id and cfg.face_image:
        raise ValueError("pass --face-id (precomputed embeddings) or --face-image, not both")
    if cfg.images and cfg.embeds:
        raise ValueError("pass reference images (--image) or saved embeddings (--embeds), not both")
    if cfg.image_masks and not cfg.images:
        raise ValueError("--image-mask hides pixels of --image references; found none (saved --embeds have no pixels)")
    if alpha:
        for path in cfg.images:
            load_alpha(path)  # ValueError naming the reference without one
    if cfg.image_masks and len(cfg.image_masks) not in (1, len(cfg.images)):
        raise ValueError(f"expected one --image-mask, or one per --image ({len(cfg.images)}), found {len(cfg.image_masks)}")
    if cfg.negative_images and cfg.images and len(cfg.negative_images) not in (1, len(cfg.images)):
        raise ValueError(f"expected one --negative-image, or one per --image ({len(cfg.images)}), found "
                         f"{len(cfg.negative_images)}")  # fmt: skip
    for flag, value in (("--image-encoder", cfg.image_encoder), ("--controlnet", cfg.controlnet),
                        ("--t2i-adapter", cfg.t2i_adapter),
                        ("--content-text-encoder", cfg.content_text_encoder)):  # fmt: skip
        check_local_model(flag, value)
    adapter = resolve_adapter(cfg.adapter)
    if not Path(adapter).is_file():
        raise FileNotFoundError(f"adapter not found: {adapter}")
    for flag, value in (("--num-images", cfg.num_images), ("--steps", cfg.steps)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, found {value}")
    for flag, value in (("--width", cfg.width), ("--height", cfg.height)):
        if value is not None and (value < 8 or value % 8):
            raise ValueError(f"{flag} must be a positive multiple of 8 (as diffusers pipelines require), found {value}")
    if (cfg.width or cfg.height) and cfg.init_image and not cfg.inpaint_mask:
        raise ValueError("--width / --height do not apply with --init-image: image-to-image keeps the init image's size")
    numbers = {"--scale": cfg.scale, "--composition-scale": cfg.composition_scale, "--boost": cfg.boost,
               "--content-scale": cfg.content_scale, "--guidance": cfg.guidance, "--controlnet-scale": cfg.controlnet_scale,
               "--t2i-adapter-scale": cfg.t2i_adapter_scale,
               "--weights": sum(cfg.weights), "--s-scale": cfg.s_scale, "--pag-scale": cfg.pag_scale}  # fmt: skip
    for flag, value in numbers.items():
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{flag} must be a finite number, found {value}")
    from .sources import check_base, parse_dtype

    parse_dtype(cfg.dtype)
    check_base(cfg.base, must_exist=False)  # a missing one is named when it would load (after the other checks)
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise ValueError(f"--out {cfg.out} is a file; expected a folder (it receives the PNGs)")
    if not 0 <= cfg.start <= cfg.end <= 1:
        raise ValueError(f"expected 0 <= --start <= --end <= 1, found {cfg.start} and {cfg.end}")
    if not 0 < cfg.strength <= 1:
        raise ValueError(f"--strength must be in (0, 1], found {cfg.strength}")
    if cfg.preset and cfg.preset not in (*PRESETS, *PRECISE):
        raise ValueError(f"unknown --preset {cfg.preset!r}; expected one of {', '.join((*PRESETS, *PRECISE))}")
    from .state import SCALINGS

    if cfg.scaling not in SCALINGS:
        raise ValueError(f"unknown --scaling {cfg.scaling!r}; expected one of {', '.join(SCALINGS)}")
    if cfg.combine not in COMBINE_MODES:
        raise ValueError(f"unknown --combine {cfg.combine!r}; expected one of {', '.join(COMBINE_MODES)}")
    if cfg.prep not in PREP_MODES:
        raise ValueError(f"unknown --prep {cfg.prep!r}; expected one of {', '.join(PREP_MODES)}")
    if cfg.weights:
        count = len(cfg.images)
        if cfg.embeds:
            from .checkpoint import read_tensors

            tensors, _ = read_tensors(cfg.embeds, shapes_only=True)
            count = tensors["features"].shape[0] if "features" in tensors else 0
        if len(cfg.weights) != count:
            raise ValueError(f"expected one --weights value per reference image ({count}), found {len(cfg.weights)}")
    if cfg.controlnet and cfg.t2i_adapter:
        raise ValueError("pass --controlnet or --t2i-adapter, not both (diffusers has no pipeline with both)")
    if bool(cfg.controlnet or cfg.t2i_adapter) != bool(cfg.control_image):
        raise ValueError("--controlnet / --t2i-adapter and --control-image go together; found only one of them")
    if cfg.t2i_adapter and cfg.init_image:
        raise ValueError("--t2i-adapter generates from text (diffusers' T2I-Adapter pipelines have no image-to-image "
                         "or inpainting); found --init-image")  # fmt: skip
    if cfg.t2i_adapter and cfg.pag_scale > 0:
        raise ValueError("--t2i-adapter with --pag-scale: diffusers has no perturbed-attention guidance T2I-Adapter "
                         "pipeline")  # fmt: skip
    if cfg.t2i_adapter and Path(cfg.t2i_adapter).exists():
        config = Path(cfg.t2i_adapter) / "config.json"
        kind = read_config(config).get("_class_name") if config.is_file() else None
        if kind not in ("T2IAdapter", "MultiAdapter"):
            raise ValueError(f"{cfg.t2i_adapter} is not a diffusers T2I-Adapter folder: expected config.json with "
                             f"_class_name T2IAdapter, found {'no config.json' if kind is None else kind}")  # fmt: skip
    if cfg.controlnet and Path(cfg.controlnet).exists() and not (Path(cfg.controlnet) / "config.json").is_file():
        raise FileNotFoundError(f"{cfg.controlnet} is not a diffusers ControlNet folder: config.json missing")
    if cfg.inpaint_mask and not cfg.init_image:
        raise ValueError("--inpaint-mask needs --init-image (the image to repaint)")
    if cfg.content_text and not cfg.content_text_encoder and base_family(cfg) == "sd":
        raise ValueError(CONTENT_ENCODER_NEEDED)
    if not 0 <= cfg.negative_noise <= 1:
        raise ValueError(f"--negative-noise must be in [0, 1], found {cfg.negative_noise}")
    if cfg.negative_images and cfg.negative_noise > 0:
        raise ValueError("--negative-image and --negative-noise both choose the unconditional image prompt; pass one")
    if cfg.negative_noise > 0 and not cfg.images:
        raise ValueError("--negative-noise noises the reference images (--image); saved --embeds have no pixels")
    if cfg.prep == "tiles" and cfg.weights:
        raise ValueError("--weights are per reference image and --prep tiles turns each image into several: pass one")
    if cfg.composition_image and cfg.preset not in ("style_and_composition", "strong_style_and_composition"):
        raise ValueError("--composition-image needs --preset style_and_composition or strong_style_and_composition, "
                         f"found {cfg.preset or 'none'}")  # fmt: skip
    composed = ("composition", "style_and_composition", "strong_style_and_composition")
    if cfg.composition_scale is not None and cfg.preset not in composed:
        raise ValueError(f"--composition-scale weighs the composition blocks of --preset {' / '.join(composed)}; "
                         f"found {cfg.preset or 'no preset'}")  # fmt: skip
    if cfg.boost is not None and cfg.preset not in PRECISE:
        raise ValueError(f"--boost goes with --preset {' / '.join(PRECISE)}; found {cfg.preset or 'no preset'}")
    if cfg.base_config and not Path(resolve_base(cfg.base)).is_file():
        raise ValueError(f"--base-config gives the configs of a single-file --base; {cfg.base} is not a file")
    if cfg.save_embeds:
        if cfg.embeds:
            raise ValueError("--save-embeds writes the features of --image references; with --embeds they are saved already")
        if Path(cfg.save_embeds).is_dir():
            raise ValueError(f"--save-embeds {cfg.save_embeds} is a folder; expected a .safetensors file to write")
        if Path(cfg.save_embeds).suffix.lower() != ".safetensors":
            raise ValueError(f"--save-embeds writes safetensors; expected a name ending in .safetensors, found "
                             f"{cfg.save_embeds}")  # fmt: skip
        if Path(cfg.save_embeds).exists():
            raise ValueError(f"--save-embeds {cfg.save_embeds} exists; it is not replaced (remove it or name a new file)")
    if cfg.guidance is not None and cfg.guidance < 0:
        raise ValueError(f"--guidance must be >= 0 (up to 1: no classifier-free guidance), found {cfg.guidance}")
    check_pag(cfg)
    check_seed(cfg.seed)
    check_device(cfg.device)
    if cfg.init_image and cfg.steps is not None:
        check_denoising(cfg.steps, cfg.strength)
    if cfg.init_image and not (cfg.width and cfg.height):
        factor = vae_factor(cfg.base)
        size = load_image(cfg.init_image).size
        if min(size) < factor:  # diffusers rounds the size down to multiples of the factor: 0 ("must be > 0")
            raise ValueError(f"--init-image {cfg.init_image} is {size[0]}x{size[1]} px; image-to-image keeps its size, "
                             f"rounded down to multiples of {factor} (the VAE's downsampling): expected at least "
                             f"{factor} px a side")  # fmt: skip
    check_models(cfg)


def pag_pipeline_names(cfg: GenerateConfig) -> tuple[str, list[str]]:
    """(the kind of generation, diffusers' AutoPipeline keys its PAG pipeline may have for this base and ControlNet:
    both families' for a base not on disk)."""
    kind = "inpaint" if cfg.inpaint_mask else "image2image" if cfg.init_image else "text2image"
    family = base_family(cfg)
    families = {"sdxl": ["stable-diffusion-xl"], "unknown": ["stable-diffusion", "stable-diffusion-xl"]}.get(
        family, ["stable-diffusion"])
    return kind, [f"{f}{'-controlnet' if cfg.controlnet else ''}-pag" for f in families]


def check_pag(cfg: GenerateConfig) -> None:
    """--pag-scale / --pag-layers: a scale >= 0, layer patterns that compile, and a PAG pipeline in diffusers for
    this kind of generation (it has none for SD1.5 ControlNet image-to-image, nor SDXL ControlNet inpainting)."""
    import re

    if cfg.pag_scale < 0:
        raise ValueError(f"--pag-scale must be >= 0 (0: off), found {cfg.pag_scale}")
    if cfg.pag_layers and cfg.pag_scale == 0:
        raise ValueError("--pag-layers chooses the layers of perturbed-attention guidance; it acts only with --pag-scale > 0")
    for layer in cfg.pag_layers:
        try:
            re.compile(layer)
        except re.error as error:
            raise ValueError(f"--pag-layers {layer!r} is not a valid pattern of layer names ({error})") from error
    if cfg.pag_scale > 0:
        from diffusers.pipelines import auto_pipeline

        kind, names = pag_pipeline_names(cfg)
        mapping = {"text2image": auto_pipeline.AUTO_TEXT2IMAGE_PIPELINES_MAPPING,
                   "image2image": auto_pipeline.AUTO_IMAGE2IMAGE_PIPELINES_MAPPING,
                   "inpaint": auto_pipeline.AUTO_INPAINT_PIPELINES_MAPPING}[kind]  # fmt: skip
        if not any(name in mapping for name in names):
            name = names[0] if len(names) == 1 else " / ".join(names)
            have = sorted(k for k in mapping if k.startswith("stable-diffusion") and k.endswith("-pag")
                          and not k.startswith("stable-diffusion-3"))  # fmt: skip
            raise ValueError(f"--pag-scale: diffusers has no perturbed-attention guidance pipeline for {kind} with "
                             f"this base{' and a ControlNet' if cfg.controlnet else ''} ({name}); it has "
                             f"{', '.join(have)}")  # fmt: skip


def check_pag_layers(unet, layers: list[str]) -> None:
    """Each --pag-layers pattern names a self-attention layer of the UNet (diffusers' rule: a regular expression
    searched in the module names), checked when the UNet is loaded rather than at the first denoising step."""
    import re

    from diffusers.models.attention_processor import Attention

    names = [n for n, m in unet.named_modules() if isinstance(m, Attention) and not m.is_cross_attention]
    for layer in layers:
        if not any(re.search(layer, n) for n in names):
            blocks = sorted({n.split(".attentions")[0] for n in names})
            raise ValueError(f"--pag-layers {layer!r} names no self-attention layer of this UNet; its blocks with "
                             f"self-attention: {', '.join(blocks)} (e.g. mid, down_blocks.2, up_blocks.1)")  # fmt: skip


def check_local_model(flag: str, value: str) -> None:
    """A model flag's value written as a path (/..., ./..., ../..., ~..., a/b/c; optionally ::subfolder) must be on
    disk, as `sources.check_base` requires of --base: diffusers and transformers would take it for a hub id and fail
    after the other models load, with a message about the network or the syntax of repository names."""
    from .sources import looks_local

    name = str(value or "").split("::")[0]
    if looks_local(name) and not Path(name).expanduser().exists():
        raise FileNotFoundError(f"{flag} {value}: not found (expected a local model folder, or a hub id owner/name)")


def vae_factor(base: str) -> int:
    """The VAE's downsampling factor (2 ** (blocks - 1)) from a local base's vae/config.json; 8 (every Stable
    Diffusion and SDXL VAE) where there is none to read (a hub id, a single file)."""
    from .sources import resolve_base

    config = Path(resolve_base(base)) / "vae" / "config.json"
    try:
        return 2 ** (len(json.loads(config.read_text())["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return 8


def check_device(device: str) -> None:
    """A device torch knows and this machine has (ValueError naming it otherwise)."""
    try:
        found = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"unknown --device {device!r}: expected cpu, cuda, cuda:N, mps, ... ({error})") from error
    if found.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {device}: this machine has no CUDA GPU that torch can use "
                             f"(torch {torch.__version__}); use --device cpu")  # fmt: skip
        if found.index is not None and found.index >= count:
            raise ValueError(f"--device {device}: this machine has {count} CUDA GPU(s) (cuda:0 to cuda:{count - 1})")
    elif found.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available on this machine; use --device cpu")


def check_denoising(steps: int, strength: float) -> None:
    """Image-to-image and inpainting denoise int(steps * strength) steps (diffusers' rule): at least one."""
    if int(steps * strength) < 1:
        raise ValueError(f"--steps {steps} with --strength {strength} leaves int({steps} x {strength}) = 0 denoising "
                         f"steps; expected at least 1: raise --steps to {math.ceil(1 / strength)} or --strength")  # fmt: skip


CONTENT_ENCODER_NEEDED = (
    "--content-text needs --content-text-encoder: the text tower paired with the image encoder (e.g. "
    "laion/CLIP-ViT-H-14-laion2B-s32B-b79K for SD1.5 ViT-H adapters; an SDXL base's own text_encoder_2 is the "
    "default for its bigG adapters)"
)


def base_family(cfg: GenerateConfig) -> str:
    """"tinyworld", "sd" or "sdxl" for a base on disk (its pipeline class or a single file's tensors), else
    "unknown" (a hub id, or a base that the other checks will name)."""
    from .sources import resolve_base, single_file_is_sdxl

    if cfg.base == "tinyworld":
        return "tinyworld"
    base = Path(resolve_base(cfg.base))
    try:
        if base.is_dir() and (base / "model_index.json").is_file():
            return "sdxl" if "XL" in read_config(base / "model_index.json").get("_class_name", "") else "sd"
        if base.is_file():
            return "sdxl" if single_file_is_sdxl(base, cfg.base_config) else "sd"
    except Exception:  # an unreadable file: check_models names it
        return "unknown"
    return "unknown"


def unet_config(cfg: GenerateConfig) -> dict | None:
    """The base's UNet config when it is on disk (a diffusers folder, or a single file's --base-config folder)."""
    from .sources import resolve_base

    base = Path(resolve_base(cfg.base))
    folder = base if base.is_dir() else Path(cfg.base_config) if cfg.base_config else None
    path = None if folder is None else folder / "unet" / "config.json"
    return read_config(path) if path is not None and path.is_file() else None


def read_config(path: Path) -> dict:
    """A model's config.json; an unreadable one is named."""
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable JSON config: {error}") from error
    if not isinstance(found, dict):
        raise ValueError(f"{path} is not a model config: expected a JSON object, found {type(found).__name__}")
    return found


def check_models(cfg: GenerateConfig) -> None:
    """What can be checked of the models from their files alone, before any weights load: the adapter file (every
    key and shape), that it fits the base's UNet (from its config), the image encoder's config and --embeds against
    it, and the inputs its kind of adapter needs or ignores."""
    from .checkpoint import adapter_from_tensors, read_tensors
    from .embeds import check_embeds, has_unconditional
    from .encoders import check_encoder_folder
    from .sources import check_base, resolve_adapter, resolve_base, resolve_image_encoder

    path = Path(resolve_adapter(cfg.adapter))
    tensors, metadata = read_tensors(path, shapes_only=True)
    adapter = adapter_from_tensors(tensors, metadata, path.name)  # on the meta device: shapes only
    found = adapter.config
    name = f"{path.name} ({found.variant})"
    reads_images = found.image_feature != "none"
    if (cfg.face_id or cfg.face_image) and not found.id_embed_dim:
        raise ValueError(f"--face-id / --face-image need a FaceID adapter; {name} is not one")
    if found.id_embed_dim and not (cfg.face_id or cfg.face_image):
        raise ValueError(f"{name} is a FaceID adapter: pass --face-id (ArcFace embeddings) or --face-image")
    if cfg.s_scale is not None and not (found.projection == "faceid_plus" and found.shortcut):
        raise ValueError(f"--s-scale weighs the face-structure branch of FaceID-PlusV2 adapters; {name} has none")
    given = [flag for flag, value in (("--image", cfg.images), ("--embeds", cfg.embeds), ("--negative-image",
             cfg.negative_images), ("--composition-image", cfg.composition_image), ("--content-text", cfg.content_text),
             ("--save-embeds", cfg.save_embeds)) if value]  # fmt: skip
    if not reads_images and given:
        raise ValueError(f"{name} reads face embeddings only, no image: {', '.join(given)} would be ignored")
    if reads_images and not (cfg.images or cfg.embeds or cfg.face_image):
        raise ValueError(f"{name} needs a reference image (--image, --embeds, or --face-image for its face crop)")
    if cfg.content_text and found.image_feature != "pooled":
        raise ValueError(f"--content-text (InstantStyle) works on global image embeddings only; {name} reads "
                         f"{found.image_feature} features")  # fmt: skip
    if cfg.face_id and found.image_feature != "none":
        faces = load_face_id(cfg.face_id)
        if faces.shape[0] > 1:
            raise ValueError(f"{name} takes one face embedding with its reference image; {cfg.face_id} holds "
                             f"{faces.shape[0]} (several faces of one person go to FaceID / FaceID-Portrait adapters)")  # fmt: skip
    unet = unet_config(cfg)
    if unet is not None:
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):  # the layers' shapes from the config, no weights
            model = UNet2DConditionModel.from_config(unet)
        try:
            adapter._check_unet(model)
        except ValueError as error:
            raise ValueError(f"{name} does not fit the base {cfg.base}: {error}") from error
        if cfg.controlnet:
            check_controlnet(cfg, unet)
        if cfg.t2i_adapter:
            check_t2i_adapter(cfg, unet)
    if reads_images:
        encoder = resolve_image_encoder(cfg.base, cfg.image_encoder)
        if not encoder and not cfg.embeds:
            check_base(cfg.base)  # a base that does not exist is named as such
            where = "has no image_encoder/ folder" if Path(resolve_base(cfg.base)).exists() else \
                "is not a local folder: no image_encoder/ is looked for beside a hub id, and a folder of that name " \
                "does not exist here"  # (owner/name, a hub id, is also how a relative path looks)  # fmt: skip
            raise ValueError(f"{name} needs {found.image_encoder_name}; pass --image-encoder (the base {cfg.base} "
                             f"{where})")  # fmt: skip
        guided = cfg.guidance is None or cfg.guidance > 1  # (None: the pipeline's default, > 1 for SD and SDXL)
        if not encoder and cfg.embeds and found.image_feature == "penultimate" and guided and \
                not has_unconditional(cfg.embeds):  # fmt: skip
            raise ValueError(f"--embeds {cfg.embeds} holds no unconditional features (written by an older ipadapter), "
                             f"which {name} ({found.variant}) needs for guidance without its image encoder "
                             f"({found.image_encoder_name}); pass --image-encoder")  # fmt: skip
        if not encoder and cfg.embeds and (cfg.negative_images or cfg.composition_image):  # images to encode
            given = "--negative-image" if cfg.negative_images else "--composition-image"
            raise ValueError(f"{given} is encoded by {found.image_encoder_name}, and --embeds {cfg.embeds} is used "
                             "without an image encoder; pass --image-encoder")  # fmt: skip
        if encoder:
            check_encoder_folder(found, encoder)
    if cfg.embeds:
        check_embeds(cfg.embeds, found)


def check_controlnet(cfg: GenerateConfig, unet: dict) -> None:
    """A local ControlNet's config against the base's UNet and VAE configs: its residuals must match the UNet's
    blocks and its condition encoder must downsample as the VAE does."""

    path = Path(cfg.controlnet) / "config.json"
    if not path.is_file():
        return  # a hub id
    control = read_config(path)
    kind = control.get("_class_name", "ControlNetModel")
    if kind != "ControlNetModel":
        raise ValueError(f"{cfg.controlnet} holds a {kind}; expected a ControlNetModel folder (config.json with "
                         "_class_name ControlNetModel)")  # fmt: skip
    for key in ("cross_attention_dim", "block_out_channels", "layers_per_block"):
        if key in control and key in unet and control[key] != unet[key]:
            raise ValueError(f"the ControlNet {cfg.controlnet} is for a UNet with {key} {control[key]}; the base's "
                             f"UNet has {unet[key]}")  # fmt: skip
    latent = vae_scale(cfg)
    if latent is not None and "conditioning_embedding_out_channels" in control:
        condition = 2 ** (len(control["conditioning_embedding_out_channels"]) - 1)
        if latent != condition:
            raise ValueError(f"the ControlNet {cfg.controlnet} encodes its condition image at 1/{condition} of its "
                             f"size; the base's VAE makes latents at 1/{latent}")  # fmt: skip


def vae_scale(cfg: GenerateConfig) -> int | None:
    """How many pixels of the base's images one latent cell covers (8 for SD1.5 / SDXL), from its VAE config on disk;
    None when it is not on disk."""
    from .sources import resolve_base

    base = Path(resolve_base(cfg.base))
    folder = base if base.is_dir() else Path(cfg.base_config) if cfg.base_config else None
    path = None if folder is None else folder / "vae" / "config.json"
    if path is None or not path.is_file():
        return None
    return 2 ** (len(read_config(path).get("block_out_channels", [0])) - 1)


def check_t2i_adapter(cfg: GenerateConfig, unet: dict) -> None:
    """A local T2I-Adapter against the base's UNet config: its feature maps are added inside the UNet's down blocks,
    so their channels and sizes must be those blocks' (otherwise diffusers fails in the first denoising step, after
    every model has loaded). Both models run on the meta device from their configs (shapes only, nothing computed;
    the UNet's transformers one layer deep, which does not change where the features are added)."""
    path = Path(cfg.t2i_adapter) / "config.json"
    if not path.is_file() or read_config(path).get("_class_name") != "T2IAdapter":
        return  # a hub id, or a MultiAdapter (diffusers checks its parts against each other)
    from diffusers import T2IAdapter, UNet2DConditionModel

    config = read_config(path)
    layout = {**{k: v for k, v in unet.items() if not k.startswith("_")}, "transformer_layers_per_block": 1}
    scale = vae_scale(cfg) or 8
    with torch.device("meta"):
        model = UNet2DConditionModel.from_config(layout)
        adapter = T2IAdapter.from_config(config)
        side = 2 * math.lcm(adapter.total_downscale_factor, scale * 2 ** (len(layout["block_out_channels"]) - 1))
        features = adapter(torch.empty(1, config.get("in_channels", 3), side, side))
        inputs = {"sample": torch.empty(1, layout.get("in_channels", 4), side // scale, side // scale),
                  "timestep": torch.tensor(1), "encoder_hidden_states": torch.empty(1, 1, layout["cross_attention_dim"])}
        if layout.get("addition_embed_type") == "text_time":  # SDXL: pooled text embedding and size/crop ids
            time_dim = layout["addition_time_embed_dim"]
            inputs["added_cond_kwargs"] = {
                "text_embeds": torch.empty(1, layout["projection_class_embeddings_input_dim"] - 6 * time_dim),
                "time_ids": torch.empty(1, 6)}  # fmt: skip
        try:
            model(**inputs, down_intrablock_additional_residuals=list(features))
        except (RuntimeError, ValueError) as error:
            try:
                model(**inputs)
            except Exception:  # the UNet alone does not run on these inputs: this check cannot tell, diffusers will
                return
            found = ", ".join(f"{f.shape[1]} channels at 1/{side // f.shape[-1]}" for f in features)
            raise ValueError(
                f"the T2I-Adapter {cfg.t2i_adapter} does not fit the base's UNet: its feature maps have {found} of the "
                f"image's size; the UNet's down blocks have {list(layout['block_out_channels'])} channels, from "
                f"latents at 1/{scale} of the image ({str(error).splitlines()[0]})"
            ) from error


def image_masks(cfg: GenerateConfig) -> list | None:
    """--image-mask files, or with `alpha` each --image's own transparency (opaque: seen by the encoder)."""
    if cfg.image_masks == ["alpha"]:
        return [load_alpha(p) for p in cfg.images]
    return [load_image(m) for m in cfg.image_masks] or None


def face_embedding(cfg: GenerateConfig) -> tuple[torch.Tensor, Image.Image]:
    """(1, 512) ArcFace embedding of the largest face in --face-image and its aligned crop (what FaceID-Plus reads
    through the image encoder), with insightface and a local model pack."""
    from .faces import FaceEmbedder

    embedder = FaceEmbedder(root=cfg.insightface_root or None,
                            instead="pass --face-id with precomputed 512-d ArcFace embeddings (.npy / .safetensors)")
    image = load_image(cfg.face_image)
    return embedder.embed(image)[None], embedder.aligned_crop(image)


def load_face_id(path: str | Path) -> torch.Tensor:
    """(N, 512) ArcFace embeddings from a .npy file or a .safetensors file (its only tensor, or "face_id")."""
    import numpy as np

    path = Path(path)
    if path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"cannot read {path} as a numeric .npy array: {e}") from e
        tensor = torch.from_numpy(np.asarray(array, dtype=np.float32))
    elif path.suffix == ".safetensors":
        from .checkpoint import read_tensors

        tensors, _ = read_tensors(path)
        if "face_id" not in tensors and len(tensors) != 1:
            raise ValueError(f"{path} holds {sorted(tensors)}; expected one tensor or one named 'face_id'")
        tensor = tensors.get("face_id", next(iter(tensors.values()))).float()
    else:
        raise ValueError(f"--face-id takes a .npy or .safetensors file, found {path.name}")
    tensor = tensor.reshape(-1, tensor.shape[-1])
    if tensor.shape[-1] != 512:
        raise ValueError(f"{path}: expected 512-d ArcFace embeddings, found shape {tuple(tensor.shape)}")
    return tensor


def generate(cfg: GenerateConfig) -> list[Path]:
    """Runs `cfg`; returns the written PNG paths."""
    from .adapter import IPAdapter
    from .encoders import ImageEncoder
    from .embeds import load_embeds, load_unconditional, save_embeds
    from .prompter import ImagePrompt, ImagePrompter
    from .sources import diffusers_dtype, load_pipeline, parse_dtype, resolve_adapter, resolve_image_encoder

    check_inputs(cfg)
    dtype = parse_dtype(cfg.dtype)
    for folder in (Path(cfg.out), Path(cfg.save_embeds).parent if cfg.save_embeds else None):
        if folder is not None:
            try:  # before any model work, so that a bad path costs nothing
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise ValueError(f"cannot create the folder {folder}: {error.strerror}") from error
    # face embeddings before any model: a missing insightface or model pack fails fast
    faces, face_crop = (load_face_id(cfg.face_id), None) if cfg.face_id else \
        face_embedding(cfg) if cfg.face_image else (None, None)  # fmt: skip
    kind = "inpaint" if cfg.inpaint_mask else "image2image" if cfg.init_image else "text2image"
    controlnet = None
    if cfg.controlnet:
        from diffusers import ControlNetModel

        controlnet = ControlNetModel.from_pretrained(cfg.controlnet, **diffusers_dtype(dtype))
    pag = {"enable_pag": True, "pag_applied_layers": cfg.pag_layers or ["mid"]} if cfg.pag_scale > 0 else {}
    if cfg.t2i_adapter:
        from diffusers import T2IAdapter

        pag["t2i_adapter"] = T2IAdapter.from_pretrained(cfg.t2i_adapter, **diffusers_dtype(dtype))
    pipe = load_pipeline(cfg.base, dtype=dtype, device=cfg.device, kind=kind, controlnet=controlnet, config=cfg.base_config,
                         **pag)  # fmt: skip
    if cfg.pag_scale > 0:
        check_pag_layers(pipe.unet, pag["pag_applied_layers"])
    pipe.set_progress_bar_config(disable=not cfg.show_progress)
    defaults = inspect.signature(pipe.__call__).parameters  # record what the pipeline will really use
    steps = cfg.steps if cfg.steps is not None else defaults["num_inference_steps"].default
    guidance = cfg.guidance if cfg.guidance is not None else defaults["guidance_scale"].default
    if cfg.init_image:
        check_denoising(steps, cfg.strength)  # with the pipeline's default steps
    adapter = IPAdapter.from_file(resolve_adapter(cfg.adapter), dtype=dtype, unet=pipe.unet)
    encoder = None
    if adapter.config.image_feature != "none" and not cfg.embeds:
        path = resolve_image_encoder(cfg.base, cfg.image_encoder)
        if not path:
            raise ValueError(f"this adapter needs {adapter.config.image_encoder_name}; pass --image-encoder")
        encoder = ImageEncoder.from_pretrained(path, dtype=dtype, device=cfg.device)
    elif adapter.config.image_feature != "none":
        path = resolve_image_encoder(cfg.base, cfg.image_encoder)  # for the unconditional features, when present
        encoder = ImageEncoder.from_pretrained(path, dtype=dtype, device=cfg.device) if path else None
    prompter = ImagePrompter(pipe, adapter, encoder)  # checks the encoder against the adapter
    if cfg.embeds:
        references = list(load_embeds(cfg.embeds, adapter.config)[0])
    else:
        references = [load_image(p) for p in cfg.images]
    if faces is not None and adapter.config.image_feature == "none":
        faces = faces[None]  # (1, K, 512): K faces of one person, their tokens concatenated (FaceID-Portrait)
    if not references and face_crop is not None and adapter.config.image_feature != "none":
        references = [face_crop]  # FaceID-Plus: the aligned face of --face-image, as the official pipeline does
    if cfg.save_embeds and cfg.images and adapter.config.image_feature != "none":
        feature = adapter.config.image_feature
        save_embeds(cfg.save_embeds, prompter.features(references, prep=cfg.prep, masks=image_masks(cfg)), feature,
                    encoder=resolve_image_encoder(cfg.base, cfg.image_encoder),
                    unconditional=encoder.unconditional(feature, 1))  # fmt: skip
    # no negative prompt: None, as a diffusers user leaves it (SD: the empty prompt; SDXL: zeros, force_zeros_for_empty_prompt)
    kwargs: dict = {"negative_prompt": cfg.negative_prompt or None, "num_images_per_prompt": cfg.num_images,
                    "generator": torch.Generator("cpu").manual_seed(cfg.seed), "num_inference_steps": steps}
    kwargs.update({k: v for k, v in (("width", cfg.width), ("height", cfg.height)) if v is not None})
    if cfg.pag_scale > 0:
        kwargs.update(pag_scale=cfg.pag_scale)
    if cfg.init_image:
        kwargs.update(image=load_image(cfg.init_image), strength=cfg.strength)
    if cfg.inpaint_mask:
        kwargs.update(mask_image=load_image(cfg.inpaint_mask))
    if cfg.t2i_adapter:  # the condition image at the output's size (the pipeline resizes it to height x width)
        control = load_image(cfg.control_image)  # RGB
        if getattr(pipe.adapter.config, "in_channels", 3) == 1:  # canny / sketch adapters read one channel ("L")
            control = control.convert("L")
        kwargs.update(image=control, adapter_conditioning_scale=cfg.t2i_adapter_scale)
    if controlnet is not None:
        key = "control_image" if cfg.init_image else "image"
        kwargs.update({key: load_image(cfg.control_image), "controlnet_conditioning_scale": cfg.controlnet_scale})
        if cfg.init_image:  # the init image's size for all three images (diffusers would take each one's own)
            for key, value in zip(("width", "height"), fitted_size(kwargs["image"].size, pipe.vae_scale_factor)):
                kwargs.setdefault(key, value)  # --width / --height (inpainting) are kept
    content = None
    if cfg.content_text:
        from .encoders import TextEmbedder

        if cfg.content_text_encoder or cfg.base == "tinyworld":
            embedder = TextEmbedder.from_pretrained(cfg.content_text_encoder or "tinyworld")
        elif getattr(pipe, "text_encoder_2", None) is not None:  # SDXL: its bigG text tower, the bigG adapters' pair
            embedder = TextEmbedder(pipe.text_encoder_2, pipe.tokenizer_2)
        else:
            raise ValueError(CONTENT_ENCODER_NEEDED)
        content = embedder.encode(cfg.content_text)
        if content.shape[-1] != adapter.config.image_embed_dim:
            raise ValueError(f"--content-text: the text tower's embeddings are {content.shape[-1]}-d and this adapter's "
                             f"image embeddings {adapter.config.image_embed_dim}-d ({adapter.config.image_encoder_name}); "
                             "pass --content-text-encoder with the text tower paired with that image encoder")  # fmt: skip
    prompt = ImagePrompt(
        image=references or None, scale=cfg.scale, preset=cfg.preset or None, composition_scale=cfg.composition_scale,
        boost=cfg.boost, scaling=cfg.scaling,
        composition_image=load_image(cfg.composition_image) if cfg.composition_image else None, combine=cfg.combine,
        weights=cfg.weights or None, prep=cfg.prep, image_mask=image_masks(cfg),
        negative_image=[load_image(p) for p in cfg.negative_images] or None, negative_noise=cfg.negative_noise,
        mask=load_image(cfg.mask) if cfg.mask else None, start=cfg.start, end=cfg.end,
        face_id=faces, s_scale=cfg.s_scale, content_embeds=content, content_scale=cfg.content_scale,
        unconditional=load_unconditional(cfg.embeds) if cfg.embeds and encoder is None else None,
    )  # fmt: skip
    images = prompter(prompt=cfg.prompt, prompts=[prompt], guidance_scale=guidance, **kwargs).images
    prompter.detach()
    out = Path(cfg.out)
    meta = PngImagePlugin.PngInfo()
    # what makes the image (not show_progress, nor save_embeds: an output, refused once written, so the parameters
    # could not be run again)
    params = {**{k: v for k, v in asdict(cfg).items() if k not in ("show_progress", "save_embeds")}, "steps": steps,
              "guidance": guidance}  # fmt: skip
    meta.add_text("ipadapter", json.dumps(params))
    # the A1111-style line image viewers and model sites read (the scheduler as "Sampler": diffusers' class name)
    meta.add_text("parameters", f"{cfg.prompt}\nNegative prompt: {cfg.negative_prompt}\nSteps: {steps}, "
                                f"Sampler: {type(pipe.scheduler).__name__}, CFG scale: {guidance}, Seed: {cfg.seed}, "
                                f"Size: {images[0].width}x{images[0].height}, Model: {cfg.base}, "
                                f"IP-Adapter: {cfg.adapter} ({cfg.scale})"
                                + (f", PAG scale: {cfg.pag_scale}" if cfg.pag_scale > 0 else ""))  # fmt: skip
    paths = output_paths(out, cfg.seed, len(images))
    for path, image in zip(paths, images):
        image.save(path, pnginfo=meta)
    return paths


def output_paths(folder: Path, seed: int, count: int) -> list[Path]:
    """`{seed}-{i}.png` for the i-th image, or with `-{run}` added, the first run number that overwrites nothing
    (earlier generations into the same folder are kept)."""
    stem = f"{seed:06d}" if seed >= 0 else f"n{-seed:06d}"  # no file name that starts with a dash
    run = 0
    while True:
        suffix = f"-{run}" if run else ""
        paths = [folder / f"{stem}-{i:03d}{suffix}.png" for i in range(count)]
        if not any(p.exists() for p in paths):
            return paths
        run += 1


def fitted_size(size: tuple[int, int], factor: int) -> tuple[int, int]:
    """(width, height) rounded down to multiples of the VAE's downsampling `factor`, as diffusers' image processor
    rounds an init image."""
    width, height = (max(factor, v // factor * factor) for v in size)
    return width, height


def read_parameters(path: str | Path) -> dict:
    """The generation parameters stored in a PNG written by `generate`."""
    with Image.open(path) as image:
        return json.loads(image.text["ipadapter"])
