"""The named IP-Adapter variants: one table drives detection labels, fresh adapters for training, and CLI choices."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    """One kind of IP-Adapter, official or generic."""

    name: str  # table key, also used as CLI choice
    projection: str  # linear | resampler | mlp | faceid | faceid_plus
    num_tokens: int  # image tokens per reference (per face for FaceID-Portrait)
    image_feature: str  # pooled | penultimate | none
    family: str  # "SD1.5", "SDXL" or "any" (generic: sized from the UNet it is built for)
    image_embed_dim: int = 0  # encoder width the official files expect (0: taken from the encoder at build time)
    id_embed_dim: int = 0  # face-identity width (512 ArcFace) for FaceID variants
    lora_rank: int = 0  # FaceID LoRA rank (128 in official files)
    shortcut: bool = False  # FaceID-PlusV2 shortcut
    resampler_dim: int = 0  # perceiver width; 0 = the UNet's cross_attention_dim
    resampler_heads: int = 0  # perceiver heads; 0 = resampler_dim // 64
    attention: str = "decoupled"  # decoupled, or concat (image tokens appended to the text tokens; ablation only)
    files: tuple[str, ...] = ()  # official files with this layout
    note: str = ""  # one line for humans


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [
        # --- generic variants, sized from the UNet and encoder they are built for (training, tiny world) ---
        Variant("base", "linear", 4, "pooled", "any", note="linear projection of the pooled embedding to 4 tokens"),
        Variant("plus", "resampler", 16, "penultimate", "any", note="Resampler: 16 queries over penultimate tokens"),
        Variant("concat", "linear", 4, "pooled", "any", attention="concat",
                note="the paper's simple adapter (Fig. 10 ablation): base's 4 tokens appended to the text tokens"),
        Variant("full", "mlp", 0, "penultimate", "any", note="MLP over every penultimate token (257 for ViT-H)"),
        Variant("faceid", "faceid", 4, "none", "any", id_embed_dim=512, lora_rank=128, note="ArcFace -> 4 tokens + LoRA"),
        Variant("faceid_plus", "faceid_plus", 4, "penultimate", "any", id_embed_dim=512, lora_rank=128,
                note="ArcFace tokens as queries over the face crop's CLIP tokens + LoRA"),
        Variant("faceid_plusv2", "faceid_plus", 4, "penultimate", "any", id_embed_dim=512, lora_rank=128, shortcut=True,
                note="FaceID-Plus with shortcut and s_scale"),
        Variant("faceid_portrait", "faceid", 16, "none", "any", id_embed_dim=512,
                note="16 tokens per face, several faces concatenated, no LoRA"),
        # --- official SD1.5 checkpoints ---
        Variant("sd15", "linear", 4, "pooled", "SD1.5", 1024,
                files=("ip-adapter_sd15", "ip-adapter_sd15_light", "ip-adapter_sd15_light_v11")),
        Variant("sd15_vit-G", "linear", 4, "pooled", "SD1.5", 1280, files=("ip-adapter_sd15_vit-G",)),
        Variant("sd15_plus", "resampler", 16, "penultimate", "SD1.5", 1280,
                files=("ip-adapter-plus_sd15", "ip-adapter-plus-face_sd15")),
        Variant("sd15_full_face", "mlp", 257, "penultimate", "SD1.5", 1280, files=("ip-adapter-full-face_sd15",)),
        Variant("faceid_sd15", "faceid", 4, "none", "SD1.5", id_embed_dim=512, lora_rank=128,
                files=("ip-adapter-faceid_sd15",)),
        Variant("faceid_plus_sd15", "faceid_plus", 4, "penultimate", "SD1.5", 1280, id_embed_dim=512, lora_rank=128,
                files=("ip-adapter-faceid-plus_sd15",)),
        Variant("faceid_plusv2_sd15", "faceid_plus", 4, "penultimate", "SD1.5", 1280, id_embed_dim=512,
                lora_rank=128, shortcut=True, files=("ip-adapter-faceid-plusv2_sd15",)),
        Variant("faceid_portrait_sd15", "faceid", 16, "none", "SD1.5", id_embed_dim=512,
                files=("ip-adapter-faceid-portrait_sd15", "ip-adapter-faceid-portrait-v11_sd15")),
        # --- official SDXL checkpoints ---
        Variant("sdxl", "linear", 4, "pooled", "SDXL", 1280, files=("ip-adapter_sdxl",)),
        Variant("sdxl_vit-h", "linear", 4, "pooled", "SDXL", 1024, files=("ip-adapter_sdxl_vit-h",)),
        Variant("sdxl_plus_vit-h", "resampler", 16, "penultimate", "SDXL", 1280, resampler_dim=1280,
                resampler_heads=20, files=("ip-adapter-plus_sdxl_vit-h", "ip-adapter-plus-face_sdxl_vit-h")),
        Variant("faceid_sdxl", "faceid", 4, "none", "SDXL", id_embed_dim=512, lora_rank=128,
                files=("ip-adapter-faceid_sdxl",)),
        Variant("faceid_plusv2_sdxl", "faceid_plus", 4, "penultimate", "SDXL", 1280, id_embed_dim=512, lora_rank=128,
                shortcut=True, files=("ip-adapter-faceid-plusv2_sdxl",)),
        Variant("faceid_portrait_sdxl", "faceid", 16, "none", "SDXL", id_embed_dim=512,
                files=("ip-adapter-faceid-portrait_sdxl",)),
    ]
}

GENERIC = tuple(name for name, v in VARIANTS.items() if v.family == "any")


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; expected one of {sorted(VARIANTS)}")
    return VARIANTS[name]


def match_variant(
    projection: str, num_tokens: int, family: str, image_embed_dim: int, lora_rank: int, filename: str = ""
) -> str:
    """The official variant with these detected properties, else the generic one.

    FaceID-Plus v1 and PlusV2 share one layout; like ComfyUI we tell them apart by "plusv2" in the file name.
    """
    wants_shortcut = "plusv2" in filename.lower().replace("-", "").replace("_", "")
    candidates = [
        v
        for v in VARIANTS.values()
        if v.family == family
        and v.projection == projection
        and v.num_tokens == num_tokens
        and v.lora_rank == lora_rank
        and (v.image_embed_dim in (0, image_embed_dim))
        and (v.projection != "faceid_plus" or v.shortcut == wants_shortcut)
    ]
    if candidates:
        return candidates[0].name
    generic = [
        v for v in VARIANTS.values()
        if v.family == "any" and v.projection == projection and v.num_tokens in (0, num_tokens)
        and (v.projection != "faceid_plus" or v.shortcut == wants_shortcut)
        and (v.projection != "faceid" or (v.lora_rank > 0) == (lora_rank > 0))
    ]
    return generic[0].name if generic else "custom"
