"""Shards: written pairs read back exactly; the stream is seeded, rank-split, bucketed and resumes exactly; every
bad input is skipped and counted (or one line with on_bad_image=abort), never a traceback."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from uae_fast.data.decode import ImageDecoder
from uae_fast.data.shard_io import TarShard, resolve_shards, write_shard
from uae_fast.data.shards import ASPECT_RATIOS, ShardDataset, aspect_bucket, bucket_index
from uae_fast.errors import ConfigError, ImageLoadError
from uae_fast.train.config import DataConfig
from uae_fast.train.data import ImageDataset, open_dataset

torch.set_num_threads(1)


def _pixels(seed: int, height: int = 16, width: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _encode(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _make(folder, shards: int = 4, per_shard: int = 6, *, shapes=((16, 24),)) -> dict[str, tuple[np.ndarray, str]]:
    """Write `shards` tar shards of `per_shard` PNG pairs; returns key -> (pixels, caption)."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for s in range(shards):
        samples = []
        for i in range(per_shard):
            key, n = f"s{s}-{i:03d}", s * per_shard + i
            pixels = _pixels(n, *shapes[n % len(shapes)])
            written[key] = (pixels, f"caption {n}: a picture of noise number {n}")
            samples.append({"key": key, "image": _encode(pixels), "ext": "png", "caption": written[key][1]})
        write_shard(folder / f"shard-{s:06d}.tar", samples)
    return written


def _raw_shard(path, records: list[dict]) -> None:
    """A shard with arbitrary bytes (bad captions, duplicate keys): the webdataset writer, no validation."""
    from webdataset import TarWriter

    with open(path, "wb") as stream:
        writer = TarWriter(stream, encoder=False)
        for record in records:
            writer.write(record)
        writer.close()


def _config(folder, **kw) -> DataConfig:
    return DataConfig(shards=str(folder), **kw)


def _epochs(dataset, count: int = 1) -> list[list[str]]:
    """The keys of the dataset's next `count` epochs (from its current one), drawn one at a time."""
    out, start = [[] for _ in range(count)], dataset.epoch
    while True:
        (image,) = dataset.next_batch(1)
        if dataset.epoch - start >= count:
            return out
        out[dataset.epoch - start].append(image.key)


def _epoch_keys(dataset) -> list[str]:
    return _epochs(dataset)[0]


def test_round_trip_pixels_and_captions(tmp_path):
    written = _make(tmp_path / "s", shards=2, per_shard=3)
    data = ShardDataset(_config(tmp_path / "s", shuffle=False))
    batch = data.next_batch(6)
    assert [im.key for im in batch] == sorted(written)  # unshuffled: shard order, then file order
    for im in batch:
        assert np.array_equal(im.pixels, written[im.key][0])
        assert im.reference_caption == written[im.key][1]
    assert data.skipped == []
    # Interoperable: the webdataset package itself reads our shards.
    import webdataset as wds

    keys = [s["__key__"] for s in wds.WebDataset(str(tmp_path / "s" / "shard-000000.tar"), shardshuffle=False)]
    assert keys == ["s0-000", "s0-001", "s0-002"]


def test_json_captions_jpeg_and_captions_jsonl(tmp_path):
    pixels = _pixels(1, 32, 32)
    jpeg = _encode(pixels, "JPEG")
    _raw_shard(tmp_path / "j.tar", [{"__key__": "a", "jpg": jpeg, "json": json.dumps({"caption": " hello "}).encode()}])
    (im,) = ShardDataset(_config(tmp_path / "j.tar")).next_batch(1)
    assert im.reference_caption == "hello"
    assert np.array_equal(im.pixels, ImageDecoder("cpu").decode([jpeg])[0])

    folder = tmp_path / "jsonl"
    (folder / "img").mkdir(parents=True)
    lines = []
    for i in range(5):
        (folder / "img" / f"{i}.png").write_bytes(_encode(_pixels(i)))
        lines.append(json.dumps({"image": f"img/{i}.png", "caption": f"pair {i}"}))
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    batch = ShardDataset(_config(folder, shuffle=False)).next_batch(5)
    assert [im.reference_caption for im in batch] == [f"pair {i}" for i in range(5)]
    assert all(np.array_equal(im.pixels, _pixels(i)) for i, im in enumerate(batch))
    # Ranks split the lines too: disjoint, and together all of them.
    parts = [set(_epoch_keys(ShardDataset(_config(folder), rank=r, world_size=2))) for r in range(2)]
    assert parts[0] and parts[1] and not parts[0] & parts[1]
    assert parts[0] | parts[1] == {f"img/{i}.png" for i in range(5)}


