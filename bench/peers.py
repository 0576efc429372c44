"""tokenmill beside the closest peers, same inputs, same tokenizer, same EOS policy, one run.

    ./run_local.sh bench peers [--corpus-mb 30] [--images 300] [--repeat 3] [--skip text,hf,images] [--shortcuts-off]

Every side is a whole process (interpreter start to finished output), run in
rounds (each side once per round, after a sync) at 1 and 2 processes; the best
of --repeat counts, all runs are kept. tokenmill runs as `tokenmill build` and
also reports its in-pipeline time (the manifest's timing).

  text, datatrove  datatrove 0.10 JsonlReader -> DocumentTokenizer (no shuffle)
                   on LocalPipelineExecutor (tasks = workers = processes), with a
                   32k byte-level BPE tokenizer.json trained here on the corpus,
                   EOS appended; RAYON_NUM_THREADS=1 for both sides. tokenmill:
                   --tokenizer hf:tokenizer.json --eos. Tokens are compared
                   document by document (datatrove skips empty documents;
                   tokenmill keeps them as EOS-only rows).
  text, HF         Hugging Face datasets load_dataset("json") + batched map with
                   tiktoken cl100k (encode_ordinary_batch, 1 thread) + to_parquet
                   (bench/hf_peer.py), against --tokenizer tiktoken:cl100k_base.
  images           HF datasets Dataset.map (num_proc) over the image paths with
                   the same decode (tokenmill's decode_image, native:1024), patchify
                   and vq code search, then to_parquet; and the plain loop of
                   bench/image_build.py writing the same Parquet; against
                   --tokenizer patch:16 and vq: (a K=256 codebook fitted with
                   `tokenmill fit` on the images).
The corpus is the Python-sources corpus of bench/corpus.py.
"""
from __future__ import annotations

import argparse
import compileall
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.corpus import build_corpus
from bench.text_build import REPO, bench_result, best_of_rounds, manifest_seconds, measure, run_measured

