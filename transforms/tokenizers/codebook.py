"""Tokenizers fitted on the user's own images, no neural weights: `vq:` codebooks and `pca:` latents.

Both work on P x P x 3 patches (see patches.py), normalized to [-1, 1]; fitted
on video clips, on T x P x P x 3 spacetime patches (the file then holds `frames`).
- `vq:PATH_OR_URI`: hard tokens, the index of the nearest code (squared
  Euclidean distance, ties to the lower index) in a (K, P*P*3) codebook.
- `pca:PATH_OR_URI`: soft tokens through a linear bottleneck: d-dimensional
  latents = (patch - mean) @ components.T; decoding is latents @ components + mean.

Files are .npz archives written by `tokenmill fit` and read with
allow_pickle=False: `kind`, `patch`, then `codes` (vq) or `mean` and
`components` (pca). The fingerprint hashes the arrays, so a refit is a new tokenizer.
"""
from __future__ import annotations

import hashlib
import io
from typing import Any

import numpy as np

from tokenmill.schemas.storage import read_bytes
from tokenmill.transforms.tokenizers.base import ImageTokenizer, TokenizerSpecError, VideoTokenizer
from tokenmill.transforms.tokenizers.patches import (NORMALIZATION, clip_to_patches, image_to_patches, multiple_padding,
                                           patches_to_clip, patches_to_image)


def to_unit(patches: np.ndarray) -> np.ndarray:
    """uint8 patches → float32 in [-1, 1]."""
    return patches.astype(np.float32) * np.float32(NORMALIZATION["scale"]) + np.float32(NORMALIZATION["offset"])


def to_pixels(values: np.ndarray) -> np.ndarray:
    """[-1, 1] values → uint8 pixels, rounded and clipped."""
    return np.clip(np.rint((values + 1.0) * 127.5), 0, 255).astype(np.uint8)


