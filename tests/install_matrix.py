"""The install matrix: tokenmill's wheel installed by pip into fresh virtual environments, once with no extras and
once per extra, and that extra's feature run there (outside the source tree, as a user's project would).

A feature that works in the development venv can still fail in a plain install: a dependency used but not
declared (pandas once turned every record into an error row), or an extra that forgets one. Each venv holds
what `pip install 'tokenmill[EXTRA]'` puts there and nothing else:

- `base`: the wheel alone, with its declared dependencies (requirements/constraints.txt pins the versions).
- each extra: a new venv with `tokenmill[EXTRA]` and nothing else.

uv does the installs, from one cache, in parallel: a venv costs seconds (see uv()). tests/test_install.py
covers the wheel installed by pip itself. `./run_local.sh test` starts this in the
background before pytest (`python -m tests.install_matrix --out FILE`) and tests/test_install_matrix.py reads
FILE; run alone, that test runs the matrix itself.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / "requirements" / "constraints.txt"
ONE_WORKER = ["--runner=FnApiRunner", "--direct_num_workers=1", "--direct_running_mode=in_memory"]
# Extras of setup.py that are not features of their own: what the tests and benchmarks use.
NOT_FEATURES = {"test", "bench"}
INSTALL_TIMEOUT = 900
CHECK_TIMEOUT = 300


class CheckFailed(Exception):
    pass


class Venv:
    """A fresh venv, and commands run in it from a work folder outside the repository."""

    def __init__(self, root: Path, work: Path, env: dict[str, str]):
        self.root, self.work, self.env = root, work, env
        self.python = root / "bin" / "python"
        self.tokenmill = root / "bin" / "tokenmill"  # the console script pip or uv wrote

    def run(self, *args: str, expect: int | None = 0, timeout: float = CHECK_TIMEOUT,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(a) for a in args], cwd=self.work, capture_output=True, text=True, timeout=timeout,
                              env={**self.env, **(env or {})})
        if expect is not None and proc.returncode != expect:
            raise CheckFailed(f"{' '.join(map(str, args))[:300]}: exit {proc.returncode} (want {expect})\n"
                              f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        return proc

    def py(self, code: str, **kw) -> str:
        return self.run(self.python, "-c", textwrap.dedent(code), **kw).stdout

    def build(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.run(self.tokenmill, "build", "--progress", "none", *args, **kw)


def clean_env() -> dict[str, str]:
    """The environment without this venv's traces: PATH without its bin, no PYTHONPATH, no TOKENMILL_*."""
    here = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p != here)
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("TOKENMILL_")}
    return {**env, "PATH": path, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def build_wheel(out: Path) -> Path:
    """The wheel of the checkout's files (a copy: setuptools leaves build/ behind in the tree it builds)."""
    src = out / "src"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(out / "wheel"), str(src)], check=True, capture_output=True, timeout=300)
    shutil.rmtree(src)
    return next((out / "wheel").glob("tokenmill-*.whl"))


def uv() -> list[str]:
    """uv, from tokenmill[test]: it installs from one shared cache, so a venv per extra costs seconds, not minutes
    (pip took 45 to 100 s for the base install alone here, and keeps no cache of this registry's files)."""
    return [sys.executable, "-m", "uv"]


def constraints_for_uv(work: Path) -> Path:
    """requirements/constraints.txt, with torch pinned to the local CPU build where one lies in pip's find-links.

    pip finds that file through its find-links and takes it for `torch==2.13.0`; uv would take the CUDA build of
    the same version from the registry (gigabytes), so it is named exactly (a local version, +cpu)."""
    text = CONSTRAINTS.read_text()
    for folder in _find_links():
        for wheel in Path(folder).glob("torch-*+cpu-*.whl"):
            version = wheel.name.split("-")[1]
            text = "\n".join(f"torch=={version}" if ln == f"torch=={version.split('+')[0]}" else ln
                             for ln in text.splitlines()) + "\n"
    out = work / "constraints.txt"
    out.write_text(text)
    return out


