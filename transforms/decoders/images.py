"""Image bytes → RGB uint8 arrays, with EXIF orientation, one mode rule and a size policy.

Mode rule (every mode becomes 8-bit RGB):
  - RGB: as is.  L, 1: gray copied to R, G and B.
  - I;16 / I;16B / I / F (16-bit and wider gray): scaled to 0..255 by value / 257
    (F is clipped to 0..255 first), then as L.
  - Anything with transparency (RGBA, LA, PA, P or L with a transparent colour):
    composited over white.
  - P without transparency, CMYK, YCbCr, LAB, HSV: PIL's conversion to RGB.
Decompression bombs are refused from the header, before any pixel is decoded.
"""
from __future__ import annotations

import dataclasses
import functools
import io
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Iterator

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows
from PIL import Image, ImageOps

from tokenmill.transforms.coders import BlockCoder  # noqa: F401  (registers the block coder)
from tokenmill.transforms.overlap import OneAhead
from tokenmill.transforms.records import ImageBlock

if TYPE_CHECKING:
    from tokenmill.transforms.records import RawBlock

DEFAULT_MAX_PIXELS = 64_000_000

# PIL's own bomb check stays on as a second line, above ours.
Image.MAX_IMAGE_PIXELS = None


class DecompressionBomb(ValueError):
    """An image whose header declares more pixels than allowed."""


