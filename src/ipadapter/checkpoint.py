"""Reading, checking and writing IP-Adapter checkpoints.

Layouts understood:
- official `.bin`: `torch.save({"image_proj": {...}, "ip_adapter": {...}})`, read with `weights_only=True` only;
- official `.safetensors`: the same tensors flat, as `image_proj.<k>` / `ip_adapter.<k>`;
- the official trainer's accelerate state (`image_proj_model.*`, `adapter_modules.*`, `unet.*` ignored);
- ours: safetensors with our parameter names and the `AdapterConfig` JSON in the metadata.

Each foreign layout is mapped by one pure function (`official_to_internal`, `internal_to_official`,
`training_to_official`). Loading is strict: the config is derived from keys and shapes, then every key and shape is
checked against the module that config builds, before any tensor is used.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
from collections import Counter
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .config import AdapterConfig, ResamplerConfig, base_family
from .files import atomic_write, save_safetensors
from .variants import match_variant

FORMAT_KEY = "format"
FORMAT_NAME = "ipadapter"
CONFIG_KEY = "ipadapter_config"
VERSION_KEY = "format_version"
FORMAT_VERSION = "1"  # bumped when older code could not read what we write

_IP_KEY = re.compile(r"^(\d+)\.(to_k_ip|to_v_ip)\.weight$")
_LORA_KEY = re.compile(r"^(\d+)\.(to_q_lora|to_k_lora|to_v_lora|to_out_lora)\.(down|up)\.weight$")


# ---- reading files ----------------------------------------------------------------------------------------------
# safetensors dtype name -> torch dtype, for every one this torch has (float8 arrived in torch 2.1, uint16-64 in 2.3).
_SAFETENSORS_DTYPES = {
    name: getattr(torch, attr)
    for name, attr in {
        "BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16", "U32": "uint32", "I32": "int32",
        "U64": "uint64", "I64": "int64", "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
        "C64": "complex64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E4M3FNUZ": "float8_e4m3fnuz",
        "F8_E5M2FNUZ": "float8_e5m2fnuz", "F8_E8M0": "float8_e8m0fnu", "F4": "float4_e2m1fn_x2",
    }.items()
    if hasattr(torch, attr)
}  # fmt: skip


def adapter_file(path: str | os.PathLike) -> Path:
    """`path`, or the adapter file inside a training checkpoint folder (`checkpoint-N/adapter.safetensors`)."""
    path = Path(path)
    if path.is_dir() and (path / "adapter.safetensors").is_file():
        return path / "adapter.safetensors"
    return path


def read_tensors(path: str | os.PathLike, shapes_only: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Reads a checkpoint file into flat `{name: tensor}` plus safetensors metadata, never running pickled code.

    Nested official `.bin` dicts are flattened to `image_proj.<k>` / `ip_adapter.<k>`. With `shapes_only` the
    tensors are meta tensors (shape and dtype, no data), which is enough to inspect or validate a large file.
    """
    path = adapter_file(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: expected a .safetensors or .bin file at {path}")
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        return _read_safetensors(path, shapes_only)
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive ("PK\x03\x04"); legacy files and raw pickles start with the PROTO opcode 0x80.
    if head != b"PK\x03\x04" and head[:1] != b"\x80":
        raise ValueError(
            f"{path} is not a PyTorch checkpoint (expected a torch.save zip archive or a .safetensors file; "
            f"found a file starting with {head!r})"
        )
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=(shapes_only and head == b"PK\x03\x04") or None)
    except pickle.UnpicklingError as e:
        reason = next((line.strip() for line in str(e).splitlines() if "Unsupported" in line), "")
        reason = reason.split(" was not an allowed global")[0].removeprefix("WeightsUnpickler error: ")
        raise ValueError(
            f"refused to load {path}: it is not a plain tensor checkpoint - its pickle holds Python objects or "
            "instructions that the safe loader (torch.load weights_only=True) does not accept, and that could run "
            f"code{f' ({reason})' if reason else ''}. If the file is complete (not truncated), get a .safetensors "
            "version of this checkpoint from a source you trust."
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}; expected a dict of tensors")
    flat = _flatten(obj, path)
    if shapes_only:
        flat = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in flat.items()}
    return flat, {}


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file under another name (a `.bin`, an extensionless Hugging Face cache blob): an 8-byte
    little-endian header length that fits the file, then a JSON object."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        size = path.stat().st_size
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= size - 8


