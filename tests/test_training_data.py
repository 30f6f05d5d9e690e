"""The training data readers on tiny synthetic files: WebDataset streaming order and resume, member names, bad records
skipped and counted, clear errors for a wrong dataset, FaceID embeddings from files and shards."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ipadapter.training.data import (
    StreamingDataset,
    TrainDataset,
    collate,
    iter_webdataset,
    load_face_id,
    read_records,
    split_member_name,
)


def _png(value: int = 128, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (value, 255 - value, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes | None]]) -> str:
    """A tar with these members in this order (None: a directory)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def _shard(path: Path, keys: list[str]) -> str:
    """One record per key: a PNG and its key as the caption."""
    return _tar(path, [m for k in keys for m in ((f"{k}.png", _png()), (f"{k}.txt", k.encode()))])


def _streamed(data: str, workers: int, batch: int, **kw) -> list[str]:
    """The captions a training DataLoader yields, in order, with `workers` workers and batches of `batch`."""
    ds = StreamingDataset(data, resolution=8, batch_size=batch, **kw)
    loader = DataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=lambda items: items)
    return [item["text"] for items in loader for item in items]


def test_streaming_yields_the_record_order_for_any_worker_count_and_resumes_exactly(tmp_path):
    keys = [f"{i:06d}" for i in range(12)]
    data = _shard(tmp_path / "twelve.tar", keys)
    for batch in (2, 5):  # 5: a ragged last batch
        for workers in (0, 1, 2):
            assert _streamed(data, workers, batch) == keys, (batch, workers)  # was [0, 2], [1, 3], ... with 2
            for skip in (2, 3):
                assert _streamed(data, workers, batch, skip=skip) == keys[skip:], (batch, workers, skip)
    # max_samples ends the stream (it was ignored for shards), and a resume inside it takes the rest
    assert _streamed(data, 2, 2, max_samples=7) == keys[:7]
    assert _streamed(data, 2, 2, max_samples=7, skip=3) == keys[3:7]


def test_shard_order_is_shuffled_per_epoch_by_the_seed_and_resume_stays_exact(tmp_path):
    keys = [f"{i:06d}" for i in range(12)]
    for s in range(4):
        _shard(tmp_path / f"s-{s}.tar", keys[3 * s : 3 * s + 3])
    pattern = str(tmp_path / "s-{0..3}.tar")
    assert [r.key for r in iter_webdataset(pattern)] == keys  # no seed: file order
    orders = [[r.key for r in iter_webdataset(pattern, seed=7, epoch=e)] for e in range(4)]
    assert all(sorted(o) == keys for o in orders) and len({tuple(o) for o in orders}) > 1
    assert all(o.index(k) + 1 == o.index(f"{int(k) + 1:06d}") for o in orders for k in keys if int(k) % 3 != 2)
    assert orders[1] == [r.key for r in iter_webdataset(pattern, seed=7, epoch=1)]  # the same (seed, epoch), same order
    assert _streamed(pattern, 2, 2, seed=7, epoch=1, skip=5) == orders[1][5:]
    assert _streamed(pattern, 2, 2, seed=7, epoch=1, max_samples=4) == keys[:4]  # a fixed subset: file order


def test_member_names_with_dot_slash_or_dotted_folders_are_grouped_as_webdataset_does(tmp_path):
    assert split_member_name("./000001.jpg") == ("000001", "jpg")
    assert split_member_name("train/part.v1/000001.face.npy") == ("train/part.v1/000001", "face.npy")
    assert split_member_name("README") is None
    # what `tar -cf x.tar .` writes: './' and './'-prefixed members
    dot = _tar(tmp_path / "dot.tar", [("./", None), ("./000001.png", _png()), ("./000001.txt", b"a red cube"),
                                       ("./000002.PNG", _png()), ("./000002.txt", b"a blue ball")])  # fmt: skip
    assert [(r.key, r.text) for r in iter_webdataset(dot)] == [("000001", "a red cube"), ("000002", "a blue ball")]
    dotted = _tar(tmp_path / "dotted.tar", [("train/part.v1/000001.png", _png()), ("train/part.v1/000001.txt", b"one"),
                                            ("train/part.v1/000002.png", _png()), ("train/part.v1/000002.txt", b"two")])
    records = list(iter_webdataset(dotted))
    assert [(r.key, r.text, r.problem) for r in records] == [("train/part.v1/000001", "one", ""),
                                                             ("train/part.v1/000002", "two", "")]  # fmt: skip
    assert records[0].image_bytes == _png()


