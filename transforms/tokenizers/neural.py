"""What every neural encoder family shares (`torchscript:`, `export:`, and any later one): the options,
the dtype mapping, the device check, and one implementation of loading, calling and batching.

The contract is the Cosmos Tokenizer interface. Images:
  - input B x 3 x H x W in [-1, 1] (x / 127.5 - 1), in the model's dtype, with
    H and W padded at the bottom and right, by repeating edge pixels, to a
    multiple of `pad_multiple` (the model's spatial factor; 16 by default);
  - a discrete encoder returns (indices, codes): indices B x h x w are the hard
    tokens; vocab_size comes from the model (each family says where it looks),
    or the --vocab-size option;
  - a continuous encoder returns (latent,), B x C x h x w: the soft tokens are
    the h * w vectors of C values;
  - a plain module returning one tensor is read the same way (integer → hard,
    floating → soft).
Videos are the same with a time axis (see NeuralVideoTokenizer). The kind is
found by running the model once on a blank input when it loads.

Batching: items are padded one by one and grouped by padded shape; each group
goes to the model in calls of up to `batch_size` items stacked with no further
padding, so an image is never padded to the size of a bigger neighbour and its
tokens do not depend on what it was batched with. A call that raises fails the
items of that call (error rows), not the block.

A family subclasses EncoderModel (how to load its file, where it declares a
vocabulary), names its model in two small subclasses of NeuralImageTokenizer
and NeuralVideoTokenizer, and loads them with `load_family`
(transforms/tokenizers/torchscript.py is the smallest).
"""
from __future__ import annotations

import hashlib
import os
import sys
from typing import Any, Sequence

import numpy as np

from tokenmill.schemas.storage import read_bytes
from tokenmill.transforms.tokenizers.base import ImageTokenizer, TokenizerSpecError, VideoTokenizer

DTYPES = ("fp32", "bf16", "fp16")
# --dtype → torch dtype name, and the name of what a floating output is stored as (schemas.tables.LATENT_STORAGE).
_TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


# What torch reads once, when it loads (libgomp) or on its first allocation (c10's CPU allocator), and only from
# the environment. Measured on AutoencoderKL encodes (docs/benchmarks.md, "diffusers: AutoencoderKL"): GNU
# OpenMP's worker threads spin after every parallel region, burning the core that the other thread of the
# region, tokenmill's decoding threads or other processes need (a quarter of a build's CPU samples were in
# libgomp); and every activation above glibc's 32 MiB mmap limit (a batch of 8 512x512 images makes many)
# was a fresh mapping faulted in 4 KiB at a time (1.9 M page faults per 64 images, most of the system time).
# Passive waiting and 2 MiB pages change no value (the same latents, bit for bit).
TORCH_ENVIRONMENT = {"OMP_WAIT_POLICY": "PASSIVE", "THP_MEM_ALLOC_ENABLE": "1"}


def torch_environment() -> bool:
    """Set TORCH_ENVIRONMENT's defaults before the first `import torch` of this process (a variable the user
    set wins; TOKENMILL_TORCH_TUNING=0 skips it). Workers forked or started from the process inherit them.
    Returns whether they were set: too late once torch is imported."""
    if "torch" in sys.modules or os.environ.get("TOKENMILL_TORCH_TUNING") == "0":
        return False
    for name, value in TORCH_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    return True


def torch_dtype(name: str):
    """The torch dtype of a --dtype value (fp32, bf16, fp16); TokenizerSpecError for anything else."""
    import torch

    if name not in _TORCH_DTYPES:
        raise TokenizerSpecError(f"--dtype must be one of {', '.join(DTYPES)}, not {name!r}")
    return getattr(torch, _TORCH_DTYPES[name])


def latent_dtype_of(dtype) -> str:
    """How a floating torch output is stored: float32, bfloat16 (as uint16 bits) or float16; wider is narrowed
    to float32."""
    name = str(dtype).removeprefix("torch.")
    return name if name in ("bfloat16", "float16") else "float32"