@dataclasses.dataclass(frozen=True)
class SizePolicy:
    """native[:MAX] keeps the size (downscaling so the longer side is at most MAX);
    crop:S center-crops to a square and resizes it to S x S;
    shorter:S resizes so the shorter side is S, keeping the aspect ratio."""

    kind: str = "native"
    size: int | None = None

    @classmethod
    def parse(cls, text: str) -> "SizePolicy":
        kind, _, arg = text.partition(":")
        if kind not in ("native", "crop", "shorter"):
            raise ValueError(f"unknown size policy {text!r}: use native[:MAX], crop:S or shorter:S")
        if arg and (not arg.isdigit() or int(arg) <= 0):
            raise ValueError(f"size policy {text!r}: size must be a positive integer")
        if kind != "native" and not arg:
            raise ValueError(f"size policy {kind} needs a size, e.g. {kind}:256")
        return cls(kind, int(arg) if arg else None)

    def __str__(self) -> str:
        return self.kind if self.size is None else f"{self.kind}:{self.size}"

    def target(self, w: int, h: int) -> tuple[tuple[int, int, int, int] | None, tuple[int, int]]:
        """(crop box or None, output size) for an image of w x h."""
        if self.kind == "crop":
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            return (left, top, left + side, top + side), (self.size, self.size)
        if self.kind == "shorter":
            scale = self.size / min(w, h)
        else:
            scale = min(1.0, self.size / max(w, h)) if self.size else 1.0
        return None, (max(1, round(w * scale)), max(1, round(h * scale)))


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if im.mode == "F":
            a = np.clip(a, 0, 255) * 257
        return Image.fromarray(np.clip(np.rint(a / 257), 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def decode_image(data: bytes, policy: SizePolicy = SizePolicy(), max_pixels: int = DEFAULT_MAX_PIXELS
                 ) -> tuple[np.ndarray, dict[str, Any]]:
    """RGB uint8 array (H, W, 3) and facts about the source (orig size, mode)."""
    im = Image.open(io.BytesIO(data))  # reads the header only
    w, h = im.size
    if w * h > max_pixels:
        raise DecompressionBomb(f"{w}x{h} = {w * h} pixels is above --max-pixels={max_pixels}")
    info = {"orig_width": w, "orig_height": h, "mode": im.mode, "format": im.format}
    if im.format == "JPEG" and policy.kind != "crop" and policy.size:
        im.draft("RGB", policy.target(w, h)[1])  # let libjpeg downscale by 1/2, 1/4, 1/8 while decoding
    im.load()
    decoded = im.size
    ImageOps.exif_transpose(im, in_place=True)  # orientation from EXIF; a no-op without it
    # The original size as displayed: the header's (the decode may be draft-reduced), turned as EXIF turns it.
    if im.size != decoded:
        info["orig_width"], info["orig_height"] = h, w
    im = _to_rgb(im)
    box, size = policy.target(*im.size)
    if box is not None:
        im = im.crop(box)
    if im.size != size:
        im = im.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    return np.asarray(im, dtype=np.uint8), info


def _decode_or_error(item: tuple[str, str, bytes], policy: SizePolicy, max_pixels: int) -> Any:
    """(image, info), or the ErrorRecord that says why the record could not be decoded."""
    from PIL import UnidentifiedImageError

    from tokenmill.transforms.records import ErrorRecord

    loc, src, data = item
    try:
        return decode_image(data, policy, max_pixels)
    except DecompressionBomb as e:
        return ErrorRecord(src, loc, "decode", "DecompressionBomb", str(e))
    except UnidentifiedImageError:
        return ErrorRecord(src, loc, "decode", "NotAnImage", "not a decodable image (unknown format or corrupt header)")
    except Exception as e:  # truncated data, broken streams, codec errors
        return ErrorRecord(src, loc, "decode", type(e).__name__, f"cannot decode image: {e}")


def decode_image_block(raw: "RawBlock", policy: SizePolicy, max_pixels: int,
                       pool: ThreadPoolExecutor | None = None) -> "ImageBlock":
    """Decode every record of a block; each failure becomes an error record with its reason.

    With a thread pool the records decode in parallel (Pillow releases the GIL
    while it decodes and resizes); results keep the block's order either way.
    """
    from tokenmill.transforms.records import ErrorRecord, ImageBlock

    sources = raw.sources or [raw.source] * len(raw.locators)
    metas = raw.metas or [None] * len(raw.locators)
    items = list(zip(raw.locators, sources, raw.payloads))
    decode = functools.partial(_decode_or_error, policy=policy, max_pixels=max_pixels)
    results = pool.map(decode, items) if pool is not None and len(items) > 1 else map(decode, items)
    out = ImageBlock(raw.source, raw.block, [], [], [], [], [], list(raw.errors), raw.nbytes)
    for (loc, src, _), meta, result in zip(items, metas, results):
        if isinstance(result, ErrorRecord):
            out.errors.append(result)
            continue
        image, info = result
        out.locators.append(loc)
        out.sources.append(src)
        out.images.append(image)
        out.infos.append(info)
        out.metas.append(meta)
    return out


@beam.typehints.with_output_types(ImageBlock)
class _DecodeImageBlocks(beam.DoFn):
    """Decodes each block in a helper thread while the previous one is tokenized and written.

    Pillow releases the GIL while it decodes, so a block's decoding overlaps
    the tokenizer's work on the one before (numpy or BLAS, which release it
    too): blocks come out one behind, in order, the last at the end of the
    bundle. A block whose decoding fails outright becomes error rows for all
    its records, since the failure surfaces after its own element was done.
    """

    def __init__(self, policy: str, max_pixels: int, threads: int = 1):
        self._policy, self._max_pixels = SizePolicy.parse(policy), max_pixels
        self._threads = max(1, threads)
        self._rejected = Metrics.counter("tokenmill", "decode_errors")
        self._pool: ThreadPoolExecutor | None = None
        self._ahead = OneAhead(self._decode, "tokenmill-decode-ahead")

    def setup(self):
        if self._threads > 1:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="tokenmill-decode")
        self._ahead.start()

    def teardown(self):
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        self._ahead.stop(wait=False)

    def start_bundle(self):
        self._ahead.reset()

    def _decode(self, raw: "RawBlock") -> ImageBlock:
        try:
            return decode_image_block(raw, self._policy, self._max_pixels, self._pool)
        except Exception as e:  # noqa: BLE001 - every record still ends as a row or an error row
            errors = raw.error_block("decode", type(e).__name__, f"decode failed for the whole block: {e}").errors
            return ImageBlock(raw.source, raw.block, [], [], [], [], [], errors, raw.nbytes)

    def _done(self, finished) -> Iterator[ImageBlock]:
        for raw, block in finished:
            self._rejected.inc(len(block.errors) - len(raw.errors))
            yield block

    def process(self, raw):
        yield from self._done(self._ahead.push(raw))

    def finish_bundle(self):
        for block in self._done(self._ahead.drain()):
            yield GlobalWindows.windowed_value(block)


class DecodeImages(beam.PTransform):
    """RawBlocks of encoded images → ImageBlocks. Returns (blocks, failed)."""

    def __init__(self, policy: str = "native:1024", max_pixels: int = DEFAULT_MAX_PIXELS, threads: int = 1):
        super().__init__()
        SizePolicy.parse(policy)  # fail at construction on a bad policy
        self._policy, self._max_pixels, self._threads = policy, max_pixels, threads

    def expand(self, raw_blocks):
        return raw_blocks | "DecodeImageBlocks" >> beam.ParDo(
            _DecodeImageBlocks(self._policy, self._max_pixels, self._threads)).with_exception_handling()