def _find_links() -> list[str]:
    folders = os.environ.get("PIP_FIND_LINKS", "").split()
    proc = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.find-links"], capture_output=True,
                          text=True)
    folders += proc.stdout.split() if proc.returncode == 0 else []
    return [f for f in dict.fromkeys(folders) if Path(f).is_dir()]


def make_venv(root: Path, env: dict[str, str]) -> None:
    base = getattr(sys, "_base_executable", sys.executable)  # the interpreter, not this venv's
    subprocess.run([*uv(), "venv", "-q", "-p", base, str(root)], check=True, capture_output=True, timeout=300,
                   env=env)


def install(root: Path, requirement: str, constraints: Path, env: dict[str, str]) -> None:
    links = [a for f in _find_links() for a in ("--find-links", f)]
    proc = subprocess.run([*uv(), "pip", "install", "-q", "-p", str(root / "bin" / "python"), "-c", str(constraints),
                           *links, requirement], capture_output=True, text=True, timeout=INSTALL_TIMEOUT, env=env)
    if proc.returncode != 0:
        raise CheckFailed(f"install of {requirement} failed:\n" + proc.stderr[-4000:])


# -- one feature check per extra -------------------------------------------------------------------------------

DOCS = [{"text": "hello world"}, {"text": ".DefaultCellStyle"}, {"text": ""}]


def _docs(v: Venv) -> Path:
    path = v.work / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    return path


def _ids(v: Venv, root: str, **env) -> list[list[int]]:
    """Token IDs of a dataset, by id, read with the training reader in the venv."""
    out = v.py(f"""
        import json
        from tokenmill import TokenReader
        rows = sorted(TokenReader({root!r}, shuffle=False, fields=["id"]), key=lambda r: r["id"])
        print(json.dumps([r["tokens"].tolist() for r in rows]))
        """, env=env)
    return json.loads(out)


def _expect(what: str, got, want) -> None:
    if got != want:
        raise CheckFailed(f"{what}: got {got!r}, want {want!r}")


def check_base(v: Venv) -> str:
    docs = _docs(v)
    v.build("--input", docs, "--output", "cl100k", "--tokenizer", "tiktoken:cl100k_base", "--eos", *ONE_WORKER)
    got = sorted(_ids(v, "cl100k"))
    _expect("cl100k rows", got, sorted([[15339, 1917, 100257], [98518, 100257], [100257]]))
    v.build("--input", docs, "--output", "bytes", "--tokenizer", "bytes", *ONE_WORKER)
    _expect("bytes rows", sorted(_ids(v, "bytes")), sorted([list(d["text"].encode()) for d in DOCS]))
    v.run(v.tokenmill, "validate", "cl100k")
    # A tokenizer whose extra is missing is one line naming the extra, and commits nothing.
    proc = v.build("--input", docs, "--output", "nothing", "--tokenizer", "hf:tok.json", *ONE_WORKER, expect=None)
    last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    if proc.returncode not in (1, 2) or "tokenmill[hf]" not in last or "Traceback" in proc.stderr:
        raise CheckFailed(f"hf: without its extra: exit {proc.returncode}, stderr:\n{proc.stderr[-2000:]}")
    if (v.work / "nothing" / "_manifest.json").exists():
        raise CheckFailed("a build that failed for a missing extra committed a manifest")
    return "cl100k and bytes rows exact; hf: without the extra is one line naming tokenmill[hf]"


def check_hf(v: Venv) -> str:
    docs = _docs(v)
    v.py("""
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.train_from_iterator(["hello world", "DefaultCellStyle hello"] * 50,
                                trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]", "</s>"],
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tok.save("tok.json")
        """)
    v.build("--input", docs, "--output", "hf", "--tokenizer", "hf:tok.json", *ONE_WORKER)
    want = json.loads(v.py("""
        import json
        from transformers import PreTrainedTokenizerFast
        t = PreTrainedTokenizerFast(tokenizer_file="tok.json")
        print(json.dumps([t(x, add_special_tokens=False)["input_ids"]
                          for x in ["hello world", ".DefaultCellStyle", ""]]))
        """))
    _expect("hf: rows", sorted(_ids(v, "hf")), sorted(want))
    return "hf:tokenizer.json rows equal transformers' input_ids"


