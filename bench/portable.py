"""The portable runner path: the worker start check's cost, and warm against cold serve-workers.

    ./run_local.sh bench portable [--rounds 5]

Starts Beam's Python job service and two `tokenmill serve-workers` pools on
127.0.0.1 (warm: workers forked from its zygote; cold: TOKENMILL_FORK_WORKERS=0),
then builds samples/text/* (cl100k, EOS) through `--runner=PortableRunner`
with each pool, with the worker start check (the default) and without
(`--worker_start_timeout=0`), beside the local runner a user would otherwise
pick (the default FnApiRunner). Whole launcher processes, a fresh output each
time, the five alternating in each round; medians and every run are reported.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.text_build import REPO, run_measured

BUILD = [sys.executable, "-m", "tokenmill", "build", "--input", str(REPO / "samples" / "text" / "*"),
         "--tokenizer", "tiktoken:cl100k_base", "--eos", "--progress", "none"]


def _ready(proc: subprocess.Popen, read, what: str, deadline_s: float = 120.0) -> str:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        found = read()
        if found:
            return found
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready within {deadline_s:g} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench portable")
    ap.add_argument("--rounds", type=int, default=5)
    args, _ = ap.parse_known_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="tokenmill-bench-portable-"))
    procs: list[subprocess.Popen] = []
    try:
        port_file = folder / "job-port"
        procs.append(subprocess.Popen([sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main",
                                       "--port", "0", "--port_file", str(port_file)], cwd=REPO,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        job = _ready(procs[-1], lambda: port_file.exists() and port_file.read_text(), "the job service")
        pools = {}
        for name, fork in (("warm", "1"), ("cold", "0")):
            log = folder / f"{name}.out"
            procs.append(subprocess.Popen([sys.executable, "-m", "tokenmill", "serve-workers", "--port", "0"],
                                          cwd=REPO, stdout=log.open("wb"), stderr=subprocess.DEVNULL,
                                          env={**os.environ, "TOKENMILL_FORK_WORKERS": fork}, start_new_session=True))
            pools[name] = _ready(procs[-1], lambda: (m := re.search(r"--environment_config=(\S+)",
                                                                     log.read_text())) and m.group(1), name)
        sides = {"local FnApiRunner (default)": []}
        for name, address in pools.items():
            for check in (True, False):
                sides[f"portable, {name} pool, check {'on' if check else 'off'}"] = [
                    "--runner=PortableRunner", f"--job_endpoint=127.0.0.1:{job}", "--environment_type=EXTERNAL",
                    f"--environment_config={address}", *([] if check else ["--worker_start_timeout=0"])]
        walls: dict[str, list[float]] = {side: [] for side in sides}
        for _ in range(args.rounds):
            for side, extra in sides.items():
                out = folder / "out"
                shutil.rmtree(out, ignore_errors=True)
                _, wall, _ = run_measured([*BUILD, "--output", str(out), *extra])
                walls[side].append(round(wall, 2))
        load = os.getloadavg()[0]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(folder, ignore_errors=True)
    result = {side: {"median_s": statistics.median(w), "runs_s": w} for side, w in walls.items()}
    data = REPO / "bench" / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "portable.json").write_text(json.dumps({"rounds": args.rounds, "load_after": load, **result}, indent=2))
    print(f"portable: samples/text/* (cl100k), {args.rounds} rounds, whole processes (load average {load:.1f}):")
    base = result["local FnApiRunner (default)"]["median_s"]
    for side, r in result.items():
        print(f"  {side:38s} median {r['median_s']:6.2f} s  ({r['median_s'] / base:.2f}x local)  runs {r['runs_s']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
