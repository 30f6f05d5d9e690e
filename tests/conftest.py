"""Test-wide settings: tiny models run fastest on one thread, and 2-core CI machines must not oversubscribe."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture
def sdpa_path(monkeypatch):
    """Real SD1.5 / SDXL layers (>= 320 channels) attend to the image through SDPA, the tiny models' narrow layers
    through block-diagonal matmuls (`attention.SMALL_LAYER_WIDTH`): these tests take the real models' path. The
    other path equals it (`test_attention.test_small_layer_path_equals_sdpa_...`), and the older parity tests
    (test_prompter, test_controls, test_pipelines) run it."""
    import ipadapter.attention

    monkeypatch.setattr(ipadapter.attention, "SMALL_LAYER_WIDTH", 0)