def check_sentencepiece(v: Venv) -> str:
    docs = _docs(v)
    want = json.loads(v.py("""
        import json, sentencepiece as spm
        lines = ["hello world", "DefaultCellStyle hello", "the quick brown fox"] * 200
        open("c.txt", "w").write("\\n".join(lines))
        spm.SentencePieceTrainer.train(input="c.txt", model_prefix="sp", vocab_size=400, model_type="bpe",
                                       hard_vocab_limit=False, byte_fallback=True, minloglevel=2)
        sp = spm.SentencePieceProcessor(model_file="sp.model")
        print(json.dumps([sp.encode(x) for x in ["hello world", ".DefaultCellStyle", ""]]))
        """))
    v.build("--input", docs, "--output", "sp", "--tokenizer", "sentencepiece:sp.model", *ONE_WORKER)
    _expect("sentencepiece: rows", sorted(_ids(v, "sp")), sorted(want))
    return "sentencepiece: rows equal SentencePieceProcessor.encode"


def check_fast(v: Venv) -> str:
    docs = _docs(v)
    v.build("--input", docs, "--output", "fast", "--tokenizer", "tiktoken:cl100k_base", "--engine", "bpe-openai",
            *ONE_WORKER)
    _expect("bpe-openai rows", sorted(_ids(v, "fast")), sorted([[15339, 1917], [98518], []]))
    return "cl100k through bpe-openai gives tiktoken's IDs"


def _images(v: Venv) -> Path:
    v.py("""
        import numpy as np, os
        from PIL import Image
        os.makedirs("images", exist_ok=True)
        rng = np.random.default_rng(0)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(f"images/im{i}.png")
        """)
    return v.work / "images"


def check_fit(v: Venv) -> str:
    images = _images(v)
    v.run(v.tokenmill, "fit", "--kind", "vq", "--input", f"{images}/*.png", "--output", "vq.npz", "--patch", "8",
          "--codes", "16", *ONE_WORKER)
    v.build("--input", f"{images}/*.png", "--output", "vq", "--tokenizer", "vq:vq.npz", *ONE_WORKER)
    rows = v.py("""
        from tokenmill import read_manifest
        m = read_manifest("vq"); print(m.rows, m.tokens)
        """).split()
    _expect("vq rows and tokens", rows, ["6", str(6 * 4 * 6)])
    return "fit --kind vq, then a vq: build of 6 images (24 codes each)"


def check_diffusers(v: Venv) -> str:
    images = _images(v)
    want = json.loads(v.py("""
        import glob, json, numpy as np, torch
        from PIL import Image
        from diffusers import AutoencoderKL
        torch.manual_seed(0)
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                            up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
                            latent_channels=4, norm_num_groups=4, sample_size=32)
        vae.save_pretrained("vae")
        x = np.asarray(Image.open(sorted(glob.glob("images/*.png"))[0]).convert("RGB"), np.float32)
        x = np.pad(x, ((0, -x.shape[0] % 2), (0, -x.shape[1] % 2), (0, 0)), mode="edge")  # f = 2
        with torch.inference_mode():
            mean = vae.encode(torch.from_numpy(x).permute(2, 0, 1)[None] / 127.5 - 1).latent_dist.mean[0]
        print(json.dumps(mean.reshape(4, -1).T.tolist()))
        """))
    v.build("--input", f"{images}/*.png", "--output", "kl", "--tokenizer", "diffusers:vae", *ONE_WORKER)
    got = json.loads(v.py("""
        import glob, json, numpy as np
        from tokenmill import TokenReader
        from tokenmill.transforms.records import row_id
        first = row_id(sorted(glob.glob(__import__("os").path.abspath("images") + "/*.png"))[0], "file")
        row = next(r for r in TokenReader("kl", shuffle=False, fields=["id"]) if r["id"] == first)
        print(json.dumps(np.asarray(row["latents"], np.float32).tolist()))
        """))
    if len(got) != len(want) or max(abs(a - b) for g, w in zip(got, want) for a, b in zip(g, w)) > 1e-4:
        raise CheckFailed(f"diffusers: latents differ from vae.encode's mean: {got[:2]} vs {want[:2]}")
    return "a diffusers: AutoencoderKL build whose latents equal vae.encode's mean"


