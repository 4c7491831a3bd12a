"""One source image in, one training image out: read, decode, validate, crop, resize, encode.

Every way an input can be unusable ends in `SkipImage`, whose message is the reason written to
the manifest; anything else raised here is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import struct
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from shards.build.inputs import read_source
from shards.build.sources import SkipImage

CROPS = ("center", "none", "celeba")
FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
MODES = ("RGB", "L")
# The paper's CelebA crop: rows 40:188 and columns 15:163 of the aligned 178x218 images.
CELEBA_SOURCE_SIZE = (178, 218)
CELEBA_BOX = (15, 40, 163, 188)  # PIL box: left, upper, right, lower
PIL_DEFAULT_MAX_PIXELS = 89_478_485
# Only these decoders ever see input bytes: Pillow knows dozens of formats, some of which hand data to
# external programs (EPS runs Ghostscript).
INPUT_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")


@dataclass(frozen=True)
class ImageSpec:
    """What every output image is: square side, crop rule, file format, quality and colour mode."""

    size: int = 64
    crop: str = "center"
    format: str = "png"
    quality: int = 95
    mode: str = "RGB"
    max_pixels: int = PIL_DEFAULT_MAX_PIXELS

    def as_dict(self) -> dict:
        return asdict(self)


@contextlib.contextmanager
def _own_pixel_limit() -> Iterator[None]:
    # PIL's bomb guard is a process-wide setting with its own fixed limit; switch it off while we
    # decode and apply --max-pixels ourselves, right after the (lazy) open has read only the header.
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def decode(data: bytes, spec: ImageSpec) -> tuple[Image.Image, tuple[int, int]]:
    """Decode the first frame fully; returns the image (possibly decoded at reduced scale) and its
    original size."""
    with _own_pixel_limit():
        try:
            image = Image.open(io.BytesIO(data), formats=INPUT_FORMATS)
            original_size = image.size
            if original_size[0] * original_size[1] > spec.max_pixels:
                raise SkipImage(_bomb_reason(original_size, spec))
            if spec.crop != "celeba":
                _decode_at_reduced_scale(image, spec.size)
            image.load()
        except SkipImage:
            raise
        except UnidentifiedImageError:
            raise SkipImage("not an image") from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as error:
            text = str(error)
            if "truncated" in text or "broken data stream" in text or isinstance(error, EOFError):
                raise SkipImage("truncated image") from None
            raise SkipImage(f"corrupt image: {text or type(error).__name__}") from None
    if min(image.size) < 1:
        raise SkipImage("empty image (zero width or height)")
    return image, original_size


def _bomb_reason(size: tuple[int, int], spec: ImageSpec) -> str:
    return f"decompression bomb: {size[0]}x{size[1]} pixels is over --max-pixels {spec.max_pixels}"


def _decode_at_reduced_scale(image: Image.Image, size: int) -> None:
    # JPEG can decode at 1/2, 1/4, 1/8 scale ~10x faster; keep at least 2x the final side on the
    # short edge so the antialiased resize still has real detail to work from.
    if image.format != "JPEG":
        return
    width, height = image.size
    scale = 2 * size / min(width, height)
    if scale < 1:
        image.draft(image.mode, (math.ceil(width * scale), math.ceil(height * scale)))


def to_mode(image: Image.Image, mode: str) -> Image.Image:
    """Convert any PIL mode to RGB or L; transparency is composited onto white."""
    with contextlib.suppress(Exception):  # a corrupt EXIF block must not cost the image
        # in place: without it Pillow returns a full copy even when there is nothing to turn
        ImageOps.exif_transpose(image, in_place=True)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.convert("I").point(lambda value: value / 256).convert("L")
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert(mode)


def crop_and_resize(image: Image.Image, original_size: tuple[int, int], spec: ImageSpec) -> Image.Image:
    target = (spec.size, spec.size)
    if spec.crop == "celeba":
        if original_size != CELEBA_SOURCE_SIZE:
            raise SkipImage(f"--crop celeba needs aligned 178x218 images, got {original_size[0]}x{original_size[1]}")
        face = image.crop(CELEBA_BOX)
        scale = face.width / spec.size
        if scale > 1:  # the authors' anti-aliasing: Gaussian of sigma sqrt(scale)/2, then bicubic
            face = face.filter(ImageFilter.GaussianBlur(math.sqrt(scale) / 2))
        return face.resize(target, Image.Resampling.BICUBIC)
    box = None
    if spec.crop == "center":
        width, height = image.size
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        box = (left, top, left + side, top + side)
    return image.resize(target, Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)


def encode(image: Image.Image, spec: ImageSpec) -> bytes:
    buffer = io.BytesIO()
    if spec.format == "jpg":
        # 4:4:4 chroma: at 64x64 the default 4:2:0 subsampling visibly smears colour edges
        image.save(buffer, "JPEG", quality=spec.quality, subsampling=0)
    elif spec.format == "webp":
        image.save(buffer, "WEBP", quality=spec.quality, lossless=spec.quality >= 100, method=4)
    else:
        image.save(buffer, "PNG")
    return buffer.getvalue()


def prepare(path: str | Path, spec: ImageSpec) -> tuple[bytes, tuple[int, int]]:
    """The whole transform: the encoded training image and the source's original (width, height)."""
    image, original_size = decode(read_source(path), spec)
    image = crop_and_resize(to_mode(image, spec.mode), original_size, spec)
    return encode(image, spec), original_size


def prepare_chunk(chunk: Sequence[tuple], spec: ImageSpec) -> list[tuple]:
    """Runs in a build worker (so this module must stay free of torch and webdataset imports).

    chunk: (entry, label index) pairs, entry with .path, .relpath, .key and .label. Returns, per
    input, ("ok", key, {extension: bytes}) or ("skip", relpath, reason)."""
    results: list[tuple] = []
    for entry, label_index in chunk:
        try:
            image, original_size = prepare(entry.path, spec)
        except SkipImage as reason:
            results.append(("skip", entry.relpath, str(reason)))
            continue
        meta = {"source": entry.relpath, "original_size": list(original_size)}
        if entry.label is not None:
            meta.update(label=label_index, label_name=entry.label)
        encoded_meta = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")
        results.append(("ok", entry.key, {spec.format: image, "json": encoded_meta}))
    return results
