"""The paper's simple adapter (Fig. 10 ablation): image tokens appended to the text tokens of the UNet's own
cross-attention. Only its projection trains; it saves and loads in our format and is refused by the official one."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_unet, unet_inputs

from ipadapter import IPAdapter, load_adapter


def test_concat_adapter_appends_scaled_tokens_to_the_context(tmp_path):
    unet = tiny_unet("sd15")
    adapter = IPAdapter.for_unet(unet, "concat", image_embed_dim=40)
    assert adapter.config.attention == "concat" and len(adapter.layers) == 0
    assert sum(p.numel() for p in adapter.parameters()) == sum(p.numel() for p in adapter.image_proj.parameters())
    inputs = unet_inputs(unet, batch=2)
    with torch.no_grad():
        plain = unet(**inputs).sample
        tokens = adapter.project(image=torch.randn(2, 40, generator=torch.Generator().manual_seed(0)))  # (2, 4, C)
        adapter.attach(unet)
        adapter.set_tokens(tokens)
        adapter.set_scale(0.5)
        found = unet(**inputs).sample
        adapter.set_scale(0.0)
        off = unet(**inputs).sample
        adapter.detach()
        context = torch.cat([inputs["encoder_hidden_states"], 0.5 * tokens], dim=1)
        expected = unet(**{**inputs, "encoder_hidden_states": context}).sample
        after = unet(**inputs).sample
    assert torch.allclose(found, expected, atol=1e-6) and torch.equal(off, plain) and torch.equal(after, plain)
    adapter.save(tmp_path / "concat.safetensors")
    loaded = load_adapter(tmp_path / "concat.safetensors")
    assert loaded.config == adapter.config
    with pytest.raises(ValueError, match="official layout holds decoupled adapters only; this one is concat"):
        adapter.save(tmp_path / "concat.bin", layout="official")


def test_concat_adapter_trains_its_projection(tmp_path):
    from tiny_models import make_sd_folder, make_world_folder

    from ipadapter.training import TrainConfig, train

    base, encoder = make_sd_folder(tmp_path)
    data = make_world_folder(tmp_path / "data", 8, size=16)
    cfg = TrainConfig(base=base, image_encoder=encoder, data=data, resolution=16, batch_size=4, max_steps=2,
                      variant="concat", output=str(tmp_path / "run"), learning_rate=1e-2)  # fmt: skip
    final = train(cfg, show_progress=False)
    trained = load_adapter(final / "adapter.safetensors")
    fresh = IPAdapter.for_unet(tiny_unet("sd15"), "concat", image_embed_dim=trained.config.image_embed_dim)
    assert trained.config.attention == "concat"
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), fresh.state_dict().values()))
