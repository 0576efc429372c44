"""`diffusers:PATH_OR_URI`: a diffusers autoencoder folder as an image or video tokenizer (extra: tokenmill[diffusers]).

The folder is what `save_pretrained` writes (and what a pipeline's `vae/` or
`vqvae/` subfolder holds): `config.json`, whose `_class_name` picks the class,
and `diffusion_pytorch_model.safetensors` (or its shards and their
`.safetensors.index.json`). Weights load from safetensors only; a folder with
only pickle weights (`.bin`) is refused. On object storage the folder's config
and safetensors are copied to a temporary folder to load, then removed.

  - `AutoencoderKL` (Stable Diffusion, SDXL, SD3, FLUX VAEs) → soft tokens: the
    latent distribution's mean (default) or, with `--latent sample`, a seeded
    sample; one C-value vector per latent position, grid (H/f, W/f),
    f = 2 ** (len(block_out_channels) - 1).
  - `VQModel` → hard tokens: the quantizer's code indices on the (H/f, W/f)
    grid; vocab_size = config.num_vq_embeddings.
  - `AutoencoderKLWan` (video) → soft spacetime latents on a (t, h, w) grid,
    t = 1 + (T - 1) / 4, f = 2 ** (len(dim_mult) - 1) x patch_size.

Stored latents are **raw**: what the encoder gives, before any scaling. The
dataset records the config's `scaling_factor`, `shift_factor`, `latents_mean`
and `latents_std` (None where the config has none), and training code applies
them as its pipeline does: (z - shift_factor) * scaling_factor for SD/FLUX,
(z - latents_mean) / latents_std per channel for Wan. Raw latents keep the
dataset valid for any such convention and decode without undoing one.

Input: RGB uint8 → [-1, 1] (x / 127.5 - 1, in float32, then the model dtype),
edge-padded at the bottom and right to a multiple of f (and a clip's last frame
repeated to 1 + 4k frames). A row's height and width are before padding, and
video rows record the padding per row. Inputs are batched by padded shape, up
to --batch-size per model call, never padded to the largest of a batch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import threading
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from tokenmill.schemas.storage import join, read_bytes, with_retries
from tokenmill.transforms.tokenizers.base import ImageTokenizer, TokenizerSpecError, VideoTokenizer
from tokenmill.transforms.tokenizers.neural import EncoderModel, neural_options, torch_environment

DTYPES = ("fp32", "bf16", "fp16")
LATENT_MODES = ("mean", "sample")
WEIGHTS = "diffusion_pytorch_model.safetensors"
PICKLE_WEIGHTS = ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json")
# The latent normalisation constants a config may carry, recorded as they are (None where absent).
FACTORS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std")


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What tokenmill needs to know of one diffusers autoencoder class."""

    modality: str  # "image" (B x 3 x H x W) or "video" (B x 3 x T x H x W)
    kind: str  # "soft" (a latent distribution) or "hard" (VQ codes)
    spatial: Callable[[dict[str, Any]], int]  # the spatial factor f, from the config
    temporal: int = 1  # frames per latent frame after the first (video)


def _down_blocks(config: dict[str, Any]) -> int:
    return 2 ** (len(config["block_out_channels"]) - 1)


ARCHITECTURES = {
    "AutoencoderKL": Architecture("image", "soft", _down_blocks),
    "VQModel": Architecture("image", "hard", _down_blocks),
    # Wan encodes the first frame, then chunks of 4 frames (AutoencoderKLWan._encode); patch_size (Wan 2.2)
    # folds p x p pixels into channels first.
    "AutoencoderKLWan": Architecture("video", "soft",
                                     lambda c: 2 ** (len(c["dim_mult"]) - 1) * int(c.get("patch_size") or 1),
                                     temporal=4),
}


# -- the folder ----------------------------------------------------------------

