"""Incremental runs: adding 1% new input, beside a full rebuild of the same data.

    ./run_local.sh bench incremental [--corpus-mb 100] [--workers 2]

The corpus is split into 101 shards of equal size. We build 100 of them, add
the 101st (1% new input) and rerun; then rerun with nothing new (the fixed
start-up cost: launching, listing, comparing, committing nothing); and time a
full rebuild of all 101 shards (--overwrite) as the reference. Each time is the
build's own "done in" figure (pipeline start to commit) and the process's wall
time (with Python and Beam start-up).
Target: incremental <= 5% of the full rebuild + the fixed cost.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

from bench.corpus import build_corpus
from bench.text_build import REPO, run_measured

TOKENMILL = [sys.executable, "-m", "tokenmill.pipelines.build"]


def timed_build(folder: Path, out: Path, workers: int, *extra: str) -> dict:
    runner = ["--runner=FnApiRunner", f"--direct_num_workers={workers}",
              f"--direct_running_mode={'multi_processing' if workers > 1 else 'in_memory'}"]
    text, wall, peak = run_measured([*TOKENMILL, "--input", str(folder / "*.jsonl"), "--output", str(out),
                                     "--tokenizer", "tiktoken:cl100k_base", "--progress", "none", *runner, *extra])
    seconds = float(re.search(r"(?:done|up to date) in ([0-9.]+) s", text).group(1))
    counters = dict(re.findall(r"(\w+)=(\d+)", text.split("counters:")[-1]))
    return {"seconds": seconds, "wall_s": round(wall, 2), "peak_rss": peak,
            "inputs_tokenized": int(counters.get("inputs_to_tokenize", 0)),
            "inputs_carried": int(counters.get("inputs_unchanged", 0)), "up_to_date": "up to date" in text}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench incremental")
    ap.add_argument("--corpus-mb", type=int, default=100)
    ap.add_argument("--workers", type=int, default=2)
    args, _ = ap.parse_known_args(argv)
    data = REPO / "bench" / "data"
    shards = build_corpus(data / "incremental-corpus", args.corpus_mb, shards=101)
    inputs, out = data / "incremental-inputs", data / "incremental-dataset"
    for d in (inputs, out):
        shutil.rmtree(d, ignore_errors=True)
    inputs.mkdir(parents=True)
    for s in shards[:100]:
        (inputs / s.name).symlink_to(s)
    first = timed_build(inputs, out, args.workers)
    (inputs / shards[100].name).symlink_to(shards[100])
    incremental = timed_build(inputs, out, args.workers)
    nothing_new = timed_build(inputs, out, args.workers)
    full = timed_build(inputs, out, args.workers, "--overwrite")
    budget = 0.05 * full["seconds"] + nothing_new["seconds"]
    result = {"corpus_mb": args.corpus_mb, "workers": args.workers, "first_build_100_shards": first,
              "incremental_plus_1_shard": incremental, "rerun_nothing_new": nothing_new,
              "full_rebuild_101_shards": full,
              "incremental_over_full": round(incremental["seconds"] / full["seconds"], 4),
              "target_s": round(budget, 2), "target_met": incremental["seconds"] <= budget}
    (data / "incremental.json").write_text(json.dumps(result, indent=2))
    print(f"incremental: full rebuild of 101 shards {full['seconds']:.2f} s (wall {full['wall_s']:.2f}); "
          f"+1 shard (1%) {incremental['seconds']:.2f} s (wall {incremental['wall_s']:.2f}, "
          f"{incremental['inputs_tokenized']} tokenized, {incremental['inputs_carried']} carried) = "
          f"{100 * result['incremental_over_full']:.1f}% of full; nothing new {nothing_new['seconds']:.2f} s "
          f"(wall {nothing_new['wall_s']:.2f}, fixed cost); target <= 5% of full + fixed = {budget:.2f} s: "
          f"{'met' if result['target_met'] else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
