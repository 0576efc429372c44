"""Cost as work grows: a build's cost per unit and peak memory at two sizes, and the launcher's listing time.

    ./run_local.sh bench scaling [--text-mb 100,1000] [--images 1000,10000] [--files 10000]
                                 [--only text|images|listing] [--repeat 1]

Each build is a whole `tokenmill build` process with the default runner, whose
tree is sampled for peak RSS and PSS (bench.text_build.measure); the load
average is recorded beside each run, since this machine is shared.

  text     --tokenizer tiktoken:cl100k_base on JSON-lines corpora of each size.
           The smallest is bench/corpus.py's Python sources; a larger one is
           copies of its shards, so every size holds the same text in files of
           the same size and a per-MB difference is the build's, not the text's.
  images   --tokenizer patch:16 on N generated 256x256 JPEGs
           (bench/image_build.make_images: image i is the same in every set).
  listing  N small .jsonl files on the local filesystem and on moto's S3
           server (127.0.0.1 only; nothing else is contacted). A child process
           times, after its imports, fs.match (the listing alone) and
           build.make_pipeline (listing, output probe, tokenizer, plan, graph:
           what the summary's `planning:` line reports), and counts the S3
           requests by operation.

Targets (issue 19): the larger build costs within 10% per unit of the smaller
(judged on CPU seconds, which a shared machine moves less than wall time; wall
is reported too), its peak RSS within 1.25x; listing and planning 10,000 files
in under 5 s. Results: bench/data/scaling.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.corpus import build_corpus
from bench.peers import TOKENMILL
from bench.text_build import REPO, bench_result, manifest_seconds, measure

DATA = REPO / "bench" / "data" / "scaling"
LOOPBACK = "127.0.0.1"
PER_UNIT_TARGET, MEMORY_TARGET, PLANNING_TARGET_S = 1.10, 1.25, 5.0


def _sizes(text: str) -> list[int]:
    return sorted({int(x) for x in text.split(",") if x.strip()})


def text_corpus(mb: int, base_mb: int) -> list[Path]:
    """The corpus of `mb` MB: bench/corpus.py's `base_mb` corpus, or mb // base_mb copies of its shards."""
    base = build_corpus(DATA / f"text-{base_mb}mb", base_mb)
    if mb == base_mb:
        return base
    folder = DATA / f"text-{mb}mb"
    folder.mkdir(parents=True, exist_ok=True)
    copies = mb // base_mb
    files = [folder / f"copy-{c:02d}-{f.name}" for c in range(copies) for f in base]
    stamp, want = folder / "_copies.json", {"base_mb": base_mb, "copies": copies, "version": 1}
    if stamp.exists() and json.loads(stamp.read_text()) == want and all(f.exists() for f in files):
        return files
    for stray in set(folder.glob("*.jsonl")) - set(files):
        stray.unlink()
    for c in range(copies):
        for f in base:
            shutil.copyfile(f, folder / f"copy-{c:02d}-{f.name}")
    stamp.write_text(json.dumps(want))
    return files


def small_files(count: int) -> Path:
    """A folder of `count` one-document .jsonl files (written once)."""
    folder = DATA / f"files-{count}"
    stamp = folder / "_files.json"
    if stamp.exists() and json.loads(stamp.read_text()) == {"count": count}:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for i in range(count):
        (folder / f"doc-{i:05d}.jsonl").write_text(json.dumps({"text": f"document {i}: " + "words " * 40}) + "\n")
    stamp.write_text(json.dumps({"count": count}))
    return folder


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _planning_s(out: str) -> float | None:
    found = re.search(r"^  planning:\s+([0-9.]+) s", out, re.M)
    return float(found.group(1)) if found else None


