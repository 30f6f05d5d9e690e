"""Files the library writes: readable by whoever the umask allows (safetensors alone makes them 0600), whole or
not at all."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from tiny_models import tiny_unet

from ipadapter import IPAdapter, load_adapter
from ipadapter.embeds import load_embeds, save_embeds
from ipadapter.files import atomic_write, fix_modes


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


@pytest.mark.skipif(os.name != "posix", reason="permission bits are a POSIX notion")
def test_saved_adapters_and_embeddings_get_the_umask_mode_not_a_private_one(tmp_path, umask):
    adapter = IPAdapter.for_unet(tiny_unet(), "base", image_embed_dim=40)
    expected = 0o666 & ~umask  # 0644 or 0640: what `open(path, "w")` gives; safetensors' own temp file is 0600
    for name, layout in (("a.safetensors", "ipadapter"), ("b.safetensors", "official"), ("c.bin", "official")):
        adapter.save(tmp_path / name, layout=layout)
        assert mode(tmp_path / name) == expected, name
        load_adapter(tmp_path / name)  # and it is a whole, loadable file
    save_embeds(tmp_path / "e.safetensors", torch.randn(2, 40), "pooled")
    assert mode(tmp_path / "e.safetensors") == expected
    assert load_embeds(tmp_path / "e.safetensors")[0].shape == (2, 40)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors", "c.bin", "e.safetensors"]


@pytest.mark.skipif(os.name != "posix", reason="permission bits are a POSIX notion")
def test_overwriting_keeps_the_files_own_mode(tmp_path):
    adapter = IPAdapter.for_unet(tiny_unet(), "base", image_embed_dim=40)
    path = tmp_path / "a.safetensors"
    adapter.save(path)
    os.chmod(path, 0o640)  # the user restricted it
    adapter.save(path)
    assert mode(path) == 0o640


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")

    def fails(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fails)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


@pytest.mark.skipif(os.name != "posix", reason="permission bits are a POSIX notion")
def test_fix_modes_opens_private_safetensors_only(tmp_path, umask):
    (tmp_path / "sub").mkdir()
    private, chosen, other = tmp_path / "sub" / "w.safetensors", tmp_path / "x.safetensors", tmp_path / "y.txt"
    for path, m in ((private, 0o600), (chosen, 0o604), (other, 0o600)):
        path.write_bytes(b"x")
        os.chmod(path, m)
    fix_modes(tmp_path)
    assert (mode(private), mode(chosen), mode(other)) == (0o666 & ~umask, 0o604, 0o600)
