"""`tokenmill fit` (vq codebooks, pca bottlenecks) and building with what it fits."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tokenmill.loaders import TokenReader
from tokenmill.pipelines import fit
from tokenmill.schemas.validate import validate
from tests.conftest import ONE_WORKER, TWO_PROCESSES, run_build
from tokenmill.transforms.decoders.images import SizePolicy, decode_image
from tokenmill.transforms.records import row_id
from tokenmill.transforms.tokenizers.base import TokenizerSpecError
from tokenmill.transforms.tokenizers.codebook import psnr, save_npz
from tokenmill.transforms.tokenizers.spec import load_image_tokenizer


def scene(i: int, size: int = 64) -> np.ndarray:
    """A structured image: a tinted gradient with two discs and a little noise."""
    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:size, 0:size]
    img = np.stack([x * rng.uniform(1, 3), y * rng.uniform(1, 3), np.full_like(x, rng.integers(0, 200))], -1)
    for _ in range(2):
        cx, cy, r = rng.integers(0, size, 3).tolist()
        img[(x - cx) ** 2 + (y - cy) ** 2 < (r // 3 + 4) ** 2] = rng.integers(0, 256, 3)
    img = img + rng.normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scenes")
    for i in range(48):
        Image.fromarray(scene(i)).save(folder / f"s{i:02d}.png")
    return folder


def run_fit(argv, runner=None):
    return fit.run([*argv, *(ONE_WORKER if runner is None else runner)])


def holdout_images(folder, report):
    """The held-out images the report scored, decoded as fit decodes them."""
    by_id = {row_id(str(p), "file"): p for p in folder.glob("*.png")}
    return [decode_image(by_id[s["id"]].read_bytes(), SizePolicy.parse("native:1024"))[0] for s in report["psnr"]]


def test_fitted_codebook_beats_a_random_codebook(tmp_path, scenes):
    out = tmp_path / "cb.npz"
    assert run_fit(["--kind", "vq", "--input", str(scenes / "*.png"), "--output", str(out), "--patch", "8",
                    "--codes", "64", "--holdout", "0.25"]) == 0
    report = json.loads((tmp_path / "cb.npz.json").read_text())
    assert report["holdout_images"] >= 6 and report["train_patches"] == 64 * report["train_images"]
    images = holdout_images(scenes, report)
    fitted = load_image_tokenizer(f"vq:{out}")
    assert report["fingerprint"] == fitted.fingerprint()
    random_file = tmp_path / "random.npz"
    random_file.write_bytes(save_npz({"kind": np.array("vq"), "patch": np.array(8), "codes":
                                      np.random.default_rng(0).uniform(-1, 1, (64, 192)).astype(np.float32)}))
    rand = load_image_tokenizer(f"vq:{random_file}")

    def score(tok):
        return np.mean([psnr(tok.decode_image(*tok.encode_image(im), *im.shape[:2]), im) for im in images])

    assert abs(score(fitted) - report["psnr_mean"]) < 1e-6
    assert score(fitted) > score(rand) + 6  # dB


def test_pca_reconstructs_better_as_d_grows(tmp_path, scenes):
    scores = []
    for d in (2, 8, 32):
        out = tmp_path / f"pca{d}.npz"
        assert run_fit(["--kind", "pca", "--input", str(scenes / "*.png"), "--output", str(out), "--patch", "8",
                        "--dim", str(d), "--holdout", "0.25"]) == 0
        scores.append(json.loads((tmp_path / f"pca{d}.npz.json").read_text())["psnr_mean"])
    assert scores[0] < scores[1] < scores[2]
    assert scores[2] > 26  # dB: 32 of 192 dimensions keep these scenes well (about 30 dB measured)


@pytest.fixture(scope="module")
def fitted(scenes, tmp_path_factory):
    """(vq, pca) codebook files fitted on the scenes with 8x8 patches: 32 codes, 24 dimensions."""
    folder = tmp_path_factory.mktemp("fitted")
    vq, pca = folder / "vq.npz", folder / "pca.npz"
    assert run_fit(["--kind", "vq", "--input", str(scenes / "*.png"), "--output", str(vq), "--patch", "8",
                    "--codes", "32"]) == 0
    assert run_fit(["--kind", "pca", "--input", str(scenes / "*.png"), "--output", str(pca), "--patch", "8",
                    "--dim", "24"]) == 0
    return vq, pca


def test_build_with_fitted_tokenizers_and_decode_back(tmp_path, scenes, fitted):
    vq, pca = fitted
    for spec in (f"vq:{vq}", f"pca:{pca}"):
        out = tmp_path / spec.split(":")[0]
        assert run_build(["--input", str(scenes / "*.png"), "--output", str(out), "--tokenizer", spec]) == 0
        assert validate(str(out)) == []
        tok = load_image_tokenizer(spec)
        gains = []
        for sample in list(TokenReader(str(out), shuffle=False))[:8]:
            assert sample["grid"] == (8, 8)
            payload = sample["tokens"] if "tokens" in sample else sample["latents"]
            if "tokens" in sample:
                assert payload.max() < 32
            else:
                assert payload.shape == (64, 24)
            name = next(p for p in scenes.glob("*.png") if sample["id"] == row_id(str(p), "file"))
            original = decode_image(name.read_bytes())[0]
            flat = np.full_like(original, original.reshape(-1, 3).mean(0).astype(np.uint8))
            gains.append(psnr(tok.decode_image(payload, sample["grid"], 64, 64), original) - psnr(flat, original))
        # Decoding beats painting each image in its mean colour, on average (pca by far).
        assert np.mean(gains) > (2 if spec.startswith("vq") else 8)


def test_fit_gives_the_same_file_with_one_and_two_workers(tmp_path, scenes):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    args = ["--kind", "vq", "--input", str(scenes / "*.png"), "--patch", "8", "--codes", "16"]
    assert run_fit([*args, "--output", str(a)]) == 0
    assert run_fit([*args, "--output", str(b)], runner=TWO_PROCESSES) == 0
    assert load_image_tokenizer(f"vq:{a}").fingerprint() == load_image_tokenizer(f"vq:{b}").fingerprint()


def test_tokenizer_files_are_never_unpickled(tmp_path):
    evil = tmp_path / "evil.npz"
    np.savez(evil, kind=np.array("vq"), patch=np.array(8), codes=np.array([object()], dtype=object))
    with pytest.raises(TokenizerSpecError, match="cannot read vq file"):
        load_image_tokenizer(f"vq:{evil}")
    wrong = tmp_path / "pca.npz"
    wrong.write_bytes(save_npz({"kind": np.array("pca"), "patch": np.array(8), "mean": np.zeros(192),
                                "components": np.zeros((4, 192))}))
    with pytest.raises(TokenizerSpecError, match="is not a vq file"):
        load_image_tokenizer(f"vq:{wrong}")


def test_items_encoded_on_threads_give_the_same_codes_and_shards(tmp_path, scenes, fitted):
    """vq:/pca: encode a block's images on a thread pool (one BLAS thread each) when a worker has spare cores."""
    from concurrent.futures import ThreadPoolExecutor

    from tokenmill.schemas.manifest import read_manifest

    vq, pca = fitted
    images = [decode_image((scenes / f"s{i:02d}.png").read_bytes(), SizePolicy())[0] for i in range(12)]
    for spec in (f"vq:{vq}", f"pca:{pca}"):
        tok = load_image_tokenizer(spec)
        assert tok.parallel_items
        alone = tok.encode_batch(images)
        with ThreadPoolExecutor(3) as pool:
            tok.item_pool = pool
            threaded = tok.encode_batch(images)
        tok.item_pool = None
        assert alone[0].equals(threaded[0]) and alone[1] == threaded[1]

        digests = []  # one in-memory worker uses the cores on threads; two processes encode one item at a time
        for name, runner in (("one", ONE_WORKER), ("two", TWO_PROCESSES)):
            out = tmp_path / f"{spec[:3]}-{name}"
            assert run_build(["--input", str(scenes / "*.png"), "--output", str(out), "--tokenizer", spec],
                             runner) == 0
            digests.append(sorted((s["path"].rsplit("/", 1)[-1], s["sha256"]) for s in read_manifest(str(out)).shards))
        assert digests[0] == digests[1]