def build(inputs: str, tokenizer: str, units: float, output: Path) -> dict[str, Any]:
    """One whole `tokenmill build` (default runner) of `inputs`: its costs, in all and per unit."""
    shutil.rmtree(output, ignore_errors=True)
    os.sync()  # no run pays for the writeback of the one before
    load_before = _load()
    m = measure([*TOKENMILL, "--input", inputs, "--output", str(output), "--tokenizer", tokenizer], pss=True)
    manifest = json.loads((output / "_manifest.json").read_text())
    shutil.rmtree(output, ignore_errors=True)
    return {"units": units, "wall_s": round(m.wall, 3), "cpu_s": round(m.cpu_s, 3),
            "pipeline_s": manifest_seconds(manifest), "planning_s": _planning_s(m.out),
            "wall_per_unit": m.wall / units, "cpu_per_unit": m.cpu_s / units,
            "peak_rss": m.peak_rss, "peak_pss": m.peak_pss, "rows": manifest["rows"], "tokens": manifest["tokens"],
            "errors": manifest["errors"], "shards": len(manifest["shards"]), "load_before": load_before,
            "load_after": _load()}


def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the least CPU, with every run's CPU and wall seconds kept."""
    return {**min(runs, key=lambda r: r["cpu_s"]), "runs_cpu_s": [r["cpu_s"] for r in runs],
            "runs_wall_s": [r["wall_s"] for r in runs]}


def compare(label: str, small: dict[str, Any], large: dict[str, Any]) -> dict[str, Any]:
    """The larger run's cost per unit and peak memory against the smaller's, with the targets."""
    cpu = large["cpu_per_unit"] / small["cpu_per_unit"]
    wall = large["wall_per_unit"] / small["wall_per_unit"]
    rss = large["peak_rss"] / small["peak_rss"]
    pss = large["peak_pss"] / small["peak_pss"] if small["peak_pss"] else None
    return {"label": label, "cpu_per_unit_ratio": round(cpu, 3), "wall_per_unit_ratio": round(wall, 3),
            "peak_rss_ratio": round(rss, 3), "peak_pss_ratio": None if pss is None else round(pss, 3),
            "per_unit_met": cpu <= PER_UNIT_TARGET, "memory_met": rss <= MEMORY_TARGET}


def scaling(kind: str, unit: str, cases: dict[str, tuple[str, str, float]], repeat: int, tmp: Path
            ) -> tuple[dict[str, dict], list[dict]]:
    """Build every case `repeat` times, in rounds; (best run per case, comparisons of each size with the first)."""
    runs: dict[str, list[dict]] = {name: [] for name in cases}
    for _ in range(max(1, repeat)):
        for name, (inputs, tokenizer, units) in cases.items():
            runs[name].append(build(inputs, tokenizer, units, tmp / "out"))
            r = runs[name][-1]
            print(f"  {name}: {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU, in-pipeline {r['pipeline_s']:.1f} s, "
                  f"planning {r['planning_s']} s, peak RSS {r['peak_rss'] / 2**20:.0f} MiB "
                  f"(load {r['load_before'][0]} -> {r['load_after'][0]})", flush=True)
    results = {name: best(rs) for name, rs in runs.items()}
    for name, (_, _, units) in cases.items():  # every record made a row: nothing lost at any size
        for r in runs[name]:
            assert r["errors"] == 0 and (kind != "images" or r["rows"] == units), (name, r)
    print(f"\n{kind:22s} {'wall s':>7s} {'CPU s':>7s} {'pipe s':>7s} {'plan s':>7s} {'wall/' + unit:>10s} "
          f"{'CPU/' + unit:>10s} {'RSS MiB':>8s} {'PSS MiB':>8s} {'shards':>7s}  load")
    for name, r in results.items():
        print(f"{name:22s} {r['wall_s']:7.1f} {r['cpu_s']:7.1f} {r['pipeline_s']:7.1f} {r['planning_s'] or 0:7.2f} "
              f"{r['wall_per_unit']:10.4f} {r['cpu_per_unit']:10.4f} {r['peak_rss'] / 2**20:8.0f} "
              f"{r['peak_pss'] / 2**20:8.0f} {r['shards']:7d}  {r['load_before'][0]}-{r['load_after'][0]}")
    names = list(results)
    checks = [compare(f"{kind}: {n} vs {names[0]}", results[names[0]], results[n]) for n in names[1:]]
    for c in checks:
        print(f"{c['label']}: CPU per {unit} {c['cpu_per_unit_ratio']:.2f}x (wall {c['wall_per_unit_ratio']:.2f}x; "
              f"target <= {PER_UNIT_TARGET}x: {'met' if c['per_unit_met'] else 'MISSED'}), peak RSS "
              f"{c['peak_rss_ratio']:.2f}x (PSS {c['peak_pss_ratio']}x; target <= {MEMORY_TARGET}x: "
              f"{'met' if c['memory_met'] else 'MISSED'})")
    return results, checks