TOKENMILL = [str(Path(sys.executable).parent / "tokenmill"), "build"]
ONE_THREAD = {"RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
EOS = "<|endoftext|>"


def runner_args(n: int) -> list[str]:
    return ["--runner=FnApiRunner", f"--direct_num_workers={n}",
            f"--direct_running_mode={'multi_processing' if n > 1 else 'in_memory'}"]


def compile_sources() -> None:
    """Byte-compile tokenmill's sources, as an install does (PYTHONDONTWRITEBYTECODE may be set here)."""
    for d in sorted(REPO.iterdir()):
        if (d / "__init__.py").exists() and d.name != "tests":
            compileall.compile_dir(str(d), quiet=1)


def train_tokenizer(folder: Path, files: list[Path]) -> Path:
    """A 32k byte-level BPE tokenizer.json trained on the corpus (once), with <|endoftext|> as a special token."""
    path = folder / "tokenizer.json"
    if path.exists():
        return path
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from bench.corpus import load_texts

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(load_texts(files), trainers.BpeTrainer(
        vocab_size=32000, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    folder.mkdir(parents=True, exist_ok=True)
    bpe.save(str(path))
    return path


def tokenmill(argv: list[str], out: Path, n: int, env: dict | None = None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    r = measure([*TOKENMILL, *argv, "--output", str(out), "--progress", "none", *runner_args(n)], env=env)
    m = json.loads((out / "_manifest.json").read_text())
    return {"seconds": r.wall, "pipeline_s": manifest_seconds(m), "tokens": m["tokens"], "rows": m["rows"],
            "peak_rss": r.peak_rss, "cpu_s": round(r.cpu_s, 2)}


# -- datatrove ---------------------------------------------------------------

def datatrove_main(n: int, inputs: str, out: str, tokenizer: str) -> None:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer

    start = time.perf_counter()
    LocalPipelineExecutor(pipeline=[JsonlReader(inputs),
                                    DocumentTokenizer(output_folder=f"{out}/tok", tokenizer_name_or_path=tokenizer,
                                                      eos_token=EOS, shuffle_documents=False)],
                          tasks=n, workers=n, logging_dir=f"{out}/logs").run()
    print("BENCH " + json.dumps({"seconds": time.perf_counter() - start}))


def datatrove_docs(out: Path) -> list[np.ndarray]:
    """The documents datatrove wrote, in order (task 0's file first)."""
    docs = []
    for ds in sorted((out / "tok").glob("*.ds")):
        tokens = np.fromfile(ds, dtype="<u2")
        ends = np.fromfile(f"{ds}.index", dtype="<u8")
        docs.extend(np.split(tokens, ends[:-1].astype(np.int64)))
    return docs


def datatrove(folder: Path, tokenizer: Path, out: Path, n: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    r = measure([sys.executable, "-m", "bench.peers", "datatrove", str(n), str(folder), str(out), str(tokenizer)],
                env=ONE_THREAD)
    tokens = sum(len(d) for d in datatrove_docs(out))
    return {"seconds": r.wall, "pipeline_s": bench_result(r.out)["seconds"], "tokens": tokens, "peak_rss": r.peak_rss,
            "cpu_s": round(r.cpu_s, 2)}


def same_tokens_as_datatrove(tm_out: Path, dt_out: Path) -> tuple[int, int, int]:
    """(documents equal, documents different, EOS-only rows tokenmill kept for empty documents)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    m = json.loads((tm_out / "_manifest.json").read_text())
    t = pa.concat_tables([pq.read_table(tm_out / f, columns=["source", "locator", "tokens"]) for f in m["files"]])
    rows = sorted(zip(t.column("source").to_pylist(), t.column("locator").to_pylist(), t.column("tokens").to_pylist(),
                      strict=True), key=lambda r: (r[0], int(r[1].split(":")[1])))
    eos = rows[0][2][-1] if rows else None
    ours = [r[2] for r in rows if r[2] != [eos]]
    theirs = [d.tolist() for d in datatrove_docs(dt_out)]
    if len(ours) != len(theirs):
        return 0, max(len(ours), len(theirs)), len(rows) - len(ours)
    equal = sum(a == b for a, b in zip(ours, theirs, strict=True))
    return equal, len(ours) - equal, len(rows) - len(ours)


# -- HF datasets on images -------------------------------------------------------

def hf_images_main(n: int, out: str, codebook: str | None, paths: list[str]) -> None:
    start = time.perf_counter()
    from datasets import Dataset

    from bench.image_build import PATCH, POLICY
    from tokenmill.transforms.decoders.images import SizePolicy, decode_image
    from tokenmill.transforms.tokenizers.codebook import nearest_codes, to_unit
    from tokenmill.transforms.tokenizers.patches import image_to_patches

    state: dict = {}

    def tokenize(batch):
        if "policy" not in state:
            state["policy"] = SizePolicy.parse(POLICY)
            if codebook:
                with np.load(codebook, allow_pickle=False) as z:
                    codes = z["codes"].astype(np.float32)
                state["codes"], state["norms"] = codes, (codes ** 2).sum(1)
        tokens, counts = [], []
        for p in batch["path"]:
            with open(p, "rb") as f:
                image, _ = decode_image(f.read(), state["policy"])
            patches, _ = image_to_patches(image, PATCH)
            if codebook:
                patches = nearest_codes(to_unit(patches), state["codes"], state["norms"]).astype(np.uint8)
            tokens.append(np.ascontiguousarray(patches).tobytes())
            counts.append(len(patches))
        return {"tokens": tokens, "num_tokens": counts}

    ds = Dataset.from_dict({"path": paths})
    ds = ds.map(tokenize, batched=True, batch_size=64, num_proc=n if n > 1 else None, remove_columns=[],
                cache_file_name=None)
    ds.to_parquet(f"{out}/out.parquet")
    print("BENCH " + json.dumps({"seconds": time.perf_counter() - start, "tokens": int(sum(ds["num_tokens"]))}))


def hf_images(paths: list[Path], out: Path, n: int, codebook: Path | None, env: dict) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    stdout, wall, peak = run_measured([sys.executable, "-m", "bench.peers", "hf-images", str(n), str(out),
                                       str(codebook or ""), *map(str, paths)],
                                      env={**env, "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(out / "hf")})
    r = bench_result(stdout)
    return {"seconds": wall, "pipeline_s": r["seconds"], "tokens": r["tokens"], "peak_rss": peak}


def image_loop(paths: list[Path], out: Path, n: int, codebook: Path | None, env: dict) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    stdout, wall, peak = run_measured([sys.executable, "-m", "bench.image_build", "--loop", str(n), "--write",
                                       str(out), *(["--codebook", str(codebook)] if codebook else []),
                                       *map(str, paths)], env=env)
    r = bench_result(stdout)
    return {"seconds": wall, "pipeline_s": r["seconds"], "tokens": r["tokens"], "peak_rss": peak}


def report(results: dict[str, dict], checks: list[tuple[str, float]], notes: list[str], path: Path) -> None:
    """Print the table and ratios so far and write them to `path` (after every part: a long run keeps them)."""
    load = os.getloadavg()
    print(f"\nload now: {load}")
    print(f"\n{'':48s} {'whole s':>8s} {'inner s':>8s} {'peak RSS':>9s}   runs (whole s)")
    for name, r in results.items():
        cpu = f"  CPU s {r['cpu_s']:.2f}" if "cpu_s" in r else ""
        print(f"{name:48s} {r['seconds']:8.2f} {r['pipeline_s']:8.2f} {r['peak_rss'] / 2**20:5.0f} MiB   {r['runs']}{cpu}")
    print()
    for note in notes:
        print(note)
    for name, ratio in checks:
        print(f"{name:62s} {ratio:5.2f}x  (target >= 1.1x: {'met' if ratio >= 1.1 else 'MISSED'})")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"results": results, "ratios": dict(checks), "notes": notes, "load": load}, indent=2))
    print(f"\nresults: {path}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.peers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus-mb", type=int, default=30)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--processes", default="1,2")
    ap.add_argument("--skip", default="", help="comma-separated parts to leave out: text, hf, images")
    ap.add_argument("--shortcuts-off", action="store_true",
                    help="text: also run tokenmill with TOKENMILL_BEAM_SHORTCUTS=0 in each round")
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "data" / "peers.json")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    procs = [int(p) for p in args.processes.split(",")]
    compile_sources()
    results: dict[str, dict] = {}
    checks: list[tuple[str, float]] = []
    notes: list[str] = []
    print(f"load before: {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="tokenmill-peers-") as tmp:
        tmp = Path(tmp)
        if not {"text", "hf"} <= skip:
            folder = REPO / "bench" / "data" / f"peers-corpus-{args.corpus_mb}"
            files = build_corpus(folder, args.corpus_mb)
            text_mb = json.loads((folder / "_corpus.json").read_text())["text_bytes"] / 1e6
            print(f"corpus: {len(files)} jsonl shards, {text_mb:.1f} MB of text ({folder})", flush=True)
            inputs = ["--input", str(folder / "*.jsonl")]
        if "text" not in skip:
            tok = train_tokenizer(REPO / "bench" / "data" / f"peers-bpe32k-{args.corpus_mb}", files)
            for n in procs:
                runs = {f"text: datatrove, {n} proc": lambda n=n: datatrove(folder, tok, tmp / f"dt{n}", n),
                        f"text: tokenmill hf:, {n} proc": lambda n=n: tokenmill(
                            [*inputs, "--tokenizer", f"hf:{tok}", "--eos"], tmp / f"tm{n}", n, ONE_THREAD)}
                if args.shortcuts_off:  # what pipelines/beam_seam.py saves, in the same rounds
                    runs[f"text: tokenmill hf:, Beam short-cuts off, {n} proc"] = lambda n=n: tokenmill(
                        [*inputs, "--tokenizer", f"hf:{tok}", "--eos"], tmp / f"tmo{n}", n,
                        {**ONE_THREAD, "TOKENMILL_BEAM_SHORTCUTS": "0"})
                results.update(best_of_rounds(args.repeat, runs))
                dt, tm = results[f"text: datatrove, {n} proc"], results[f"text: tokenmill hf:, {n} proc"]
                checks.append((f"text {n} proc: tokenmill vs datatrove", dt["seconds"] / tm["seconds"]))
                empty = tm["rows"] - len(datatrove_docs(tmp / f"dt{n}"))
                assert tm["tokens"] == dt["tokens"] + empty, (tm["tokens"], dt["tokens"], empty)
                if n == procs[0]:
                    equal, differ, eos_only = same_tokens_as_datatrove(tmp / f"tm{n}", tmp / f"dt{n}")
                    notes.append(f"text: {equal} documents with the same tokens as datatrove, {differ} different, "
                                 f"{eos_only} empty documents kept by tokenmill as EOS-only rows")
                    assert differ == 0, notes[-1]
                print(f"  done: text {n}", flush=True)
                report(results, checks, notes, args.results)
        if "hf" not in skip:
            for n in procs:
                runs = {f"text: HF datasets tiktoken, {n} proc": lambda n=n: _hf_text(files, tmp / f"hf{n}", n),
                        f"text: tokenmill tiktoken, {n} proc": lambda n=n: tokenmill(
                            [*inputs, "--tokenizer", "tiktoken:cl100k_base"], tmp / f"tmt{n}", n)}
                results.update(best_of_rounds(args.repeat, runs))
                hf, tm = results[f"text: HF datasets tiktoken, {n} proc"], results[f"text: tokenmill tiktoken, {n} proc"]
                assert hf["tokens"] == tm["tokens"], (hf["tokens"], tm["tokens"])
                checks.append((f"text {n} proc: tokenmill vs HF datasets (tiktoken)", hf["seconds"] / tm["seconds"]))
                print(f"  done: HF text {n}", flush=True)
                report(results, checks, notes, args.results)
        if "images" not in skip:
            from bench.image_build import PATCH, POLICY, make_images

            imgdir = REPO / "bench" / "data" / f"images-{args.size}-n{args.images}"
            paths = make_images(imgdir, args.images, args.size)
            codebook = imgdir / f"codebook-p{PATCH}-k256.npz"
            if not codebook.exists():
                run_measured([*TOKENMILL[:1], "fit", "--kind", "vq", "--input", str(imgdir / "*.jpg"), "--output",
                              str(codebook), "--patch", str(PATCH), "--codes", "256", "--samples-per-image", "32",
                              "--max-samples", "20000", "--iterations", "10"])
            print(f"images: {len(paths)} JPEGs of {args.size}x{args.size} ({imgdir})", flush=True)
            for spec, cb, label in [(f"patch:{PATCH}", None, f"patch:{PATCH}"), (f"vq:{codebook}", codebook, "vq:K=256")]:
                for n in procs:
                    blas = {v: "1" for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")} \
                        if n > 1 else {}
                    names = (f"images {label}: HF datasets map, {n} proc", f"images {label}: loop + Parquet, {n} proc",
                             f"images {label}: tokenmill, {n} proc")
                    runs = {names[0]: lambda n=n, cb=cb, b=blas: hf_images(paths, tmp / "hfi", n, cb, b),
                            names[1]: lambda n=n, cb=cb, b=blas: image_loop(paths, tmp / "loop", n, cb, b),
                            names[2]: lambda n=n, spec=spec: tokenmill(
                                ["--input", str(imgdir / "*.jpg"), "--tokenizer", spec, "--size", POLICY],
                                tmp / "tmi", n)}
                    results.update(best_of_rounds(args.repeat, runs))
                    tm = results[names[2]]
                    for peer in names[:2]:
                        assert results[peer]["tokens"] == tm["tokens"], (peer, results[peer]["tokens"], tm["tokens"])
                        checks.append((f"images {label} {n} proc: tokenmill vs {peer.split(': ')[1].rsplit(',', 1)[0]}",
                                       results[peer]["seconds"] / tm["seconds"]))
                    print(f"  done: images {label} {n}", flush=True)
                    report(results, checks, notes, args.results)
    return 0


def _hf_text(files: list[Path], work: Path, n: int) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    stdout, wall, peak = run_measured([sys.executable, "-m", "bench.hf_peer", str(n), str(work), *map(str, files)],
                                      env={"HF_DATASETS_OFFLINE": "1", "HF_HOME": str(work / "hf")})
    r = bench_result(stdout)
    return {"seconds": wall, "pipeline_s": r["seconds"], "tokens": r["tokens"], "peak_rss": peak}


if __name__ == "__main__":
    if sys.argv[1:2] == ["datatrove"]:
        datatrove_main(int(sys.argv[2]), *sys.argv[3:6])
    elif sys.argv[1:2] == ["hf-images"]:
        hf_images_main(int(sys.argv[2]), sys.argv[3], sys.argv[4] or None, sys.argv[5:])
    else:
        sys.exit(main())
