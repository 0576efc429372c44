"""`torchscript:PATH_OR_URI`: any TorchScript image encoder (extra: tokenmill[torch]).

The Cosmos Tokenizer image interface is the contract:
  - input B x 3 x H x W in [-1, 1] (x / 127.5 - 1), float32 or bfloat16, with H
    and W padded at the bottom and right, by repeating edge pixels, to a
    multiple of `pad_multiple` (the model's spatial factor; 16 by default);
  - a discrete encoder returns (indices, codes): indices B x h x w are the hard
    tokens; vocab_size comes from the model's `vocab_size` (or `codebook_size`)
    attribute, or the --vocab-size option;
  - a continuous encoder returns (latent,), B x C x h x w: the soft tokens are
    the h * w vectors of C values;
  - a plain module returning one tensor is read the same way (integer → hard,
    floating → soft).
The kind is found by running the model once on a blank input when it loads.
Images are batched by padded size, up to `batch_size` at a time. The model is
loaded with torch.jit.load (TorchScript, not pickle) once per worker.
"""
from __future__ import annotations

import hashlib
import io
from typing import Any, Sequence

import numpy as np

from schemas.storage import read_bytes
from transforms.tokenizers.base import ImageTokenizer, TokenizerSpecError

DTYPES = ("fp32", "bf16")


class TorchScriptImageTokenizer(ImageTokenizer):
    def __init__(self, spec: str, uri: str, *, device: str = "cpu", dtype: str = "fp32", batch_size: int = 8,
                 pad_multiple: int = 16, vocab_size: int | None = None):
        try:
            import torch
        except ImportError:
            raise TokenizerSpecError("torchscript: needs the extra: pip install 'tokenmill[torch]'") from None
        if dtype not in DTYPES:
            raise TokenizerSpecError(f"--dtype must be one of {', '.join(DTYPES)}")
        try:
            data = read_bytes(uri)
            self.model = torch.jit.load(io.BytesIO(data), map_location=device).eval()
        except Exception as e:
            raise TokenizerSpecError(f"cannot load TorchScript model {uri}: {e}") from None
        self.spec, self.uri, self.device = spec, uri, device
        self.torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        self.dtype, self.batch_size, self.pad_multiple = dtype, max(1, batch_size), pad_multiple
        self._sha256 = hashlib.sha256(data).hexdigest()
        self.name = uri.rstrip("/").rsplit("/", 1)[-1]
        if dtype == "bf16":
            self.model = self.model.to(torch.bfloat16)  # weights and input in the same dtype
        try:
            probe = self._run(np.zeros((1, pad_multiple, pad_multiple, 3), np.uint8))
        except Exception as e:
            raise TokenizerSpecError(f"{uri} failed on a blank 1x3x{pad_multiple}x{pad_multiple} input: "
                                     f"{str(e).strip().splitlines()[-1]}") from None
        if probe.dtype.is_floating_point:
            self.kind, self.dim = "soft", int(probe.shape[1])
            self.latent_dtype = "bfloat16" if probe.dtype == torch.bfloat16 else "float32"
        else:
            self.kind = "hard"
            size = vocab_size or next((int(getattr(self.model, a)) for a in ("vocab_size", "codebook_size")
                                       if hasattr(self.model, a)), None)
            if not size:
                raise TokenizerSpecError(f"{uri} returns codes but declares no vocab_size; pass --vocab-size")
            self.vocab_size = size

    def _run(self, batch: np.ndarray):
        """uint8 B x H x W x 3 (already padded) → the model's token tensor."""
        import torch

        x = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).to(self.torch_dtype) / 127.5 - 1.0
        with torch.inference_mode():
            out = self.model(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor) or out.dim() not in (3, 4):
            raise ValueError("the model must return indices (B x h x w), a latent (B x C x h x w), or a tuple "
                             "starting with one")
        return out

    def _pad(self, image: np.ndarray) -> np.ndarray:
        m = self.pad_multiple
        H, W = image.shape[:2]
        return np.pad(image, ((0, -H % m), (0, -W % m), (0, 0)), mode="edge")

    def identity(self) -> dict[str, Any]:
        return {"family": "torchscript", "model_sha256": self._sha256, "dtype": self.dtype,
                "pad_multiple": self.pad_multiple, "device_type": self.device.split(":")[0],
                "input": "B x 3 x H x W in [-1, 1], edge-padded bottom/right"}

    def metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "spec": self.spec, "name": self.name, "modality": self.modality, "kind": self.kind,
            "dtype": self.dtype, "device": self.device, "batch_size": self.batch_size,
            "geometry": {"pad_multiple": self.pad_multiple, "padding": "edge, bottom/right",
                         "input_range": [-1.0, 1.0]},
            "fingerprint": self.fingerprint()}
        if self.kind == "hard":
            meta.update(vocab_size=self.vocab_size, token_dtype=str(self.token_type))
        else:
            meta.update(dim=self.dim, latent_dtype=self.latent_dtype, token_dtype=self.latent_dtype)
        return meta

    def _tokens(self, out) -> list[tuple[np.ndarray, tuple[int, int]]]:
        import torch

        results = []
        for item in out:
            if self.kind == "hard":
                h, w = item.shape[-2:]
                results.append((item.reshape(-1).to(torch.int64).cpu().numpy(), (h, w)))
            else:
                c, h, w = item.shape
                vec = item.reshape(c, h * w).T.contiguous()
                if self.latent_dtype == "bfloat16":
                    vec = vec.view(torch.uint16) if hasattr(torch, "uint16") else vec.view(torch.int16)
                results.append((vec.cpu().numpy(), (h, w)))
        return results

    def encode_images(self, images: Sequence[np.ndarray]) -> list[Any]:
        """Batched by padded size: one model call per bucket of up to batch_size images."""
        results: list[Any] = [None] * len(images)
        buckets: dict[tuple[int, int], list[int]] = {}
        padded = []
        for i, image in enumerate(images):
            padded.append(self._pad(image))
            buckets.setdefault(padded[-1].shape[:2], []).append(i)
        for members in buckets.values():
            for s in range(0, len(members), self.batch_size):
                chunk = members[s:s + self.batch_size]
                try:
                    for i, r in zip(chunk, self._tokens(self._run(np.stack([padded[i] for i in chunk])))):
                        results[i] = r
                except Exception as e:  # a failing batch fails its images, not the block
                    for i in chunk:
                        results[i] = e
        return results

    def encode_image(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        result = self.encode_images([image])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def decode_image(self, tokens: np.ndarray, grid: tuple[int, int], height: int, width: int) -> np.ndarray:
        raise NotImplementedError("decoding needs the model's decoder, which torchscript: does not load")
