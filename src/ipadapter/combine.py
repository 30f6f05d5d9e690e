"""Several reference images for one prompt: weighting and combining their encoder features.

Combining happens on the frozen encoder's outputs, before the adapter's projection (as ComfyUI_IPAdapter_plus
does), so it works the same for every variant:

- concat: nothing is mixed; each reference is projected to its own tokens and the tokens are concatenated (the
  layers attend to all of them at once; cost grows with the number of references). diffusers' multi-image input.
- average: the weighted mean of the features.
- norm_average: the mean of the L2-normalised feature vectors, rescaled to their mean norm (references whose
  features are larger do not dominate).
- add: the weighted sum.
- subtract: the first reference minus the weighted mean of the others (what to keep, minus what to remove).
- max / min: the element-wise maximum / minimum over the (weighted) references (ComfyUI's CombineEmbeds).

Per-reference weights multiply each reference's features before combining.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

COMBINE_MODES = ("concat", "average", "norm_average", "add", "subtract", "max", "min")


def weigh(features: torch.Tensor, weights: Sequence[float] | None) -> torch.Tensor:
    """features (K, ...) of K references times one weight each."""
    if weights is None:
        return features
    if len(weights) != features.shape[0]:
        raise ValueError(f"expected one weight per reference image ({features.shape[0]}), found {len(weights)}")
    w = torch.tensor([float(x) for x in weights], device=features.device, dtype=features.dtype)
    return features * w.view(-1, *([1] * (features.ndim - 1)))


def combine_features(features: torch.Tensor, mode: str, weights: Sequence[float] | None = None) -> torch.Tensor:
    """Combines the features (K, ...) of K references of one prompt.

    Returns:
        (K, ...) unchanged (weighted) for "concat" (the tokens are concatenated after projection), else (1, ...).
    """
    if mode not in COMBINE_MODES:
        raise ValueError(f"unknown combine mode {mode!r}; expected one of {', '.join(COMBINE_MODES)}")
    if mode == "norm_average":
        norms = features.norm(dim=-1, keepdim=True).clamp(min=1e-12)  # (K, ..., 1)
        unit = weigh(features / norms, weights)
        return unit.mean(0, keepdim=True) * norms.mean(0, keepdim=True)
    features = weigh(features, weights)
    if mode == "concat" or features.shape[0] == 1:
        return features
    if mode == "average":
        return features.mean(0, keepdim=True)
    if mode == "add":
        return features.sum(0, keepdim=True)
    if mode == "max":
        return features.amax(0, keepdim=True)
    if mode == "min":
        return features.amin(0, keepdim=True)
    return features[:1] - features[1:].mean(0, keepdim=True)  # subtract


def concat_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """(K, T, C) tokens of K references -> (1, K*T, C)."""
    return tokens.reshape(1, -1, tokens.shape[-1])
