"""Video: clip sampling, spacetime patches, codebooks and TorchScript encoders, bad files, a real build.

Every video is generated here with PyAV (libx264, vp9, mpeg4), small and short.
"""
from __future__ import annotations

import fractions
import io
import itertools
import json
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from tokenmill.schemas.manifest import read_manifest
from tests.conftest import ONE_WORKER, REPO, TWO_PROCESSES, read_errors, read_rows, run_build
from tokenmill.transforms.decoders.images import SizePolicy
from tokenmill.transforms.decoders.video import ClipSpec, decode_video_task, iter_clips, plan_clips
from tokenmill.transforms.records import VideoTask, row_id
from tokenmill.transforms.tokenizers.patches import Patches, VideoPatchTokenizer, clip_to_patches, patches_to_clip
from tokenmill.transforms.tokenizers.spec import load_video_tokenizer

NATIVE = SizePolicy.parse("native:1024")


def frame(i: int, w: int, h: int) -> np.ndarray:
    """A frame that differs from its neighbours: a moving bar over a colour ramp."""
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([(x * 255 // max(1, w - 1)), (y * 255 // max(1, h - 1)), np.full_like(x, (i * 37) % 256)], -1)
    a[:, (i * 3) % w] = 255
    return a.astype(np.uint8)


def encode_all(container, stream, frames) -> None:
    """Encode and mux every frame, then flush the encoder."""
    for f in itertools.chain(frames, [None]):
        for p in stream.encode(f):
            container.mux(p)


def timed(f: av.VideoFrame, pts_ms: int | None) -> av.VideoFrame:
    if pts_ms is not None:
        f.pts, f.time_base = pts_ms, fractions.Fraction(1, 1000)
    return f


def make_video(path: Path, codec: str = "libx264", n: int = 24, w: int = 64, h: int = 48,
               fps: int | fractions.Fraction = 25,
               pix: str = "yuv420p", pts_ms: list[int] | None = None, faststart: bool = False) -> Path:
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, pix
        if codec == "libx264":
            s.options = {"preset": "ultrafast"}
        if pts_ms is not None:
            s.time_base = fractions.Fraction(1, 1000)
        encode_all(c, s, (timed(av.VideoFrame.from_ndarray(frame(i, w, h), format="rgb24"),
                                pts_ms[i] if pts_ms else None) for i in range(n)))  # one frame at a time
    return path


def make_audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=16000)
        frames = [av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
                  for _ in range(10)]
        for i, fr in enumerate(frames):
            fr.sample_rate, fr.pts = 16000, i * 1024
        encode_all(c, s, frames)
    return path


def task(path: Path) -> VideoTask:
    return VideoTask(str(path), size=path.stat().st_size)


# -- clip sampling: a pure function ---------------------------------------------

def test_clips_take_every_source_frame_without_fps():
    ts = np.arange(10) / 25
    clips = plan_clips(ts, 10 / 25, ClipSpec(frames=4))
    assert [c.frame_indices for c in clips] == [(0, 1, 2, 3), (4, 5, 6, 7)]  # the partial tail is dropped
    assert [(c.start, c.end) for c in clips] == [(0.0, 0.16), (0.16, 0.32)]
    assert clips[0].fps == pytest.approx(25.0)


def test_clip_fps_is_the_containers_rational_rate_not_a_float_measure():
    ts = np.round(np.arange(48) * 1001 / 24000, 6)  # 23.976 fps, times rounded as a time base rounds them
    clips = plan_clips(ts, 48 * 1001 / 24000, ClipSpec(frames=16), nominal_rate=24000 / 1001)
    assert [c.fps for c in clips] == [24000 / 1001] * 3
    measured = plan_clips(ts, 48 * 1001 / 24000, ClipSpec(frames=16))[0].fps
    assert measured == round(measured, 6) and measured != 24000 / 1001
    # a variable-rate clip keeps its own rate
    assert plan_clips(np.arange(8) / 10, 0.8, ClipSpec(frames=8), nominal_rate=25.0)[0].fps == 10.0


def test_a_clip_of_no_duration_takes_the_containers_rate():
    """Repeated frame times (a damaged stream) make a one-frame clip end where it starts: its rate is the
    container's, not a ZeroDivisionError that lost the whole video."""
    clips = plan_clips([0.0, 0.04, 0.04, 0.08], 0.12, ClipSpec(frames=1), nominal_rate=25.0)
    assert [(c.start, c.end, c.fps) for c in clips] == [(0.0, 0.04, 25.0), (0.04, 0.04, 25.0), (0.04, 0.08, 25.0),
                                                       (0.08, 0.12, 25.0)]


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
@pytest.mark.parametrize("rate", [fractions.Fraction(24), fractions.Fraction(30000, 1001)])
def test_decoded_clips_carry_the_containers_rate_exactly(tmp_path, decoder, rate):
    path = make_video(tmp_path / "v.mp4", n=20, fps=rate)
    clips = [c for c in iter_clips(str(path), ClipSpec(frames=8), NATIVE, decoder=decoder)]
    assert len(clips) == 2 and all(c.plan.fps == float(rate) for c in clips), [getattr(c, "plan", c) for c in clips]


def test_clips_resample_to_target_fps_with_overlap():
    ts = np.arange(30) / 30  # 1 s at 30 fps
    clips = plan_clips(ts, 1.0, ClipSpec(frames=4, fps=10, stride=2))
    # sample k at k / 10 s is the last frame shown then: frame 3k
    assert [c.frame_indices for c in clips] == [(0, 3, 6, 9), (6, 9, 12, 15), (12, 15, 18, 21),
                                                (18, 21, 24, 27)]
    assert [c.start for c in clips] == pytest.approx([0.0, 0.2, 0.4, 0.6])
    assert [c.end for c in clips] == pytest.approx([0.4, 0.6, 0.8, 1.0])
    assert all(c.fps == 10 for c in clips)


def test_clips_honour_start_end_and_max_clips():
    ts = np.arange(100) / 10  # 10 s at 10 fps
    clips = plan_clips(ts, 10.0, ClipSpec(frames=5, start=2.0, end=6.0, max_clips=3))
    assert [c.frame_indices[0] for c in clips] == [20, 25, 30]
    assert clips[-1].end == pytest.approx(3.5)
    assert plan_clips(ts, 10.0, ClipSpec(frames=5, start=20.0)) == []


def test_short_video_gives_one_short_clip():
    clips = plan_clips([0.0], 0.04, ClipSpec(frames=16))
    assert [(c.frame_indices, c.start, c.end) for c in clips] == [((0,), 0.0, 0.04)]


def test_variable_frame_rate_is_sampled_by_time():
    ts = np.array([0, 40, 80, 200, 240, 500, 540, 580, 900, 940]) / 1000
    clips = plan_clips(ts, 0.98, ClipSpec(frames=10, fps=10))
    # at 0.0, 0.1, ..., 0.9 s: the frame shown at each time
    assert clips[0].frame_indices == (0, 2, 3, 4, 4, 5, 7, 7, 7, 8)


def test_decoded_clip_times_match_frame_indices(tmp_path):
    path = make_video(tmp_path / "v.mp4", n=30, fps=30)
    clips = list(iter_clips(str(path), ClipSpec(frames=5, fps=10), NATIVE))
    assert [c.plan.frame_indices for c in clips] == [(0, 3, 6, 9, 12), (15, 18, 21, 24, 27)]
    assert [c.plan.start for c in clips] == pytest.approx([0.0, 0.5])
    assert all(c.frames.shape == (5, 48, 64, 3) and c.decoder == "decord" for c in clips)


@pytest.mark.parametrize("codec,suffix", [("libx264", "mp4"), ("libvpx-vp9", "webm"), ("mpeg4", "avi")])
def test_decord_and_pyav_give_the_same_frames_and_indices(tmp_path, codec, suffix):
    path = make_video(tmp_path / f"v.{suffix}", codec=codec, n=12)
    spec = ClipSpec(frames=4, stride=3)
    a = list(iter_clips(str(path), spec, NATIVE, decoder="decord"))
    b = list(iter_clips(str(path), spec, NATIVE, decoder="pyav"))
    assert [c.plan for c in a] == [c.plan for c in b] and len(a) == 3
    assert [c.decoder for c in a + b] == ["decord"] * 3 + ["pyav"] * 3
    for x, y in zip(a, b):  # both are FFmpeg underneath; colour conversion may differ by a step
        assert np.abs(x.frames.astype(int) - y.frames.astype(int)).max() <= 3


# -- spacetime patches ----------------------------------------------------------

@pytest.mark.parametrize("shape,t,p", [((5, 17, 33, 3), 2, 8), ((4, 16, 16, 3), 4, 16), ((1, 9, 7, 3), 2, 4)])
def test_spacetime_patches_round_trip_exactly(shape, t, p):
    clip = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    patches, grid = clip_to_patches(clip, t, p)
    assert grid == (-(-shape[0] // t), -(-shape[1] // p), -(-shape[2] // p))
    assert patches.shape == (grid[0] * grid[1] * grid[2], t * p * p * 3) and patches.dtype == np.uint8
    assert np.array_equal(patches_to_clip(patches, grid, t, p, *shape[:3]), clip)


def test_spacetime_patch_holds_frames_rows_columns_in_order():
    clip = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    patches, grid = clip_to_patches(clip, 2, 2)
    assert grid == (1, 2, 2)
    assert np.array_equal(patches[1].reshape(2, 2, 2, 3), clip[:, 0:2, 2:4])  # (t, row 0, column 1)


def test_patches_are_cut_as_from_an_edge_padded_copy():
    """Patches pads only the last cells of each axis, yet gives what np.pad of the whole array then cutting gives."""
    def reference(array, size):
        padded = np.pad(array, [(0, -n % s) for n, s in zip(array.shape[:-1], size)] + [(0, 0)], mode="edge")
        k, grid = len(size), [n // s for n, s in zip(padded.shape[:-1], size)]
        split = [d for g, c in zip(grid, size) for d in (g, c)]
        cut = padded.reshape(*split, 3).transpose(*range(0, 2 * k, 2), *range(1, 2 * k, 2), 2 * k)
        return cut.reshape(int(np.prod(grid)), -1)

    rng = np.random.default_rng(0)
    for shape in itertools.product([1, 2, 5, 16], [1, 7, 16, 33], [1, 16, 31]):
        clip = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        for size in [(2, 16, 16), (1, 4, 4), (3, 5, 7)]:
            patches = Patches(clip, size)
            out = np.empty(patches.size, np.uint8)
            patches.copy_into(out)
            assert np.array_equal(out.reshape(patches.shape), reference(clip, size)), (shape, size)
        assert np.array_equal(np.asarray(Patches(clip[0], (16, 16))), reference(clip[0], (16, 16)))


def test_decord_frames_are_shared_not_copied(tmp_path):
    import decord

    from tokenmill.transforms.decoders.video import as_numpy

    reader = decord.VideoReader(str(make_video(tmp_path / "a.mp4", n=8)), ctx=decord.cpu(0), num_threads=1)
    batch = reader.get_batch([0, 3, 5])
    frames = as_numpy(batch)
    assert frames.shape == (3, 48, 64, 3) and frames.dtype == np.uint8 and not frames.flags.writeable
    assert np.array_equal(frames, batch.asnumpy())
    kept = frames.copy()
    reader.get_batch([1, 2])  # the next batch has memory of its own
    del reader, batch
    assert np.array_equal(frames, kept)


def test_decoded_clip_patches_round_trip_to_frames(tmp_path):
    path = make_video(tmp_path / "odd.mkv", n=7, w=33, h=17, pix="yuv444p")
    tok = load_video_tokenizer("patch:2,8")
    assert isinstance(tok, VideoPatchTokenizer)
    for clip in iter_clips(str(path), ClipSpec(frames=7), NATIVE):
        tokens, grid = tok.encode_clip(clip.frames)
        assert grid == (4, 3, 5) and tok.padding(7, 17, 33) == (1, 7, 7)
        assert np.array_equal(tok.decode_clip(tokens, grid, 7, 17, 33), clip.frames)


# -- codebooks ------------------------------------------------------------------

def test_video_vq_and_pca_codebooks(tmp_path):
    from tokenmill.transforms.tokenizers.codebook import save_npz, to_unit

    rng = np.random.default_rng(0)
    codes = rng.uniform(-1, 1, (8, 2 * 4 * 4 * 3)).astype(np.float32)
    (tmp_path / "vq.npz").write_bytes(save_npz({"kind": np.array("vq"), "patch": np.array(4),
                                                "frames": np.array(2), "codes": codes}))
    vq = load_video_tokenizer(f"vq:{tmp_path / 'vq.npz'}")
    clip = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    ids, grid = vq.encode_clip(clip)
    patches, _ = clip_to_patches(clip, 2, 4)
    expect = np.argmin(((to_unit(patches)[:, None] - codes[None]) ** 2).sum(-1), 1)
    assert grid == (2, 2, 2) and np.array_equal(ids, expect)
    mean = np.zeros(96, np.float32)
    comps = np.eye(96, dtype=np.float32)  # lossless: every value kept
    (tmp_path / "pca.npz").write_bytes(save_npz({"kind": np.array("pca"), "patch": np.array(4),
                                                 "frames": np.array(2), "mean": mean, "components": comps}))
    pca = load_video_tokenizer(f"pca:{tmp_path / 'pca.npz'}")
    lat, grid = pca.encode_clip(clip)
    assert lat.shape == (8, 96) and np.array_equal(pca.decode_clip(lat, grid, 4, 8, 8), clip)
    from tokenmill.transforms.tokenizers.base import TokenizerSpecError
    from tokenmill.transforms.tokenizers.spec import load_image_tokenizer

    with pytest.raises(TokenizerSpecError, match="fitted on video"):
        load_image_tokenizer(f"vq:{tmp_path / 'vq.npz'}")


# -- TorchScript video encoders (Cosmos interface) --------------------------------

class ContinuousVideoEncoder(torch.nn.Module):
    """Like Cosmos CV4x8x8: B x 3 x (1 + 4k) x H x W → (latent B x 6 x (1 + k) x H/8 x W/8,)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first = torch.nn.Conv3d(3, 6, kernel_size=(1, 8, 8), stride=(1, 8, 8))
        self.rest = torch.nn.Conv3d(3, 6, kernel_size=(4, 8, 8), stride=(4, 8, 8))

    def forward(self, x: torch.Tensor):
        return (torch.cat([self.first(x[:, :, :1]), self.rest(x[:, :, 1:])], 2),)


class DiscreteVideoEncoder(torch.nn.Module):
    """Like Cosmos DV4x8x8: → (indices B x t x h x w, codes), 3 FSQ channels of 5 levels = 125 codes."""

    def __init__(self):
        super().__init__()
        self.inner = ContinuousVideoEncoder()
        self.vocab_size = 125

    def forward(self, x: torch.Tensor):
        codes = torch.round(torch.tanh(self.inner(x)[0][:, :3]) * 2)
        levels = (codes + 2).to(torch.int64)
        return levels[:, 0] + 5 * levels[:, 1] + 25 * levels[:, 2], codes


class PlainVideoEncoder(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, ::4, ::8, ::8] * 2  # one tensor, floating: soft


def direct(module: torch.nn.Module, clip: np.ndarray, factor: int = 4, multiple: int = 16):
    """The model called by hand on the clip, padded as the interface says."""
    T, H, W = clip.shape[:3]
    padded = np.pad(clip, ((0, (-(T - 1)) % factor), (0, -H % multiple), (0, -W % multiple), (0, 0)), mode="edge")
    x = torch.from_numpy(padded).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0
    with torch.inference_mode():
        out = module(x)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("module,kind", [(ContinuousVideoEncoder(), "soft"), (DiscreteVideoEncoder(), "hard"),
                                         (PlainVideoEncoder(), "soft")])
def test_torchscript_video_through_the_pipeline_equals_direct_call(tmp_path, module, kind):
    model = tmp_path / "enc.pt"
    torch.jit.script(module).save(str(model))
    videos = tmp_path / "in"
    videos.mkdir()
    make_video(videos / "a.mp4", n=11, w=40, h=24)
    out = tmp_path / "out"
    assert run_build(["--input", str(videos), "--output", str(out), "--tokenizer", f"torchscript:{model}",
                      "--clip-frames", "6", "--temporal-factor", "4", "--batch-size", "2"]) == 0
    m = read_manifest(str(out))
    assert m.modality == "video" and m.tokenizer["kind"] == kind and m.errors == 0
    rows = read_rows(out).to_pylist()
    clips = {c.plan.index: c for c in iter_clips(str(videos / "a.mp4"), ClipSpec(frames=6), NATIVE)}
    assert sorted(r["locator"] for r in rows) == ["clip:0"] and len(clips) == 1
    row, clip = rows[0], clips[0]
    assert row["frame_indices"] == list(range(6)) and row["padding"] == [3, 8, 8]
    want = direct(module, clip.frames)[0]
    assert row["grid"] == list(want.shape[-3:])
    if kind == "hard":
        assert m.tokenizer["vocab_size"] == 125
        assert row["tokens"] == want.reshape(-1).tolist()
    else:
        got = np.frombuffer(row["latents"], "<f4").reshape(row["num_tokens"], -1)
        assert np.allclose(got, want.reshape(want.shape[0], -1).T.numpy(), atol=1e-6)


# -- memory: bounded by the clip, not the video -----------------------------------

MEMORY_PROBE = r"""
import sys, psutil, numpy as np
from tokenmill.transforms.decoders.images import SizePolicy
from tokenmill.transforms.decoders.video import ClipSpec, decode_video_task
from tokenmill.transforms.records import VideoTask
path, decoder = sys.argv[1], sys.argv[2]
proc = psutil.Process()
peak, clips, base = 0, 0, None
for block in decode_video_task(VideoTask(path, size=1), ClipSpec(frames=8), SizePolicy.parse("native:1024"),
                               decoder=decoder, block_bytes=1):
    clips += len(block.clips)
    rss = proc.memory_info().rss
    base = rss if base is None else base
    peak = max(peak, rss)
print(clips, base, peak)
"""


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
def test_long_video_memory_stays_within_a_few_clips(tmp_path, decoder):
    # 1200 frames of 320x240: 276 MB decoded; a clip of 8 frames is 1.8 MB.
    path = make_video(tmp_path / "long.mp4", n=1200, w=320, h=240)
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(path), decoder], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    clips, base, peak = map(int, out.stdout.split())
    assert clips == 150
    video_bytes = 1200 * 320 * 240 * 3
    # RSS after the first clip vs the peak: growth stays far below the decoded video
    assert peak - base < 40 << 20, (peak - base) / 2 ** 20
    assert peak - base < video_bytes / 6


# -- bad inputs: every one a row or an error row ----------------------------------

@pytest.fixture(scope="module")
def bad_videos(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    good = make_video(d / "good.mp4", n=24)
    files = {"good": good}
    data = good.read_bytes()
    (d / "truncated.mp4").write_bytes(data[: len(data) // 2])  # moov at the end: the index is lost
    (d / "garbage.webm").write_bytes(np.random.default_rng(0).bytes(4000))
    (d / "zero.mp4").write_bytes(b"")
    fs = make_video(d / "fs.mp4", n=60, faststart=True).read_bytes()
    (d / "overreported.mp4").write_bytes(fs[: int(len(fs) * 0.8)])  # header promises 60 frames
    (d / "fs.mp4").unlink()
    files.update(truncated=d / "truncated.mp4", garbage=d / "garbage.webm", zero=d / "zero.mp4",
                 overreported=d / "overreported.mp4",
                 one_frame=make_video(d / "one_frame.mp4", n=1),
                 odd=make_video(d / "odd.mkv", n=9, w=33, h=17, pix="yuv444p"),
                 vfr=make_video(d / "vfr.mp4", n=10, pts_ms=[0, 40, 80, 200, 240, 500, 540, 580, 900, 940]),
                 audio_only=make_audio_only(d / "audio_only.mp4"))
    return files


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
def test_every_bad_input_ends_as_rows_or_an_error(bad_videos, decoder):
    spec = ClipSpec(frames=8)
    got = {}
    for name, path in bad_videos.items():
        blocks = list(decode_video_task(task(path), spec, NATIVE, decoder=decoder, timeout=60))
        got[name] = ([i["frame_indices"] for b in blocks for i in b.infos],
                     [(e.locator, e.error_type, e.message) for b in blocks for e in b.errors])
        assert got[name][0] or got[name][1], name
    assert got["good"] == ([list(range(8)), list(range(8, 16)), list(range(16, 24))], [])
    for name in ("truncated", "garbage", "zero", "audio_only"):
        clips, errors = got[name]
        assert clips == [] and len(errors) == 1 and errors[0][0] == "file", (name, errors)
    assert "zero-byte" in got["zero"][1][0][2]
    assert "no video stream" in got["audio_only"][1][0][2]
    assert got["one_frame"] == ([[0]], [])
    assert got["odd"] == ([list(range(8))], [])
    assert got["vfr"] == ([list(range(8))], [])
    clips, errors = got["overreported"]
    assert 1 <= len(clips) < 60 // 8  # what the stream really holds, not what the header claims
    blocks = list(decode_video_task(task(bad_videos["overreported"]), spec, NATIVE, decoder=decoder))
    assert {i["decoder"] for b in blocks for i in b.infos} == {"pyav"}  # decord cannot: PyAV stands in


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
@pytest.mark.parametrize("policy,shape", [("crop:16", (16, 16)), ("shorter:24", (24, 32)), ("native:32", (24, 32))])
def test_size_policy_applies_to_frames(tmp_path, decoder, policy, shape):
    path = make_video(tmp_path / "v.mp4", n=4)
    clip = next(iter_clips(str(path), ClipSpec(frames=4), SizePolicy.parse(policy), decoder=decoder))
    assert clip.frames.shape == (4, *shape, 3) and (clip.orig_height, clip.orig_width) == (48, 64)


def test_odd_dimensions_and_vfr_timing_are_kept(bad_videos):
    odd = next(iter_clips(str(bad_videos["odd"]), ClipSpec(frames=8), NATIVE))
    assert odd.frames.shape == (8, 17, 33, 3)
    vfr = next(iter_clips(str(bad_videos["vfr"]), ClipSpec(frames=4, fps=10), NATIVE))
    assert vfr.plan.frame_indices == (0, 2, 3, 4) and vfr.plan.end == pytest.approx(0.4)


def test_decode_timeout_ends_as_an_error_row(bad_videos):
    blocks = list(decode_video_task(task(bad_videos["good"]), ClipSpec(frames=8), NATIVE, timeout=1e-9))
    errors = [e for b in blocks for e in b.errors]
    assert sum(len(b.clips) for b in blocks) == 0
    assert [(e.locator, e.error_type) for e in errors] == [("file", "DecodeTimeout")]


# -- a real build -------------------------------------------------------------------

def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_build_reads_back_every_clip_and_error(tmp_path, bad_videos):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name, path in bad_videos.items():
        (inputs / path.name).write_bytes(path.read_bytes())
    make_video(inputs / "b.webm", codec="libvpx-vp9", n=16)
    clip_bytes = make_video(tmp_path / "m.mp4", n=17).read_bytes()
    write_tar(inputs / "shard.tar", {"s1.mp4": clip_bytes, "s1.json": b'{"caption": "a bar"}',
                                     "s2.avi": make_video(tmp_path / "m.avi", codec="mpeg4", n=8).read_bytes(),
                                     "s3.mp4": b"not a video", "../escape.mp4": clip_bytes})
    out = tmp_path / "out"
    assert run_build(["--input", str(inputs), "--output", str(out), "--tokenizer", "patch:2,16",
                      "--clip-frames", "8", "--modality", "video"], runner=TWO_PROCESSES) == 0
    m = read_manifest(str(out))
    rows, errors = read_rows(out).to_pylist(), read_errors(out)
    assert m.modality == "video" and m.rows == len(rows) and m.errors == len(errors)
    by_source: dict[str, list] = {}
    for r in rows:
        by_source.setdefault(Path(r["source"]).name, []).append(r["locator"])
    assert sorted(by_source["good.mp4"]) == ["clip:0", "clip:1", "clip:2"]
    assert sorted(by_source["b.webm"]) == ["clip:0", "clip:1"]
    assert sorted(by_source["shard.tar"]) == ["member:s1.mp4#clip:0", "member:s1.mp4#clip:1",
                                              "member:s2.avi#clip:0"]
    err = {(Path(e["source"]).name, e["locator"]): e for e in errors}
    assert {("truncated.mp4", "file"), ("garbage.webm", "file"), ("zero.mp4", "file"),
            ("audio_only.mp4", "file"), ("shard.tar", "member:s3.mp4"),
            ("shard.tar", "member:../escape.mp4")} <= set(err)
    assert err[("shard.tar", "member:../escape.mp4")]["error_type"] == "UnsafeMember"
    # every video file and tar member: clips, or an error saying why not
    names = {p.name for p in inputs.iterdir() if p.suffix != ".tar"} | {"s1.mp4", "s2.avi", "s3.mp4"}
    seen = {s for s in by_source} | {s for s, _ in err}
    seen |= {loc.split(":", 1)[1].split("#")[0] for s, loc in err if s == "shard.tar"}
    seen |= {loc.split(":", 1)[1].split("#")[0] for r in rows for loc in [r["locator"]]
             if loc.startswith("member:")}
    assert names <= seen
    s1 = next(r for r in rows if r["locator"] == "member:s1.mp4#clip:1")
    assert s1["frame_indices"] == list(range(8, 16)) and s1["clip_start"] == pytest.approx(0.32)
    assert s1["clip_end"] == pytest.approx(0.64) and s1["fps"] == 25.0  # the container's rate, exactly
    assert json.loads(s1["meta"]) == {"json": {"caption": "a bar"}}
    assert s1["grid"] == [4, 3, 4] and s1["num_tokens"] == 48 and s1["id"] == row_id(s1["source"], s1["locator"])
    # the row's patches are the clip's frames, exactly
    tok = load_video_tokenizer("patch:2,16")
    good = next(r for r in rows if Path(r["source"]).name == "good.mp4" and r["locator"] == "clip:1")
    frames = tok.decode_clip(np.frombuffer(good["latents"], np.uint8).reshape(good["num_tokens"], -1),
                             tuple(good["grid"]), 8, good["height"], good["width"])
    clip = list(iter_clips(str(bad_videos["good"]), ClipSpec(frames=8), NATIVE))[1]
    assert np.array_equal(frames, clip.frames)
    assert m.options["clip_frames"] == 8 and m.options["decoder"] == "decord"


def test_concurrent_decoders_give_the_same_shards_and_errors(tmp_path, bad_videos):
    """Videos decoded several at once hand out blocks interleaved; the dataset is byte for byte the same."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for path in bad_videos.values():
        (inputs / path.name).write_bytes(path.read_bytes())
    for i in range(3):
        make_video(inputs / f"more{i}.mp4", n=20 + 4 * i)
    digests = []
    for threads in ("1", "3"):
        out = tmp_path / f"out{threads}"
        assert run_build(["--input", str(inputs), "--output", str(out), "--tokenizer", "patch:2,16",
                          "--clip-frames", "4", "--modality", "video", "--decode-threads", threads],
                         runner=ONE_WORKER) == 0
        m = read_manifest(str(out))
        digests.append((m.rows, m.errors, sorted((Path(s["path"]).name, s["sha256"])
                                                 for s in m.shards + m.error_shards)))
    assert digests[0] == digests[1] and digests[0][0] > 20 and digests[0][1] >= 4


def _video_blocks(log: list, gates: dict):
    """Stand-in decode_video_task for ConcurrentVideos: logs what happens, waits at gates the test opens."""
    def blocks(task, decoded):
        name, count = task
        log.append(("start", name))
        for k in range(count):
            if (name, k) in gates:
                gates[(name, k)].wait(5)
            if k == count - 1:
                decoded()
            yield f"{name}{k}"
        log.append(("end", name))
        if name == "bad":
            raise RuntimeError("a bug in decoding")
    return blocks


def test_one_decoder_starts_the_next_video_before_the_last_block_is_dealt_with():
    from tokenmill.transforms.decoders.video import ConcurrentVideos

    log: list = []
    videos = ConcurrentVideos(1, _video_blocks(log, {}))
    videos.add(("a", 3))
    got = []
    for block in videos.take(until_running=1):  # nothing: only one video in flight
        got.append(block)
    videos.add(("b", 2))
    for block in videos.take(until_running=1):
        got.append(block)
        if block == "a2":  # a's last block, not yet dealt with: b is decoding already
            deadline = time.monotonic() + 5
            while ("start", "b") not in log and time.monotonic() < deadline:
                time.sleep(0.01)
            assert ("start", "b") in log
    got += list(videos.take(until_running=0))
    assert sorted(got) == ["a0", "a1", "a2", "b0", "b1"] and videos.running == 0
    assert [b for b in got if b[0] == "a"] == ["a0", "a1", "a2"]  # each video's blocks in order
    assert [b for b in got if b[0] == "b"] == ["b0", "b1"]
    videos.close()


def test_two_decoders_decode_two_videos_at_once_and_a_failure_reaches_the_consumer():
    from tokenmill.transforms.decoders.video import ConcurrentVideos

    log: list = []
    a_waits = threading.Event()  # a's second block waits until b has started: both decode at once
    videos = ConcurrentVideos(2, _video_blocks(log, {("a", 1): a_waits}))
    videos.add(("a", 2))
    videos.add(("b", 2))
    got = []
    for block in videos.take(until_running=0):
        got.append(block)
        if ("start", "b") in log:
            a_waits.set()
    assert sorted(got) == ["a0", "a1", "b0", "b1"] and ("start", "b") in log
    videos.add(("bad", 1))
    with pytest.raises(RuntimeError, match="a bug in decoding"):
        list(videos.take(until_running=0))
    assert videos.running == 0
    videos.add(("stuck", 3))  # close() lets a thread waiting to hand over its next block go
    next(iter(videos.take(until_running=0)))
    videos.close()


def test_build_usage_errors_are_one_line(tmp_path, capsys):
    make_video(tmp_path / "a.mp4", n=4)
    with pytest.raises(SystemExit) as e:
        run_build(["--input", str(tmp_path / "a.mp4"), "--output", str(tmp_path / "o"), "--tokenizer",
                   "patch:2,16", "--clip-frames", "0"])
    assert e.value.code == 2 and "clip-frames" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        run_build(["--input", str(tmp_path / "a.mp4"), "--output", str(tmp_path / "o"), "--tokenizer",
                   "patch:16"])
    assert e.value.code == 2


def test_fit_a_spacetime_codebook_then_build_with_it(tmp_path):
    from tokenmill.pipelines import fit

    videos = tmp_path / "in"
    videos.mkdir()
    for i in range(3):
        make_video(videos / f"v{i}.mp4", n=8 + 4 * i, w=32, h=32)
    book = tmp_path / "vq.npz"
    assert fit.run(["--kind", "vq", "--input", str(videos), "--output", str(book), "--patch", "8", "--frames", "2",
                    "--clip-frames", "4", "--codes", "4", "--samples-per-image", "8", "--holdout", "0.3",
                    "--iterations", "3", *ONE_WORKER]) == 0
    report = json.loads((tmp_path / "vq.npz.json").read_text())
    assert report["frames"] == 2 and report["train_patches"] > 0
    tok = load_video_tokenizer(f"vq:{book}")
    assert tok.frames == 2 and tok.vocab_size == 4 and tok.metadata()["geometry"]["patch"] == [2, 8, 8]
    out = tmp_path / "out"
    assert run_build(["--input", str(videos), "--output", str(out), "--tokenizer", f"vq:{book}",
                      "--clip-frames", "4"]) == 0
    rows = read_rows(out).to_pylist()
    assert len(rows) == 2 + 3 + 4 and all(r["grid"] == [2, 4, 4] and r["num_tokens"] == 32 for r in rows)
    row = next(r for r in rows if r["source"].endswith("v0.mp4") and r["locator"] == "clip:1")
    clip = list(iter_clips(str(videos / "v0.mp4"), ClipSpec(frames=4), NATIVE))[1]
    assert row["tokens"] == tok.encode_clip(clip.frames)[0].tolist()


def test_a_hung_decoder_is_abandoned_at_the_timeout(bad_videos, monkeypatch):
    import time

    from tokenmill.transforms.decoders import video

    def hang(self, indices):
        time.sleep(3)  # stands for a decoder stuck in native code

    monkeypatch.setattr(video.DecordReader, "get_batch", hang)
    start = time.monotonic()
    blocks = list(decode_video_task(task(bad_videos["good"]), ClipSpec(frames=8), NATIVE, timeout=0.5))
    assert time.monotonic() - start < 2
    errors = [(e.locator, e.error_type) for b in blocks for e in b.errors]
    assert errors == [("clip:0", "DecodeTimeout")] and not any(b.clips for b in blocks)


def build_small_patch_video(tmp_path: Path, frames: int) -> tuple[Path, Path]:
    """A 40x24 video of `frames` frames, built with patch:2,8 in 6-frame clips: (input folder, dataset)."""
    videos, out = tmp_path / "in", tmp_path / "out"
    videos.mkdir()
    make_video(videos / "a.mp4", n=frames, w=40, h=24)
    assert run_build(["--input", str(videos), "--output", str(out), "--tokenizer", "patch:2,8",
                      "--clip-frames", "6"]) == 0
    return videos, out


def test_training_reader_yields_normalized_spacetime_patches_with_their_grid(tmp_path):
    from tokenmill.loaders.dataset import TokenReader

    videos, out = build_small_patch_video(tmp_path, frames=12)
    rows = {r["id"]: r for r in read_rows(out).to_pylist()}
    samples = list(TokenReader(str(out), shuffle=False))
    assert len(samples) == len(rows) == 2
    for s in samples:
        row = rows[s["id"]]
        assert tuple(s["grid"]) == tuple(row["grid"]) == (3, 3, 5)
        raw = np.frombuffer(row["latents"], np.uint8).reshape(row["num_tokens"], 2 * 8 * 8 * 3)
        assert s["latents"].dtype == np.float32 and s["latents"].shape == raw.shape
        assert np.allclose(s["latents"], raw / 127.5 - 1.0, atol=1e-6), np.abs(s["latents"] - (raw / 127.5 - 1)).max()


def test_decode_writes_a_contact_sheet_of_a_clips_frames(tmp_path):
    from PIL import Image

    from tokenmill.reports.render import contact_sheet
    from tests.conftest import run_cli

    videos, out = build_small_patch_video(tmp_path, frames=6)
    (row,) = read_rows(out).to_pylist()
    sheet = tmp_path / "sheet.png"
    done = run_cli("tokenmill.pipelines.cli", "decode", str(out), "--id", row["id"], "--out", str(sheet))
    assert done.returncode == 0, done.stderr
    (clip,) = iter_clips(str(videos / "a.mp4"), ClipSpec(frames=6), SizePolicy.parse("native:1024"))
    assert np.array_equal(np.asarray(Image.open(sheet)), contact_sheet(clip.frames))  # patches are lossless