def _listing(uri: str) -> dict[str, int]:
    """{file name: size} of the folder's files; a one-line TokenizerSpecError if it is not a folder."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    try:
        entries = with_retries(lambda: fs.ls(path, detail=True), f"listing {uri}")
    except (FileNotFoundError, NotADirectoryError):
        entries = []
    except OSError as e:
        raise TokenizerSpecError(f"diffusers:{uri}: cannot list the folder: {e}") from None
    if len(entries) == 1 and entries[0]["type"] == "file" and entries[0]["name"].rstrip("/") == path.rstrip("/"):
        raise TokenizerSpecError(f"diffusers:{uri}: is a file; give the folder that holds config.json and the "
                                 "safetensors weights")
    files = {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0) for e in entries if e["type"] == "file"}
    if not files:
        raise TokenizerSpecError(f"diffusers:{uri}: no such model folder (config.json + safetensors)")
    return files


def _weight_files(uri: str, files: dict[str, int]) -> list[str]:
    """The safetensors files from_pretrained reads (one file, or the shards its index names); refuses pickle."""
    if WEIGHTS in files:
        return [WEIGHTS]
    index = WEIGHTS + ".index.json"
    if index in files:
        try:
            shards = sorted(set(json.loads(read_bytes(join(uri, index)))["weight_map"].values()))
        except Exception as e:
            raise TokenizerSpecError(f"diffusers:{uri}: unreadable {index}: {e}") from None
        missing = [s for s in shards if s not in files or "/" in s]
        if missing:
            raise TokenizerSpecError(f"diffusers:{uri}: {index} names missing shards: {', '.join(missing)}")
        return [index, *shards]
    if any(p in files for p in PICKLE_WEIGHTS):
        raise TokenizerSpecError(f"diffusers:{uri}: only pickle weights (diffusion_pytorch_model.bin); tokenmill "
                                 f"loads safetensors only: convert them where you trust them "
                                 f"(save_pretrained(..., safe_serialization=True))")
    raise TokenizerSpecError(f"diffusers:{uri}: no {WEIGHTS} in the folder")


def _read_config(uri: str, files: dict[str, int]) -> dict[str, Any]:
    if "config.json" not in files:
        hint = (": a pipeline folder; point at its vae/ (or vqvae/) subfolder" if "model_index.json" in files
                else ": not a diffusers model folder")
        raise TokenizerSpecError(f"diffusers:{uri}: no config.json{hint}")
    data = read_bytes(join(uri, "config.json"))
    try:
        config = json.loads(data)
        assert isinstance(config, dict)
    except Exception:
        raise TokenizerSpecError(f"diffusers:{uri}: config.json is not a JSON object") from None
    return config


def _sha256_file(uri: str, copy_to: str | None = None) -> str:
    """sha256 of a file, streamed; with `copy_to`, written there on the way (object storage)."""
    import fsspec

    def read() -> str:
        h = hashlib.sha256()
        with fsspec.open(uri, "rb") as src, (open(copy_to, "wb") if copy_to else contextlib.nullcontext()) as dst:
            while chunk := src.read(8 << 20):
                h.update(chunk)
                if dst is not None:
                    dst.write(chunk)
        return h.hexdigest()

    return with_retries(read, f"reading {uri}")


@contextlib.contextmanager
def _local_copy(uri: str, names: list[str]) -> Iterator[tuple[str, dict[str, str]]]:
    """(a local folder holding the files, {name: sha256}): the folder itself, or a temporary copy of those files."""
    from tokenmill.transforms.fs import canonical, is_local

    if is_local(uri):
        folder = canonical(uri)
        yield folder, {n: _sha256_file(os.path.join(folder, n)) for n in names}
        return
    tmp = tempfile.mkdtemp(prefix="tokenmill-diffusers-")
    try:
        yield tmp, {n: _sha256_file(join(uri, n), os.path.join(tmp, n)) for n in names}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- the model -------------------------------------------------------------------

class _Autoencoder(EncoderModel):
    """A diffusers autoencoder, its dtype, device and geometry.

    Reuses the neural families' `EncoderModel.tokens` and `encode_bucketed`
    (transforms/tokenizers/neural.py: per-item tokens, bucketing by padded
    shape); `call` is the one place the model encodes a batch, as a Beam
    ModelHandler would call it (transforms/neural_inference.py).
    """

    max_batch = None  # any batch size (EncoderModel's loader sets this for fixed-batch programs)

    def __init__(self, uri: str, modality: str, device: str, dtype: str, latent: str, seed: int):
        torch_environment()
        import torch

        if dtype not in DTYPES:
            raise TokenizerSpecError(f"--dtype must be one of {', '.join(DTYPES)}")
        if latent not in LATENT_MODES:
            raise TokenizerSpecError(f"--latent must be one of {', '.join(LATENT_MODES)}")
        files = _listing(uri)
        config = _read_config(uri, files)
        cls_name = str(config.get("_class_name") or "")
        arch = ARCHITECTURES.get(cls_name)
        if not cls_name:
            raise TokenizerSpecError(f"diffusers:{uri}: config.json names no _class_name: not a diffusers model")
        if arch is None:
            raise TokenizerSpecError(f"diffusers:{uri}: {cls_name} is not supported (supported: "
                                     f"{', '.join(ARCHITECTURES)})")
        if arch.modality != modality:
            raise TokenizerSpecError(f"diffusers:{uri}: {cls_name} is a{'n' if arch.modality == 'image' else ''} "
                                     f"{arch.modality} autoencoder, not for {modality} inputs")
        if int(config.get("in_channels", 3)) != 3:
            raise TokenizerSpecError(f"diffusers:{uri}: {cls_name} takes {config['in_channels']} input channels, "
                                     "not RGB")
        weights = _weight_files(uri, files)
        self.arch, self.config, self.class_name = arch, config, cls_name
        try:
            self.pad_multiple, self.temporal_factor = int(arch.spatial(config)), arch.temporal
            self.vocab_size = int(config["num_vq_embeddings"]) if arch.kind == "hard" else None
        except (KeyError, TypeError, ValueError) as e:
            raise TokenizerSpecError(f"diffusers:{uri}: config.json lacks a valid {e} for {cls_name}") from None
        self.latent, self.seed = latent, int(seed) if latent == "sample" else None
        self.device, self.dtype, self.rank = device, dtype, 4 if modality == "image" else 5
        self.order = (0, 3, 1, 2) if modality == "image" else (0, 4, 1, 2, 3)
        self.torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        self.name = uri.rstrip("/").rsplit("/", 1)[-1]
        import diffusers

        self.library_version = diffusers.__version__
        with _local_copy(uri, ["config.json", *weights]) as (folder, hashes):
            self.files_sha256 = hashes  # what the model was built from: the fingerprint
            try:
                model_cls = getattr(diffusers, cls_name)
                self.model = model_cls.from_pretrained(folder, use_safetensors=True, local_files_only=True,
                                                       low_cpu_mem_usage=False, torch_dtype=self.torch_dtype)
            except Exception as e:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise TokenizerSpecError(f"diffusers:{uri}: {cls_name} cannot load: {first[:300]}") from None
        try:
            self.model = self.model.to(device).eval()
        except (RuntimeError, AssertionError, ValueError) as e:
            raise TokenizerSpecError(f"--device {device}: {(str(e).strip().splitlines() or [''])[0]}") from None
        self._lock = threading.Lock()  # Wan keeps its frame cache on the module: one call at a time
        self.kind = arch.kind
        self.dim, self.latent_dtype = 0, None
        m = self.pad_multiple
        probe = np.zeros((1, m, m, 3) if modality == "image" else (1, 1 + self.temporal_factor, m, m, 3), np.uint8)
        try:
            out = self.call(probe)
        except Exception as e:
            raise TokenizerSpecError(f"diffusers:{uri}: {cls_name} failed on a blank "
                                     f"{'x'.join(map(str, probe.shape[1:-1]))} input: "
                                     f"{(str(e).strip().splitlines() or [''])[-1]}") from None
        want = (1, 1) if modality == "image" else (2, 1, 1)
        if tuple(out.shape[-len(want):]) != want:
            raise TokenizerSpecError(f"diffusers:{uri}: {cls_name} maps a {'x'.join(map(str, probe.shape[1:-1]))} "
                                     f"input to a {'x'.join(map(str, out.shape[-len(want):]))} grid, not "
                                     f"{'x'.join(map(str, want))}: its compression is not what its config says")
        if self.kind == "soft":
            self.dim = int(out.shape[1])
            self.latent_dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]

    def row_seed(self, item: np.ndarray) -> int:
        """The sampling seed of one input: from --seed and the padded input's bytes, so a row's sample depends
        on nothing else (not its batch, block or worker)."""
        h = hashlib.sha256(f"{self.seed}:{item.shape}".encode())
        h.update(np.ascontiguousarray(item).data)
        return int.from_bytes(h.digest()[:8], "little") & ((1 << 63) - 1)

    def noise(self, item: np.ndarray, shape: Sequence[int]):
        """The standard normal draw of one row's sample: torch.randn on the CPU from row_seed (any device)."""
        import torch

        return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(self.row_seed(item)))

    def call(self, batch: np.ndarray):
        """uint8 channels-last batch (already padded) → [-1, 1] channels-first → codes (B x grid, int64) or
        latents (B x C x grid)."""
        import torch

        x = torch.from_numpy(batch).to(self.device).permute(*self.order).float() / 127.5 - 1.0
        x = x.to(self.torch_dtype)
        with self._lock, torch.inference_mode():
            if self.arch.kind == "hard":
                h = self.model.encode(x).latents
                codes = self.model.quantize(h)[2][2]  # (B * h * w,) in (b, h, w) order
                return codes.reshape(h.shape[0], *h.shape[2:]).to(torch.int64)
            dist = self.model.encode(x).latent_dist
            if self.latent == "mean":
                return dist.mean
            eps = torch.stack([self.noise(item, dist.mean.shape[1:]) for item in batch])
            return dist.mean + dist.std * eps.to(dist.mean.device, dist.mean.dtype)

    def tokens(self, out) -> list[Any]:
        """Per item: tokens and grid, or a ValueError for latents that are not finite (fp16 overflow)."""
        import torch

        results = super().tokens(out)
        if self.kind == "soft":
            finite = torch.isfinite(out.reshape(out.shape[0], -1)).all(1).tolist()
            results = [r if ok else ValueError(f"the {self.dtype} latents are not finite (NaN or infinite); "
                                               "the model overflows in this dtype: try bf16 or fp32")
                       for r, ok in zip(results, finite)]
        return results

    def decode(self, tokens: np.ndarray, grid: tuple[int, ...]) -> np.ndarray:
        """Stored tokens → the decoder's RGB uint8 output, channels last, at the padded size."""
        import torch

        with self._lock, torch.inference_mode():
            if self.kind == "hard":
                codes = torch.from_numpy(np.asarray(tokens, np.int64)).to(self.device)
                q = self.model.quantize
                z = q.get_codebook_entry(codes, (1, *grid, q.embedding.weight.shape[1])).to(self.torch_dtype)
                pixels = self.model.decode(z, force_not_quantize=True).sample
            else:
                values = np.array(tokens)  # a copy: torch wants a writable array
                z = torch.from_numpy(values.view(np.int16) if self.latent_dtype == "bfloat16" else values)
                if self.latent_dtype == "bfloat16":
                    z = z.view(torch.bfloat16)
                z = z.reshape(*grid, -1).permute(len(grid), *range(len(grid)))[None]
                pixels = self.model.decode(z.to(self.device, self.torch_dtype)).sample
        x = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
        return x.permute(*range(1, x.dim()), 0).numpy()  # (..., H, W, 3)

    def identity(self) -> dict[str, Any]:
        return {"family": "diffusers", "class": self.class_name, "files_sha256": self.files_sha256,
                "dtype": self.dtype, "latent": self.latent,
                "seed": self.seed, "pad_multiple": self.pad_multiple, "temporal_factor": self.temporal_factor,
                "device_type": self.device.split(":")[0]}

    def metadata(self, spec: str, modality: str, batch_size: int, fingerprint: str) -> dict[str, Any]:
        meta = super().metadata(spec, modality, batch_size, fingerprint)
        meta.update({"class": self.class_name, "diffusers_version": self.library_version})
        meta["geometry"].update(padding="edge, bottom/right", normalize="x / 127.5 - 1 (float32, then dtype)")
        if modality == "video":
            meta["geometry"].update(temporal_factor=self.temporal_factor,
                                    padding="edge: last frame repeated to T = 1 + k x temporal_factor; "
                                            "bottom/right to the pad multiple; per row in the padding column")
        if self.kind == "soft":
            meta.update(latent=self.latent, seed=self.seed,
                        latents="raw encoder output: apply the recorded factors as the model's pipeline does",
                        **{k: self.config.get(k) for k in FACTORS})
        return meta


