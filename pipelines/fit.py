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
import sys
import time
from typing import Any, Iterator, Sequence

import apache_beam as beam
import numpy as np

from tokenmill.pipelines import runners
from tokenmill.pipelines.build import check_inputs
from tokenmill.pipelines.cli_errors import OneLineArgumentParser, UsageError, usage_errors
from tokenmill.schemas.storage import write_bytes_atomic
from tokenmill.transforms import fs
from tokenmill.transforms.decoders.images import DEFAULT_MAX_PIXELS, DecodeImages, SizePolicy
from tokenmill.transforms.decoders.video import DECODERS, ClipSpec, DecodeVideos
from tokenmill.transforms.records import ImageBlock, VideoBlock, row_id
from tokenmill.transforms.sources.images import ReadImageShards
from tokenmill.transforms.sources.videos import ReadVideoShards
from tokenmill.transforms.tokenizers.codebook import psnr, save_npz, to_unit
from tokenmill.transforms.tokenizers.patches import clip_to_patches, image_to_patches


def _unit_hash(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest(), "big")


class _SamplePatches(beam.DoFn):
    """Per image or clip: `per_image` random patches (seeded by its id), or the whole of it if held out."""

    def __init__(self, patch: int, per_image: int, holdout: float, seed: int, frames: int = 0):
        self._patch, self._per_image, self._holdout, self._seed = patch, per_image, holdout, seed
        self._frames = frames

    def process(self, block: ImageBlock | VideoBlock) -> Iterator[Any]:
        items = block.clips if isinstance(block, VideoBlock) else block.images
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
            yield key, patches[np.sort(take)]


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
                   *, kind: str, patch: int, size: int, output: str, iterations: int, seed: int,
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
              "psnr": scores, "iterations": iterations if kind == "vq" else None, "seed": seed}
    write_bytes_atomic(output + ".json", (json.dumps(report, indent=2) + "\n").encode())
    return report


def make_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog="tokenmill fit", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=("vq", "pca"), required=True, help="vq: k-means codebook; pca: linear bottleneck")
    p.add_argument("--input", action="append", required=True, metavar="GLOB", help="image shards (repeatable)")
    p.add_argument("--output", required=True, metavar="PATH", help="where to write the .npz (and PATH.json)")
    p.add_argument("--patch", type=int, default=16, help="patch size P (default 16)")
    p.add_argument("--codes", type=int, default=1024, help="vq: number of codes K (default 1024)")
    p.add_argument("--dim", type=int, default=16, help="pca: latent dimension d (default 16)")
    p.add_argument("--size", default="native:1024", metavar="POLICY", help="image size policy, as for build")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    p.add_argument("--samples-per-image", type=int, default=64)
    p.add_argument("--max-samples", type=int, default=200_000, help="patches used for the fit at most")
    p.add_argument("--holdout", type=float, default=0.1, help="share of images held out for the PSNR report")
    p.add_argument("--holdout-images", type=int, default=32, help="held-out images scored at most")
    p.add_argument("--iterations", type=int, default=20, help="vq: k-means iterations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-field", default="image")
    v = p.add_argument_group("video")
    v.add_argument("--modality", choices=("auto", "image", "video"), default="auto",
                   help="auto: video when the inputs are video files (.mp4, .webm, .mkv, .mov, .avi)")
    v.add_argument("--frames", type=int, default=2, help="video: frames per spacetime patch T (default 2)")
    v.add_argument("--clip-frames", type=int, default=16, help="video: frames per clip (default 16)")
    v.add_argument("--fps", type=float, help="video: sample clips at this rate (default: source frames)")
    v.add_argument("--max-clips", type=int, help="video: clips per video at most (default: all)")
    v.add_argument("--decoder", choices=DECODERS, default="decord")
    return p


def build_pipeline(args: argparse.Namespace, options) -> beam.Pipeline:
    p = beam.Pipeline(runner=runners.make_runner(options), options=options)
    frames = args.frames if args.modality == "video" else 0
    if frames:
        read = p | "ReadVideoShards" >> ReadVideoShards(args.input)
        spec = ClipSpec(frames=args.clip_frames, fps=args.fps, max_clips=args.max_clips)
        decoded, _ = read["blocks"] | "DecodeVideos" >> DecodeVideos(spec, args.size, decoder=args.decoder)
    else:
        read = p | "ReadImageShards" >> ReadImageShards(args.input, image_field=args.image_field)
        decoded, _ = read["blocks"] | "DecodeImages" >> DecodeImages(args.size, args.max_pixels,
                                                                      runners.cores_per_worker(options))
    sampled = decoded | "SamplePatches" >> beam.ParDo(
        _SamplePatches(args.patch, args.samples_per_image, args.holdout, args.seed, frames)).with_outputs(
        "holdout", main="train")
    holdout = sampled.holdout | "GatherHoldout" >> beam.combiners.ToList()
    size = args.codes if args.kind == "vq" else args.dim
    _ = (sampled.train
         | "GatherSamples" >> beam.combiners.ToList()
         | "FitAndWrite" >> beam.Map(_fit_and_write, holdout=beam.pvalue.AsSingleton(holdout), kind=args.kind,
                                     patch=args.patch, size=size, output=args.output, iterations=args.iterations,
                                     seed=args.seed, max_samples=args.max_samples,
                                     holdout_images=args.holdout_images, frames=frames))
    return p


def make_pipeline(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, beam.Pipeline, str]:
    """Parse and check the command line and build the un-run graph: (args, pipeline, runner description).

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
    uris = [f.uri for f in check_inputs(args.input)] if runners.runs_locally(options) else []
    if args.modality == "auto":
        from tokenmill.transforms.registry import modality_of_files

        args.modality = "video" if modality_of_files(uris) == "video" else "image"
    if args.modality == "video" and not (1 <= args.frames <= args.clip_frames):
        raise UsageError("need 1 <= --frames <= --clip-frames")
    args.output = fs.canonical(args.output)
    return args, build_pipeline(args, options), runner


def run(argv: Sequence[str] | None = None) -> int:
    with usage_errors("tokenmill fit"):
        args, pipeline, runner = make_pipeline(argv)
    print(f"tokenmill fit: runner {runner}", file=sys.stderr)
    start = time.perf_counter()
    outcome = runners.execute(pipeline, "tokenmill fit")
    if outcome.result is None:
        return outcome.code
    from tokenmill.schemas.storage import read_bytes

    report = json.loads(read_bytes(args.output + ".json"))
    print(f"tokenmill fit: {args.kind} written to {args.output} in {time.perf_counter() - start:.1f} s\n"
          f"  spec:        {report['spec']} (fingerprint {report['fingerprint'][:12]})\n"
          f"  trained on:  {report['train_patches']} patches from {report['train_images']} images\n"
          f"  held out:    {report['holdout_images']} images, reconstruction PSNR "
          f"{report['psnr_mean'] if report['psnr_mean'] is None else round(report['psnr_mean'], 2)} dB\n"
          f"  report:      {args.output}.json")
    return 0


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
