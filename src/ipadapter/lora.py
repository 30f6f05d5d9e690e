"""Low-rank adapters on a UNet attention's q/k/v/out projections (the FaceID LoRA, rank 128 in official files)."""

from __future__ import annotations

import torch
from torch import nn


class LoRALinear(nn.Module):
    """x -> up(down(x)); down: (rank, in), up: (out, rank), no biases, `up` zero-initialised (identity at start)."""

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        nn.init.normal_(self.down.weight, std=1 / rank)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.down.weight.dtype
        return self.up(self.down(x.to(dtype))).to(x.dtype)


class AttentionLoRA(nn.Module):
    """The four LoRA deltas of one attention layer, named as in official FaceID checkpoints."""

    def __init__(self, hidden_size: int, context_dim: int, rank: int) -> None:
        super().__init__()
        self.to_q_lora = LoRALinear(hidden_size, hidden_size, rank)
        self.to_k_lora = LoRALinear(context_dim, hidden_size, rank)
        self.to_v_lora = LoRALinear(context_dim, hidden_size, rank)
        self.to_out_lora = LoRALinear(hidden_size, hidden_size, rank)


# (attention module attribute, AttentionLoRA attribute): the projections a FaceID LoRA adds to
PROJECTIONS = (("to_q", "to_q_lora"), ("to_k", "to_k_lora"), ("to_v", "to_v_lora"), ("to_out", "to_out_lora"))


def hook_lora(attn: nn.Module, lora: AttentionLoRA) -> list[torch.utils.hooks.RemovableHandle]:
    """Adds `lora`'s deltas to the outputs of `attn`'s q/k/v/out Linear layers through forward hooks, so that the
    LoRA acts whatever attention processor the layer runs (ours, diffusers' own, or one a pipeline swaps in during
    its call, as perturbed-attention guidance does), as diffusers' PEFT LoRA does. Returns the hooks' handles."""
    handles = []
    for proj_name, lora_name in PROJECTIONS:
        handles.append(projection(attn, proj_name).register_forward_hook(_DeltaHook(lora, getattr(lora, lora_name))))
    return handles


def projection(attn: nn.Module, name: str) -> nn.Module:
    """`attn`'s q/k/v/out Linear layer; under a PEFT LoRA (pipe.load_lora_weights) the layer it wraps, which stays
    in place when that LoRA is unloaded (unload_lora_weights() puts it back instead of the wrapper)."""
    proj = attn.to_out[0] if name == "to_out" else getattr(attn, name)
    base = getattr(proj, "get_base_layer", None)
    return base() if callable(base) else proj


def hooks_in_place(attn: nn.Module, handles: list[torch.utils.hooks.RemovableHandle]) -> bool:
    """Whether `hook_lora`'s hooks on `attn` still act: its projections not fused or replaced since."""
    if getattr(attn, "fused_projections", False):
        return False
    return all(h.id in projection(attn, name)._forward_hooks for (name, _), h in zip(PROJECTIONS, handles))


class _DeltaHook:
    """The forward hook that adds one LoRA delta to a projection's output. An object rather than a closure so that
    `copy.deepcopy` of a UNet copies its LoRA with it (a copied closure would still run the original's)."""

    def __init__(self, lora: AttentionLoRA, delta: LoRALinear) -> None:
        self.lora = lora  # the layer's AttentionLoRA (moved as a whole)
        self.delta = delta  # its q, k, v or out part

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        if self.delta.down.weight.device != x.device and not torch.compiler.is_compiling():
            # The UNet runs elsewhere than where the adapter was attached (enable_model_cpu_offload() moves it to the
            # GPU for its forward only): this layer's LoRA moves there once, as the offloaded UNet's own weights do
            # (a few MB per layer; the image keys/values are moved, not the projections, see
            # `attention.ImageBranch._project_tokens`).
            self.lora.to(x.device)
        return output + self.delta(x)
