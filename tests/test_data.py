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


# --- damaged captions, sidecars, shards and manifests ----------------------------------------------------------------

def _tar(path, members):
    """Write `members` (name -> bytes) as a plain tar shard; returns its bytes."""
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path.read_bytes()


def test_tar_samples_with_unreadable_captions_are_skipped_and_counted_like_unreadable_images(tmp_path, caplog):
    """A `.json` sidecar that is not JSON or not an object, or a `.txt` that is not UTF-8, makes its sample
    unreadable: the dataset still loads, `dataset[i]` is None, the bucket scan gets None, `num_skipped` counts each
    once, and the warning names the shard and the member. The other samples load exactly."""
    good, _ = _png((16, 16), 0)
    _tar(tmp_path / "000000.tar", {
        "ok.png": good, "ok.json": json.dumps({"caption": "fine", "width": 16}).encode(),
        "badjson.png": good, "badjson.json": b'{"caption": "unterminated',
        "listjson.png": good, "listjson.json": b'["caption"]',
        "latin1.png": good, "latin1.txt": "caf\xe9".encode("latin-1"),
        "badutf8json.png": good, "badutf8json.json": '{"caption": "caf\xe9"}'.encode("latin-1"),
    })
    dataset = TarShardDataset(str(tmp_path / "*.tar"))
    assert len(dataset) == 5
    keys = [dataset._key(i) for i in range(len(dataset))]
    assert keys == [f"000000.tar:{k}" for k in ("ok", "badjson", "listjson", "latin1", "badutf8json")]
    item = dataset[0]
    assert item["prompt"] == "fine" and item["width"] == 16 and item["key"] == "000000.tar:ok"
    with caplog.at_level("WARNING", logger="rlhf_image.data"):
        assert [dataset[i] for i in range(1, 5)] == [None] * 4
        assert [dataset.image_size(i) for i in range(1, 5)] == [None] * 4  # the bucket scan skips them too
    assert dataset.num_skipped == 4
    assert [it["key"] for it in dataset] == ["000000.tar:ok"] and dataset.num_skipped == 4
    for member in ("badjson.json", "listjson.json", "latin1.txt", "badutf8json.json"):
        assert f"000000.tar:{member}" in caplog.text, member
    assert "not JSON" in caplog.text and "not a JSON object" in caplog.text and "not UTF-8" in caplog.text


def test_a_truncated_shard_keeps_the_samples_before_the_cut(tmp_path, caplog):
    """Shards cut in a member's data, in a header, at a header boundary, or not tar at all: every complete sample
    before the cut loads, a sample cut in the middle is unreadable (counted), the damaged shards are listed and
    named in a warning, and the intact shard loads whole."""
    names = [f"s{i}" for i in range(4)]
    members = {}
    for i, name in enumerate(names):
        members[f"{name}.png"], _ = _png((16, 16), i)
        members[f"{name}.txt"] = f"caption {i}".encode()
    whole = _tar(tmp_path / "000000.tar", members)
    with tarfile.open(tmp_path / "000000.tar") as tar:
        offsets = {m.name: (m.offset, m.offset_data, m.size) for m in tar}
    s2_txt = offsets["s2.txt"]
    cuts = {"001_in_data.tar": s2_txt[1] + 2,              # in s2's caption: s0, s1 load, s2 is unreadable
            "002_in_header.tar": offsets["s2.png"][0] + 100,   # in s2's image header: s0, s1 load
            "003_at_boundary.tar": offsets["s2.png"][0],       # at a header boundary: s0, s1 load
            "004_not_tar.tar": whole[:100]}
    for name, cut in cuts.items():
        (tmp_path / name).write_bytes(whole[:cut] if isinstance(cut, int) else cut)
    with caplog.at_level("WARNING", logger="rlhf_image.data"):
        dataset = TarShardDataset(str(tmp_path / "*.tar"))
    assert sorted(dataset.damaged_shards) == sorted(str(tmp_path / n) for n in cuts)
    for name in cuts:
        assert name in caplog.text
    loaded = {dataset._key(i): dataset[i] for i in range(len(dataset))}
    assert [k for k, v in loaded.items() if v is None] == ["001_in_data.tar:s2"]
    assert dataset.num_skipped == 1
    expected = {f"000000.tar:{n}" for n in names} | {f"00{k}_{w}.tar:s{i}" for k, w in
                                                     ((1, "in_data"), (2, "in_header"), (3, "at_boundary"))
                                                     for i in range(2)}
    assert {k for k, v in loaded.items() if v is not None} == expected
    for key in expected:
        assert loaded[key]["prompt"] == f"caption {key[-1]}"
    with pytest.raises(ValueError, match="no image-caption sample.*004_not_tar.tar: not a tar file"):
        TarShardDataset([str(tmp_path / "004_not_tar.tar")])


def test_compressed_tar_shards_are_refused_by_name(tmp_path):
    """Members are read by offset in the file, so a compressed shard would make every image unreadable."""
    data, _ = _png((16, 16), 0)
    with tarfile.open(tmp_path / "000000.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("a.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match=r"000000.tar.gz is gzip-compressed.*decompress"):
        TarShardDataset(str(tmp_path / "*.tar.gz"))


def test_a_folder_caption_that_is_not_utf8_is_skipped_and_counted(tmp_path, caplog):
    for name, caption in (("a", "a red square".encode()), ("b", "caf\xe9".encode("latin-1"))):
        (tmp_path / f"{name}.png").write_bytes(_png((16, 16), 0)[0])
        (tmp_path / f"{name}.txt").write_bytes(caption)
    dataset = ImageFolderDataset(str(tmp_path))
    with caplog.at_level("WARNING", logger="rlhf_image.data"):
        assert dataset[0]["prompt"] == "a red square" and dataset[1] is None
    assert dataset.num_skipped == 1 and "b.png" in caplog.text and "not UTF-8" in caplog.text


@pytest.mark.parametrize("fmt, content, message", [
    ("jsonl", b'{"image": "a.png", "caption": "ok"}\n{"image": "b.png", "caption": \n', r"m.jsonl line 2: not JSON"),
    ("jsonl", b'{"image": "a.png", "caption": "ok"}\n["b.png", "x"]\n', r"m.jsonl line 2: a JSON list, not an object"),
    ("jsonl", b'{"image": "a.png", "caption": "caf\xe9"}\n', r"m.jsonl line 1: not UTF-8"),
    ("csv", b'image,caption\na.png,ok\nb.png,caf\xe9\n', r"m.csv line 3: not UTF-8"),
    ("csv", b'image,caption\na.png,"ok\n', r"m.csv line 2: not CSV \(unexpected end of data"),
])
def test_a_damaged_manifest_fails_naming_the_file_and_line(tmp_path, fmt, content, message):
    """The manifest is the dataset's index, and a row without its columns already fails at construction naming
    the row: a row that cannot be parsed does too, instead of a bare JSONDecodeError/UnicodeDecodeError."""
    path = tmp_path / f"m.{fmt}"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        ManifestDataset(str(path))