# -- listing and planning ------------------------------------------------------------------------------------


def loopback_only() -> None:
    """Refuse, in this process, any TCP connection that is not to 127.0.0.1 (as tests/test_object_storage.py)."""
    real = socket.socket.connect

    def connect(self, address):
        if isinstance(address, tuple) and address[0] not in (LOOPBACK, "localhost", "::1"):
            raise ConnectionRefusedError(f"bench.scaling contacts 127.0.0.1 only, not {address!r}")
        return real(self, address)

    socket.socket.connect = connect


def s3_environment(port: int, tmp: Path) -> dict[str, str]:
    """What a user sets to reach an S3-compatible endpoint: here moto's, on the loopback address."""
    nowhere = str(tmp / "no-aws-config")
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": f"http://{LOOPBACK}:{port}", "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": nowhere, "AWS_SHARED_CREDENTIALS_FILE": nowhere}


def plan_child(pattern: str, output: str) -> None:
    """In a fresh process, after imports: seconds to list `pattern`, and to plan a build of it; S3 requests."""
    loopback_only()
    from tokenmill.pipelines import build
    from tokenmill.transforms import fs

    calls: dict[str, int] = {}
    raw_s = None
    if pattern.startswith("s3://"):  # the floor: the same keys paged through with boto3, nothing else
        import boto3

        bucket, _, key = pattern[len("s3://"):].partition("/")
        raw_start = time.perf_counter()
        pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                            Prefix=key.split("*")[0])
        raw_keys = sum(len(page.get("Contents", [])) for page in pages)
        raw_s = time.perf_counter() - raw_start
        import fsspec

        s3 = fsspec.filesystem("s3")  # the instance tokenmill's own calls get (fsspec caches it)
        s3.connect()

        def count(model, **_):
            calls[model.name] = calls.get(model.name, 0) + 1

        s3.s3.meta.events.register("before-call.s3", count)
    start, cpu0 = time.perf_counter(), time.process_time()
    files = fs.match(pattern)
    listed, cpu1 = time.perf_counter(), time.process_time()
    listing_calls = dict(calls)
    build.make_pipeline(["--input", pattern, "--output", output, "--tokenizer", "tiktoken:cl100k_base"])
    planned, cpu2 = time.perf_counter(), time.process_time()
    print("BENCH " + json.dumps({"files": len(files), "listing_s": listed - start, "planning_s": planned - listed,
                                 "listing_cpu_s": cpu1 - cpu0, "planning_cpu_s": cpu2 - cpu1,
                                 "raw_list_s": raw_s, "raw_keys": raw_keys if raw_s is not None else None,
                                 "listing_requests": listing_calls,
                                 "planning_requests": {k: v - listing_calls.get(k, 0) for k, v in calls.items()}}))


