"""Training-reader benchmark: packed text tokens/s against a raw pyarrow read of the same files.

    ./run_local.sh bench reader [--seq-len 2048]

Builds (once) a cl100k dataset of the benchmark corpus, then times, each in a
fresh process with its peak RSS sampled:
  raw pyarrow      pq.ParquetFile(f).read_row_group(i, columns=["tokens"]) for
                   every row group, tokens materialised as a numpy array
  reader           TokenReader(seq_len, shuffle) iterated in-process
  torch DataLoader TorchTokenDataset in a DataLoader, in-process (num_workers=0)
                   and with one worker process (num_workers=1), batch 8 and 32.
                   A worker process pays torch's per-batch shared-memory
                   transfer (about 1 ms a batch here), so batch size matters.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.corpus import build_corpus
from bench.text_build import REPO, bench_result, run_measured


def _raw(root: str) -> dict:
    import pyarrow.parquet as pq

    m = json.loads((Path(root) / "_manifest.json").read_text())
    start = time.perf_counter()
    tokens = 0
    for f in m["files"]:
        pf = pq.ParquetFile(Path(root) / f)
        for i in range(pf.num_row_groups):
            col = pf.read_row_group(i, columns=["tokens"]).column(0).combine_chunks()
            tokens += len(col.values.to_numpy())
    return {"seconds": time.perf_counter() - start, "tokens": tokens}


def _reader(root: str, seq_len: int) -> dict:
    from tokenmill.loaders import TokenReader

    start = time.perf_counter()
    windows = sum(1 for _ in TokenReader(root, seq_len=seq_len, seed=0))
    return {"seconds": time.perf_counter() - start, "tokens": windows * seq_len, "samples": windows}


def _torch(root: str, seq_len: int, workers: int, batch_size: int) -> dict:
    from torch.utils.data import DataLoader

    from tokenmill.loaders import TorchTokenDataset

    start = time.perf_counter()
    batches = samples = 0
    for batch in DataLoader(TorchTokenDataset(root, seq_len=seq_len, seed=0), batch_size=batch_size,
                            num_workers=workers):
        batches += 1
        samples += batch.shape[0]
    return {"seconds": time.perf_counter() - start, "tokens": samples * seq_len, "samples": samples}


MODES = {
    "raw": ("raw pyarrow read", None),
    "reader": ("TokenReader, packed", None),
    "torch-w0-b8": ("torch DataLoader, in-process, b=8", (0, 8)),
    "torch-w1-b8": ("torch DataLoader, 1 worker, b=8", (1, 8)),
    "torch-w1-b32": ("torch DataLoader, 1 worker, b=32", (1, 32)),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.reader", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--corpus-mb", type=int, default=120)
    ap.add_argument("--dataset", type=Path, default=REPO / "bench" / "data" / "text-dataset")
    ap.add_argument("--mode", choices=tuple(MODES), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.mode:  # child process: one measurement
        root = str(args.dataset)
        if args.mode == "raw":
            result = _raw(root)
        elif args.mode == "reader":
            result = _reader(root, args.seq_len)
        else:
            result = _torch(root, args.seq_len, *MODES[args.mode][1])
        print("BENCH " + json.dumps(result))
        return 0

    files = build_corpus(REPO / "bench" / "data" / "text-corpus", args.corpus_mb)
    if not (args.dataset / "_manifest.json").exists():
        subprocess.run([sys.executable, "-m", "tokenmill.pipelines.build", "--input", str(files[0].parent / "*.jsonl"),
                        "--output", str(args.dataset), "--tokenizer", "tiktoken:cl100k_base", "--eos",
                        "--overwrite"], check=True, cwd=REPO, capture_output=True)
    results = {}
    for mode in MODES:  # best of `repeat` fresh processes: these runs are short and the disk cache noisy
        for _ in range(args.repeat):
            out, wall, peak = run_measured([sys.executable, "-m", "bench.reader", "--mode", mode,
                                            "--dataset", str(args.dataset), "--seq-len", str(args.seq_len)])
            r = {**bench_result(out), "wall_s": wall, "peak_rss": peak}
            if mode not in results or r["seconds"] < results[mode]["seconds"]:
                results[mode] = r
    print(f"dataset: {args.dataset} ({results['raw']['tokens']:,} tokens), packed seq_len={args.seq_len}, "
          f"best of {args.repeat}")
    raw_rate = results["raw"]["tokens"] / results["raw"]["seconds"]
    print(f"{'':34s} {'seconds':>8s} {'Mtok/s':>8s} {'vs raw':>7s} {'peak RSS':>9s}")
    for mode, r in results.items():
        rate = r["tokens"] / r["seconds"]
        print(f"{MODES[mode][0]:34s} {r['seconds']:8.2f} {rate / 1e6:8.1f} {rate / raw_rate:6.2f}x "
              f"{r['peak_rss'] / 2**20:6.0f} MiB")
    ratio = results["reader"]["tokens"] / results["reader"]["seconds"] / raw_rate
    print(f"TokenReader (packed, one process) vs raw pyarrow: {ratio:.2f}x "
          f"(target >= 0.5x: {'met' if ratio >= 0.5 else 'MISSED'})")
    (REPO / "bench" / "data" / "reader.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
