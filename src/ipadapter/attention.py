"""Decoupled cross-attention (paper §3.2, eq. 5): Z = Attn(Q, K_text, V_text) + Σ_a λ_a · Attn(Q, K_ip^a, V_ip^a).

`DecoupledAttnProcessor` replaces a diffusers attention processor. Its text attention is diffusers'
`AttnProcessor2_0` step for step, so with no image branch active the layer computes exactly what it did before.
Each attached adapter adds one `ImageBranch` (its own `to_k_ip` / `to_v_ip` over its image tokens, with the same
query). A FaceID adapter's LoRA deltas on q/k/v/out are not here but hooks on those Linear layers (`lora.hook_lora`),
so that they act under any processor. The processor is not an `nn.Module`: attaching an adapter adds nothing to the
UNet's parameters or state dict.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .state import PromptState

# Small layers (e.g. the tiny world's) add their image attention through `add_block` rather than SDPA, on CPUs only
# (on an H200 in float16 it was slower than SDPA: tiny-world UNet call +7.0% against +3.6% over the plain UNet):
# at most this many channels (heads * head_dim) ...
SMALL_LAYER_WIDTH = 128
# ... and at most this many image keys over all heads (heads * tokens), which bounds the block-diagonal matrices'
# zeros (their matmuls do heads x the work of per-head ones). Larger layers (SD1.5's 320+) keep SDPA.
SMALL_LAYER_KEYS = 64


class IPLayer(nn.Module):
    """The two new projections of one cross-attention layer: image tokens -> keys / values (no bias)."""

    def __init__(self, context_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.to_k_ip = nn.Linear(context_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(context_dim, hidden_size, bias=False)


@dataclass(frozen=True, eq=False, slots=True)
class Term:
    """One token group's image attention at one layer, prepared for one query shape (`ImageBranch.terms`)."""

    keys: torch.Tensor  # SDPA: (B, H, T, Dh); block: (B, H*T, H*Dh) block-diagonal, 1/sqrt(Dh) folded in
    values: torch.Tensor  # SDPA: (B, H, T, Dh); block: (B, H*T, H*Dh) block-diagonal
    weight: float  # multiplies the attention's output: λ ("v" scaling) or 1 (λ is inside the keys/values)
    mask: torch.Tensor | None  # where the group acts: SDPA (B, 1, L, 1), block (B, 1, L); None: everywhere
    block: bool  # True: added after the heads merge by `add_block` (see SMALL_LAYER_WIDTH); False: `add_sdpa`
    heads: int  # H


def add_sdpa(query: torch.Tensor, term: Term, into: torch.Tensor | None) -> torch.Tensor:
    """into + the term's image attention, heads split (B, H, L, Dh); in place outside autograd."""
    out = F.scaled_dot_product_attention(query, term.keys, term.values, dropout_p=0.0, is_causal=False)
    if term.mask is not None:
        out = out * term.mask
    if into is None:
        return out if term.weight == 1 else term.weight * out
    if not torch.is_grad_enabled():
        return into.add_(out, alpha=term.weight)
    return into + (out if term.weight == 1 else term.weight * out)