def listing(count: int, repeat: int, tmp: Path) -> dict[str, dict]:
    """Listing and planning `count` files, local and on moto's S3 (best of `repeat`, by planning seconds)."""
    folder = small_files(count)
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    loopback_only()
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address=LOOPBACK, port=port, verbose=False)
    server.start()
    env = s3_environment(port, tmp)
    os.environ.update(env)
    try:
        import fsspec

        s3 = fsspec.filesystem("s3", client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL_S3"]})
        s3.mkdir("bench")
        start = time.perf_counter()
        s3.pipe({f"bench/in/{f.name}": f.read_bytes() for f in sorted(folder.glob("*.jsonl"))})
        print(f"  uploaded {count} files to moto's S3 in {time.perf_counter() - start:.1f} s", flush=True)
        cases = {f"local, {count} files": (str(folder / "*.jsonl"), str(tmp / "plan-out")),
                 f"S3 (moto), {count} files": ("s3://bench/in/*.jsonl", "s3://bench/plan-out")}
        results: dict[str, dict] = {}
        for name, (pattern, output) in cases.items():
            runs = []
            for _ in range(max(1, repeat)):
                load_before = _load()
                m = measure([sys.executable, "-m", "bench.scaling", "--plan", pattern, output], env=env)
                runs.append({**bench_result(m.out), "wall_s": round(m.wall, 3), "cpu_s": round(m.cpu_s, 3),
                             "load_before": load_before, "load_after": _load()})
                r = runs[-1]
                print(f"  {name}: listing {r['listing_s']:.2f} s ({r['listing_cpu_s']:.2f} s CPU), planning "
                      f"{r['planning_s']:.2f} s ({r['planning_cpu_s']:.2f} s CPU), whole process "
                      f"{r['wall_s']:.1f} s (load {load_before[0]} -> {r['load_after'][0]}); "
                      + (f"boto3 paging alone {r['raw_list_s']:.2f} s; " if r["raw_list_s"] is not None else "") +
                      f"S3 requests {r['listing_requests'] or '-'} / {r['planning_requests'] or '-'}", flush=True)
            results[name] = {**min(runs, key=lambda r: r["planning_s"]),
                             "runs_planning_s": [round(r["planning_s"], 3) for r in runs]}
    finally:
        server.stop()
    for name, r in results.items():
        assert r["files"] == count, (name, r["files"])
        met = r["planning_s"] < PLANNING_TARGET_S
        print(f"{name}: listing {r['listing_s']:.2f} s, listing and planning {r['planning_s']:.2f} s "
              f"({r['planning_cpu_s']:.2f} s CPU in the launcher) "
              f"(target < {PLANNING_TARGET_S:.0f} s: {'met' if met else 'MISSED'})")
        r["met"] = met
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.scaling", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text-mb", default="100,1000", help="corpus sizes in MB, multiples of the smallest")
    ap.add_argument("--images", default="1000,10000", help="image counts")
    ap.add_argument("--files", type=int, default=10_000, help="input files for listing and planning")
    ap.add_argument("--only", choices=("text", "images", "listing"), help="one part only (default: all)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each measurement, in rounds (default 1)")
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "data" / "scaling.json")
    ap.add_argument("--plan", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.plan:
        plan_child(*args.plan)
        return 0
    text_mb, images = _sizes(args.text_mb), _sizes(args.images)
    if any(mb % text_mb[0] for mb in text_mb):
        ap.error(f"--text-mb: each size must be a multiple of the smallest ({text_mb[0]})")
    out: dict[str, Any] = {"machine": {"cores": os.cpu_count()}, "repeat": args.repeat}
    with tempfile.TemporaryDirectory(prefix="tokenmill-scaling-") as tmp:
        tmp = Path(tmp)
        if args.only in (None, "text"):
            cases = {}
            for mb in text_mb:
                files = text_corpus(mb, text_mb[0])
                disk_mb = sum(f.stat().st_size for f in files) / 1e6
                cases[f"text {mb} MB"] = (str(files[0].parent / "*.jsonl"), "tiktoken:cl100k_base", disk_mb)
                print(f"text corpus: {len(files)} files, {disk_mb:.0f} MB ({files[0].parent})", flush=True)
            out["text"], out["text_checks"] = scaling("text", "MB", cases, args.repeat, tmp)
            first = out["text"][f"text {text_mb[0]} MB"]
            for mb in text_mb:  # a larger corpus is copies of the smallest: as many times its rows and tokens
                r = out["text"][f"text {mb} MB"]
                assert (r["rows"], r["tokens"]) == (first["rows"] * mb // text_mb[0],
                                                    first["tokens"] * mb // text_mb[0]), (mb, r, first)
        if args.only in (None, "images"):
            from bench.image_build import make_images

            cases = {}
            for n in images:
                files = make_images(DATA / f"images-256-{n}", n, 256)
                cases[f"images {n}"] = (str(files[0].parent / "*.jpg"), "patch:16", float(n))
                print(f"images: {n} JPEGs of 256x256 ({files[0].parent})", flush=True)
            out["images"], out["images_checks"] = scaling("images", "image", cases, args.repeat, tmp)
        if args.only in (None, "listing"):
            out["listing"] = listing(args.files, args.repeat, tmp)
    out["load_after"] = _load()
    args.results.parent.mkdir(parents=True, exist_ok=True)
    if args.results.exists():  # a part run alone (--only) replaces that part's figures and keeps the others
        out = {**json.loads(args.results.read_text()), **out}
    args.results.write_text(json.dumps(out, indent=2))
    print(f"\nresults: {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