def _read_safetensors(path: Path, shapes_only: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
            unsupported = _unsupported_dtype(dtypes, path)
            if unsupported is None and not shapes_only:
                return {k: f.get_tensor(k) for k in dtypes}, metadata
            if unsupported is None:
                tensors = {}
                for k, dtype in dtypes.items():
                    shape = list(f.get_slice(k).get_shape())
                    if dtype == "F4" and shape:
                        shape[-1] //= 2  # F4 counts 4-bit values; torch's float4_e2m1fn_x2 packs two per element
                    tensors[k] = torch.empty(shape, dtype=_SAFETENSORS_DTYPES[dtype], device="meta")
                return tensors, metadata
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        unsupported = _unsupported_dtype(_header_dtypes(path), path)  # a dtype safetensors does not know: no corruption
        if unsupported is None:
            raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    raise ValueError(unsupported)


def _unsupported_dtype(dtypes: dict[str, str], path: Path) -> str | None:
    """The error message for the first tensor whose dtype this torch cannot hold, if any."""
    for key, dtype in dtypes.items():
        if dtype not in _SAFETENSORS_DTYPES:
            return (f"{path}: unsupported tensor dtype {dtype} in key {key!r}; this torch ({torch.__version__}) reads "
                    f"{', '.join(_SAFETENSORS_DTYPES)}")  # fmt: skip
    return None


def _header_dtypes(path: Path) -> dict[str, str]:
    """`{key: dtype}` read from a safetensors header directly (for one safetensors refused), {} if it is not JSON."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))  # the header's length, then the header as JSON
            header = json.loads(f.read(min(size, 100_000_000)))
        return {k: str(v["dtype"]) for k, v in header.items() if k != "__metadata__"}
    except (OSError, struct.error, ValueError, TypeError, KeyError, AttributeError):
        return {}


def _flatten(obj: dict, path: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    flat: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            flat[name] = value
        elif isinstance(value, dict):
            flat.update(_flatten(value, path, name + "."))
        else:
            raise ValueError(f"{path}: entry {name!r} is a {type(value).__name__}; expected tensors only")
    return flat


def detect_layout(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """'ipadapter', 'official' or 'training' (official trainer's accelerate state)."""
    if metadata.get(FORMAT_KEY) == FORMAT_NAME:
        return "ipadapter"
    if any(k.startswith("image_proj.") for k in tensors) and any(k.startswith("ip_adapter.") for k in tensors):
        return "official"
    if any(k.startswith("image_proj_model.") for k in tensors) and any(
        k.startswith("adapter_modules.") or (k.startswith("unet.") and ".processor." in k) for k in tensors
    ):
        return "training"
    sample = sorted(tensors)[:5]
    raise ValueError(
        "not an IP-Adapter checkpoint: expected `image_proj.*` and `ip_adapter.*` tensors (official layout) or "
        f"ipadapter metadata; found {len(tensors)} tensors such as {sample}{_what_it_is(tensors)}"
    )


def _what_it_is(tensors: dict[str, torch.Tensor]) -> str:
    """A hint for files often taken for IP-Adapters: LoRAs, whole UNets or pipelines, image encoders."""
    keys = list(tensors)
    if any("lora" in k.lower() for k in keys):
        return " - this looks like a LoRA (its tensors name lora): load it with diffusers' pipe.load_lora_weights()"
    if any(k.startswith(("model.diffusion_model.", "conv_in.", "down_blocks.")) for k in keys):
        return " - this looks like a UNet or a whole Stable Diffusion checkpoint, to pass as --base"
    if any(k.startswith("vision_model.") for k in keys):
        return " - this looks like a CLIP image encoder, to pass as --image-encoder (its folder)"
    return ""


# ---- pure layout mappings ---------------------------------------------------------------------------------------
def training_to_official(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official trainer state (`image_proj_model.*`, `adapter_modules.{k}.*`) -> official layout; `unet.*` dropped.

    `adapter_modules` is `ModuleList(unet.attn_processors.values())`, so its index is the official index.
    """
    out = {}
    for key, value in tensors.items():
        if key.startswith("image_proj_model."):
            out["image_proj." + key.removeprefix("image_proj_model.")] = value
        elif key.startswith("adapter_modules."):
            out["ip_adapter." + key.removeprefix("adapter_modules.")] = value
    if not any(k.startswith("ip_adapter.") for k in out):
        out.update(_processors_from_unet(tensors))
    return out


_ATTENTION = re.compile(r"^unet\.((?:down_blocks|up_blocks|mid_block)\..*\.attn\d+)\.to_q\.weight$")


def _processors_from_unet(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`ip_adapter.{k}.*` from `unet.<attention>.processor.*`: accelerate's `model.safetensors` (its default save)
    keeps one name of tied tensors, and the processors' weights are `adapter_modules.*` and
    `unet.<attention>.processor.*` at once, so it may keep only the latter (official issues #246, #375, #410, #436).
    k is the attention layer's position in `unet.attn_processors` (what `adapter_modules` enumerates): diffusers
    registers down_blocks, up_blocks, then mid_block, each layer's attn1 before its attn2."""
    group = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}

    def order(name: str) -> tuple:
        parts = name.split(".")
        return (group[parts[0]], *(int(p) if p.isdigit() else int(p[4:]) if p.startswith("attn") else 0 for p in parts[1:]))

    names = sorted((m.group(1) for k in tensors if (m := _ATTENTION.match(k))), key=order)
    index = {name: k for k, name in enumerate(names)}
    out = {}
    for key, value in tensors.items():
        head, sep, rest = key.partition(".processor.")
        if sep and head.startswith("unet.") and head[5:] in index:
            out[f"ip_adapter.{index[head[5:]]}.{rest}"] = value
    return out


def official_to_internal(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official names -> ours: `ip_adapter.{2i+1}.to_k_ip` -> `layers.{i}.to_k_ip`; `ip_adapter.{j}.*_lora` ->
    `lora.{j}.*_lora`; `image_proj.*` unchanged. Raises on any key it cannot place."""
    out = {}
    for key, value in tensors.items():
        if key.startswith("image_proj."):
            out[key] = value
            continue
        if not key.startswith("ip_adapter."):
            raise ValueError(f"unexpected tensor {key!r}: official checkpoints hold only image_proj.* and ip_adapter.*")
        rest = key.removeprefix("ip_adapter.")
        if m := _IP_KEY.match(rest):
            index = int(m.group(1))
            if index % 2 != 1:
                raise ValueError(f"{key}: image keys/values sit on cross-attention layers (odd indices), found {index}")
            out[f"layers.{(index - 1) // 2}.{m.group(2)}.weight"] = value
        elif m := _LORA_KEY.match(rest):
            out[f"lora.{m.group(1)}.{m.group(2)}.{m.group(3)}.weight"] = value
        else:
            raise ValueError(f"unexpected tensor {key!r} in the official ip_adapter section")
    return out


def internal_to_official(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `official_to_internal`."""
    out = {}
    for key, value in tensors.items():
        if key.startswith("image_proj."):
            out[key] = value
        elif m := re.match(r"^layers\.(\d+)\.(to_k_ip|to_v_ip)\.weight$", key):
            out[f"ip_adapter.{2 * int(m.group(1)) + 1}.{m.group(2)}.weight"] = value
        elif m := re.match(r"^lora\.(\d+)\.(\w+_lora)\.(down|up)\.weight$", key):
            out[f"ip_adapter.{m.group(1)}.{m.group(2)}.{m.group(3)}.weight"] = value
        else:
            raise ValueError(f"unexpected adapter tensor {key!r}")
    return _official_order(out)


def _official_order(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """image_proj first, then ip_adapter by numeric index (LoRA before to_k_ip/to_v_ip, as official modules)."""
    def rank(key: str) -> tuple:
        if key.startswith("image_proj."):
            return (0, 0, 0)
        index, name = key.removeprefix("ip_adapter.").split(".", 1)
        order = ["to_q_lora", "to_k_lora", "to_v_lora", "to_out_lora", "to_k_ip", "to_v_ip"]
        sub = name.split(".")[0]
        return (1, int(index), order.index(sub) if sub in order else 99)

    keys = sorted(tensors, key=lambda k: rank(k))  # stable: image_proj keeps its order
    return {k: tensors[k] for k in keys}


# ---- config detection -------------------------------------------------------------------------------------------
_LORA_NAMES = ("to_q_lora", "to_k_lora", "to_v_lora", "to_out_lora")
OFFICIAL_RESAMPLER_DEPTH = 4  # Resampler / FacePerceiverResampler depth in every official file


def _named(filename: str) -> str:
    return f"checkpoint {filename}" if filename else "checkpoint"


def _shape(tensors: dict[str, torch.Tensor], key: str, ndim: int, filename: str) -> tuple[int, ...]:
    """The shape of `tensors[key]`, checked to have `ndim` dimensions, none of them empty."""
    if key not in tensors:
        raise ValueError(f"{_named(filename)} is incomplete: expected tensor {key!r}, not found")
    shape = tuple(tensors[key].shape)
    if len(shape) != ndim or 0 in shape:
        raise ValueError(
            f"{_named(filename)}: {key} should be a {ndim}-d tensor with no empty dimension, found shape {shape}"
        )
    return shape


def _agreed(votes: list[tuple[str, tuple[int, ...], int]], what: str, filename: str) -> int:
    """The size that every `(key, shape, dim)` gives as `shape[dim]` for `what`. When they differ, a ValueError names
    the tensors outside a strict majority (the odd ones out), or every tensor when no size has a majority."""
    counts = Counter(shape[dim] for _, shape, dim in votes)
    size, count = counts.most_common(1)[0]
    if len(counts) == 1:
        return size
    if 2 * count > len(votes):
        agree = next(f"{key} {shape}" for key, shape, dim in votes if shape[dim] == size)
        odd = [(f"{key} {shape}", str(shape[dim])) for key, shape, dim in votes if shape[dim] != size][:3]
        more = f" and {len(votes) - count - len(odd)} more" if len(votes) - count > len(odd) else ""
        raise ValueError(
            f"{_named(filename)}: {', '.join(o[0] for o in odd)}{more}: expected {what} to be {size}, as in {count} "
            f"other tensors (e.g. {agree}); found {', '.join(o[1] for o in odd)}"
        )
    listed = " and ".join(f"{key} {shape}" for key, shape, _ in votes[:4])
    raise ValueError(
        f"{_named(filename)}: {what} differs between {listed}{' and others' if len(votes) > 4 else ''}; "
        "expected one size - one of them is damaged"
    )


def detect_config(tensors: dict[str, torch.Tensor], filename: str = "") -> AdapterConfig:
    """Derives the full AdapterConfig of an official-layout state dict from its keys and shapes alone.

    Every size is read from all the tensors that share it, so a damaged tensor is named rather than its neighbours.
    """
    proj = {k.removeprefix("image_proj."): v for k, v in tensors.items() if k.startswith("image_proj.")}
    ip = {k.removeprefix("ip_adapter."): v for k, v in tensors.items() if k.startswith("ip_adapter.")}
    if not proj or not ip:
        raise ValueError(
            f"{_named(filename)}: an official checkpoint needs both image_proj.* and ip_adapter.* tensors; "
            f"found {len(proj)} and {len(ip)}"
        )
    where = _named(filename)

    def shape(key: str, ndim: int = 2) -> tuple[int, ...]:
        return _shape(tensors, key, ndim, filename)

    def votes(keys_dims: list[tuple[str, int]]) -> list[tuple[str, tuple[int, ...], int]]:
        return [(key, shape(key), dim) for key, dim in keys_dims if key in tensors]

    # Cross-attention layers: odd indices 1, 3, ..., 2L-1 with to_k_ip / to_v_ip.
    indices = sorted({int(m.group(1)) for k in ip if (m := _IP_KEY.match(k))})
    if not indices:
        raise ValueError(f"{where}: expected ip_adapter.<index>.to_k_ip.weight / to_v_ip.weight tensors, found none")
    last = max(indices) | 1
    if stray := [i for i in indices if i % 2 == 0]:
        key = next(f"ip_adapter.{k}" for k in sorted(ip) if (m := _IP_KEY.match(k)) and int(m.group(1)) == stray[0])
        raise ValueError(
            f"{where}: unexpected tensor {key}: image keys/values sit on cross-attention layers, at odd indices "
            f"(here 1, 3, ..., {last}); found index {stray[0]}"
        )
    if missing := sorted(set(range(1, last + 1, 2)) - set(indices)):
        raise ValueError(
            f"{where}: expected to_k_ip / to_v_ip at every odd ip_adapter index 1, 3, ..., {last} (one per "
            f"cross-attention layer); none found at {missing[:8]}{'...' if len(missing) > 8 else ''}"
        )
    num_layers = len(indices)

    # FaceID LoRA on every attention layer 0 .. 2L-1.
    lora_idx = sorted({int(m.group(1)) for k in ip if (m := _LORA_KEY.match(k))})
    if lora_idx and lora_idx != list(range(2 * num_layers)):
        absent = sorted(set(range(2 * num_layers)) - set(lora_idx))
        extra = sorted(set(lora_idx) - set(range(2 * num_layers)))
        raise ValueError(
            f"{where}: the FaceID LoRA must cover every attention layer, ip_adapter indices 0..{2 * num_layers - 1}; "
            + "; ".join(([f"none found at {absent[:8]}"] if absent else []) + ([f"found extra ones at {extra[:8]}"] if extra else []))
        )

    def width_votes(j: int) -> list[tuple[str, tuple[int, ...], int]]:
        """Every tensor that gives the query width of attention layer j (attn2 of a block when j is odd)."""
        p = f"ip_adapter.{j}."
        keys = [(p + "to_k_ip.weight", 0), (p + "to_v_ip.weight", 0)] + [(f"{p}{n}.up.weight", 0) for n in _LORA_NAMES]
        keys += [(p + "to_q_lora.down.weight", 1), (p + "to_out_lora.down.weight", 1)]
        if j % 2 == 0:  # self-attention: its k/v LoRA reads the hidden states
            keys += [(p + "to_k_lora.down.weight", 1), (p + "to_v_lora.down.weight", 1)]
        return votes(keys)

    hidden = tuple(_agreed(width_votes(i), f"the query width of attention layer {i}", filename) for i in indices)
    lora_rank, lora_hidden = 0, ()
    if lora_idx:
        ranks = [(f"ip_adapter.{j}.{n}.{part}.weight", dim) for j in lora_idx for n in _LORA_NAMES
                 for part, dim in (("down", 0), ("up", 1))]  # fmt: skip
        lora_rank = _agreed(votes(ranks), "the LoRA rank", filename)
        lora_hidden = tuple(_agreed(width_votes(j), f"the query width of attention layer {j}", filename) for j in lora_idx)

    resampler = None
    id_dim = id_hidden = embed_dim = 0
    shortcut = False
    if "proj.weight" in proj:
        projection, feature = "linear", "pooled"
        out_dim, embed_dim = shape("image_proj.proj.weight")
        token_width = ("image_proj.norm.weight", shape("image_proj.norm.weight", 1), 0)
        num_tokens = out_dim // token_width[1][0]
    elif "proj.3.weight" in proj:
        projection, feature = "mlp", "penultimate"
        embed_dim = shape("image_proj.proj.0.weight")[1]
        token_width = ("image_proj.proj.3.weight", shape("image_proj.proj.3.weight", 1), 0)
        num_tokens = 257 if embed_dim == 1280 else 0  # one token per encoder token (257 for ViT-H/14 at 224)
    elif "perceiver_resampler.proj_in.weight" in proj:
        projection, feature = "faceid_plus", "penultimate"
        id_hidden, id_dim = shape("image_proj.proj.0.weight")
        token_width = ("image_proj.norm.weight", shape("image_proj.norm.weight", 1), 0)
        num_tokens = shape("image_proj.proj.2.weight")[0] // token_width[1][0]
        dim, embed_dim = shape("image_proj.perceiver_resampler.proj_in.weight")
        resampler = _detect_resampler(proj, "perceiver_resampler.", dim, shape, filename)
        shortcut = "plusv2" in filename.lower().replace("-", "").replace("_", "")
    elif "latents" in proj:
        projection, feature = "resampler", "penultimate"
        _, num_tokens, dim = shape("image_proj.latents", 3)
        embed_dim = shape("image_proj.proj_in.weight")[1]
        token_width = ("image_proj.proj_out.weight", shape("image_proj.proj_out.weight"), 0)
        resampler = _detect_resampler(proj, "", dim, shape, filename)
    elif "norm.weight" in proj and "proj.0.weight" in proj:
        projection, feature = "faceid", "none"
        id_hidden, id_dim = shape("image_proj.proj.0.weight")
        token_width = ("image_proj.norm.weight", shape("image_proj.norm.weight", 1), 0)
        num_tokens = shape("image_proj.proj.2.weight")[0] // token_width[1][0]
    else:
        raise ValueError(f"{where}: unrecognised image_proj layout; keys found: {sorted(proj)[:8]}")

    # The context width: what image_proj's tokens are, and what every to_k_ip / to_v_ip (and cross-attention
    # k/v LoRA) reads.
    context = [(f"ip_adapter.{i}.{n}.weight", 1) for i in indices for n in ("to_k_ip", "to_v_ip")]
    context += [(f"ip_adapter.{j}.{n}.down.weight", 1) for j in lora_idx if j % 2 for n in ("to_k_lora", "to_v_lora")]
    cross_dim = _agreed([token_width, *votes(context)], "the context width (cross_attention_dim)", filename)
    family = base_family(cross_dim, num_layers)
    variant = match_variant(projection, num_tokens, family, embed_dim, lora_rank, filename)
    return AdapterConfig(
        projection=projection,
        num_tokens=num_tokens,
        cross_attention_dim=cross_dim,
        layer_hidden_sizes=hidden,
        image_feature=feature,
        image_embed_dim=embed_dim,
        id_embed_dim=id_dim,
        id_hidden_dim=id_hidden,
        resampler=resampler,
        lora_rank=lora_rank,
        lora_hidden_sizes=lora_hidden,
        shortcut=shortcut,
        variant=variant,
    )


def _detect_resampler(proj: dict[str, torch.Tensor], prefix: str, dim: int, shape, filename: str) -> ResamplerConfig:
    """The resampler under `image_proj.{prefix}`; `shape(key)` reads a checked 2-d shape."""
    blocks = sorted({k.removeprefix(prefix).split(".")[1] for k in proj if k.startswith(prefix + "layers.")},
                    key=lambda b: (not b.isdigit(), int(b) if b.isdigit() else 0, b))
    depth = len(blocks)
    if blocks != [str(i) for i in range(OFFICIAL_RESAMPLER_DEPTH)]:
        raise ValueError(
            f"{_named(filename)}: image_proj.{prefix}layers.*: an official resampler has {OFFICIAL_RESAMPLER_DEPTH} "
            f"blocks (layers.0 to layers.{OFFICIAL_RESAMPLER_DEPTH - 1}); found {depth} ({', '.join(blocks[:8])}) - "
            "the file is incomplete or damaged (other depths are saved in the ipadapter format, which records them)"
        )
    inner = shape(f"image_proj.{prefix}layers.0.0.to_q.weight")[0]
    dim_head = 64  # official value; only heads * dim_head is visible in the weights
    if inner % dim_head:
        raise ValueError(
            f"{_named(filename)}: image_proj.{prefix}layers.0.0.to_q.weight: resampler attention width {inner} is "
            "not a multiple of the 64-d heads official files use"
        )
    ff_inner = shape(f"image_proj.{prefix}layers.0.1.1.weight")[0]
    return ResamplerConfig(dim=dim, depth=depth, dim_head=dim_head, heads=inner // dim_head, ff_mult=ff_inner // dim)


# ---- strict loading ---------------------------------------------------------------------------------------------
def _official_name(key: str) -> str:
    """Our parameter name -> the official one (`layers.{i}.to_k_ip` -> `ip_adapter.{2i+1}.to_k_ip`), for messages."""
    if m := re.match(r"^layers\.(\d+)\.(.*)$", key):
        return f"ip_adapter.{2 * int(m.group(1)) + 1}.{m.group(2)}"
    if m := re.match(r"^lora\.(\d+)\.(.*)$", key):
        return f"ip_adapter.{m.group(1)}.{m.group(2)}"
    return key


def check_state_dict(expected: dict[str, torch.Size], found: dict[str, torch.Tensor], what: str,
                     shown=lambda key: key) -> None:  # fmt: skip
    """Raises ValueError listing missing, unexpected, mis-shaped and non-floating-point tensors, each named by
    `shown(key)` (the name the file uses)."""
    missing = sorted(shown(k) for k in set(expected) - set(found))
    unexpected = sorted(shown(k) for k in set(found) - set(expected))
    wrong = [
        f"{shown(k)}: expected {tuple(expected[k])}, found {tuple(found[k].shape)}"
        for k in expected
        if k in found and tuple(found[k].shape) != tuple(expected[k])
    ]
    wrong += [
        f"{shown(k)}: expected floating-point weights, found {str(found[k].dtype).removeprefix('torch.')} "
        "(quantized checkpoints are not supported: dequantize to float16 / float32 first)"
        for k in expected
        if k in found and not (found[k].is_floating_point() or found[k].is_complex())
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if wrong:
            parts.append(f"{len(wrong)} with wrong shapes or dtypes (e.g. {wrong[:3]})")
        raise ValueError(f"{what} does not match its architecture: " + "; ".join(parts))


def load_adapter(
    path: str | os.PathLike | dict[str, torch.Tensor],
    unet: torch.nn.Module | None = None,
    image_encoder: torch.nn.Module | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    shortcut: bool | None = None,
):
    """Loads an IP-Adapter from any supported layout, strictly.

    Args:
        path: a .safetensors or .bin file (official layout, official trainer state, or ours), or a flat or nested
            official state dict.
        unet: if given, the adapter is checked against it (layer count, widths) - not attached.
        image_encoder: if given, its output width is checked against the adapter's projection.
        dtype: cast the weights (default: keep the file's dtype).
        device: where the weights go.
        shortcut: FaceID-Plus only: force PlusV2 behaviour on (True) or off (False); default from the file name.

    Returns:
        an `IPAdapter`, detached.
    """
    if isinstance(path, dict):
        tensors, metadata, name = _flatten(path, Path("<state dict>")), {}, "<state dict>"
    else:
        tensors, metadata = read_tensors(path)
        name = adapter_file(path).name
    adapter = adapter_from_tensors(tensors, metadata, name, shortcut=shortcut)
    adapter.to(device=device, dtype=dtype) if dtype is not None else adapter.to(device=device)
    if unet is not None:
        adapter._check_unet(unet)
    if image_encoder is not None:
        from .encoders import check_encoder

        check_encoder(adapter.config, image_encoder)
    return adapter


def config_from_tensors(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], name: str = ""
) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """The config of a checkpoint in any layout, and its tensors under our parameter names."""
    layout = detect_layout(tensors, metadata)
    if layout == "ipadapter":
        return _own_config(metadata, name), tensors
    official = training_to_official(tensors) if layout == "training" else tensors
    return detect_config(official, name), official_to_internal(official)


def _own_config(metadata: dict[str, str], name: str) -> AdapterConfig:
    """The config in the metadata of our own format, refusing a format version newer than this code."""
    version = metadata.get(VERSION_KEY, FORMAT_VERSION)  # files without a version read as version 1
    if not version.isdigit():
        raise ValueError(
            f"{_named(name)}: metadata field {VERSION_KEY!r} is {version!r}; expected a whole number (this ipadapter "
            f"reads format version {FORMAT_VERSION} and older)"
        )
    if int(version) > int(FORMAT_VERSION):
        raise ValueError(
            f"{_named(name)}: metadata field {VERSION_KEY!r} is {version!r}, a newer format than this ipadapter reads "
            f"(version {FORMAT_VERSION} and older): upgrade ipadapter to load it"
        )
    if CONFIG_KEY not in metadata:
        raise ValueError(
            f"{_named(name)}: metadata says {FORMAT_KEY}={FORMAT_NAME!r} but has no {CONFIG_KEY!r} field (expected the "
            f"adapter config as JSON); found metadata fields {sorted(metadata)}"
        )
    try:
        return AdapterConfig.from_json(metadata[CONFIG_KEY])
    except ValueError as e:
        raise ValueError(f"{_named(name)}: metadata field {CONFIG_KEY!r} is not a valid adapter config: {e}") from e


def adapter_from_tensors(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], name: str = "", shortcut: bool | None = None
):
    """Builds the adapter a checkpoint describes (without random init) and loads it strictly."""
    from dataclasses import replace

    from .adapter import IPAdapter

    config, internal = config_from_tensors(tensors, metadata, name)
    if shortcut is not None and config.projection == "faceid_plus":
        config = replace(config, shortcut=shortcut)
    with torch.device("meta"):
        adapter = IPAdapter(config)
    expected = {k: v.shape for k, v in adapter.state_dict().items()}
    layout = detect_layout(tensors, metadata)
    # tensors are named as the file names them; a trainer state's (image_proj_model.*, adapter_modules.*) by the
    # official names it converts to
    what = f"checkpoint {name} ({config.variant}" + (", tensors named as in the official layout)"
                                                     if layout == "training" else ")")  # fmt: skip
    check_state_dict(expected, internal, what, shown=(lambda key: key) if layout == "ipadapter" else _official_name)
    adapter.load_state_dict(internal, strict=True, assign=True)
    return adapter


def save_adapter(adapter, path: str | os.PathLike, layout: str = "ipadapter",
                 values: dict[str, torch.Tensor] | None = None) -> None:  # fmt: skip
    """Writes `adapter` as ours (safetensors + config metadata) or official (.bin nested / .safetensors flat).
    `values`: tensors that replace some of the adapter's own under the same names (e.g. a trainer's float32 master
    weights of an adapter it runs in bfloat16)."""
    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in adapter.state_dict().items()}
    if values:
        unknown = sorted(set(values) - set(state))
        if unknown:
            raise KeyError(f"values for tensors the adapter does not have: {unknown[:3]}")
        for name, value in values.items():
            if value.shape != state[name].shape:
                raise ValueError(f"{name}: the adapter holds {tuple(state[name].shape)}, the value is {tuple(value.shape)}")
            state[name] = value.detach().contiguous().cpu()
    if layout == "ipadapter":
        if path.suffix != ".safetensors":
            raise ValueError(f"the ipadapter layout is safetensors; expected a .safetensors path, found {path.name}")
        metadata = {FORMAT_KEY: FORMAT_NAME, CONFIG_KEY: adapter.config.to_json(), VERSION_KEY: FORMAT_VERSION}
        save_safetensors(state, path, metadata)
    elif layout == "official":
        if adapter.config.attention != "decoupled":
            raise ValueError(f"the official layout holds decoupled adapters only; this one is {adapter.config.attention} "
                             "(the paper's ablation): save it with layout='ipadapter'")  # fmt: skip
        depth = adapter.config.resampler.depth if adapter.config.resampler is not None else None
        if depth not in (None, OFFICIAL_RESAMPLER_DEPTH):  # the official code builds depth 4, and so reading does
            raise ValueError(f"the official layout holds resamplers of depth {OFFICIAL_RESAMPLER_DEPTH}; this one has "
                             f"{depth}: save it with layout='ipadapter', which records its depth")  # fmt: skip
        official = internal_to_official(state)
        if path.suffix == ".safetensors":
            save_safetensors(official, path)
        elif path.suffix in (".bin", ".pt", ".pth"):
            nested: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
            for key, value in official.items():
                section, name = key.split(".", 1)
                nested[section][name] = value
            atomic_write(path, lambda tmp: torch.save(nested, str(tmp)))
        else:
            raise ValueError(f"official checkpoints are .bin or .safetensors; found {path.name}")
    else:
        raise ValueError(f"layout must be 'ipadapter' or 'official', found {layout!r}")


def describe(path: str | os.PathLike) -> dict:
    """What `ipadapter inspect` prints: variant, tokens, base family, layers, the encoder needed, size, dtype."""
    tensors, metadata = read_tensors(path, shapes_only=True)
    layout = detect_layout(tensors, metadata)
    adapter = adapter_from_tensors(tensors, metadata, Path(path).name)  # validates every key and shape
    cfg = adapter.config
    own = adapter.state_dict()  # the adapter's tensors (a trainer state also holds the whole UNet)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in own.values()})
    tokens = cfg.num_tokens or "one per encoder token"
    if cfg.projection == "faceid" and cfg.num_tokens == 16:
        tokens = "16 per face (faces concatenated)"
    return {
        "file": str(path),
        "layout": layout,
        "variant": cfg.variant,
        "projection": cfg.projection,
        "attention": "decoupled (paper §3.2)" if cfg.attention == "decoupled" else "concat: tokens appended to the text (ablation)",
        "num_tokens": tokens,
        "base_family": cfg.base_family,
        "cross_attention_dim": cfg.cross_attention_dim,
        "adapted_layers": cfg.num_layers,
        "image_encoder": cfg.image_encoder_name,
        "image_feature": cfg.image_feature,
        "image_embed_dim": cfg.image_embed_dim,
        "face_id_embedding": f"{cfg.id_embed_dim}-d ArcFace (insightface)" if cfg.id_embed_dim else "none",
        "lora_rank": cfg.lora_rank,
        "parameters": sum(t.numel() for t in own.values()),
        "dtype": ", ".join(dtypes),
    }