def test_missing_shards_of_a_pattern_are_named_before_any_record(tmp_path):
    for s in (0, 1):
        _shard(tmp_path / f"s-{s}.tar", [f"{s}"])
    pattern = str(tmp_path / "s-{0..3}.tar")
    message = r"2 of 4 WebDataset shards of .*s-\{0\.\.3\}\.tar not found: .*s-2\.tar, .*s-3\.tar$"
    with pytest.raises(FileNotFoundError, match=message):
        next(iter_webdataset(pattern))  # was found only when the stream reached s-2.tar
    with pytest.raises(FileNotFoundError, match=message):
        StreamingDataset(pattern, resolution=8)


def test_malformed_webdataset_captions_are_skipped_and_counted(tmp_path, caplog, monkeypatch):
    from ipadapter.training import data as data_module

    monkeypatch.setattr(data_module, "_warned", 0)  # the first skips of a process are named: earlier tests used some
    def record(key: str, caption: bytes) -> list[tuple[str, bytes]]:
        return [(f"{key}.png", _png()), (f"{key}.json", caption)]

    data = _tar(tmp_path / "captions.tar", [
        *record("0", b'{"text": "a red cube"}'), *record("1", b"{not json"), *record("2", b"[1, 2]"),
        *record("3", b'{"text": null}'), *record("4", b'{"caption": "a blue ball"}'), *record("5", b'{"text": 7}'),
        ("6.txt", b"a caption without its image"),
    ])  # fmt: skip
    records = list(iter_webdataset(data))
    assert [r.text for r in records[:5]] == ["a red cube", "", "", "", "a blue ball"]  # JSON null: no caption
    problems = {r.key: r.problem for r in records if r.problem}
    assert sorted(problems) == ["1", "2", "5", "6"]
    assert "captions.tar: 1.json: not valid JSON (" in problems["1"]  # was a bare JSONDecodeError
    assert problems["2"].endswith('2.json: expected an object with a "text" string, found list')  # was AttributeError
    assert problems["5"].endswith('found "text": 7')
    assert problems["6"].endswith("6: expected an image member (jpg, jpeg, png, webp), found txt")
    with caplog.at_level(logging.WARNING, logger="ipadapter.training.data"):
        loader = DataLoader(StreamingDataset(data, resolution=8, batch_size=7), batch_size=7, collate_fn=collate)
        [batch] = list(loader)
    assert batch["skipped"] == 4 and batch["index"].tolist() == [0, 3, 4]
    assert batch["text"] == ["a red cube", "", "a blue ball"]
    assert "captions.tar: 1.json: not valid JSON" in caplog.text


def test_an_image_over_the_decompression_bomb_limit_is_skipped_and_counted(tmp_path, monkeypatch):
    for i, size in enumerate((8, 16, 8)):
        (tmp_path / f"{i}.png").write_bytes(_png(size=size))
    dataset = TrainDataset(read_records(str(tmp_path)), resolution=8)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 16 x 16 > 2 x 100: PIL raises DecompressionBombError
    batch = collate([dataset[i] for i in range(3)])  # was: the error ended the run
    assert batch["skipped"] == 1 and batch["index"].tolist() == [0, 2]