def test_fit_reports_what_it_skipped_and_shows_progress(tmp_path, scenes, capsys):
    """A fit says how many inputs it could not use and why (in its output and report), and shows progress."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(6):
        (folder / f"s{i}.png").write_bytes((scenes / f"s{i:02d}.png").read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "empty.png").write_bytes(b"")
    out = tmp_path / "vq.npz"
    assert run_fit(["--kind", "vq", "--input", str(folder / "*.png"), "--output", str(out), "--patch", "8",
                    "--codes", "8", "--holdout", "0", "--progress", "log", "--progress-every", "0.2"]) == 0
    report = json.loads((tmp_path / "vq.npz.json").read_text())
    assert report["train_images"] == 6 and report["skipped"] == 2
    assert sum(report["skipped_by_reason"].values()) == 2
    assert sorted(e["source"].rsplit("/", 1)[-1] for e in report["skipped_examples"]) == ["broken.png", "empty.png"]
    captured = capsys.readouterr()
    assert "  skipped:     2 inputs (" in captured.out, captured.out
    progress = [ln for ln in captured.err.splitlines() if ln.startswith("tokenmill fit: progress: ")]
    assert progress and "inputs 8/8" in progress[-1] and "errors 2" in progress[-1], captured.err


def test_fit_help_gives_every_option_a_default_or_says_it_is_required():
    import re

    help_text = " ".join(fit.make_parser().format_help().split())
    options = {a.option_strings[-1]: a for a in fit.make_parser()._actions if a.option_strings}
    for flag, action in options.items():
        if flag == "--help":
            continue
        assert action.help, f"{flag} has no help"
        documented = action.required or "(default:" in action.help
        assert documented, f"{flag}: {action.help!r} does not give its default"
    assert re.search(r"--max-samples MAX_SAMPLES patches used for the fit at most, a seeded subset \(default: 200000\)",
                     help_text)


@pytest.mark.parametrize("runner", ["one", "two"])
def test_a_fit_that_cannot_fit_fails_in_one_line_naming_why(tmp_path, scenes, runner, capsys):
    """On worker processes the runner wraps the worker's error in a RuntimeError whose text is a traceback;
    the one line names the worker's error (it read "RuntimeError: Traceback (most recent call last):")."""
    (tmp_path / "s0.png").write_bytes((scenes / "s00.png").read_bytes())
    assert run_fit(["--kind", "vq", "--input", str(tmp_path / "s0.png"), "--output", str(tmp_path / "v.npz"),
                    "--patch", "4", "--codes", "1024", "--holdout", "0", "--progress", "none"],
                   ONE_WORKER if runner == "one" else TWO_PROCESSES) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "tokenmill fit: failed: ValueError: 64 sampled patches cannot fit 1024 codes; add images or "
        "--samples-per-image")


def test_an_output_fit_cannot_write_or_a_dim_above_the_patch_is_misuse_before_any_work(tmp_path, scenes, capsys):
    """They failed after the whole fit had run (IsADirectoryError, FileExistsError, 'more than the values')."""
    (tmp_path / "afile").write_text("x")
    base = ["--input", str(scenes / "s00.png"), "--patch", "4", "--progress", "none"]
    for argv, message in (
            (["--kind", "vq", "--output", str(tmp_path)], f"--output {tmp_path} is a folder"),
            (["--kind", "vq", "--output", str(tmp_path / "afile" / "x.npz")], f"{tmp_path / 'afile'} is a file"),
            (["--kind", "pca", "--output", str(tmp_path / "p.npz"), "--dim", "49"],
             "--dim 49 is more than the 48 values of a 4x4 patch")):
        with pytest.raises(SystemExit) as e:
            run_fit(base + argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and message in err[0], err