def check_device(device: str) -> None:
    """One line for a device this machine cannot run (a CUDA device without CUDA, a name torch does not know)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise TokenizerSpecError(f"--device {device!r} is not a torch device (examples: cpu, cuda, cuda:0)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TokenizerSpecError(f"--device {device}: CUDA is not available here (torch {torch.__version__}, "
                                 f"{'no CUDA build' if torch.version.cuda is None else 'no GPU found'}); "
                                 "use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise TokenizerSpecError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def neural_options():
    """Options every neural encoder family takes (torch device, dtype, batching, padding)."""
    from tokenmill.transforms.registry import Option

    return (
        Option("device", "torch device, e.g. cpu or cuda:0 (default: cpu)", default="cpu"),
        Option("dtype", "model dtype: weights and input (default: fp32)", default="fp32", choices=DTYPES),
        Option("batch_size", "images or clips per model call, of one padded shape (default: 8)", type=int,
               default=8),
        Option("pad_multiple", "pad H and W (edge, bottom/right) to a multiple of this (default: 16)", type=int,
               default=16),
        Option("vocab_size", "codes of a discrete encoder that does not declare them", type=int),
        Option("temporal_factor", "video encoders: clips are edge-padded to 1 + k x N frames (default: 8)",
               type=int, default=8, metavar="N"),
    )


class EncoderModel:
    """A loaded encoder, its dtype and device, and what its probe said it returns (hard or soft).

    Subclasses set `family` and `what` (for messages) and implement `_load`; they may override
    `_declared_vocab_size`, `_probe_shape` and `_refusal`.
    """

    family: str
    what: str  # "TorchScript model", ...

    def __init__(self, uri: str, device: str, dtype: str, pad_multiple: int, vocab_size: int | None,
                 probe_shape: tuple[int, ...], order: tuple[int, ...]):
        torch_environment()
        try:
            import torch
        except ImportError:
            raise TokenizerSpecError(f"{self.family}: needs the extra: pip install 'tokenmill[torch]'") from None
        self.torch_dtype = torch_dtype(dtype)
        check_device(device)
        try:
            data = read_bytes(uri)
        except Exception as e:
            raise TokenizerSpecError(f"cannot read {self.what} {uri}: {e}") from None
        self.device, self.order, self.rank = device, order, len(order)
        self.dtype, self.pad_multiple = dtype, pad_multiple
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.name = uri.rstrip("/").rsplit("/", 1)[-1]
        self.uri = uri
        self.max_batch: int | None = None  # a program exported for one batch size sets it
        self.model = self._load(data)
        self.dim, self.latent_dtype, self.vocab_size = 0, None, None
        probe = np.zeros(self._probe_shape(probe_shape), np.uint8)
        try:
            out = self.call(probe)
        except TokenizerSpecError:
            raise
        except Exception as e:
            shape = "x".join(str(d) for d in (probe.shape[0], 3, *probe.shape[1:-1]))
            raise TokenizerSpecError(f"{uri} failed on a blank {shape} input: "
                                     f"{str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}"
                                     ) from None
        if out.dtype.is_floating_point:
            self.kind, self.dim = "soft", int(out.shape[1])
            self.latent_dtype = latent_dtype_of(out.dtype)
        else:
            self.kind = "hard"
            size = vocab_size or self._declared_vocab_size()
            if not size:
                raise TokenizerSpecError(f"{uri} returns codes but declares no vocab_size; pass --vocab-size")
            self.vocab_size = size

    # -- what a family provides -----------------------------------------------
    def _load(self, data: bytes):
        """The callable model from the file's bytes, on self.device in self.torch_dtype;
        TokenizerSpecError with a one-line reason if it cannot be loaded safely."""
        raise NotImplementedError

    def _declared_vocab_size(self) -> int | None:
        return None

    def _probe_shape(self, default: tuple[int, ...]) -> tuple[int, ...]:
        """The channels-last uint8 shape of the blank input the model is probed with."""
        return default

    def _refusal(self, e: Exception, x) -> Exception:
        """The error an item gets when the model raises on its batch (a family may reword it)."""
        return e

    # -- shared ---------------------------------------------------------------
    def call(self, batch: np.ndarray):
        """uint8 channels-last batch (already padded) → [-1, 1] channels-first input → the model's token tensor."""
        import torch

        x = torch.from_numpy(batch).to(self.device).permute(*self.order).to(self.torch_dtype) / 127.5 - 1.0
        with torch.inference_mode():
            try:
                out = self.model(x)
            except Exception as e:
                raise self._refusal(e, x) from None
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor) or out.dim() not in (self.rank - 1, self.rank):
            grid = "h x w" if self.rank == 4 else "t x h x w"
            raise ValueError(f"the model must return indices (B x {grid}), a latent (B x C x {grid}), or a tuple "
                             "starting with one")
        return out

    def identity(self) -> dict[str, Any]:
        return {"family": self.family, "model_sha256": self.sha256, "dtype": self.dtype,
                "pad_multiple": self.pad_multiple, "device_type": self.device.split(":")[0]}

    def metadata(self, spec: str, modality: str, batch_size: int, fingerprint: str) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "spec": spec, "name": self.name, "modality": modality, "kind": self.kind,
            "dtype": self.dtype, "device": self.device, "batch_size": batch_size,
            "geometry": {"pad_multiple": self.pad_multiple, "padding": "edge, bottom/right",
                         "input_range": [-1.0, 1.0]},
            "fingerprint": fingerprint}
        if self.kind == "hard":
            from tokenmill.schemas.tables import token_type_for_vocab

            meta.update(vocab_size=self.vocab_size, token_dtype=str(token_type_for_vocab(self.vocab_size)))
        else:
            meta.update(dim=self.dim, latent_dtype=self.latent_dtype, token_dtype=self.latent_dtype)
        return meta

    def tokens(self, out) -> list[tuple[np.ndarray, tuple[int, ...]]]:
        """Per item: hard indices flattened, or soft latents as (positions, C), with the grid."""
        import torch

        results = []
        for item in out:
            if self.kind == "hard":
                grid = tuple(int(d) for d in item.shape[-(self.rank - 2):])
                results.append((item.reshape(-1).to(torch.int64).cpu().numpy(), grid))
            else:
                c, grid = item.shape[0], tuple(int(d) for d in item.shape[1:])
                vec = item.reshape(c, -1).T.contiguous()
                if vec.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                    vec = vec.to(torch.float32)
                if self.latent_dtype == "bfloat16":
                    vec = vec.view(torch.uint16) if hasattr(torch, "uint16") else vec.view(torch.int16)
                results.append((vec.cpu().numpy(), grid))
        return results

    def encode_bucketed(self, padded: Sequence[np.ndarray], batch_size: int) -> list[Any]:
        """One model call per bucket of up to batch_size inputs of the same padded shape (never padded to a
        neighbour's size); each result is (tokens, grid), or the exception of the call that failed it."""
        size = max(1, min(batch_size, self.max_batch or batch_size))
        results: list[Any] = [None] * len(padded)
        buckets: dict[tuple[int, ...], list[int]] = {}
        for i, item in enumerate(padded):
            buckets.setdefault(item.shape, []).append(i)
        for members in buckets.values():
            for s in range(0, len(members), size):
                chunk = members[s:s + size]
                try:
                    for i, r in zip(chunk, self.tokens(self.call(np.stack([padded[i] for i in chunk])))):
                        results[i] = r
                except Exception as e:  # a failing batch fails its inputs, not the block
                    for i in chunk:
                        results[i] = e
        return results


