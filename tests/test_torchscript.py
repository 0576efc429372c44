"""torchscript: image encoders with the Cosmos Tokenizer interface, built and saved by the test."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokenmill.loaders import TokenReader
from tokenmill.schemas.manifest import read_manifest
from tokenmill.schemas.validate import validate
from tests.conftest import read_rows, run_build, run_cli
from tokenmill.transforms.decoders.images import decode_image
from tokenmill.transforms.records import row_id


class ContinuousEncoder(torch.nn.Module):
    """Like Cosmos CI: B x 3 x H x W in [-1, 1] → (latent,) with 16 channels at 1/8 resolution."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 16, kernel_size=8, stride=8)

    def forward(self, x: torch.Tensor):
        return (torch.tanh(self.conv(x)),)


class DiscreteEncoder(torch.nn.Module):
    """Like Cosmos DI: → (indices, codes), FSQ with levels (5, 5, 5, 5) = 625 codes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = torch.nn.Conv2d(3, 4, kernel_size=8, stride=8)
        self.vocab_size = 625

    def forward(self, x: torch.Tensor):
        codes = torch.round(torch.tanh(self.conv(x)) * 2)  # each channel in -2..2
        levels = (codes + 2).to(torch.int64)
        indices = levels[:, 0] + 5 * levels[:, 1] + 25 * levels[:, 2] + 125 * levels[:, 3]
        return indices, codes


def save(module: torch.nn.Module, path: Path) -> Path:
    torch.jit.script(module).save(str(path))
    return path


def scene(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // w, y * 255 // h, np.full_like(x, rng.integers(0, 255))], -1).astype(np.uint8)


def direct(module: torch.nn.Module, image: np.ndarray, multiple: int = 16):
    """What the model gives when called by hand on the same padded input."""
    H, W = image.shape[:2]
    padded = np.pad(image, ((0, -H % multiple), (0, -W % multiple), (0, 0)), mode="edge")
    x = torch.from_numpy(padded).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.inference_mode():
        return module(x)


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, (h, w) in enumerate([(64, 64), (50, 70), (33, 17), (64, 64)]):
        Image.fromarray(scene(h, w, i)).save(folder / f"i{i}.png")
    return folder


def test_continuous_encoder_through_the_pipeline_equals_a_direct_call(tmp_path, images):
    model = save(ContinuousEncoder(), tmp_path / "encoder.jit")
    out = tmp_path / "ds"
    assert run_build(["--input", str(images / "*.png"), "--output", str(out), "--tokenizer",
                      f"torchscript:{model}", "--batch-size", "2"]) == 0
    assert validate(str(out)) == []
    m = read_manifest(str(out))
    assert m.tokenizer["kind"] == "soft" and m.tokenizer["dim"] == 16
    assert m.tokenizer["geometry"]["pad_multiple"] == 16
    module = torch.jit.load(str(model))
    for sample in TokenReader(str(out), shuffle=False):
        path = next(p for p in images.glob("*.png") if row_id(str(p), "file") == sample["id"])
        image = decode_image(path.read_bytes())[0]
        (latent,) = direct(module, image)
        want = latent[0].reshape(16, -1).T.numpy()
        assert sample["grid"] == tuple(latent.shape[-2:])
        assert np.allclose(sample["latents"], want, atol=1e-6)
    rows = {Path(r["source"]).name: r for r in read_rows(out).to_pylist()}
    assert (rows["i2.png"]["height"], rows["i2.png"]["width"], rows["i2.png"]["grid"]) == (33, 17, [6, 4])


def test_discrete_encoder_gives_hard_codes_with_the_declared_vocabulary(tmp_path, images):
    model = save(DiscreteEncoder(), tmp_path / "di.jit")
    out = tmp_path / "ds"
    assert run_build(["--input", str(images / "*.png"), "--output", str(out), "--tokenizer",
                      f"torchscript:{model}"]) == 0
    assert validate(str(out)) == []
    m = read_manifest(str(out))
    assert m.tokenizer["kind"] == "hard" and m.tokenizer["vocab_size"] == 625 and m.token_dtype == "uint16"
    module = torch.jit.load(str(model))
    for r in read_rows(out).to_pylist():
        image = decode_image(Path(r["source"]).read_bytes())[0]
        indices, _ = direct(module, image)
        assert r["tokens"] == indices[0].reshape(-1).tolist()


def test_bf16_and_misuse(tmp_path, images):
    model = save(ContinuousEncoder(), tmp_path / "encoder.jit")
    out = tmp_path / "bf16"
    assert run_build(["--input", str(images / "*.png"), "--output", str(out), "--tokenizer",
                      f"torchscript:{model}", "--dtype", "bf16"]) == 0
    m = read_manifest(str(out))
    assert m.tokenizer["latent_dtype"] == "bfloat16" and m.tokenizer["dtype"] == "bf16"
    sample = next(iter(TokenReader(str(out), shuffle=False)))
    assert sample["latents"].dtype == np.uint16  # raw bfloat16 bits; torch views them as bfloat16
    (tmp_path / "junk.jit").write_bytes(b"not a model")
    proc = run_cli("tokenmill.pipelines.build", "--input", str(images / "*.png"), "--output", str(tmp_path / "o"),
                   "--tokenizer", f"torchscript:{tmp_path / 'junk.jit'}")
    assert proc.returncode == 2 and "cannot load TorchScript model" in proc.stderr