@pytest.mark.parametrize("buckets", [False, True])
def test_exact_resume_mid_epoch(tmp_path, buckets):
    _make(tmp_path / "s", shards=4, per_shard=6, shapes=((16, 24), (24, 16), (16, 16)))
    config = _config(tmp_path / "s", shuffle_buffer=5, aspect_buckets=buckets)
    reference = ShardDataset(config, seed=3)
    for _ in range(3):
        reference.next_batch(4)
    state = json.loads(json.dumps(reference.state_dict()))  # what a checkpoint stores
    expected = [reference.next_batch(4) for _ in range(10)]  # crosses into later epochs
    resumed = ShardDataset(config, seed=3)
    resumed.load_state_dict(state)
    got = [resumed.next_batch(4) for _ in range(10)]
    assert [[im.key for im in b] for b in got] == [[im.key for im in b] for b in expected]
    assert all(np.array_equal(a.pixels, b.pixels) for ga, gb in zip(got, expected) for a, b in zip(ga, gb))
    assert resumed.epoch == reference.epoch >= 1
    # A fresh dataset without the state draws something else: the resume is what made them equal.
    fresh = ShardDataset(config, seed=3)
    assert [im.key for im in fresh.next_batch(4)] != [im.key for im in expected[0]]


def test_resume_refuses_other_shards_or_ranks(tmp_path):
    _make(tmp_path / "s", shards=2, per_shard=2)
    state = ShardDataset(_config(tmp_path / "s"), rank=0, world_size=2).state_dict()
    with pytest.raises(ConfigError, match="rank 0 of 2"):
        ShardDataset(_config(tmp_path / "s")).load_state_dict(state)
    _make(tmp_path / "s", shards=3, per_shard=2)
    with pytest.raises(ConfigError, match="shards changed"):
        ShardDataset(_config(tmp_path / "s"), rank=0, world_size=2).load_state_dict(state)