class _NeuralTokenizer:
    """What the image and video tokenizers share: the loaded model, its metadata, batched encoding."""

    spec: str
    modality: str
    model_class: type[EncoderModel]

    def _load(self, spec: str, uri: str, batch_size: int, probe_shape: tuple[int, ...], order: tuple[int, ...],
              device: str, dtype: str, pad_multiple: int, vocab_size: int | None) -> None:
        if batch_size < 1:
            raise TokenizerSpecError(f"--batch-size must be 1 or more, not {batch_size}")
        if pad_multiple < 1:
            raise TokenizerSpecError(f"--pad-multiple must be 1 or more, not {pad_multiple}")
        self._model = self.model_class(uri, device, dtype, pad_multiple, vocab_size, probe_shape, order)
        self.spec, self.uri, self.batch_size, self.model = spec, uri, batch_size, self._model.model
        for k in ("device", "dtype", "pad_multiple", "name", "kind", "dim", "latent_dtype", "vocab_size"):
            setattr(self, k, getattr(self._model, k))

    def metadata(self) -> dict[str, Any]:
        return self._model.metadata(self.spec, self.modality, self.batch_size, self.fingerprint())

    def encode_padded(self, padded: list[np.ndarray]) -> list[Any]:
        """Already padded items, batched by padded shape: (tokens, grid) or an exception for each.
        The batch call a ModelHandler makes (transforms/neural_inference.py)."""
        return self._model.encode_bucketed(padded, self.batch_size)

    @staticmethod
    def _only(results: list[Any]) -> Any:
        if isinstance(results[0], Exception):
            raise results[0]
        return results[0]


