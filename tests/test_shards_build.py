"""`shards build`: pixels, splits, shard cutting, labels, manifest and determinism, checked against
independent computations on reopened files."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import folder_bytes, read_manifest, synthetic_pixels, write_images
from PIL import Image

from shards.cli import main
from shards.read.reader import open_split, webdataset


def build(src: Path, out: Path, *options: str) -> dict:
    assert main(["build", str(src), str(out), "--workers", "0", *options]) == 0
    return read_manifest(out)


def tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    """Reopen a shard with nothing but tarfile."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, extension = member.name.split(".", 1)
            samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
    return samples


def all_samples(out: Path, manifest: dict) -> dict[str, dict[str, bytes]]:
    samples = {}
    for split in ("train", "val"):
        for shard in manifest["splits"][split]["shards"]:
            samples.update(tar_samples(out / shard["name"]))
    return samples


def pixels_by_source(out: Path, manifest: dict) -> dict[str, np.ndarray]:
    image_format = manifest["image"]["format"]
    result = {}
    for sample in all_samples(out, manifest).values():
        meta = json.loads(sample["json"])
        result[meta["source"]] = np.asarray(Image.open(io.BytesIO(sample[image_format])))
    return result


@pytest.mark.slow
def test_png_round_trip_is_exact_through_the_reader(tmp_path: Path, image_folder: Path) -> None:
    out = tmp_path / "out"
    manifest = build(image_folder, out, "--crop", "none", "--val-fraction", "0")
    assert manifest["splits"]["train"]["count"] == 40
    originals = {p.name: np.asarray(Image.open(p)) for p in image_folder.iterdir()}
    # the trainer's view: float CHW in [-1, 1]
    seen = 0
    for tensor, label in webdataset(open_split(out, "train")):
        assert label == -1 and tensor.shape == (3, 64, 64)
        recovered = (tensor.permute(1, 2, 0).numpy().astype(np.float64) + 1) * 127.5
        match = [name for name, pixels in originals.items() if np.abs(recovered - pixels).max() < 1e-3]
        assert len(match) == 1
        seen += 1
    assert seen == 40
    assert {name: pixels.tolist() for name, pixels in pixels_by_source(out, manifest).items()} == {
        name: pixels.tolist() for name, pixels in originals.items()
    }


def expected_center_resize(path: Path, size: int) -> np.ndarray:
    image = Image.open(path).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return np.asarray(image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS))


def codec_round_trip(pixels: np.ndarray, image_format: str) -> np.ndarray:
    """What the codec alone does to an image, at the settings `shards build` documents."""
    buffer = io.BytesIO()
    settings = {
        "jpg": ("JPEG", {"quality": 95, "subsampling": 0}),
        "webp": ("WEBP", {"quality": 95}),
        "png": ("PNG", {}),
    }[image_format]
    Image.fromarray(pixels).save(buffer, settings[0], **settings[1])
    return np.asarray(Image.open(buffer))


@pytest.mark.parametrize("image_format", ["png", "jpg", "webp"])
def test_center_crop_resize_matches_pil(tmp_path: Path, image_format: str) -> None:
    source = tmp_path / "src"
    write_images(source, 6, size=(120, 90))
    out = tmp_path / "out"
    manifest = build(source, out, "--size", "32", "--format", image_format, "--val-fraction", "0")
    produced = pixels_by_source(out, manifest)
    assert len(produced) == 6
    for name, pixels in produced.items():
        expected = codec_round_trip(expected_center_resize(source / name, 32), image_format)
        error = np.abs(pixels.astype(float) - expected)
        assert pixels.shape == (32, 32, 3)
        assert error.mean() < 2.0, (name, error.mean())  # a misplaced crop gives ~40