# -- the tokenizers ----------------------------------------------------------------

class _DiffusersTokenizer:
    """What the image and video tokenizers share: the loaded autoencoder, its metadata, batched encoding."""

    spec: str
    modality: str
    fingerprint: Callable[[], str]

    def _load(self, spec: str, uri: str, *, device: str, dtype: str, batch_size: int, latent: str,
              seed: int) -> None:
        self._model = _Autoencoder(uri.rstrip("/"), self.modality, device, dtype, latent, seed)
        self.spec, self.uri, self.batch_size, self.model = spec, uri, max(1, batch_size), self._model.model
        for k in ("device", "dtype", "pad_multiple", "temporal_factor", "name", "kind", "dim", "latent_dtype",
                  "vocab_size"):
            setattr(self, k, getattr(self._model, k))

    def identity(self) -> dict[str, Any]:
        return self._model.identity()

    def metadata(self) -> dict[str, Any]:
        return self._model.metadata(self.spec, self.modality, self.batch_size, self.fingerprint())

    @staticmethod
    def _only(results: list[Any]) -> Any:
        if isinstance(results[0], Exception):
            raise results[0]
        return results[0]


class DiffusersImageTokenizer(_DiffusersTokenizer, ImageTokenizer):
    """Images through an AutoencoderKL (soft latents) or a VQModel (hard codes)."""

    def __init__(self, spec: str, uri: str, **options: Any):
        self._load(spec, uri, **options)

    def _pad(self, image: np.ndarray) -> np.ndarray:
        m = self.pad_multiple
        H, W = image.shape[:2]
        return np.pad(image, ((0, -H % m), (0, -W % m), (0, 0)), mode="edge")

    def encode_images(self, images: Sequence[np.ndarray]) -> list[Any]:
        return self._model.encode_bucketed([self._pad(i) for i in images], self.batch_size)

    def encode_image(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        return self._only(self.encode_images([image]))

    def decode_image(self, tokens: np.ndarray, grid: tuple[int, int], height: int, width: int) -> np.ndarray:
        return self._model.decode(tokens, grid)[:height, :width]


class DiffusersVideoTokenizer(_DiffusersTokenizer, VideoTokenizer):
    """Clips through a video autoencoder (AutoencoderKLWan): soft latents on a (t, h, w) grid.

    T is edge-padded (the last frame repeated) to 1 + k x temporal_factor frames,
    H and W to the spatial factor; a row's `padding` column records what was added.
    """

    def __init__(self, spec: str, uri: str, **options: Any):
        self._load(spec, uri, **options)

    def padding(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        m = self.pad_multiple
        return (-(frames - 1)) % self.temporal_factor, -height % m, -width % m

    def _pad(self, clip: np.ndarray) -> np.ndarray:
        t, h, w = self.padding(*clip.shape[:3])
        return np.pad(clip, ((0, t), (0, h), (0, w), (0, 0)), mode="edge")

    def encode_clips(self, clips: Sequence[np.ndarray]) -> list[Any]:
        return self._model.encode_bucketed([self._pad(c) for c in clips], self.batch_size)

    def encode_clip(self, clip: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        return self._only(self.encode_clips([clip]))

    def decode_clip(self, tokens: np.ndarray, grid: tuple[int, int, int], frames: int, height: int,
                    width: int) -> np.ndarray:
        return self._model.decode(tokens, grid)[:frames, :height, :width]


def load(spec: str, arg: str, modality: str, *, device: str = "cpu", dtype: str = "fp32", batch_size: int = 8,
         latent: str = "mean", seed: int = 0):
    cls = DiffusersVideoTokenizer if modality == "video" else DiffusersImageTokenizer
    return cls(spec, arg, device=device, dtype=dtype, batch_size=batch_size, latent=latent, seed=seed)


def _options():
    """device and batch_size as every neural family takes them; dtype with fp16; the latent and its seed."""
    from tokenmill.transforms.registry import Option

    shared = {o.name: o for o in neural_options()}
    return (shared["device"],
            Option("dtype", "model dtype: fp32, bf16 or fp16 (default: fp32)", default="fp32", choices=DTYPES),
            shared["batch_size"],
            Option("latent", "soft latents of a KL autoencoder: the distribution's mean, or a sample seeded per "
                             "input (default: mean)", default="mean", choices=LATENT_MODES),
            Option("seed", "seed of --latent sample; each input's draw also depends on its pixels (default: 0)",
                   type=int, default=0))


def _family():
    from tokenmill.transforms.registry import TokenizerFamily

    return TokenizerFamily("diffusers", ("image", "video"), ("diffusers:PATH_OR_URI",), loader=f"{__name__}:load",
                           options=_options(), extra="diffusers", requires=("diffusers", "safetensors", "torch"))


FAMILY = _family()