class NeuralImageTokenizer(_NeuralTokenizer, ImageTokenizer):
    """A neural image encoder (see the module docstring): B x 3 x H x W in [-1, 1], edge-padded bottom/right."""

    def __init__(self, spec: str, uri: str, *, device: str = "cpu", dtype: str = "fp32", batch_size: int = 8,
                 pad_multiple: int = 16, vocab_size: int | None = None):
        self._load(spec, uri, batch_size, (1, pad_multiple, pad_multiple, 3), (0, 3, 1, 2), device, dtype,
                   pad_multiple, vocab_size)

    def pad(self, image: np.ndarray) -> np.ndarray:
        m = self.pad_multiple
        H, W = image.shape[:2]
        return np.pad(image, ((0, -H % m), (0, -W % m), (0, 0)), mode="edge")

    def identity(self) -> dict[str, Any]:
        return {**self._model.identity(), "input": "B x 3 x H x W in [-1, 1], edge-padded bottom/right"}

    def encode_images(self, images: Sequence[np.ndarray]) -> list[Any]:
        return self.encode_padded([self.pad(i) for i in images])

    def encode_image(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        return self._only(self.encode_images([image]))

    def decode_image(self, tokens: np.ndarray, grid: tuple[int, int], height: int, width: int) -> np.ndarray:
        raise NotImplementedError(f"decoding needs the model's decoder, which {self.spec.partition(':')[0]}: "
                                  "does not load")


class NeuralVideoTokenizer(_NeuralTokenizer, VideoTokenizer):
    """A neural video encoder, the Cosmos Tokenizer video interface.

    Input B x 3 x T x H x W in [-1, 1]. T is edge-padded (the last frame repeated)
    to 1 + k x `temporal_factor` frames (the causal first frame plus k groups),
    H and W to a multiple of `pad_multiple`; a row's `padding` column records
    what was added. A discrete encoder returns (indices B x t x h x w, codes),
    a continuous one (latent B x C x t x h x w,); a plain module returning one
    tensor is read the same way. Clips of one padded shape share model calls.
    """

    def __init__(self, spec: str, uri: str, *, device: str = "cpu", dtype: str = "fp32", batch_size: int = 8,
                 pad_multiple: int = 16, temporal_factor: int = 8, vocab_size: int | None = None):
        self.temporal_factor = max(1, temporal_factor)
        self._load(spec, uri, batch_size, (1, 1 + self.temporal_factor, pad_multiple, pad_multiple, 3),
                   (0, 4, 1, 2, 3), device, dtype, pad_multiple, vocab_size)

    def padding(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        m = self.pad_multiple
        return (-(frames - 1)) % self.temporal_factor, -height % m, -width % m

    def pad(self, clip: np.ndarray) -> np.ndarray:
        t, h, w = self.padding(*clip.shape[:3])
        return np.pad(clip, ((0, t), (0, h), (0, w), (0, 0)), mode="edge")

    def identity(self) -> dict[str, Any]:
        return {**self._model.identity(), "temporal_factor": self.temporal_factor,
                "input": "B x 3 x T x H x W in [-1, 1], T = 1 + k x temporal_factor; edge-padded at the end "
                         "of the clip and bottom/right"}

    def metadata(self) -> dict[str, Any]:
        meta = super().metadata()
        meta["geometry"].update(temporal_factor=self.temporal_factor,
                                padding="edge: last frame repeated to T = 1 + k x temporal_factor; "
                                        "bottom/right to the pad multiple; per row in the padding column")
        return meta

    def encode_clips(self, clips: Sequence[np.ndarray]) -> list[Any]:
        return self.encode_padded([self.pad(c) for c in clips])

    def encode_clip(self, clip: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        return self._only(self.encode_clips([clip]))


def load_family(image_class: type[NeuralImageTokenizer], video_class: type[NeuralVideoTokenizer], spec: str,
                arg: str, modality: str, *, temporal_factor: int = 8, **options: Any):
    """A family's loader: its video tokenizer for video, else its image tokenizer."""
    if modality == "video":
        return video_class(spec, arg, temporal_factor=temporal_factor, **options)
    return image_class(spec, arg, **options)