def check_torch(v: Venv) -> str:
    docs = _docs(v)
    v.build("--input", docs, "--output", "ds", "--tokenizer", "bytes", *ONE_WORKER)
    got = json.loads(v.py("""
        import json, torch
        from torch.utils.data import DataLoader
        from tokenmill.loaders.torch_dataset import TorchTokenDataset
        ds = TorchTokenDataset("ds", shuffle=False, seq_len=8, remainder="pad", pad_id=0)
        print(json.dumps([b.tolist() for b in DataLoader(ds, batch_size=None, num_workers=1)]))
        """))
    # The reader packs the documents, each closed by bytes' EOS (256), into windows of seq_len + 1 that overlap by
    # one token (inputs and shifted targets), the last padded with pad_id.
    stream = [t for d in DOCS for t in (*d["text"].encode(), 256)]
    want = [(stream[i:i + 9] + [0] * 9)[:9] for i in range(0, len(stream) - 1, 8)]
    _expect("TorchTokenDataset windows through a DataLoader worker", got, want)
    return "TorchTokenDataset through a DataLoader worker yields every byte token"


def check_video(v: Venv) -> str:
    v.py("""
        import av, numpy as np
        with av.open("clip.mp4", "w") as c:
            s = c.add_stream("mpeg4", rate=10)
            s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
            for i in range(6):
                frame = np.full((32, 32, 3), 40 * i, np.uint8)
                for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)
        """)
    v.build("--input", "clip.mp4", "--output", "video", "--tokenizer", "patch:2,16", *ONE_WORKER)
    rows = v.py("""
        from tokenmill import TokenReader, read_manifest
        m = read_manifest("video"); r = next(iter(TokenReader("video", shuffle=False, fields=["grid"])))
        print(m.rows, m.errors, list(r["grid"]))
        """).strip()
    _expect("video rows, errors and grid", rows, "1 0 [3, 2, 2]")
    return "a 6-frame mpeg4 clip decoded and patched (grid 3x2x2)"


def check_report(v: Venv) -> str:
    docs = _docs(v)
    v.build("--input", docs, "--output", "ds", "--tokenizer", "tiktoken:cl100k_base", *ONE_WORKER)
    v.run(v.tokenmill, "report", "ds", "--out", "report")
    page = (v.work / "report" / "index.html").read_text()
    if "<img" not in page or "DefaultCellStyle" not in page:
        raise CheckFailed("report.html has no plot or no sample text")
    return "report writes a page with plots"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_aws(v: Venv) -> str:
    from moto.server import ThreadedMotoServer  # the orchestrator's moto (tokenmill[test]), on 127.0.0.1 only

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", "AWS_EC2_METADATA_DISABLED": "true",
               "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}
        v.py("import fsspec; fsspec.filesystem('s3').mkdir('bucket')", env=env)
        v.build("--input", _docs(v), "--output", "s3://bucket/ds", "--tokenizer", "bytes", *ONE_WORKER, env=env)
        v.run(v.tokenmill, "validate", "s3://bucket/ds", env=env)
        _expect("rows read back from S3", sorted(_ids(v, "s3://bucket/ds", **env)),
                sorted([list(d["text"].encode()) for d in DOCS]))
    finally:
        server.stop()
    return "a build to s3:// (moto on 127.0.0.1), validated and read back"


