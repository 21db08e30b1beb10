"""Image-text datasets (folder, JSONL, CSV, parquet, tar shards), unreadable images, buckets, batching."""

import csv
import io
import json
import math
import os
import tarfile

import numpy as np
import PIL.Image
import pytest

from rlhf_image.data import (BucketBatchSampler, ImageFolderDataset, ManifestDataset, ParquetImageDataset,
                             TarShardDataset, make_buckets, nearest_bucket, resize_to_bucket)

# (name, (height, width), caption); the last two are unreadable: truncated PNG bytes and a text file.
GOOD = [("a", (16, 16), "a red square"), ("b", (16, 32), "a wide one"), ("c", (32, 16), "a tall one")]


def _png(size, seed):
    rng = np.random.default_rng(seed)
    image = PIL.Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue(), image


def _samples():
    """name -> (bytes, caption, reference PIL image or None)."""
    out = {}
    for seed, (name, size, caption) in enumerate(GOOD):
        data, image = _png(size, seed)
        out[name] = (data, caption, image)
    truncated, _ = _png((16, 16), 9)
    out["truncated"] = (truncated[: len(truncated) // 2], "broken", None)
    out["text"] = (b"this is not an image\n", "not an image", None)
    return out


def _check(dataset, key_of):
    """Every good sample loads exactly (pixels, caption); both bad ones give None and are counted once."""
    samples = _samples()
    assert len(dataset) == len(samples)
    seen = {}
    for index in range(len(dataset)):
        item = dataset[index]
        name = key_of(dataset._text(index)["key"])
        if samples[name][2] is None:
            assert item is None
        else:
            seen[name] = item
            assert item["prompt"] == samples[name][1]
            assert np.array_equal(np.asarray(item["image"]), np.asarray(samples[name][2]))
    assert sorted(seen) == ["a", "b", "c"]
    assert dataset.num_skipped == 2
    assert [it["prompt"] for it in dataset] == [dataset[i]["prompt"] for i in range(len(dataset))
                                                 if dataset[i] is not None]
    assert dataset.num_skipped == 2  # counted once per image, however often it is read


def test_folder(tmp_path):
    for name, (data, caption, _) in _samples().items():
        (tmp_path / f"{name}.png").write_bytes(data)
        (tmp_path / f"{name}.txt").write_text(caption + "\n")
    (tmp_path / "uncaptioned.png").write_bytes(_samples()["a"][0])
    dataset = ImageFolderDataset(str(tmp_path))
    _check(dataset, lambda key: os.path.splitext(key)[0])


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_manifest(tmp_path, fmt):
    os.makedirs(tmp_path / "img")
    rows = []
    for name, (data, caption, _) in _samples().items():
        (tmp_path / "img" / f"{name}.png").write_bytes(data)
        rows.append({"file": f"img/{name}.png", "text": caption, "score": "7"})
    path = tmp_path / f"manifest.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["file", "text", "score"])
            writer.writeheader()
            writer.writerows(rows)
    dataset = ManifestDataset(str(path), image_column="file", prompt_column="text")
    _check(dataset, lambda key: os.path.splitext(os.path.basename(key))[0])
    assert dataset[0]["score"] == "7"  # extra columns pass through
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['image', 'prompt'\].*prompt_column"):
        ManifestDataset(str(path))


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    samples = _samples()
    names = list(samples)
    # bytes in one file, datasets-style {"bytes", "path"} structs in another, paths in a third
    pq.write_table(pa.table({"image": [samples[n][0] for n in names[:2]], "caption": [samples[n][1] for n in names[:2]],
                             "name": names[:2]}), tmp_path / "part0.parquet")
    structs = [{"bytes": samples[n][0], "path": None} for n in names[2:4]]
    pq.write_table(pa.table({"image": structs, "caption": [samples[n][1] for n in names[2:4]], "name": names[2:4]}),
                   tmp_path / "part1.parquet")
    (tmp_path / "last.png").write_bytes(samples[names[4]][0])
    pq.write_table(pa.table({"image": ["last.png"], "caption": [samples[names[4]][1]], "name": names[4:]}),
                   tmp_path / "part2.parquet")
    dataset = ParquetImageDataset(str(tmp_path / "*.parquet"), prompt_column="caption")  # files' text column
    _check(dataset, lambda key: names[{"part0.parquet": 0, "part1.parquet": 2, "part2.parquet": 4}[key.split(":")[0]]
                                      + int(key.split(":")[1])])
    assert [dataset._text(i)["name"] for i in range(len(dataset))] == names


def test_tar_shards(tmp_path):
    samples = _samples()

    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    names = list(samples)
    for shard, chunk in enumerate([names[:3], names[3:]]):
        with tarfile.open(tmp_path / f"{shard:06d}.tar", "w") as tar:
            for i, name in enumerate(chunk):
                add(tar, f"{name}.png", samples[name][0])
                if i % 2:  # caption in json (with an extra field) or txt
                    add(tar, f"{name}.json", json.dumps({"caption": samples[name][1], "width": 1}).encode())
                else:
                    add(tar, f"{name}.txt", samples[name][1].encode())
            add(tar, "orphan.txt", b"no image")
    dataset = TarShardDataset(str(tmp_path / "*.tar"))
    _check(dataset, lambda key: key.split(":")[1])
    assert any("width" in dataset._text(i) for i in range(len(dataset)))


def test_nearest_bucket_and_resize():
    buckets = [(64, 64), (48, 96), (96, 48), (128, 128)]
    assert nearest_bucket(100, 100, buckets) == (64, 64)  # covers 64 but not 128: no upscaling
    assert nearest_bucket(300, 300, buckets) == (128, 128)  # largest square it covers
    assert nearest_bucket(10, 10, buckets) == (64, 64)  # covers none: smallest of that ratio
    assert nearest_bucket(50, 120, buckets) == (48, 96)  # ratio 2.4 -> 2
    assert nearest_bucket(120, 50, buckets) == (96, 48)
    assert nearest_bucket(100, 130, buckets) == (64, 64)  # ratio 1.3: log-distance to 1 < to 2
    assert nearest_bucket(100, 150, buckets) == (48, 96)  # ratio 1.5: log-distance to 2 < to 1
    # resize covers then center-crops: a 2:1 image into a square keeps its middle
    image = PIL.Image.new("RGB", (40, 20), "red")
    image.paste(PIL.Image.new("RGB", (10, 20), "blue"), (15, 0))
    out = resize_to_bucket(image, (10, 10))
    assert out.size == (10, 10)
    pixels = np.asarray(out)
    assert tuple(pixels[5, 5]) == (0, 0, 255) and tuple(pixels[5, 0]) == (255, 0, 0)
    for ratio, (h, w) in zip((0.5, 1.0, 2.0), make_buckets(64, (0.5, 1.0, 2.0), multiple_of=8)):
        assert h % 8 == 0 and w % 8 == 0 and abs(w / h - ratio) < 0.2 and abs(h * w - 64 * 64) < 0.2 * 64 * 64


def test_bucket_batch_sampler():
    rng = np.random.default_rng(0)
    buckets = [[(8, 8), (8, 16), (16, 8)][k] for k in rng.integers(0, 3, 50)]
    buckets[3] = None  # unreadable: never batched
    sampler = BucketBatchSampler(buckets, batch_size=4, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    for batch in batches:
        assert len({buckets[i] for i in batch}) == 1  # one resolution per batch
    assert sorted(i for b in batches for i in b) == [i for i in range(50) if i != 3]
    assert batches == list(sampler)  # deterministic
    sampler.set_epoch(1)
    assert list(sampler) != batches
    # sharding: rank r takes global batches r, r + R, ...; equal counts, padded by repeats
    global_batches = BucketBatchSampler(buckets, 4, seed=1).global_batches()
    shards = [list(BucketBatchSampler(buckets, 4, seed=1, num_replicas=3, rank=r)) for r in range(3)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == math.ceil(len(global_batches) / 3)
    for r, shard in enumerate(shards):
        for j, batch in enumerate(shard):
            assert batch == global_batches[(j * 3 + r) % len(global_batches)]
    dropped = BucketBatchSampler(buckets, 4, seed=1, drop_last=True, num_replicas=2, rank=0)
    assert all(len(b) == 4 for b in dropped)