def test_json_nulls_and_non_utf8_captions(tmp_path):
    (tmp_path / "a.png").write_bytes(_png())
    (tmp_path / "data.json").write_text(json.dumps([{"image_file": "a.png", "text": None}, {"image_file": "a.png"}]))
    assert [r.text for r in read_records(str(tmp_path / "data.json"))] == ["", ""]  # was the caption 'None'
    (tmp_path / "null.json").write_text(json.dumps([{"image_file": "a.png", "text": "x"}, {"image_file": None}]))
    with pytest.raises(ValueError, match=r"null.json: item 1: 'image_file' must be a file path .*found None"):
        read_records(str(tmp_path / "null.json"))  # was a TypeError
    (tmp_path / "face.jsonl").write_text(json.dumps({"image_file": "a.png", "id_embed_file": ["f.npy"]}))
    with pytest.raises(ValueError, match=r"face.jsonl: line 1: 'id_embed_file' must be a file path .*found \['f.npy'\]"):
        read_records(str(tmp_path / "face.jsonl"))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.png").write_bytes(_png())
    (folder / "a.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match=r"folder/a.txt: expected UTF-8 text, found byte 0xe9 at offset 3"):
        read_records(str(folder))  # was a UnicodeDecodeError naming no file


def test_face_embeddings_of_the_wrong_size_are_skipped_not_stacked(tmp_path):
    from safetensors.torch import save_file

    items = []
    shapes = [(512,), (1, 512), (128,), (512,), (3, 512)]
    for i, shape in enumerate(shapes):
        (tmp_path / f"{i}.png").write_bytes(_png())
        np.save(tmp_path / f"{i}.npy", np.full(shape, float(i), dtype=np.float32))
        items.append({"image_file": f"{i}.png", "text": "", "id_embed_file": f"{i}.npy"})
    save_file({"embedding": torch.ones(512)}, str(tmp_path / "5.safetensors"))
    items.append({"image_file": "0.png", "text": "", "id_embed_file": "5.safetensors"})
    (tmp_path / "faces.json").write_text(json.dumps(items))
    dataset = TrainDataset(read_records(str(tmp_path / "faces.json")), resolution=8)
    [batch] = list(DataLoader(dataset, batch_size=6, collate_fn=collate))  # was: "stack expects each tensor ..."
    assert batch["skipped"] == 2 and batch["index"].tolist() == [0, 1, 3, 5]
    assert batch["face_id"].shape == (4, 512) and batch["face_id"][:, 0].tolist() == [0.0, 1.0, 3.0, 1.0]
    with pytest.raises(ValueError, match=r"2\.npy: expected one 512-d ArcFace embedding, .* found shape \(128,\)"):
        load_face_id(str(tmp_path / "2.npy"))
    # several faces were flattened to 2560-d ("expects 512-d, found 2560-d" at the adapter); now named as such
    with pytest.raises(ValueError, match=r"4\.npy: holds 3 face embeddings \(3, 512\); training takes one 512-d"):
        load_face_id(str(tmp_path / "4.npy"))


def test_faceid_records_stream_their_face_embedding_from_shards(tmp_path):
    faces = [np.full(512, float(i), dtype=np.float32) for i in range(4)]
    data = _tar(tmp_path / "faces.tar", [
        ("000000.png", _png()), ("000000.txt", b"a"), ("000000.face.npy", _npy(faces[0])),
        ("000001.jpg", _png()), ("000001.npy", _npy(faces[1][None])),  # (1, 512), the plain .npy name
        ("000002.png", _png()), ("000002.face.npy", _npy(np.zeros(256, dtype=np.float32))),  # wrong size
        ("000003.png", _png()), ("000003.face.npy", _npy(faces[3])),
        ("000004.png", _png()),  # no face among records with one: it cannot share their batch
    ])  # fmt: skip
    records = list(iter_webdataset(data))
    assert records[0].face_id_path.endswith("faces.tar:000000.face.npy") and records[4].face_id_path == ""
    [batch] = list(DataLoader(StreamingDataset(data, resolution=8, batch_size=5), batch_size=5, collate_fn=collate))
    assert batch["skipped"] == 2 and batch["index"].tolist() == [0, 1, 3]
    assert torch.equal(batch["face_id"], torch.from_numpy(np.stack([faces[0], faces[1], faces[3]])))


def test_a_batch_keeps_its_usual_records_when_one_carries_an_extra_member():
    """One record with a face embedding among three without (a stray .face.npy in a base-adapter run): the odd one
    is the one skipped, not the three that agree."""
    plain = [{"index": i, "pixels": torch.zeros(3, 8, 8)} for i in range(3)]
    odd = {"index": 3, "pixels": torch.zeros(3, 8, 8), "face_id": torch.zeros(512)}
    batch = collate([plain[0], odd, plain[1], plain[2]])
    assert batch["skipped"] == 1 and batch["index"].tolist() == [0, 1, 2] and "face_id" not in batch