def test_celeba_crop_takes_rows_40_188_and_columns_15_163(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    face = synthetic_pixels(3, 178, 218)
    face[:40] = face[188:] = (255, 0, 0)  # anything outside the crop is red
    face[:, :15] = face[:, 163:] = (255, 0, 0)
    Image.fromarray(face).save(source / "aligned.png")
    Image.fromarray(synthetic_pixels(4, 200, 200)).save(source / "not-aligned.png")
    out = tmp_path / "out"
    manifest = build(source, out, "--crop", "celeba", "--size", "148", "--val-fraction", "0")
    produced = pixels_by_source(out, manifest)
    assert np.array_equal(produced["aligned.png"], face[40:188, 15:163])
    assert manifest["skipped"] == [
        {"path": "not-aligned.png", "reason": "--crop celeba needs aligned 178x218 images, got 200x200"}
    ]


def test_same_inputs_give_byte_identical_output_whatever_the_workers(tmp_path: Path, image_folder: Path) -> None:
    build(image_folder, tmp_path / "a", "--shard-size", "7")
    assert main(["build", str(image_folder), str(tmp_path / "b"), "--shard-size", "7", "--workers", "2"]) == 0
    first, second = folder_bytes(tmp_path / "a"), folder_bytes(tmp_path / "b")
    assert first == second
    assert len([name for name in first if name.endswith(".tar")]) >= 6


def test_seed_orders_samples_but_not_the_split(tmp_path: Path, image_folder: Path) -> None:
    one = build(image_folder, tmp_path / "one", "--seed", "1", "--val-fraction", "0.3")
    two = build(image_folder, tmp_path / "two", "--seed", "2", "--val-fraction", "0.3")
    for split in ("train", "val"):
        keys_one = [k for s in one["splits"][split]["shards"] for k in tar_samples(tmp_path / "one" / s["name"])]
        keys_two = [k for s in two["splits"][split]["shards"] for k in tar_samples(tmp_path / "two" / s["name"])]
        assert sorted(keys_one) == sorted(keys_two)
        if split == "train":
            assert keys_one != keys_two


def test_val_split_is_the_documented_hash_of_the_key(tmp_path: Path, image_folder: Path) -> None:
    manifest = build(image_folder, tmp_path / "out", "--val-fraction", "0.25")
    expected_val = set()
    for path in image_folder.iterdir():
        key = hashlib.blake2b(path.name.encode(), digest_size=10).hexdigest()
        if int(key[:12], 16) / 16**12 < 0.25:
            expected_val.add(path.name)
    val = {
        json.loads(sample["json"])["source"]
        for shard in manifest["splits"]["val"]["shards"]
        for sample in tar_samples(tmp_path / "out" / shard["name"]).values()
    }
    assert val == expected_val and 0 < len(val) < 40
    assert manifest["splits"]["val"]["count"] == len(val)
    assert manifest["splits"]["train"]["count"] == 40 - len(val)


def test_manifest_describes_the_files_exactly(tmp_path: Path, image_folder: Path) -> None:
    out = tmp_path / "out"
    manifest = build(image_folder, out, "--shard-size", "9", "--size", "16")
    assert manifest["format_version"] == 1
    assert manifest["image"] == {"size": 16, "format": "png", "mode": "RGB", "channels": 3}
    assert manifest["options"]["shard_size"] == 9 and manifest["options"]["crop"] == "center"
    for split in ("train", "val"):
        shards = manifest["splits"][split]["shards"]
        assert [s["name"] for s in shards] == [f"{split}-{i:06d}.tar" for i in range(len(shards))]
        for shard in shards:
            data = (out / shard["name"]).read_bytes()
            assert shard["sha256"] == hashlib.sha256(data).hexdigest()
            assert shard["bytes"] == len(data)
            assert shard["count"] == len(tar_samples(out / shard["name"]))
        assert all(s["count"] == 9 for s in shards[:-1])
        assert manifest["splits"][split]["count"] == sum(s["count"] for s in shards)
    meta = [json.loads(s["json"]) for s in all_samples(out, manifest).values()]
    assert sorted(m["source"] for m in meta) == sorted(p.name for p in image_folder.iterdir())
    assert all(m["original_size"] == [64, 64] for m in meta)
    assert not (out / ".build").exists()


def test_shard_bytes_caps_every_file(tmp_path: Path, image_folder: Path) -> None:
    out = tmp_path / "out"
    manifest = build(image_folder, out, "--shard-bytes", "60000", "--val-fraction", "0")
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) > 3
    for shard in shards:
        assert (out / shard["name"]).stat().st_size <= 60000
    assert sum(s["count"] for s in shards) == 40


def test_labels_from_folders_and_from_a_csv_column(tmp_path: Path) -> None:
    source = tmp_path / "src"
    write_images(source / "cat", 5, prefix="c")
    write_images(source / "dog", 4, prefix="d")
    (source / "loose.png").write_bytes((source / "cat" / "c0000.png").read_bytes())
    manifest = build(source, tmp_path / "by-folder", "--labels", "folder", "--val-fraction", "0")
    assert manifest["labels"] == ["cat", "dog"]
    assert {"path": "loose.png", "reason": "not inside a label folder (--labels folder)"} in manifest["skipped"]
    labels = sorted(int(label) for _, label in webdataset(open_split(tmp_path / "by-folder", "train")))
    assert labels == [0] * 5 + [1] * 4

    listing = tmp_path / "list.csv"
    listing.write_text("path,label\nsrc/cat/c0000.png,tabby\nsrc/dog/d0000.png,terrier\nsrc/dog/d0001.png\n")
    manifest = build(listing, tmp_path / "by-csv", "--val-fraction", "0")
    assert manifest["labels"] == ["tabby", "terrier"]
    samples = all_samples(tmp_path / "by-csv", manifest).values()
    meta = {m["source"]: m for m in (json.loads(sample["json"]) for sample in samples)}
    assert meta["src/cat/c0000.png"]["label_name"] == "tabby" and meta["src/cat/c0000.png"]["label"] == 0
    assert "label" not in meta["src/dog/d0001.png"]


def test_grayscale_output(tmp_path: Path, image_folder: Path) -> None:
    out = tmp_path / "out"
    build(image_folder, out, "--mode", "L", "--size", "8", "--val-fraction", "0")
    tensors = [tensor for tensor, _ in webdataset(open_split(out, "train"))]
    assert len(tensors) == 40 and all(t.shape == (1, 8, 8) for t in tensors)
    assert min(t.min() for t in tensors) >= -1 and max(t.max() for t in tensors) <= 1


def test_rerun_of_a_finished_build_is_a_no_op_other_options_need_overwrite(tmp_path: Path, image_folder: Path) -> None:
    out = tmp_path / "out"
    build(image_folder, out, "--shard-size", "7")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    build(image_folder, out, "--shard-size", "7")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert main(["build", str(image_folder), str(out), "--workers", "0", "--size", "32"]) == 2
    manifest = build(image_folder, out, "--size", "32", "--overwrite", "--shard-size", "100")
    assert manifest["image"]["size"] == 32
    listed = [s["name"] for split in ("train", "val") for s in manifest["splits"][split]["shards"]]
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(listed) == ["train-000000.tar"]