def test_per_rank_split_disjoint_and_complete(tmp_path):
    written = _make(tmp_path / "s", shards=7, per_shard=3)
    for epoch_skip in (0, 1):
        parts = []
        for rank in range(3):
            data = ShardDataset(_config(tmp_path / "s", shuffle_buffer=4), seed=5, rank=rank, world_size=3)
            parts.append(_epochs(data, 2)[epoch_skip])  # epoch 1 has another shard order
        flat = [k for p in parts for k in p]
        assert len(flat) == len(set(flat)) == len(written)  # disjoint, union = all
        assert set(flat) == set(written)
        # whole shards per rank
        assert all(len({k.split("-")[0] for k in p}) == len(p) // 3 for p in parts)
    with pytest.raises(ConfigError, match="7 shard"):
        ShardDataset(_config(tmp_path / "s"), world_size=8)


def test_shuffle_buffer_is_seeded(tmp_path):
    written = _make(tmp_path / "s", shards=3, per_shard=8)
    order = {seed: _epoch_keys(ShardDataset(_config(tmp_path / "s", shuffle_buffer=10), seed=seed)) for seed in (0, 1)}
    assert order[0] == _epoch_keys(ShardDataset(_config(tmp_path / "s", shuffle_buffer=10), seed=0))
    assert order[0] != order[1]
    assert sorted(order[0]) == sorted(order[1]) == sorted(written)  # a permutation of the epoch
    data = ShardDataset(_config(tmp_path / "s", shuffle_buffer=10), seed=0)
    first, second = _epochs(data, 2)
    assert first != second and sorted(first) == sorted(second)  # each epoch has its own order
    # The buffer mixes across shards: within the first 8 draws, more than one shard shows up.
    assert len({k.split("-")[0] for k in order[0][:8]}) > 1
    # shuffle=False: file order, no buffer.
    assert _epoch_keys(ShardDataset(_config(tmp_path / "s", shuffle=False))) == sorted(written)


def test_aspect_buckets():
    for side in (512, 768, 1024):
        shapes = set()
        for h, w in ASPECT_RATIOS:
            bh, bw = aspect_bucket(h * 100, w * 100, side)
            assert bh % 64 == 0 and bw % 64 == 0
            assert abs(bh * bw / side**2 - 1) < 0.12
            assert abs(np.log((bh / bw) / (h / w))) < 0.1  # keeps the ratio
            shapes.add((bh, bw))
        assert len(shapes) == len(ASPECT_RATIOS) or side < 1024  # distinct at 1024 (64-px steps merge some below)
    assert aspect_bucket(300, 300, 512) == (512, 512)
    assert aspect_bucket(500, 1000, 1024) == (704, 1472)  # 1:2 landscape
    assert aspect_bucket(1000, 500, 1024) == (1472, 704)
    assert aspect_bucket(480, 640, 512) == aspect_bucket(300, 400, 512)  # one bucket, one shape
    assert bucket_index(480, 640) == ASPECT_RATIOS.index((3, 4))
    with pytest.raises(ValueError):
        aspect_bucket(10, 10, 32)


def test_batches_come_from_one_bucket(tmp_path):
    _make(tmp_path / "s", shards=3, per_shard=8, shapes=((16, 32), (32, 16), (24, 24)))
    data = ShardDataset(_config(tmp_path / "s", shuffle_buffer=6, aspect_buckets=True), seed=1)
    seen = set()
    for _ in range(12):
        batch = data.next_batch(3)
        assert len(batch) == 3
        assert len({bucket_index(*im.pixels.shape[:2]) for im in batch}) == 1
        seen.add(bucket_index(*batch[0].pixels.shape[:2]))
    assert len(seen) == 3


def _bad_shards(folder) -> None:
    """One good shard and one with each kind of bad sample."""
    folder.mkdir()
    good = _encode(_pixels(0))
    write_shard(folder / "a.tar", [{"key": f"ok{i}", "image": _encode(_pixels(i)), "ext": "png", "caption": "fine"}
                                   for i in range(3)])  # fmt: skip
    _raw_shard(
        folder / "b.tar",
        [
            {"__key__": "bad_jpeg", "jpg": b"\xff\xd8\xff\xe0" + b"\x00" * 40, "txt": b"a caption"},
            {"__key__": "empty", "png": good, "txt": b"   \n"},
            {"__key__": "latin1", "png": good, "txt": "caf\xe9".encode("latin-1")},
            {"__key__": "dup", "png": good, "txt": b"first"},
            {"__key__": "other", "png": _encode(_pixels(9)), "txt": b"kept"},
            {"__key__": "dup", "png": good, "txt": b"second"},
        ],
    )
    data = (folder / "a.tar").read_bytes()
    (folder / "c.tar").write_bytes(data[: len(data) // 3])  # truncated: the first sample survives


def test_bad_samples_are_skipped_and_counted(tmp_path):
    _bad_shards(tmp_path / "s")
    data = ShardDataset(_config(tmp_path / "s", shuffle=False))
    keys = [im.key for im in data.next_batch(6)]
    assert keys == ["ok0", "ok1", "ok2", "dup", "other", "ok0"]  # c.tar's first sample survived the cut
    reasons = {("image" if "image" in s else "source", s["reason"]) for s in data.skipped}
    kinds = sorted(r for _, r in reasons)
    assert len(data.skipped) == 5, data.skipped
    assert any(w == "image" and "b.tar/bad_jpeg" in r for w, r in reasons)
    assert "b.tar/empty: empty caption" in kinds
    assert any("b.tar/latin1: caption is not UTF-8" in r for r in kinds)
    assert "b.tar/dup: duplicate key" in kinds
    assert any(r.startswith("c.tar: truncated") for r in kinds), kinds
    # Each bad sample is counted once, however many epochs pass.
    for _ in range(3):
        data.next_batch(6)
    assert len(data.skipped) == 5
    with pytest.raises(ImageLoadError, match="b.tar/empty: empty caption.*on_bad_image=skip") as info:
        ShardDataset(_config(tmp_path / "s", shuffle=False, on_bad_image="abort")).next_batch(6)
    assert "\n" not in str(info.value) and info.value.__context__ is None


def test_truncated_and_damaged_tars(tmp_path):
    import tarfile

    _make(tmp_path / "s", shards=1, per_shard=5)
    whole = tmp_path / "s" / "shard-000000.tar"
    data = whole.read_bytes()
    assert all(s.problem is None for s in TarShard(whole).samples())
    offsets = [m.offset for m in tarfile.open(whole).getmembers()]  # header positions
    cuts = {"mid-header": 100, "header boundary": offsets[5], "mid-data": offsets[5] + 700, "ragged end": len(data) - 3}
    for what, cut in cuts.items():
        path = tmp_path / f"cut{cut}.tar"
        path.write_bytes(data[:cut])
        samples = list(TarShard(path).samples())
        assert samples[-1].problem is not None and samples[-1].problem.kind == "corrupt_shard", what
        assert all(s.problem is None for s in samples[:-1]), what
    assert len(list(TarShard(tmp_path / f"cut{offsets[5]}.tar").samples())) == 2 + 1  # 2 whole samples, 1 problem
    damaged = bytearray(data)
    damaged[offsets[4] + 100] ^= 0xFF  # a header's mode field: bad checksum, where tarfile stops without a word
    (tmp_path / "damaged.tar").write_bytes(bytes(damaged))
    samples = list(TarShard(tmp_path / "damaged.tar").samples())
    assert samples[-1].problem.kind == "corrupt_shard" and "damaged header" in str(samples[-1].problem)


def test_empty_and_unusable_shard_lists(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no .tar shards and no captions.jsonl"):
        open_dataset(_config(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="2 of 2 shard"):
        resolve_shards(str(tmp_path / "x-{0..1}.tar"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.tar").write_bytes(b"not a tar at all")
    (tmp_path / "bad" / "b.tar").write_bytes(b"")
    data = open_dataset(_config(tmp_path / "bad"))
    with pytest.raises(ConfigError, match="no usable image-caption pair.*2 skipped"):
        data.next_batch(1)


def test_write_shard_is_atomic(tmp_path):
    def samples():
        yield {"key": "a", "image": _encode(_pixels(0)), "ext": "png", "caption": "x"}
        raise RuntimeError("captioner crashed")

    with pytest.raises(RuntimeError):
        write_shard(tmp_path / "shard.tar", samples())
    assert list(tmp_path.iterdir()) == []  # neither the shard nor a temporary


def test_open_dataset_and_demo_captions(tmp_path):
    from uae_fast.data.demo import DEMO_CAPTIONS, DEMO_IMAGE_NAMES

    _make(tmp_path / "s", shards=1, per_shard=2)
    assert isinstance(open_dataset(_config(tmp_path / "s")), ShardDataset)
    demo = open_dataset(DataConfig())
    assert isinstance(demo, ImageDataset)
    with pytest.raises(ConfigError, match="aspect_buckets needs data.shards"):
        DataConfig(aspect_buckets=True)
    captions = {im.key: im.reference_caption for im in demo.preview(4)}
    assert captions == {name: DEMO_CAPTIONS[name] for name in DEMO_IMAGE_NAMES}
    assert len(set(captions.values())) == 4
    assert all(40 <= len(c.split()) <= 80 for c in captions.values())
    assert {im.reference_caption for im in demo.next_batch(4)} == set(captions.values())
