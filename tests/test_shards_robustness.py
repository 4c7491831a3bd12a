"""Bad input never ends a build; user mistakes end it with one line; verify finds damaged shards.
All through real `python -m shards` processes."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import read_manifest, run_shards, synthetic_pixels, write_images
from PIL import Image


def encoded(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def png_header_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge image: the classic decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + pixels + chunk(b"IEND", b"")


def make_corpus(source: Path) -> tuple[dict[str, str], set[str]]:
    """Returns ({bad path: expected reason}, {good paths})."""
    source.mkdir(parents=True)
    photo = Image.fromarray(synthetic_pixels(7, 80, 60))
    png, jpg = encoded(photo, "PNG"), encoded(photo, "JPEG")
    bad = {
        "empty.png": (b"", "empty file"),
        "half.png": (png[: len(png) // 2], "truncated image"),
        "half.jpg": (jpg[: len(jpg) // 2], "truncated image"),
        "words.jpg": (b"this is not an image\n", "not an image"),
        "scrambled.png": (png[:100] + bytes(200) + png[300:], "corrupt image: unrecognized data stream contents"),
        "bomb.png": (png_header_claiming(100_000, 100_000), "decompression bomb: 100000x100000 pixels is over"),
        "notes.txt": (b"hello", "not an image file name (.txt)"),
    }
    for name, (data, _) in bad.items():
        (source / name).write_bytes(data)
    os.symlink(source / "does-not-exist.png", source / "dangling.png")
    bad_reasons = {name: reason for name, (_, reason) in bad.items()} | {"dangling.png": "file not found"}

    good = {
        "café ☕.png": encoded(photo, "PNG"),
        "with space.jpg": jpg,
        "-leading-dash.png": png,
        "a..b.png": png,
        "palette.gif": encoded(photo.convert("P"), "GIF"),
        "bitmap.bmp": encoded(photo, "BMP"),
        "lossy.webp": encoded(photo, "WEBP"),
        "cmyk.jpg": encoded(photo.convert("CMYK"), "JPEG"),
        "sixteen-bit.png": encoded(Image.fromarray(synthetic_pixels(2, 40, 40, 1).astype(np.uint16) * 257), "PNG"),
        "transparent.png": encoded(photo.convert("RGBA"), "PNG"),
    }
    (source / "nested" / "deeper").mkdir(parents=True)
    good["nested/deeper/inside.png"] = png
    for name, data in good.items():
        (source / name).write_bytes(data)
    return bad_reasons, set(good)


@pytest.mark.slow
def test_bad_files_are_skipped_with_their_reason_and_odd_names_work(tmp_path: Path) -> None:
    bad, good = make_corpus(tmp_path / "src")
    result = run_shards("build", tmp_path / "src", tmp_path / "out", "--workers", "2", "--val-fraction", "0")
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(tmp_path / "out")
    skipped = {item["path"]: item["reason"] for item in manifest["skipped"]}
    assert set(skipped) == set(bad)
    for path, reason in bad.items():
        assert skipped[path].startswith(reason), (path, skipped[path])
    assert manifest["splits"]["train"]["count"] == len(good)
    check = run_shards("verify", tmp_path / "out")
    assert check.returncode == 0, check.stderr


@pytest.mark.slow
def test_sixteen_bit_and_transparent_inputs_convert_sensibly(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    deep = synthetic_pixels(2, 64, 64, 1).astype(np.uint16) * 257  # full 16-bit range
    Image.fromarray(deep).save(source / "deep.png")
    clear = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # fully transparent red
    clear.save(source / "clear.png")
    result = run_shards("build", source, tmp_path / "out", "--val-fraction", "0", "--crop", "none", "--mode", "L")
    assert result.returncode == 0, result.stderr
    from shards.read.reader import open_split, webdataset

    images = [tensor for tensor, _ in webdataset(open_split(tmp_path / "out"))]
    by_mean = sorted(images, key=lambda tensor: float(tensor.mean()))
    deep_back = np.rint((by_mean[0][0].numpy().astype(np.float64) + 1) * 127.5)
    assert np.abs(deep_back - synthetic_pixels(2, 64, 64, 1)).max() <= 1  # 16-bit scaled, not clipped white
    assert float(by_mean[1].min()) == 1.0  # transparency composited on white


@pytest.mark.slow
def test_list_file_entries_that_leave_src_repeat_or_are_missing(tmp_path: Path) -> None:
    write_images(tmp_path / "images", 3)
    write_images(tmp_path, 1, prefix="outside")
    (tmp_path / "images" / "list.txt").write_text(
        "# a comment\nimg0000.png\nimg0001.png\nimg0001.png\n../outside0000.png\nmissing.png\n\n img0002.png \n"
    )
    result = run_shards("build", tmp_path / "images" / "list.txt", tmp_path / "out", "--val-fraction", "0")
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(tmp_path / "out")
    assert sorted((item["path"], item["reason"]) for item in manifest["skipped"]) == [
        ("../outside0000.png", "path leaves SRC ('..')"),
        ("img0001.png", "listed twice"),
        ("missing.png", "file not found"),
    ]
    assert manifest["splits"]["train"]["count"] == 3


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr  # a progress bar may come before it
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.mark.slow
def test_user_mistakes_end_with_one_line(tmp_path: Path) -> None:
    assert_one_line_error(run_shards("build", tmp_path / "nowhere", tmp_path / "out"), "SRC does not exist")
    write_images(tmp_path / "src", 2)
    (tmp_path / "a-file").write_text("x")
    assert_one_line_error(run_shards("build", tmp_path / "src", tmp_path / "a-file" / "out"), "a-file is not a folder")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_bytes(b"")
    (tmp_path / "junk" / "b.jpg").write_bytes(b"nope")
    assert_one_line_error(
        run_shards("build", tmp_path / "junk", tmp_path / "out2"), "no usable image", "1 empty file", "1 not an image"
    )
    assert not (tmp_path / "out2" / "manifest.json").exists()
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_shards("build", tmp_path / "empty", tmp_path / "out3"), "no image files found")
    assert_one_line_error(run_shards("verify", tmp_path / "src"), "manifest.json is missing")
    assert_one_line_error(run_shards("inspect", tmp_path / "nowhere"), "is not a shard folder")
    bad_value = run_shards("build", tmp_path / "src", tmp_path / "out4", "--size", "0")
    assert bad_value.returncode == 2 and "Traceback" not in bad_value.stderr and "--size" in bad_value.stderr


@pytest.mark.slow
def test_verify_names_a_shard_with_a_flipped_byte_and_a_truncated_one(tmp_path: Path) -> None:
    write_images(tmp_path / "src", 30)
    out = tmp_path / "out"
    assert run_shards("build", tmp_path / "src", out, "--shard-size", "10", "--val-fraction", "0").returncode == 0
    assert run_shards("verify", out).returncode == 0
    flipped, truncated, intact = (out / f"train-00000{i}.tar" for i in range(3))
    data = bytearray(flipped.read_bytes())
    data[len(data) // 3] ^= 0x01
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:5000])
    result = run_shards("verify", out)
    assert result.returncode == 1
    bad_lines = [line for line in result.stdout.splitlines() if line.startswith("BAD ")]
    assert len(bad_lines) == 2
    assert bad_lines[0].startswith("BAD train-000000.tar: sha256 does not match")
    assert bad_lines[1].startswith("BAD train-000001.tar: sha256 does not match")
    assert "unreadable tar" in bad_lines[1] or "holds" in bad_lines[1]
    assert intact.name not in result.stdout + result.stderr


@pytest.mark.slow
def test_inspect_prints_a_summary_and_draws_a_contact_sheet(tmp_path: Path) -> None:
    write_images(tmp_path / "src", 12)
    out = tmp_path / "out"
    assert run_shards("build", tmp_path / "src", out, "--size", "16", "--val-fraction", "0").returncode == 0
    result = run_shards("inspect", out, "--grid", tmp_path / "sheet.png", "--count", "9")
    assert result.returncode == 0, result.stderr
    assert "train" in result.stdout and "12" in result.stdout
    sheet = np.asarray(Image.open(tmp_path / "sheet.png"))
    assert sheet.shape == (3 * 18 + 2, 3 * 18 + 2, 3)
    manifest = read_manifest(out)
    first_name = manifest["splits"]["train"]["shards"][0]["name"]
    import tarfile

    with tarfile.open(out / first_name) as tar:
        first_png = next(tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".png"))
    assert np.array_equal(sheet[2:18, 2:18], np.asarray(Image.open(io.BytesIO(first_png))))
    assert json.loads((out / "manifest.json").read_text())["splits"]["train"]["count"] == 12


@pytest.mark.slow
def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    stored = np.zeros((32, 64, 3), dtype=np.uint8)
    stored[:, 32:] = 255  # stored: left half black, right half white
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: top half black, bottom half white
    Image.fromarray(stored).save(source / "turned.png", exif=exif)
    result = run_shards("build", source, tmp_path / "out", "--crop", "none", "--size", "16", "--val-fraction", "0")
    assert result.returncode == 0, result.stderr
    from PIL import ImageOps

    from shards.read.reader import open_split, webdataset

    ((image, _),) = list(webdataset(open_split(tmp_path / "out")))
    produced = np.rint((image.permute(1, 2, 0).numpy().astype(np.float64) + 1) * 127.5)
    upright = ImageOps.exif_transpose(Image.open(source / "turned.png")).convert("RGB")
    expected = np.asarray(upright.resize((16, 16), Image.Resampling.LANCZOS), dtype=np.float64)
    assert upright.size == (32, 64)
    assert np.abs(produced - expected).max() <= 1
    assert produced[:4].mean() < 10 and produced[-4:].mean() > 245
