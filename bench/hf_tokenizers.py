"""hf: tokenizers beside the same library's own batch encode: a SentencePiece model and a byte-level BPE.

    ./run_local.sh bench hf_tokenizers [--corpus-mb 20] [--repeat 3]

Inputs, generated under bench/data/hf-tokenizers/ and reused: about 20 MB of
multilingual text (JSON lines; seeded sentences over a Zipf-distributed word
list in Latin, Cyrillic, Greek, Arabic, Devanagari and CJK scripts, with digits,
punctuation and emoji) and two tokenizers trained on a 2 MB sample of it:
  sentencepiece   a SentencePiece BPE model (8,000 pieces, byte fallback) in a
                  Llama 2-style folder: tokenizer.model + tokenizer_config.json
                  naming LlamaTokenizer, which hf: has transformers convert.
  byte-level      a byte-level BPE tokenizer.json (8,000 tokens, the tokenizers
                  trainer), which hf: reads with tokenizers alone.

Timed, each as a whole process (interpreter start, imports, loading the
tokenizer, reading the corpus, encoding; tokenmill also writes its dataset), in
rounds (each side once per round, best of --repeat), with peak RSS, CPU seconds
(user + system of the process tree) and the 1-minute load average at the start:
  raw batch       one process reading the JSON lines and calling the library's
                  batch encode on 1,000 documents at a time: transformers'
                  AutoTokenizer(batch, add_special_tokens=False) for the
                  SentencePiece folder, tokenizers' Tokenizer.encode_batch for
                  the tokenizer.json. With the library's own threads (rayon: one
                  per core), and pinned to one (RAYON_NUM_THREADS=1); and in 2
                  processes (a fork pool, each process loading the tokenizer and
                  encoding half of the shards, library threads left as they are).
  tokenmill       tokenmill build --tokenizer hf:FOLDER with 1 worker (one
                  process, one document at a time) and 2 workers.
Token counts must agree between the two sides.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.text_build import REPO, TOKENMILL, bench_result, best_of_rounds, measure
from bench.corpus import load_texts

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
ONE_THREAD = {"RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
VOCAB = 8000


def _alphabets() -> list[str]:
    def span(a: int, b: int) -> str:
        return "".join(chr(c) for c in range(a, b + 1))

    return [span(0x61, 0x7A) + "éèàçñöüß", span(0x430, 0x44F), span(0x3B1, 0x3C9), span(0x627, 0x64A),
            span(0x915, 0x939) + span(0x93E, 0x94C), span(0x4E00, 0x4FFF)]


def write_corpus(folder: Path, target_mb: int, shards: int = 4) -> list[Path]:
    """Seeded multilingual documents as JSON lines (`{"text": ...}`), at least target_mb MB of text."""
    import numpy as np

    files = [folder / f"shard-{i}.jsonl" for i in range(shards)]
    stamp = folder / "_corpus.json"
    want = {"target_mb": target_mb, "shards": shards, "version": 1}
    if stamp.exists() and json.loads(stamp.read_text()).get("spec") == want and all(f.exists() for f in files):
        return files
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20261)
    words = []
    for k, alphabet in enumerate(_alphabets()):
        letters = np.array(list(alphabet))
        for _ in range(4000):
            n = int(rng.integers(1, 3 if k == 5 else 10))
            words.append("".join(rng.choice(letters, n)))
    words += [str(n) for n in range(200)] + ["🚀", "🔥", "🧪", "✓", "—", "“", "”", "…"]
    weights = 1.0 / np.arange(1, len(words) + 1)  # Zipf
    order = rng.permutation(len(words))
    probs = weights[order] / weights.sum()
    punct = np.array([" ", " ", " ", " ", " ", ", ", ". ", "! ", "? ", ": ", "\n", "; "])
    target, total, docs = target_mb * 1_000_000, 0, []
    while total < target:
        n = int(rng.integers(20, 800))
        picks = rng.choice(len(words), n, p=probs)
        seps = rng.choice(punct, n)
        doc = "".join(words[w] + s for w, s in zip(picks, seps, strict=True)).strip()
        docs.append(doc)
        total += len(doc.encode("utf-8"))
    handles = [f.open("w", encoding="utf-8") for f in files]
    for i, doc in enumerate(docs):
        handles[i % shards].write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
    for h in handles:
        h.close()
    stamp.write_text(json.dumps({"spec": want, "documents": len(docs), "text_bytes": total}))
    return files


def train_tokenizers(folder: Path, files: list[Path]) -> dict[str, Path]:
    """The SentencePiece folder and the byte-level tokenizer.json, trained once on a 2 MB sample."""
    out = {"sentencepiece": folder / "sentencepiece", "byte-level": folder / "byte-level"}
    if all((p / "done").exists() for p in out.values()):
        return out
    sample, size = [], 0
    for text in load_texts(files[:1]):
        sample.append(text.replace("\n", " "))
        size += len(text)
        if size > 2_000_000:
            break
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    for p in out.values():
        shutil.rmtree(p, ignore_errors=True)
        p.mkdir(parents=True)
    corpus = folder / "sample.txt"
    corpus.write_text("\n".join(sample), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "sp"), model_type="bpe",
                                   vocab_size=VOCAB, byte_fallback=True, character_coverage=0.9995,
                                   max_sentence_length=1 << 20, num_threads=2, minloglevel=2)
    shutil.copy(folder / "sp.model", out["sentencepiece"] / "tokenizer.model")
    (out["sentencepiece"] / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(sample, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.save(str(out["byte-level"] / "tokenizer.json"))
    for p in out.values():
        (p / "done").write_text("")
    return out


def _raw_encoder(kind: str, folder: str):
    if kind == "sentencepiece":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)

        def encode(batch):
            return tok(batch, add_special_tokens=False)["input_ids"]
    else:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))

        def encode(batch):
            return [e.ids for e in tok.encode_batch(batch, add_special_tokens=False)]
    return encode


def _raw_part(job: tuple[str, str, list[str]]) -> tuple[int, int]:
    """(documents, tokens) of some shards: read, load, batch-encode 1,000 documents at a time."""
    kind, folder, files = job
    texts = load_texts([Path(f) for f in files])
    encode = _raw_encoder(kind, folder)
    return len(texts), sum(sum(len(ids) for ids in encode(texts[i:i + 1000])) for i in range(0, len(texts), 1000))


def raw_main(kind: str, folder: str, files: list[str], processes: int = 1) -> None:
    """The raw side, in its own process (and a fork pool for processes > 1); prints one `BENCH {json}` line.
    With one process the timer covers the encoding alone; with a pool it covers each worker's read, load and
    encoding too."""
    if processes == 1:
        texts = load_texts([Path(f) for f in files])
        encode = _raw_encoder(kind, folder)
        start = time.perf_counter()
        tokens = sum(sum(len(ids) for ids in encode(texts[i:i + 1000])) for i in range(0, len(texts), 1000))
        documents = len(texts)
    else:
        import multiprocessing

        start = time.perf_counter()
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            parts = pool.map(_raw_part, [(kind, folder, files[i::processes]) for i in range(processes)])
        documents, tokens = (sum(x) for x in zip(*parts, strict=True))
    print("BENCH " + json.dumps({"seconds": time.perf_counter() - start, "tokens": tokens,
                                 "documents": documents}))


def raw(kind: str, folder: Path, files: list[Path], env: dict[str, str], processes: int = 1) -> dict:
    load = os.getloadavg()[0]
    m = measure([sys.executable, "-m", "bench.hf_tokenizers", "raw", str(processes), kind, str(folder),
                 *map(str, files)], env={**OFFLINE, **env})
    r = bench_result(m.out)
    return {"seconds": m.wall, "encode_s": r["seconds"], "tokens": r["tokens"], "peak_rss": m.peak_rss,
            "cpu_s": m.cpu_s, "load": round(load, 2)}


def tokenmill(folder: Path, files: list[Path], workers: int, out_dir: Path) -> dict:
    runner = ["--runner=FnApiRunner", f"--direct_num_workers={workers}",
              f"--direct_running_mode={'multi_processing' if workers > 1 else 'in_memory'}"]
    shutil.rmtree(out_dir, ignore_errors=True)
    load = os.getloadavg()[0]
    m = measure([*TOKENMILL, "--input", str(files[0].parent / "*.jsonl"), "--output", str(out_dir),
                 "--tokenizer", f"hf:{folder}", "--progress", "none", "--overwrite", *runner], env=OFFLINE)
    manifest = json.loads((out_dir / "_manifest.json").read_text())
    build_s = round(manifest["timing"]["finished_at"] - manifest["timing"]["started_at"], 3)
    return {"seconds": m.wall, "build_s": build_s, "tokens": manifest["tokens"], "peak_rss": m.peak_rss,
            "cpu_s": m.cpu_s, "load": round(load, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.hf_tokenizers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus-mb", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--data-dir", type=Path, default=REPO / "bench" / "data" / "hf-tokenizers")
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "data" / "hf_tokenizers.json")
    args = ap.parse_args(argv)

    files = write_corpus(args.data_dir / "corpus", args.corpus_mb)
    text_mb = json.loads((args.data_dir / "corpus" / "_corpus.json").read_text())["text_bytes"] / 1e6
    folders = train_tokenizers(args.data_dir, files)
    print(f"corpus: {len(files)} jsonl shards, {text_mb:.1f} MB of text ({args.data_dir / 'corpus'})", flush=True)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="tokenmill-bench-") as tmp:
        for kind, folder in folders.items():
            runs = {
                f"{kind}: raw batch, 1 proc": lambda k=kind, f=folder: raw(k, f, files, {}),
                f"{kind}: raw batch, 1 proc, 1 thread": lambda k=kind, f=folder: raw(k, f, files, ONE_THREAD),
                f"{kind}: raw batch, 2 procs": lambda k=kind, f=folder: raw(k, f, files, {}, 2),
                f"{kind}: tokenmill hf:, 1 worker": lambda f=folder: tokenmill(f, files, 1, Path(tmp) / "tm"),
                f"{kind}: tokenmill hf:, 2 workers": lambda f=folder: tokenmill(f, files, 2, Path(tmp) / "tm"),
            }
            results.update(best_of_rounds(args.repeat, runs))
            print(f"  done: {kind}", flush=True)

    print(f"\n{'':44s} {'whole s':>8s} {'MB/s':>6s} {'encode s':>9s} {'CPU s':>6s} {'peak RSS':>9s} {'load':>5s}"
          "   runs")
    for name, r in results.items():
        inner = r.get("encode_s", r.get("build_s"))
        print(f"{name:44s} {r['seconds']:8.2f} {text_mb / r['seconds']:6.2f} {inner:9.2f} {r['cpu_s']:6.2f} "
              f"{r['peak_rss'] / 2**20:5.0f} MiB {r['load']:5.1f}   {r['runs']}")
    print()
    for kind in folders:
        tm, raw1 = results[f"{kind}: tokenmill hf:, 1 worker"], results[f"{kind}: raw batch, 1 proc"]
        for name in (f"{kind}: raw batch, 1 proc, 1 thread", f"{kind}: raw batch, 2 procs",
                     f"{kind}: tokenmill hf:, 2 workers"):
            assert results[name]["tokens"] == tm["tokens"] == raw1["tokens"], (name, results[name]["tokens"])
        for mine, other in (("1 worker", "raw batch, 1 proc"), ("1 worker", "raw batch, 1 proc, 1 thread"),
                            ("2 workers", "raw batch, 2 procs")):
            t, o = results[f"{kind}: tokenmill hf:, {mine}"], results[f"{kind}: {other}"]
            print(f"{kind}: tokenmill {mine:9s} vs {other:28s} wall {o['seconds'] / t['seconds']:5.2f}x  "
                  f"CPU {o['cpu_s'] / t['cpu_s']:5.2f}x")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({"corpus_text_mb": text_mb, "results": results}, indent=2))
    print(f"\nresults: {args.results}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["raw"]:
        os.environ.update(OFFLINE)
        raw_main(sys.argv[3], sys.argv[4], sys.argv[5:], int(sys.argv[2]))
    else:
        sys.exit(main())
