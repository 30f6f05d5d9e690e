"""Decoupled cross-attention: the math, attaching and detaching, batches, scales and the key/value cache."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from tiny_models import tiny_unet, unet_inputs

from ipadapter import IPAdapter
from ipadapter.attention import DecoupledAttnProcessor
from ipadapter.layers import cross_attention_layers


@pytest.fixture(scope="module")
def unet():
    return tiny_unet("sd15")


def _adapter(unet, variant="base", seed=0):
    torch.manual_seed(seed)
    adapter = IPAdapter.for_unet(unet, variant, image_embed_dim=40 if variant == "base" else 48)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return adapter


def test_one_layer_computes_text_attention_plus_scaled_image_attention(unet):
    """Z = softmax(QK^T/sqrt(d))V + λ softmax(QK'^T/sqrt(d))V', then to_out (paper eq. 5)."""
    adapter = _adapter(unet).attach(unet)
    layer = cross_attention_layers(unet)[0]
    attn = layer.module
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, layer.hidden_size, generator=g)
    text = torch.randn(2, 3, unet.config.cross_attention_dim, generator=g)
    tokens = torch.randn(2, 4, unet.config.cross_attention_dim, generator=g)
    adapter.set_tokens(tokens)
    adapter.set_scale(0.6)
    with torch.no_grad():
        found = attn(x, encoder_hidden_states=text)

        def heads(t):  # (B, N, H*Dh) -> (B, H, N, Dh)
            return t.view(2, t.shape[1], attn.heads, -1).transpose(1, 2)

        def attend(q, k, v):
            w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
            return (w @ v).transpose(1, 2).reshape(2, q.shape[2], -1)

        q = heads(attn.to_q(x))
        text_out = attend(q, heads(attn.to_k(text)), heads(attn.to_v(text)))
        ip = adapter.layers[0]
        image_out = attend(q, heads(ip.to_k_ip(tokens)), heads(ip.to_v_ip(tokens)))
        expected = attn.to_out[0](text_out + 0.6 * image_out)
    adapter.detach()
    assert torch.allclose(found, expected, atol=1e-5)


def test_new_adapter_copies_to_k_to_v_and_adapts_only_cross_attention(unet):
    adapter = IPAdapter.for_unet(unet, "base", image_embed_dim=40)
    cross = cross_attention_layers(unet)
    assert len(adapter.layers) == len(cross) == 16
    for ip, layer in zip(adapter.layers, cross):
        assert torch.equal(ip.to_k_ip.weight, layer.module.to_k.weight)
        assert torch.equal(ip.to_v_ip.weight, layer.module.to_v.weight)
        assert ip.to_k_ip.bias is None and ip.to_v_ip.bias is None
    adapter.attach(unet)
    for name, proc in unet.attn_processors.items():
        assert isinstance(proc, DecoupledAttnProcessor) == name.endswith("attn2.processor")
    adapter.detach()


def test_detach_restores_previous_processors_and_output_bit_for_bit(unet):
    unet.set_attn_processor(AttnProcessor())  # a non-default processor must come back too
    before = dict(unet.attn_processors)
    keys_before = list(unet.state_dict())
    inputs = unet_inputs(unet, 2)
    with torch.no_grad():
        reference = unet(**inputs).sample
        adapter = _adapter(unet).attach(unet)
        assert list(unet.state_dict()) == keys_before  # nothing added to the UNet's weights
        adapter.set_tokens(adapter.project(image=torch.randn(2, 40)))
        assert not torch.equal(unet(**inputs).sample, reference)
        adapter.set_scale(0.0)  # λ = 0: the branch is skipped, output identical to the plain model
        assert torch.equal(unet(**inputs).sample, reference)
        adapter.detach()
        assert dict(unet.attn_processors) == before
        assert torch.equal(unet(**inputs).sample, reference)
    unet.set_attn_processor(AttnProcessor2_0())


def test_two_adapters_work_side_by_side_and_detach_independently(unet):
    inputs = unet_inputs(unet, 1)
    a, b = _adapter(unet, "base", 1), _adapter(unet, "plus", 2)
    with torch.no_grad():
        plain = unet(**inputs).sample
        a.attach(unet)
        a.set_tokens(a.project(image=torch.randn(1, 40)))
        only_a = unet(**inputs).sample
        b.attach(unet)
        b.set_tokens(b.project(image=torch.randn(1, 5, 48)))
        both = unet(**inputs).sample
        assert not torch.allclose(both, only_a)
        b.detach()
        assert torch.equal(unet(**inputs).sample, only_a)
        a.detach()
        assert torch.equal(unet(**inputs).sample, plain)


def test_batch_rule_cfg_and_images_per_prompt(unet):
    """Row r of a batch gets its own reference; CFG batches get [uncond half, cond half]."""
    adapter = _adapter(unet).attach(unet)
    g = torch.Generator().manual_seed(5)
    cond = adapter.project(image=torch.randn(2, 40, generator=g)).detach()
    uncond = adapter.project(image=torch.zeros(2, 40)).detach()
    inputs = unet_inputs(unet, 4)
    with torch.no_grad():
        adapter.set_tokens(cond, uncond)  # 2 prompts, CFG: rows = [u0, u1, c0, c1]
        batched = unet(**inputs).sample
        for row, (tokens, index) in enumerate([(uncond, 0), (uncond, 1), (cond, 0), (cond, 1)]):
            adapter.set_tokens(tokens[index : index + 1])
            single = {k: (v[row : row + 1] if torch.is_tensor(v) and v.ndim > 0 else v) for k, v in inputs.items()}
            assert torch.allclose(unet(**single).sample, batched[row : row + 1], atol=1e-5), row
        adapter.set_tokens(cond)  # no CFG, 2 images per prompt: rows = [c0, c0, c1, c1]
        rows = adapter.state.tokens_for(4)
        assert torch.equal(rows[1], cond[0]) and torch.equal(rows[2], cond[1])
        adapter.set_tokens(cond, uncond)
        with pytest.raises(ValueError, match="not a CFG batch"):
            unet(**unet_inputs(unet, 3))
    adapter.detach()


def test_image_keys_values_are_computed_once_per_generation(unet):
    adapter = _adapter(unet).attach(unet)
    calls = []
    hook = adapter.layers[0].to_k_ip.register_forward_hook(lambda *a: calls.append(1))
    inputs = unet_inputs(unet, 1)
    with torch.no_grad():
        adapter.set_tokens(adapter.project(image=torch.randn(1, 40)))
        first = unet(**inputs).sample
        second = unet(**inputs).sample  # a later denoising step
        assert len(calls) == 1 and torch.equal(first, second)
        adapter.set_tokens(adapter.project(image=torch.randn(1, 40)))  # a new prompt invalidates the cache
        unet(**inputs)
        assert len(calls) == 2
    out = unet(**inputs).sample  # with gradients (training): always recomputed, and differentiable
    assert len(calls) == 3 and out.requires_grad
    hook.remove()
    adapter.detach()


def test_gradients_reach_only_the_adapter(unet):
    adapter = _adapter(unet).attach(unet)
    unet.requires_grad_(False)
    features = torch.randn(2, 40)
    adapter.set_tokens(adapter.project(image=features))
    loss = unet(**unet_inputs(unet, 2)).sample.square().mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
    assert all(p.grad is None for p in unet.parameters())
    adapter.detach()


def test_per_layer_scales(unet):
    inputs = unet_inputs(unet, 1)
    with torch.no_grad():
        plain = unet(**inputs).sample
    adapter = _adapter(unet).attach(unet)
    with torch.no_grad():
        adapter.set_tokens(adapter.project(image=torch.randn(1, 40)))
        adapter.set_scale([0.0] * 16)
        assert torch.equal(unet(**inputs).sample, plain)
        adapter.set_scale([0.0] * 15 + [1.0])  # only the mid-block layer (official index 31)
        assert not torch.equal(unet(**inputs).sample, plain)
        with pytest.raises(ValueError, match=r"one scale per adapted layer \(16\), found 3"):
            adapter.set_scale([1.0, 1.0, 1.0])
    adapter.detach()


def test_cached_plans_follow_every_change_of_scale_window_step_and_tokens(unet):
    """Outside autograd each layer keeps what acts and its prepared keys/values between calls (`state.plans`); every
    change a user or the step tracker makes must reach the next call: the result equals a run without any cache."""
    inputs = unet_inputs(unet, 1)
    adapter = _adapter(unet).attach(unet)
    state = adapter.state
    g = torch.Generator().manual_seed(7)
    first, second = adapter.project(image=torch.randn(1, 40, generator=g)), adapter.project(image=torch.randn(1, 40, generator=g))

    def run(cached: bool) -> torch.Tensor:
        state.use_cache = cached
        try:
            return unet(**inputs).sample
        finally:
            state.use_cache = True

    with torch.no_grad():
        plain = _plain_output(unet, adapter, inputs)
        adapter.set_tokens(first)
        at_one = run(True)
        assert torch.equal(run(True), at_one) and state.plans  # the second call runs from the plans
        adapter.set_scale(0.3)
        at_low = run(True)
        assert torch.allclose(at_low, run(False), atol=1e-6) and not torch.allclose(at_low, at_one, atol=1e-4)
        adapter.set_tokens(second)
        assert torch.allclose(run(True), run(False), atol=1e-6) and not torch.allclose(run(True), at_low, atol=1e-4)
        state.set_window(0.5, 1.0)
        state.progress = (0, 10)  # outside the window: exactly the plain UNet
        assert torch.equal(run(True), plain)
        state.progress = (6, 10)  # inside it again
        assert torch.allclose(run(True), run(False), atol=1e-6) and not torch.equal(run(True), plain)
        state.progress = None
    adapter.detach()


def _plain_output(unet, adapter, inputs) -> torch.Tensor:
    adapter.detach()
    try:
        return unet(**inputs).sample
    finally:
        adapter.attach(unet)


def test_missing_image_prompt_is_a_clear_error(unet):
    adapter = _adapter(unet).attach(unet)
    with pytest.raises(ValueError, match="no image prompt is set"):
        with torch.no_grad():
            unet(**unet_inputs(unet, 1))
    adapter.detach()
    with pytest.raises(ValueError, match="already attached"):
        adapter.attach(unet).attach(unet)
    adapter.detach()


@pytest.mark.parametrize("mode", ["kv", "kv_penalty", "k_mean_v_penalty"])
def test_scaling_modes_put_the_scale_inside_the_attention(unet, mode):
    import torch.nn.functional as F

    from ipadapter.state import TokenGroup

    adapter = _adapter(unet).attach(unet)
    tokens = adapter.project(image=torch.randn(2, 40, generator=torch.Generator().manual_seed(3)))
    branch = next(b for p in adapter._processors for b in p[1].image_branches if b.owner is adapter)
    layer = branch.layer
    query = torch.randn(2, 2, 5, layer.to_k_ip.out_features // 2, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        adapter.state.set_groups([TokenGroup(tokens, scaling=mode, layer_scales=[0.7] * adapter.config.num_layers)])
        found = branch.attention(query)
        k = layer.to_k_ip(tokens).view(2, -1, 2, query.shape[-1]).transpose(1, 2)
        v = layer.to_v_ip(tokens).view(2, -1, 2, query.shape[-1]).transpose(1, 2)
        w = 0.7 if mode == "kv" else 0.7 * layer.to_k_ip.out_features / 1280
        if mode == "k_mean_v_penalty":
            mean = v.mean(2, keepdim=True)
            expected = F.scaled_dot_product_attention(query, w * k, v - mean + w * mean)
        else:
            expected = F.scaled_dot_product_attention(query, w * k, w * v)
        plain = 0.7 * F.scaled_dot_product_attention(query, k, v)
    assert torch.allclose(found, expected, atol=1e-6) and not torch.allclose(found, plain, atol=1e-4)
    adapter.detach()
    with pytest.raises(ValueError, match="scaling must be one of"):
        TokenGroup(tokens, scaling="k")


def test_k_mean_v_penalty_takes_the_token_mean_per_concatenated_reference(unet):
    import torch.nn.functional as F

    from ipadapter.state import TokenGroup

    adapter = _adapter(unet).attach(unet)
    per_image = adapter.project(image=torch.randn(3, 40, generator=torch.Generator().manual_seed(3)))  # (3, T, C)
    t = per_image.shape[1]
    tokens = per_image.reshape(1, 3 * t, -1)  # three references concatenated (combine="concat")
    branch = next(b for p in adapter._processors for b in p[1].image_branches if b.owner is adapter)
    layer = branch.layer
    query = torch.randn(1, 2, 5, layer.to_k_ip.out_features // 2, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        adapter.state.set_groups([TokenGroup(tokens, scaling="k_mean_v_penalty", segment=t,
                                             layer_scales=[1.5] * adapter.config.num_layers)])  # fmt: skip
        found = branch.attention(query)
        k = layer.to_k_ip(tokens).view(1, -1, 2, query.shape[-1]).transpose(1, 2)
        v = layer.to_v_ip(tokens).view(1, -1, 2, query.shape[-1]).transpose(1, 2)
        w = 1.5 * layer.to_k_ip.out_features / 1280
        # ComfyUI: ip_v is (images, T, C) before its attention joins the images' tokens; the mean is per image
        mean = torch.cat([v[:, :, i * t:(i + 1) * t].mean(2, keepdim=True).expand(-1, -1, t, -1) for i in range(3)], 2)
        expected = F.scaled_dot_product_attention(query, w * k, v - mean + w * mean)
        pooled = v.mean(2, keepdim=True)
        over_all = F.scaled_dot_product_attention(query, w * k, v - pooled + w * pooled)
    assert torch.allclose(found, expected, atol=1e-6) and not torch.allclose(found, over_all, atol=1e-4)
    adapter.detach()


@pytest.mark.parametrize("variant", ["base", "plus"])
def test_small_layer_path_equals_sdpa_with_masks_groups_and_scaling_modes(unet, variant, monkeypatch):
    """Narrow layers add the image attention through block-diagonal matmuls instead of SDPA (faster at the tiny
    world's sizes); the UNet's output must be the SDPA path's, for every option that reaches the attention."""
    from ipadapter import attention
    from ipadapter.state import TokenGroup

    adapter = _adapter(unet, variant).attach(unet)
    g = torch.Generator().manual_seed(5)
    dim = 40 if variant == "base" else 48
    image = torch.randn(2, dim, generator=g) if variant == "base" else torch.randn(2, 9, dim, generator=g)
    cond, uncond = adapter.project(image=image), adapter.project(image=torch.zeros_like(image))
    mask = torch.zeros(1, 32, 32)
    mask[:, :, :16] = 1
    groups = [
        TokenGroup(cond, uncond, mask=mask),
        TokenGroup(cond.flip(0), uncond, scaling="k_mean_v_penalty", layer_scales=[0.8] * adapter.config.num_layers),
        TokenGroup(cond, uncond, scaling="kv"),
    ]
    inputs = unet_inputs(unet, 4)  # a CFG batch of 2 prompts
    calls = []
    original = attention.add_block
    monkeypatch.setattr(attention, "add_block", lambda *a, **k: calls.append(1) or original(*a, **k))
    with torch.no_grad():
        adapter.state.set_groups(groups)
        adapter.set_scale(0.7)
        small = unet(**inputs).sample
        assert len(calls) == 3 * adapter.config.num_layers  # every layer of this tiny UNet is small (3 groups)
        assert torch.equal(unet(**inputs).sample, small)  # the next step, from the kept plans and block matrices
        calls.clear()
        monkeypatch.setattr(attention, "SMALL_LAYER_WIDTH", 0)  # every layer through SDPA
        adapter.state.set_groups(groups)
        reference = unet(**inputs).sample
        assert not calls  # all through SDPA
        # off a CPU (on a GPU SDPA measured faster) the same layer takes SDPA; here the meta device stands for one
        monkeypatch.undo()
        branch = next(p.image_branches[0] for p in unet.attn_processors.values() if getattr(p, "image_branches", None))
        width = branch.layer.to_k_ip.out_features
        for device, block in (("cpu", True), ("meta", False)):
            adapter.state.set_groups(groups)
            query = torch.zeros(4, 2, 16, width // 2, device=device)  # (B, H, L, Dh)
            assert [term.block for term in branch.terms(query)] == [block] * 3
        adapter.detach()
        plain = unet(**inputs).sample
    assert torch.allclose(small, reference, atol=1e-5)
    assert not torch.allclose(small, plain, atol=1e-3)


def test_faceid_lora_follows_a_unet_moved_after_attaching():
    """enable_model_cpu_offload() moves the UNet to the GPU only for its forward, after the adapter was attached on
    the CPU: the image keys/values follow (computed where the adapter is, then moved), and the FaceID LoRA moves to
    where the UNet runs (here the `meta` device stands in for the GPU: shapes only)."""
    unet = tiny_unet("sd15")
    torch.manual_seed(0)
    adapter = IPAdapter.for_unet(unet, "faceid").attach(unet)
    adapter.set_tokens(adapter.project(face_id=torch.randn(2, 512)))
    inputs = unet_inputs(unet, batch=2)
    expected_shape = unet(**inputs).sample.shape
    unet.to("meta")  # what an offload hook does before the UNet's forward
    moved = unet(**{k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}).sample
    assert moved.device.type == "meta" and moved.shape == expected_shape
    assert {p.device.type for p in adapter.lora.parameters()} == {"meta"}
    assert {p.device.type for p in adapter.image_proj.parameters()} == {"cpu"}  # the rest stays where it was


def test_faceid_lora_hooks_follow_the_unets_projections():
    """The FaceID LoRA sits in forward hooks on each attention's q/k/v/out Linear layers: a PEFT LoRA loaded before
    attaching and unloaded after (pipe.unload_lora_weights) leaves it acting (it is hooked on the layer PEFT wraps);
    fused projections, which bypass those layers, are refused at attach and at the next check; a deep-copied UNet
    carries its own copy of the LoRA."""
    import copy

    from peft import LoraConfig

    unet = tiny_unet("compact")
    torch.manual_seed(0)
    adapter = IPAdapter.for_unet(unet, "faceid")
    with torch.no_grad():
        for p in adapter.lora.parameters():
            p.normal_(0, 0.3)
    inputs = unet_inputs(unet, 2)

    def run(model=unet):
        with torch.no_grad():
            adapter.set_tokens(adapter.project(face_id=torch.ones(2, 512)))
            return model(**inputs).sample

    adapter.attach(unet)
    expected = run()
    adapter.detach()
    unet.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name="style")
    adapter.attach(unet)
    assert torch.equal(run(), expected)  # (the style LoRA starts as zero)
    unet.unload_lora()  # what pipe.unload_lora_weights() calls: the wrapped Linear layers are put back
    adapter.check_attached(unet)
    assert torch.equal(run(), expected)
    clone = copy.deepcopy(unet)
    with torch.no_grad():
        for p in adapter.lora.parameters():
            p.zero_()
    assert torch.equal(run(clone), expected) and not torch.equal(run(), expected)  # the copy has its own LoRA
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    hooked = attn.to_q
    attn.to_q = torch.nn.Linear(hooked.in_features, hooked.out_features, bias=False)  # replaced by hand, hook behind
    with pytest.raises(ValueError, match=r"the q/k/v/out projections of down_blocks\.0\..*attn1, where this FaceID "
                                         r"adapter's LoRA acts, were fused or replaced after it was attached"):  # fmt: skip
        adapter.check_attached(unet)
    attn.to_q = hooked
    unet.fuse_qkv_projections()
    with pytest.raises(ValueError, match="the attention processor of .* was replaced after this adapter was attached"):
        adapter.check_attached(unet)
    adapter.detach()
    with pytest.raises(ValueError, match=r"this UNet's attention projections are fused \(fuse_qkv_projections\(\)\)"):
        adapter.attach(unet)
