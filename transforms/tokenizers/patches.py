"""`patch:P`: soft visual patches, the Sora / NaViT token: P x P x 3 pixels per token;
`patch:T,P`: soft spacetime patches of video clips, T frames x P x P x 3 pixels per token.

Native resolution and aspect ratio are kept: the image (after the size policy)
is padded at the bottom and right, by repeating its edge pixels, to a multiple
of P, then cut into a row-major (h, w) grid. Each token holds its pixels in
(row, column, channel) order as uint8, which is lossless and half the bytes of
float16; the normalization to [-1, 1] (x / 127.5 - 1) is recorded in the
metadata and applied by the reader. Decoding reassembles the grid and cuts the
padding off, giving back exactly the image that was tokenized.

Clips are padded the same way in time (the last frame repeated) to a multiple
of T and cut into a (t, h, w) grid; each token holds its pixels in (frame, row,
column, channel) order.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from transforms.tokenizers.base import ImageTokenizer, TokenizerSpecError, VideoTokenizer

NORMALIZATION = {"scale": 1 / 127.5, "offset": -1.0, "range": [-1.0, 1.0]}


def patch_view(image: np.ndarray, p: int) -> tuple[np.ndarray, tuple[int, int]]:
    """An (h, w, p, p, 3) view of an (H, W, 3) image's patches (no copy unless padding), and the grid.

    Its elements in C order are the (h * w, p * p * 3) patches: the batch
    encoder copies them once, straight into the Arrow buffer.
    """
    H, W = image.shape[:2]
    h, w = -(-H // p), -(-W // p)
    if (h * p, w * p) != (H, W):
        image = np.pad(image, ((0, h * p - H), (0, w * p - W), (0, 0)), mode="edge")
    return image.reshape(h, p, w, p, 3).transpose(0, 2, 1, 3, 4), (h, w)


def image_to_patches(image: np.ndarray, p: int) -> tuple[np.ndarray, tuple[int, int]]:
    """(h * w, p * p * 3) uint8 patches and the grid (h, w) of an (H, W, 3) image."""
    view, (h, w) = patch_view(image, p)
    return np.ascontiguousarray(view).reshape(h * w, p * p * 3), (h, w)


def patches_to_image(patches: np.ndarray, grid: tuple[int, int], p: int, height: int, width: int) -> np.ndarray:
    h, w = grid
    full = np.asarray(patches).reshape(h, w, p, p, 3).transpose(0, 2, 1, 3, 4).reshape(h * p, w * p, 3)
    return full[:height, :width]


class PatchTokenizer(ImageTokenizer):
    kind = "soft"
    latent_dtype = "uint8"

    def __init__(self, spec: str, patch: int):
        if not 1 <= patch <= 256:
            raise TokenizerSpecError(f"patch size must be 1..256, got {patch}")
        self.spec, self.patch = spec, patch
        self.name = f"patch{patch}"
        self.dim = patch * patch * 3

    def identity(self) -> dict[str, Any]:
        return {"family": "patch", "version": 1, "patch": self.patch, "layout": "row-major grid, (y, x, c) in patch",
                "padding": "edge, bottom and right, to a multiple of the patch size"}

    def metadata(self) -> dict[str, Any]:
        return {"spec": self.spec, "name": self.name, "modality": self.modality, "kind": self.kind,
                "dim": self.dim, "latent_dtype": self.latent_dtype, "token_dtype": self.latent_dtype,
                "normalization": NORMALIZATION,
                "geometry": {"patch": [self.patch, self.patch], "channels": 3, "layout": "hwc",
                             "padding": "edge, bottom/right, to a multiple of the patch"},
                "fingerprint": self.fingerprint()}

    def encode_image(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        return image_to_patches(image, self.patch)

    def encode_images(self, images):
        """Patch views, copied once by encode_batch (a contiguous copy here would be a second)."""
        return [patch_view(image, self.patch) for image in images]

    def decode_image(self, tokens: np.ndarray, grid: tuple[int, int], height: int, width: int) -> np.ndarray:
        return patches_to_image(tokens, grid, self.patch, height, width)


def clip_view(clip: np.ndarray, t: int, p: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A (gt, gh, gw, t, p, p, 3) view of a (T, H, W, 3) clip's spacetime patches, and the grid.

    No copy unless padding; its elements in C order are the patches (see patch_view).
    """
    T, H, W = clip.shape[:3]
    gt, gh, gw = -(-T // t), -(-H // p), -(-W // p)
    if (gt * t, gh * p, gw * p) != (T, H, W):
        clip = np.pad(clip, ((0, gt * t - T), (0, gh * p - H), (0, gw * p - W), (0, 0)), mode="edge")
    return clip.reshape(gt, t, gh, p, gw, p, 3).transpose(0, 2, 4, 1, 3, 5, 6), (gt, gh, gw)


def clip_to_patches(clip: np.ndarray, t: int, p: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(n, t * p * p * 3) uint8 spacetime patches and the grid (gt, gh, gw) of a (T, H, W, 3) clip."""
    view, (gt, gh, gw) = clip_view(clip, t, p)
    return np.ascontiguousarray(view).reshape(gt * gh * gw, -1), (gt, gh, gw)


def patches_to_clip(patches: np.ndarray, grid: tuple[int, int, int], t: int, p: int, frames: int, height: int,
                    width: int) -> np.ndarray:
    gt, gh, gw = grid
    full = np.asarray(patches).reshape(gt, gh, gw, t, p, p, 3).transpose(0, 3, 1, 4, 2, 5, 6)
    return full.reshape(gt * t, gh * p, gw * p, 3)[:frames, :height, :width]


def multiple_padding(frames: int, height: int, width: int, t: int, p: int) -> tuple[int, int, int]:
    return -frames % t, -height % p, -width % p


class VideoPatchTokenizer(VideoTokenizer):
    kind = "soft"
    latent_dtype = "uint8"

    def __init__(self, spec: str, frames: int, patch: int):
        if not 1 <= patch <= 256 or not 1 <= frames <= 64:
            raise TokenizerSpecError(f"patch:T,P needs 1 <= T <= 64 and 1 <= P <= 256, got {spec!r}")
        self.spec, self.frames, self.patch = spec, frames, patch
        self.name = f"patch{frames}x{patch}"
        self.dim = frames * patch * patch * 3

    def identity(self) -> dict[str, Any]:
        return {"family": "patch", "version": 1, "frames": self.frames, "patch": self.patch,
                "layout": "row-major (t, h, w) grid, (f, y, x, c) in patch",
                "padding": "edge, end of clip and bottom/right, to multiples of the patch"}

    def metadata(self) -> dict[str, Any]:
        return {"spec": self.spec, "name": self.name, "modality": self.modality, "kind": self.kind,
                "dim": self.dim, "latent_dtype": self.latent_dtype, "token_dtype": self.latent_dtype,
                "normalization": NORMALIZATION,
                "geometry": {"patch": [self.frames, self.patch, self.patch], "channels": 3, "layout": "thwc",
                             "padding": "edge, end of clip and bottom/right, to multiples of the patch"},
                "fingerprint": self.fingerprint()}

    def encode_clip(self, clip: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        return clip_to_patches(clip, self.frames, self.patch)

    def encode_clips(self, clips):
        """Patch views, copied once by encode_batch."""
        return [clip_view(clip, self.frames, self.patch) for clip in clips]

    def padding(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        return multiple_padding(frames, height, width, self.frames, self.patch)

    def decode_clip(self, tokens: np.ndarray, grid: tuple[int, int, int], frames: int, height: int,
                    width: int) -> np.ndarray:
        return patches_to_clip(tokens, grid, self.frames, self.patch, frames, height, width)