def add_block(merged_query: torch.Tensor, term: Term, into: torch.Tensor) -> None:
    """Adds a block term's image attention to `into` (B, L, H*Dh), the text attention with heads merged, in place:
    one matmul, a softmax over the T tokens and one fused multiply-add, instead of SDPA; the same sum up to float
    rounding. merged_query: (B, L, H*Dh).

    Why: SDPA over a handful of keys is dominated by its softmax over rows of T = 4 values; here the softmax runs
    over a leading axis with the L queries contiguous. At the tiny world's layers (L 16-256, width 64-96, 4 heads)
    it is 1.4-3x faster on a CPU (benchmarks/inference_overhead.py measures the whole effect); on a GPU, where
    SDPA's softmax is fused, it is slower and not used."""
    batch, length, _ = merged_query.shape
    scores = torch.bmm(term.keys, merged_query.transpose(1, 2))  # (B, H*T, L)
    keys = scores.shape[1]
    probs = scores.view(batch, term.heads, keys // term.heads, length).softmax(dim=2).view(batch, keys, length)
    if term.mask is not None:
        probs = probs * term.mask  # (B, 1, L)
    into.baddbmm_(probs.transpose(1, 2), term.values, alpha=term.weight)  # (B, L, H*Dh)


class ImageBranch:
    """Σ_g λ_g · mask_g · softmax(Q K_g^T / sqrt(d)) V_g for one adapter at one layer, over its token groups g
    (one group for a plain image prompt; see `state.PromptState`)."""

    def __init__(self, owner: nn.Module, layer: IPLayer, layer_index: int, state: PromptState) -> None:
        self.owner = owner  # the IPAdapter this branch belongs to (used to detach)
        self.layer = layer
        self.layer_index = layer_index
        self.state = state

    def acting(self) -> list[tuple[int, float]]:
        """(group, λ) of the groups that act at this layer now; empty when every λ is 0 here (scale 0, or the step
        is outside the group's window): the branch is then skipped entirely (bit-identical to no adapter, free).
        Kept in `state.plans` until the scales, windows, step or tokens change."""
        state = self.state
        keep = not torch.compiler.is_compiling()  # see `PromptState.caching`
        found = state.plans.get(self.layer_index) if keep else None
        if found is None:
            if not state.groups:
                state.tokens_for(0)  # raises the error that says how to set an image prompt
            found = []
            for g in range(len(state.groups)):
                scale = state.scale_of(g, self.layer_index)
                if scale != 0:
                    found.append((g, scale))
            if keep:
                state.plans[self.layer_index] = found
        return found  # type: ignore[return-value]

    @property
    def active(self) -> bool:
        return bool(self.acting())

    def terms(self, query: torch.Tensor, block_ok: bool = True) -> tuple[Term, ...]:
        """The acting groups' image attention for a query (B, H, L, Dh), ready to add; outside autograd (with the
        cache on) built once per generation and kept in `state.plans`. `block_ok`: small layers may take the
        block-diagonal path (False where the merged query is not the attended one, e.g. with norm_q)."""
        state = self.state
        keep = state.caching
        if keep:
            key = (self.layer_index, query.shape, query.dtype, query.device, block_ok)
            found = state.plans.get(key)
            if found is not None:
                return found  # type: ignore[return-value]
        found = tuple(self._term(group, scale, query, block_ok) for group, scale in self.acting())
        if keep:
            state.plans[key] = found
        return found

    def _term(self, group: int, scale: float, query: torch.Tensor, block_ok: bool) -> Term:
        batch, heads, length, head_dim = query.shape
        state = self.state
        mode = state.groups[group].scaling
        mask = state.mask_for(group, batch, length)  # (B, L, 1) or None
        if mask is not None:
            mask = mask.to(device=query.device, dtype=query.dtype)
        weight = scale if mode == "v" else 1.0
        if block_ok and query.device.type == "cpu" and self._small(group, heads, head_dim):
            keys, values = self._block_diagonal(group, query, heads, scale, mode)
            return Term(keys, values, weight, None if mask is None else mask.transpose(1, 2), True, heads)
        if mode == "v":
            keys, values = self._keys_values(group, query, heads)
        else:
            keys, values = self._scaled_keys_values(group, query, heads, scale, mode)
        return Term(keys, values, weight, None if mask is None else mask[:, None], False, heads)

    def _small(self, group: int, heads: int, head_dim: int) -> bool:
        """Whether this group takes the block-diagonal path (on a CPU): outside autograd, at layers at most
        SMALL_LAYER_WIDTH wide with at most SMALL_LAYER_KEYS image keys over all heads."""
        if torch.is_grad_enabled() or heads * head_dim > SMALL_LAYER_WIDTH:
            return False
        return heads * self.state.groups[group].cond.shape[1] <= SMALL_LAYER_KEYS

    def attention(self, query: torch.Tensor) -> torch.Tensor | None:
        """The scaled image attention of the acting groups (B, H, L, Dh) through SDPA, or None if none acts."""
        total = None
        for term in self.terms(query, block_ok=False):
            total = add_sdpa(query, term, total)
        return total

    def _keys_values(self, group: int, query: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch, _, _, head_dim = query.shape
        key = (group, self.layer_index, batch, query.dtype, query.device)
        kv = self.state.cached(key)
        if kv is None:
            kv = self._project_tokens(group, batch, query, heads, head_dim)
            self.state.store(key, kv)
        return kv

    def _scaled_keys_values(self, group: int, query: torch.Tensor, heads: int, scale: float,
                            mode: str) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Keys/values with λ inside the attention (ComfyUI_IPAdapter_plus's embeds scaling): "kv" scales K and V;
        "kv_penalty" scales both by λ * C / 1280 (C = the layer's width); "k_mean_v_penalty" scales K by that and only
        V's mean over tokens. Scaling K sharpens or flattens the softmax, so these are not linear in λ."""
        batch, _, _, head_dim = query.shape
        key = (group, self.layer_index, batch, query.dtype, query.device, mode, scale)
        kv = self.state.cached(key)
        if kv is None:
            k, v = self._keys_values(group, query, heads)
            w = scale if mode == "kv" else scale * heads * head_dim / 1280
            if mode == "k_mean_v_penalty":
                segment = self.state.groups[group].segment
                tokens = v.shape[2]
                if segment and tokens > segment and tokens % segment == 0:  # concatenated references: each its own
                    parts = v.unflatten(2, (tokens // segment, segment))  # (B, H, K, T, Dh)
                    mean = parts.mean(dim=3, keepdim=True).expand_as(parts).flatten(2, 3)
                else:
                    mean = v.mean(dim=2, keepdim=True)  # (B, H, 1, Dh) over the image tokens
                kv = (k * w, v - mean + w * mean)
            else:
                kv = (k * w, v * w)
            self.state.store(key, kv)
        return kv

    def _project_tokens(self, group: int, batch: int, query: torch.Tensor, heads: int,
                        head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """The group's image tokens for this batch -> keys, values (B, H, T, Dh) in the query's dtype."""
        tokens = self.state.tokens_for(batch, group)  # (B, T, C)
        weight = self.layer.to_k_ip.weight
        tokens = tokens.to(device=weight.device, dtype=weight.dtype)
        # (the adapter may sit on another device than the UNet's layers, e.g. after `pipe.to("cuda")`)
        k = self.layer.to_k_ip(tokens).to(device=query.device, dtype=query.dtype)  # (B, T, H*Dh)
        v = self.layer.to_v_ip(tokens).to(device=query.device, dtype=query.dtype)
        k = k.view(batch, -1, heads, head_dim).transpose(1, 2)  # (B, H, T, Dh)
        v = v.view(batch, -1, heads, head_dim).transpose(1, 2)
        return k, v

    def _block_diagonal(self, group: int, query: torch.Tensor, heads: int, scale: float,
                        mode: str) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """The group's keys and values as block-diagonal matrices over the merged heads, built once per generation:
        K (B, H*T, H*Dh) with the softmax's 1/sqrt(Dh) folded in, V (B, H*T, H*Dh); row h*T + t holds token t of
        head h in head h's columns, zeros elsewhere (see `SMALL_LAYER_WIDTH`)."""
        batch, _, _, head_dim = query.shape
        key = (group, self.layer_index, batch, query.dtype, query.device, mode, None if mode == "v" else scale,
               "block-diagonal")  # fmt: skip
        found = self.state.cached(key)
        if found is None:
            k, v = self._keys_values(group, query, heads) if mode == "v" else \
                self._scaled_keys_values(group, query, heads, scale, mode)  # (B, H, T, Dh) each  # fmt: skip
            tokens = k.shape[2]
            k_blocks = k.new_zeros(batch, heads, tokens, heads, head_dim)  # [b, h, t, g, d]: nonzero where g == h
            v_blocks = torch.zeros_like(k_blocks)
            # diagonal(1, 3) views the g == h entries as (B, T, Dh, H)
            k_blocks.diagonal(dim1=1, dim2=3).copy_(k.permute(0, 2, 3, 1)).mul_(head_dim**-0.5)
            v_blocks.diagonal(dim1=1, dim2=3).copy_(v.permute(0, 2, 3, 1))
            found = (k_blocks.view(batch, heads * tokens, heads * head_dim),
                     v_blocks.view(batch, heads * tokens, heads * head_dim))  # fmt: skip
            self.state.store(key, found)
        return found


class DecoupledAttnProcessor:
    """diffusers attention processor with decoupled image-prompt branches (see module docstring)."""

    def __init__(self, previous: Callable) -> None:
        self.previous = previous  # restored when the last branch is removed
        self.image_branches: list[ImageBranch] = []

    @property
    def empty(self) -> bool:
        return not self.image_branches

    def remove(self, owner: nn.Module) -> None:
        self.image_branches = [b for b in self.image_branches if b.owner is not owner]

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        # During a generation `acting` and `terms` come from the states' plans (a dict lookup each): on the tiny world
        # the Python around the image attention's tensor ops then costs about 0.1% of a UNet call (measured with
        # those ops skipped).
        acting = [b for b in self.image_branches if b.acting()]
        if not acting:
            # Nothing to add: the layer's own processor runs, so its output is exactly what it was.
            return self.previous(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)  # (B, HW, C)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])  # (B, H, L, S)

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        merged_query = query  # (B, L, H*Dh)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)  # (B, S, H*Dh)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, L, Dh)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, S, Dh)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )  # (B, H, L, Dh)

        # Decoupled image attention: same query, the adapter's own keys/values, added before to_out (eq. 5). SDPA
        # terms add while heads are still split (one head merge for all); block terms (small layers) after it.
        block_ok = attn.norm_q is None  # the block path attends with the merged query, taken before norm_q
        terms = acting[0].terms(query, block_ok) if len(acting) == 1 else \
            [t for b in acting for t in b.terms(query, block_ok)]  # fmt: skip
        for term in terms:
            if not term.block:
                hidden_states = add_sdpa(query, term, hidden_states)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)  # (B, L, H*Dh)
        hidden_states = hidden_states.to(query.dtype)
        for term in terms:
            if term.block:
                add_block(merged_query, term, hidden_states)

        hidden_states = attn.to_out[0](hidden_states)  # linear
        hidden_states = attn.to_out[1](hidden_states)  # dropout

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
