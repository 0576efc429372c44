"""`tokenmill fit`: fit a patch codebook (k-means) or a PCA bottleneck on the user's images or videos.

    read → decode → sample patches (held-out images aside) → gather → fit → write + report

Writes PATH (an .npz that `vq:PATH` / `pca:PATH` load) and PATH.json, a report
with the tokenizer's fingerprint and the reconstruction PSNR on held-out images.
Videos (by file name, or --modality video) are cut into clips as for build, and
the samples are T x P x P spacetime patches (--frames T); a clip is held out whole.
Sampling is seeded per image from its id, and samples are sorted before
fitting, so the same inputs give the same file with any number of workers.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from typing import Any, Iterator, Sequence

import apache_beam as beam
import numpy as np

from tokenmill.pipelines import runners
from tokenmill.pipelines.build import check_inputs
from tokenmill.pipelines.cli_errors import OneLineArgumentParser, UsageError, usage_errors
from tokenmill.pipelines.progress import MODES, BuildProgress
from tokenmill.schemas.storage import join, write_bytes_atomic
from tokenmill.transforms import fs
from tokenmill.transforms.decoders.images import DEFAULT_MAX_PIXELS, DecodeImages, SizePolicy
from tokenmill.transforms.decoders.video import DECODERS, ClipSpec, DecodeVideos
from tokenmill.transforms.records import ErrorRecord, ImageBlock, VideoBlock, row_id
from tokenmill.transforms.sources.images import ReadImageShards
from tokenmill.transforms.sources.videos import ReadVideoShards
from tokenmill.transforms.tokenizers.codebook import psnr, save_npz, to_unit
from tokenmill.transforms.tokenizers.patches import clip_to_patches, image_to_patches
from tokenmill.transforms.write import PROGRESS_DIR, error_to_block, failed_to_block, shard_name


def _unit_hash(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest(), "big")


class _SamplePatches(beam.DoFn):
    """Per image or clip: `per_image` random patches (seeded by its id), or the whole of it if held out.

    The records a block could not decode go out as "skipped" (the fit's report counts them by reason). With a
    progress folder (local runners), each block leaves a progress record there, as a build's writer does.
    """

    def __init__(self, patch: int, per_image: int, holdout: float, seed: int, frames: int = 0,
                 progress_root: str | None = None):
        self._patch, self._per_image, self._holdout, self._seed = patch, per_image, holdout, seed
        self._frames, self._progress_root = frames, progress_root

    def process(self, block: ImageBlock | VideoBlock) -> Iterator[Any]:
        items = block.clips if isinstance(block, VideoBlock) else block.images
        sampled = 0
        for src, loc, image in zip(block.sources, block.locators, items):
            key = row_id(src, loc)
            h = _unit_hash(self._seed, key)
            if (h % 10_000) < self._holdout * 10_000:
                yield beam.pvalue.TaggedOutput("holdout", (key, image))
                continue
            patches, _ = (clip_to_patches(image, self._frames, self._patch) if self._frames else
                          image_to_patches(image, self._patch))
            rng = np.random.default_rng(h)
            take = rng.choice(len(patches), size=min(self._per_image, len(patches)), replace=False)
            sampled += len(take)
            yield key, patches[np.sort(take)]
        for error in block.errors:
            yield beam.pvalue.TaggedOutput("skipped", error)
        if self._progress_root:
            sources = list(dict.fromkeys([block.source, *block.sources, *(e.source for e in block.errors)]))
            write_fit_progress(self._progress_root, "data", block.source, block.block, rows=len(items),
                               tokens=sampled, errors=len(block.errors), input_bytes=block.nbytes, sources=sources)


def write_fit_progress(root: str, kind: str, source: str, block: int, **record: Any) -> None:
    """One progress record (pipelines/progress.py reads them) for a block the fit sampled or skipped;
    not fsynced, like a build's (transforms/write.write_progress)."""
    write_bytes_atomic(join(root, PROGRESS_DIR, f"{kind}-{shard_name(source, block)}.json"),
                       json.dumps({"source": source, "block": block, **record}).encode(), durable=False)


def _progress_of_failures(block: Any, root: str) -> Any:
    write_fit_progress(root, "errors", block.source, block.block, rows=0, tokens=0, errors=len(block.errors),
                       input_bytes=block.nbytes, sources=list(dict.fromkeys(e.source for e in block.errors)))
    return block


def _skipped_records(blocks: Any) -> Iterator[ErrorRecord]:
    """The error records of a dead-letter or listing-error block."""
    yield from blocks.errors


def skipped_summary(errors: list[ErrorRecord], examples: int = 5) -> dict[str, Any]:
    """What the fit skipped: how many records, by stage and error type, with a few examples."""
    by_reason: dict[str, int] = {}
    for e in errors:
        reason = f"{e.stage}: {e.error_type}"
        by_reason[reason] = by_reason.get(reason, 0) + 1
    ordered = sorted(errors, key=lambda e: (e.source, e.locator))
    return {"skipped": len(errors), "skipped_by_reason": dict(sorted(by_reason.items(), key=lambda kv: -kv[1])),
            "skipped_examples": [{"source": e.source, "locator": e.locator, "stage": e.stage,
                                  "error": f"{e.error_type}: {e.message}"[:300]} for e in ordered[:examples]]}


def fit_kmeans(data: np.ndarray, k: int, iterations: int, seed: int) -> np.ndarray:
    """k-means++ then Lloyd iterations (scipy.cluster.vq.kmeans2), on [-1, 1] patch vectors."""
    from scipy.cluster.vq import kmeans2

    if len(data) < k:
        raise ValueError(f"{len(data)} sampled patches cannot fit {k} codes; add images or --samples-per-image")
    codes, _ = kmeans2(data, k, iter=iterations, minit="++", seed=np.random.default_rng(seed))
    return codes.astype(np.float32)


def fit_pca(data: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and the top `dim` principal directions (rows), signs fixed for determinism."""
    if dim > data.shape[1]:
        raise ValueError(f"--dim {dim} is more than the {data.shape[1]} values of a patch")
    mean = data.mean(0)
    _, _, vt = np.linalg.svd(data - mean, full_matrices=False)
    comps = vt[:dim]
    signs = np.sign(comps[np.arange(dim), np.abs(comps).argmax(1)])
    return mean.astype(np.float32), (comps * signs[:, None]).astype(np.float32)


def _fit_and_write(samples: list[tuple[str, np.ndarray]], holdout: list[tuple[str, np.ndarray]],
                   skipped: list[ErrorRecord], *, kind: str, patch: int, size: int, output: str, iterations: int, seed: int,
                   max_samples: int, holdout_images: int, frames: int = 0) -> dict[str, Any]:
    from tokenmill.transforms.tokenizers.codebook import PCATokenizer, VideoPCATokenizer, VideoVQTokenizer, VQTokenizer

    samples = sorted(samples, key=lambda kv: kv[0])
    values = (frames or 1) * patch * patch * 3
    data = to_unit(np.concatenate([p for _, p in samples])) if samples else np.zeros((0, values))
    if len(data) > max_samples:  # a deterministic subset
        data = data[np.sort(np.random.default_rng(seed).choice(len(data), max_samples, replace=False))]
    shape = {"patch": np.array(patch), **({"frames": np.array(frames)} if frames else {})}
    if kind == "vq":
        arrays = {"kind": np.array("vq"), **shape, "codes": fit_kmeans(data, size, iterations, seed)}
    else:
        mean, comps = fit_pca(data, size)
        arrays = {"kind": np.array("pca"), **shape, "mean": mean, "components": comps}
    write_bytes_atomic(output, save_npz(arrays))
    classes = {"vq": (VQTokenizer, VideoVQTokenizer), "pca": (PCATokenizer, VideoPCATokenizer)}[kind]
    tok = classes[bool(frames)](f"{kind}:{output}", output)
    scores = []
    for key, array in sorted(holdout, key=lambda kv: kv[0])[:holdout_images]:
        tokens, grid = tok.encode_array(array)
        # JSON has no infinity: a lossless reconstruction is reported as 100 dB.
        scores.append({"id": key, "psnr": min(100.0, psnr(tok.decode_array(tokens, grid, array.shape[:-1]), array))})
    report = {"kind": kind, "spec": f"{kind}:{output}", "fingerprint": tok.fingerprint(), "patch": patch,
              "frames": frames or None,
              ("codes" if kind == "vq" else "dim"): size, "train_patches": int(len(data)),
              "train_images": len(samples), "holdout_images": len(scores),
              "psnr_mean": float(np.mean([s["psnr"] for s in scores])) if scores else None,
              "psnr": scores, "iterations": iterations if kind == "vq" else None, "seed": seed,
              **skipped_summary(skipped)}
    write_bytes_atomic(output + ".json", (json.dumps(report, indent=2) + "\n").encode())
    return report


def make_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog="tokenmill fit", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=("vq", "pca"), required=True, help="vq: k-means codebook; pca: linear bottleneck")
    p.add_argument("--input", action="append", required=True, metavar="GLOB", help="image shards (repeatable)")
    p.add_argument("--output", required=True, metavar="PATH", help="where to write the .npz (and PATH.json)")
    p.add_argument("--patch", type=int, default=16, help="patch size P (default: 16)")
    p.add_argument("--codes", type=int, default=1024, help="vq: number of codes K (default: 1024)")
    p.add_argument("--dim", type=int, default=16, help="pca: latent dimension d (default: 16)")
    p.add_argument("--size", default="native:1024", metavar="POLICY",
                   help="image size policy, as for build (default: native:1024)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"images with more pixels are skipped before decoding (default: {DEFAULT_MAX_PIXELS})")
    p.add_argument("--samples-per-image", type=int, default=64,
                   help="random patches taken from each training image (default: 64)")
    p.add_argument("--max-samples", type=int, default=200_000,
                   help="patches used for the fit at most, a seeded subset (default: 200000)")
    p.add_argument("--holdout", type=float, default=0.1,
                   help="share of images held out for the PSNR report (default: 0.1)")
    p.add_argument("--holdout-images", type=int, default=32, help="held-out images scored at most (default: 32)")
    p.add_argument("--iterations", type=int, default=20, help="vq: k-means iterations (default: 20)")
    p.add_argument("--seed", type=int, default=0, help="seeds sampling, hold-out and k-means (default: 0)")
    p.add_argument("--image-field", default="image",
                   help="Parquet column with the image bytes (default: image)")
    p.add_argument("--progress", choices=MODES, default="auto",
                   help="auto: a bar on a terminal, a line every --progress-every seconds otherwise (default: auto)")
    p.add_argument("--progress-every", type=float, default=10.0, metavar="SECONDS",
                   help="seconds between progress lines in log mode (default: 10)")
    v = p.add_argument_group("video")
    v.add_argument("--modality", choices=("auto", "image", "video"), default="auto",
                   help="auto: video when the inputs are video files (.mp4, .webm, .mkv, .mov, .avi) (default: auto)")
    v.add_argument("--frames", type=int, default=2, help="video: frames per spacetime patch T (default: 2)")
    v.add_argument("--clip-frames", type=int, default=16, help="video: frames per clip (default: 16)")
    v.add_argument("--fps", type=float, help="video: sample clips at this rate (default: the source's frames)")
    v.add_argument("--max-clips", type=int, help="video: clips per video at most (default: all)")
    v.add_argument("--decoder", choices=DECODERS, default="decord", help="video decoder (default: decord)")
    return p


class GatherSkipped(beam.PTransform):
    """(read failures, decode failures, listing errors, records a block could not decode) → one list of every
    ErrorRecord, for the report: what a build would write as error rows. Leaves progress records if asked."""

    def __init__(self, progress_root: str | None = None):
        super().__init__()
        self._progress_root = progress_root

    def expand(self, inputs):
        read_failed, decode_failed, listing_errors, undecoded = inputs
        blocks = ((read_failed | "ReadFailuresAsErrors" >> beam.Map(failed_to_block, "read")),
                  (decode_failed | "DecodeFailuresAsErrors" >> beam.Map(failed_to_block, "decode")),
                  (listing_errors | "ListingErrorsAsBlocks" >> beam.Map(error_to_block))) | "Join" >> beam.Flatten()
        if self._progress_root:
            blocks = blocks | "ShowInProgress" >> beam.Map(_progress_of_failures, self._progress_root)
        records = blocks | "AsRecords" >> beam.FlatMap(_skipped_records)
        return (records, undecoded) | "JoinRecords" >> beam.Flatten() | "ToList" >> beam.combiners.ToList()


def build_pipeline(args: argparse.Namespace, options, progress_root: str | None = None) -> beam.Pipeline:
    p = beam.Pipeline(runner=runners.make_runner(options), options=options)
    frames = args.frames if args.modality == "video" else 0
    if frames:
        read = p | "ReadVideoShards" >> ReadVideoShards(args.input)
        spec = ClipSpec(frames=args.clip_frames, fps=args.fps, max_clips=args.max_clips)
        decoded, decode_failed = read["blocks"] | "DecodeVideos" >> DecodeVideos(spec, args.size,
                                                                                  decoder=args.decoder)
    else:
        read = p | "ReadImageShards" >> ReadImageShards(args.input, image_field=args.image_field)
        decoded, decode_failed = read["blocks"] | "DecodeImages" >> DecodeImages(
            args.size, args.max_pixels, runners.cores_per_worker(options))
    sampled = decoded | "SamplePatches" >> beam.ParDo(
        _SamplePatches(args.patch, args.samples_per_image, args.holdout, args.seed, frames, progress_root)
    ).with_outputs("holdout", "skipped", main="train")
    skipped = ((read["failed"], decode_failed, read["errors"], sampled.skipped)
               | "GatherSkipped" >> GatherSkipped(progress_root))
    holdout = sampled.holdout | "GatherHoldout" >> beam.combiners.ToList()
    size = args.codes if args.kind == "vq" else args.dim
    _ = (sampled.train
         | "GatherSamples" >> beam.combiners.ToList()
         | "FitAndWrite" >> beam.Map(_fit_and_write, holdout=beam.pvalue.AsSingleton(holdout),
                                     skipped=beam.pvalue.AsSingleton(skipped), kind=args.kind,
                                     patch=args.patch, size=size, output=args.output, iterations=args.iterations,
                                     seed=args.seed, max_samples=args.max_samples,
                                     holdout_images=args.holdout_images, frames=frames))
    return p


def make_pipeline(argv: Sequence[str] | None = None,
                  progress_root: str | None = None) -> tuple[argparse.Namespace, beam.Pipeline, str, dict[str, int]]:
    """Parse and check the command line and build the un-run graph: (args, pipeline, runner description, the
    inputs' sizes for the progress display; empty off a local runner).

    Inputs are checked only on a local runner (see pipelines/local.is_local_runner). Raises UsageError.
    """
    args, beam_args = make_parser().parse_known_args(argv)
    beam_args, runner = runners.local_defaults(beam_args)
    options = runners.pipeline_options(beam_args)
    runners.tune_local(options)
    try:
        SizePolicy.parse(args.size)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not 1 <= args.patch <= 256 or args.codes < 2 or args.dim < 1 or not 0 <= args.holdout < 1:
        raise UsageError("need 1 <= --patch <= 256, --codes >= 2, --dim >= 1, 0 <= --holdout < 1")
    if not args.progress_every > 0:
        raise UsageError(f"--progress-every must be a positive number of seconds, not {args.progress_every}")
    local = runners.runs_locally(options)
    files = check_inputs(args.input) if local else []
    if args.modality == "auto":
        from tokenmill.transforms.registry import modality_of_files

        args.modality = "video" if modality_of_files([f.uri for f in files]) == "video" else "image"
    if args.modality == "video" and not (1 <= args.frames <= args.clip_frames):
        raise UsageError("need 1 <= --frames <= --clip-frames")
    values = args.patch * args.patch * 3 * (args.frames if args.modality == "video" else 1)
    if args.kind == "pca" and args.dim > values:
        shape = f"{args.frames}x" * (args.modality == "video") + f"{args.patch}x{args.patch}"
        raise UsageError(f"--dim {args.dim} is more than the {values} values of a {shape} patch")
    if local:
        _check_output_path(args.output)
    args.output = fs.canonical(args.output)
    progress = progress_root if local and args.progress != "none" else None
    return args, build_pipeline(args, options, progress), runner, {f.uri: f.size for f in files}


def _check_output_path(output: str) -> None:
    """A local --output that cannot be written is misuse, found before the fit runs (not after)."""
    import os

    if "://" in output:
        return
    if os.path.isdir(output):
        raise UsageError(f"--output {output} is a folder; name the .npz file to write")
    parent = os.path.dirname(os.path.abspath(output))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"cannot write --output {output}: {parent} is a file")


def run(argv: Sequence[str] | None = None) -> int:
    # Progress records go to a folder of their own (a fit has no dataset folder), removed when the fit ends.
    progress_root = tempfile.mkdtemp(prefix="tokenmill-fit-progress-")
    try:
        with usage_errors("tokenmill fit"):
            args, pipeline, runner, sizes = make_pipeline(argv, progress_root)
        print(f"tokenmill fit: runner {runner}", file=sys.stderr)
        start = time.perf_counter()
        progress = BuildProgress(progress_root, sizes, mode=args.progress, every=args.progress_every,
                                 prog="tokenmill fit") if sizes else None
        outcome = runners.execute(pipeline, "tokenmill fit", progress)
    finally:
        shutil.rmtree(progress_root, ignore_errors=True)
    if outcome.result is None:
        return outcome.code
    from tokenmill.schemas.storage import read_bytes

    report = json.loads(read_bytes(args.output + ".json"))
    reasons = ", ".join(f"{n} {reason}" for reason, n in report["skipped_by_reason"].items())
    print(f"tokenmill fit: {args.kind} written to {args.output} in {time.perf_counter() - start:.1f} s\n"
          f"  spec:        {report['spec']} (fingerprint {report['fingerprint'][:12]})\n"
          f"  trained on:  {report['train_patches']} patches from {report['train_images']} images\n"
          f"  held out:    {report['holdout_images']} images, reconstruction PSNR "
          f"{report['psnr_mean'] if report['psnr_mean'] is None else round(report['psnr_mean'], 2)} dB\n"
          f"  skipped:     {report['skipped']} inputs" + (f" ({reasons}; examples in the report)" if reasons else "")
          + f"\n  report:      {args.output}.json")
    return 0


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
