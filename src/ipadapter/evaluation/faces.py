"""Face metrics for FaceID adapters: identity similarity (ArcFace), FID and LPIPS through existing libraries.

Nothing here downloads anything: ArcFace comes from insightface's model packs on disk (`ipadapter.faces`), FID and
LPIPS from torchmetrics with the weights it needs already in the local caches (torch-fidelity's Inception for FID,
torchvision's AlexNet/VGG for LPIPS). A missing library or weight file is a clear error naming it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def identity_similarity(embedder, generated: Sequence[Image.Image], reference: Image.Image) -> list[float | None]:
    """Cosine similarity of each generated image's face embedding with the reference's (None: no face found).

    `embedder` is anything with `embed(image) -> (512,) tensor` raising ValueError when it finds no face, e.g.
    `ipadapter.faces.FaceEmbedder`."""
    ref = F.normalize(embedder.embed(reference).float(), dim=-1)
    scores: list[float | None] = []
    for image in generated:
        try:
            emb = F.normalize(embedder.embed(image).float(), dim=-1)
        except ValueError:
            scores.append(None)
            continue
        scores.append(float((emb * ref).sum()))
    return scores


def _uint8_batch(images: Sequence[Image.Image], size: tuple[int, int] | None = None) -> torch.Tensor:
    """(N, 3, H, W) uint8 of images resized to `size` (width, height), or as they are (then all of one size)."""
    if size is None and len({i.size for i in images}) > 1:
        raise ValueError(f"expected images of one size, found {sorted({i.size for i in images})}")
    arrays = [np.asarray(i.convert("RGB").resize(size) if size else i.convert("RGB")) for i in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W) uint8


def _torchmetrics(what: str):
    try:
        import torchmetrics  # noqa: F401
    except ImportError as e:
        raise ImportError(f"{what} needs torchmetrics: `pip install torchmetrics[image]` (with its weights in the "
                          "local caches; nothing is downloaded here)") from e  # fmt: skip


def fid(real: Sequence[Image.Image], generated: Sequence[Image.Image], feature: int = 2048) -> float:
    """Fréchet Inception Distance between two image sets (torchmetrics / torch-fidelity Inception weights).

    Each set needs at least 2 images (a covariance); FID is biased upward for small sets, and below `feature` images
    per set its covariances are singular: compare FIDs only at equal set sizes (the count is reported with it)."""
    if min(len(real), len(generated)) < 2:
        raise ValueError(f"FID compares the statistics of two image sets: expected at least 2 images in each, found "
                         f"{len(real)} real and {len(generated)} generated")  # fmt: skip
    _torchmetrics("FID")
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        metric = FrechetInceptionDistance(feature=feature)
    except (ImportError, ModuleNotFoundError, OSError, RuntimeError) as e:
        raise FileNotFoundError(f"FID needs torch-fidelity's Inception weights in the local torch hub cache: {e}") from e
    metric.update(_uint8_batch(real, (299, 299)), real=True)
    metric.update(_uint8_batch(generated, (299, 299)), real=False)
    return float(metric.compute())


def lpips(a: Sequence[Image.Image], b: Sequence[Image.Image], net: str = "alex") -> float:
    """Mean LPIPS distance between paired images (torchmetrics; torchvision backbone weights must be cached)."""
    _torchmetrics("LPIPS")
    if len(a) != len(b):
        raise ValueError(f"LPIPS compares pairs: found {len(a)} and {len(b)} images")
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        metric = LearnedPerceptualImagePatchSimilarity(net_type=net, normalize=True)
    except (ImportError, ModuleNotFoundError, OSError, RuntimeError) as e:
        raise FileNotFoundError(f"LPIPS needs torchvision's {net} weights in the local torch hub cache: {e}") from e
    size = a[0].size  # every image at the first one's (width, height): the reference is resized, not squashed square
    x = _uint8_batch(a, size).float() / 255
    y = _uint8_batch(b, size).float() / 255
    return float(metric(x, y))