def nearest_codes(x: np.ndarray, codes: np.ndarray, code_norms: np.ndarray) -> np.ndarray:
    """Index of the nearest code for each row of x: argmin ||c||^2 - 2 x.c, in chunks to bound memory."""
    out = np.empty(len(x), np.int64)
    for i in range(0, len(x), 4096):
        out[i:i + 4096] = np.argmin(code_norms[None, :] - 2.0 * (x[i:i + 4096] @ codes.T), axis=1)
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images, in dB (inf when equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def save_npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _load_npz(uri: str, kind: str) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(read_bytes(uri)), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise TokenizerSpecError(f"cannot read {kind} file {uri}: {e}") from None
    if str(arrays.get("kind")) != kind:
        raise TokenizerSpecError(f"{uri} is not a {kind} file (kind={arrays.get('kind')})")
    need = {"vq": ("patch", "codes"), "pca": ("patch", "mean", "components")}[kind]
    missing = [k for k in need if k not in arrays]
    if missing:
        raise TokenizerSpecError(f"{uri}: a {kind} file needs {', '.join(need)}; it has no {', '.join(missing)}")
    for name in need:
        a = arrays[name]
        if a.dtype.kind not in "iuf":
            raise TokenizerSpecError(f"{uri}: {name} must hold numbers, not {a.dtype}")
        if not np.isfinite(a).all():
            raise TokenizerSpecError(f"{uri}: {name} holds NaN or infinite values")
    if arrays["patch"].size != 1 or int(arrays["patch"]) < 1:
        raise TokenizerSpecError(f"{uri}: patch must be one positive integer, not {arrays['patch'].tolist()}")
    return arrays


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


class _PatchFitted:
    """What vq: and pca: share, for images (P x P x 3 patches) and clips (T x P x P x 3; the file has `frames`)."""

    modality: str
    spec: str
    parallel_items = True  # per-item numpy (code search, projection): threads scale where BLAS threads do not

    def __init__(self, spec: str, uri: str, kind: str):
        self.spec, self.uri = spec, uri
        self._arrays = _load_npz(uri, kind)
        self.patch = int(self._arrays["patch"])
        self.frames = int(self._arrays["frames"]) if "frames" in self._arrays else 0
        if (self.frames > 0) != (self.modality == "video"):
            raise TokenizerSpecError(f"{uri} was fitted on {'video clips' if self.frames else 'images'}; "
                                     f"it cannot tokenize {self.modality}")
        self.name = f"{kind}:{uri.rstrip('/').rsplit('/', 1)[-1]}"
        self.values = (self.frames or 1) * self.patch * self.patch * 3

    def _geometry(self) -> dict[str, Any]:
        if self.frames:
            return {"patch": [self.frames, self.patch, self.patch], "channels": 3, "layout": "thwc",
                    "padding": "edge, end of clip and bottom/right, to multiples of the patch"}
        return {"patch": [self.patch, self.patch], "channels": 3, "layout": "hwc",
                "padding": "edge, bottom/right, to a multiple of the patch"}

    def _shape_identity(self) -> dict[str, Any]:
        return {"patch": self.patch, **({"frames": self.frames} if self.frames else {})}

    def _patches(self, array: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
        if self.frames:
            return clip_to_patches(array, self.frames, self.patch)
        return image_to_patches(array, self.patch)

    def _array(self, patches: np.ndarray, grid: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
        if self.frames:
            return patches_to_clip(patches, grid, self.frames, self.patch, *shape)
        return patches_to_image(patches, grid, self.patch, *shape)

    def padding(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        return multiple_padding(frames, height, width, self.frames, self.patch)

    def encode_clip(self, clip: np.ndarray):
        return self.encode_array(clip)

    def decode_clip(self, tokens: np.ndarray, grid, frames: int, height: int, width: int) -> np.ndarray:
        return self.decode_array(tokens, grid, (frames, height, width))

    def encode_image(self, image: np.ndarray):
        return self.encode_array(image)

    def decode_image(self, tokens: np.ndarray, grid, height: int, width: int) -> np.ndarray:
        return self.decode_array(tokens, grid, (height, width))


class _VQ(_PatchFitted):
    kind = "hard"

    def __init__(self, spec: str, uri: str):
        super().__init__(spec, uri, "vq")
        self.codes = self._arrays["codes"].astype(np.float32)
        if self.codes.ndim != 2 or self.codes.shape[1] != self.values or len(self.codes) == 0:
            raise TokenizerSpecError(f"{uri}: codes must be (K, {self.values}) with K >= 1, not {self.codes.shape}")
        self._norms = (self.codes ** 2).sum(1)
        self.vocab_size = len(self.codes)

    def identity(self) -> dict[str, Any]:
        return {"family": "vq", "version": 1, **self._shape_identity(), "codes_sha256": _digest(self.codes)}

    def metadata(self) -> dict[str, Any]:
        return {"spec": self.spec, "name": self.name, "modality": self.modality, "kind": self.kind,
                "vocab_size": self.vocab_size, "token_dtype": str(self.token_type),
                "geometry": self._geometry(), "fingerprint": self.fingerprint()}

    def encode_array(self, array: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
        patches, grid = self._patches(array)
        return nearest_codes(to_unit(patches), self.codes, self._norms), grid

    def decode_array(self, tokens: np.ndarray, grid: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
        return self._array(to_pixels(self.codes[np.asarray(tokens, np.int64)]), grid, shape)


class _PCA(_PatchFitted):
    kind = "soft"

    def __init__(self, spec: str, uri: str, latent_dtype: str = "float32"):
        super().__init__(spec, uri, "pca")
        self.mean = self._arrays["mean"].astype(np.float32)
        self.components = self._arrays["components"].astype(np.float32)
        if self.components.ndim != 2 or self.components.shape[1] != self.values or len(self.components) == 0 \
                or self.mean.shape != (self.values,):
            raise TokenizerSpecError(f"{uri}: components must be (d, {self.values}) with d >= 1 and mean "
                                     f"({self.values},), not {self.components.shape} and {self.mean.shape}")
        self.dim = len(self.components)
        self.latent_dtype = latent_dtype

    def identity(self) -> dict[str, Any]:
        return {"family": "pca", "version": 1, **self._shape_identity(), "latent_dtype": self.latent_dtype,
                "arrays_sha256": _digest(self.mean, self.components)}

    def metadata(self) -> dict[str, Any]:
        return {"spec": self.spec, "name": self.name, "modality": self.modality, "kind": self.kind,
                "dim": self.dim, "latent_dtype": self.latent_dtype, "token_dtype": self.latent_dtype,
                "geometry": self._geometry(), "fingerprint": self.fingerprint()}

    def encode_array(self, array: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
        patches, grid = self._patches(array)
        latents = (to_unit(patches) - self.mean) @ self.components.T
        return latents.astype(self.latent_dtype), grid

    def decode_array(self, tokens: np.ndarray, grid: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
        values = np.asarray(tokens, np.float32).reshape(-1, self.dim) @ self.components + self.mean
        return self._array(to_pixels(values), grid, shape)


class VQTokenizer(_VQ, ImageTokenizer):
    """vq: on images."""


class PCATokenizer(_PCA, ImageTokenizer):
    """pca: on images."""


class VideoVQTokenizer(_VQ, VideoTokenizer):
    """vq: on clips: one code per T x P x P spacetime patch."""


class VideoPCATokenizer(_PCA, VideoTokenizer):
    """pca: on clips: one latent per T x P x P spacetime patch."""


def load(spec: str, arg: str, modality: str):
    """A fitted vq codebook or pca bottleneck (`tokenmill fit`), for images or clips."""
    family = spec.partition(":")[0]
    classes = {("vq", "image"): VQTokenizer, ("pca", "image"): PCATokenizer,
               ("vq", "video"): VideoVQTokenizer, ("pca", "video"): VideoPCATokenizer}
    return classes[family, modality](spec, arg)


def _families():
    from tokenmill.transforms.registry import TokenizerFamily

    return tuple(TokenizerFamily(name, ("image", "video"), (f"{name}:PATH_OR_URI",), loader=f"{__name__}:load")
                 for name in ("vq", "pca"))


VQ_FAMILY, PCA_FAMILY = _families()