def check_gcp(v: Venv) -> str:
    proc = v.build("--input", "gs://my-bucket/raw/*.jsonl", "--output", "gs://my-bucket/tokens", "--tokenizer",
                   "bytes", "--runner=DataflowRunner", "--dry_run=True", "--no_auth", "--sdk_location=container",
                   "--project=my-project", "--region=us-central1", "--temp_location=gs://my-bucket/tmp")
    if "translated job (not submitted)" not in proc.stdout or "TokenizeText" not in proc.stdout:
        raise CheckFailed(f"the Dataflow dry run printed no translated job:\n{proc.stdout[-2000:]}")
    return "a Dataflow job translated offline (--dry_run)"


CHECKS: dict[str, Callable[[Venv], str]] = {
    "base": check_base, "hf": check_hf, "sentencepiece": check_sentencepiece, "fast": check_fast,
    "fit": check_fit, "torch": check_torch, "diffusers": check_diffusers, "video": check_video,
    "report": check_report, "aws": check_aws, "gcp": check_gcp,
}


def wheel_extras(wheel: Path) -> list[str]:
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    return [ln.split(":", 1)[1].strip() for ln in meta.splitlines() if ln.startswith("Provides-Extra:")]


def run_matrix(work: Path, jobs: int = 3, only: list[str] | None = None) -> dict[str, dict]:
    """Base and every extra installed into a venv of its own and checked; {name: {ok, install_s, check_s, what |
    error}}. An extra with no check fails: a new extra must say how its feature is proven here."""
    env = clean_env()
    wheel = build_wheel(work)
    constraints = constraints_for_uv(work)
    extras = [e for e in wheel_extras(wheel) if e not in NOT_FEATURES]
    names = ["base", *extras] if only is None else [n for n in ["base", *extras] if n == "base" or n in only]
    results: dict[str, dict] = {n: {"ok": False, "error": f"extra {n!r} has no check in tests/install_matrix.py"}
                                for n in names if n not in CHECKS}

    def one(name: str) -> dict:
        root = work / f"venv-{name}"
        start = time.monotonic()
        try:
            make_venv(root, env)
            install(root, str(wheel) if name == "base" else f"tokenmill[{name}] @ {wheel.as_uri()}", constraints,
                    env)
            installed = time.monotonic()
            folder = work / f"work-{name}"
            folder.mkdir()
            what = CHECKS[name](Venv(root, folder, env))
            return {"ok": True, "install_s": round(installed - start, 1),
                    "check_s": round(time.monotonic() - installed, 1), "what": what}
        except CheckFailed as e:
            return {"ok": False, "error": str(e), "s": round(time.monotonic() - start, 1)}
        except Exception:
            return {"ok": False, "error": traceback.format_exc(), "s": round(time.monotonic() - start, 1)}

    todo = [n for n in names if n in CHECKS]
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        for name, res in zip(todo, pool.map(one, todo), strict=True):
            results[name] = res
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results as JSON here (written last, atomically)")
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument("--only", help="comma-separated extras (base always runs)")
    parser.add_argument("--keep", action="store_true", help="keep the venvs (printed)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="tokenmill-install-matrix-"))
    start = time.monotonic()
    try:
        results = run_matrix(work, args.jobs, args.only.split(",") if args.only else None)
    except Exception:
        results = {"matrix": {"ok": False, "error": traceback.format_exc()}}
    finally:
        if args.keep:
            print(f"venvs kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    summary = {"seconds": round(time.monotonic() - start, 1), "results": results}
    text = json.dumps(summary, indent=1)
    if args.out:
        tmp = Path(args.out + ".tmp")
        tmp.write_text(text)
        tmp.replace(args.out)
    for name, r in results.items():
        print(f"{name:14} {'ok  ' if r['ok'] else 'FAIL'} {r.get('what') or r.get('error', '').splitlines()[0]}")
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
