"""Video files → clips of RGB uint8 frames (T, H, W, 3), streamed one clip at a time.

Three parts, each usable without Beam:
- `ClipSpec` and `plan_clips`: clip sampling as a pure function of the frame
  timestamps. Sampled frame k of a clip sits at time start + k / fps and is the
  last source frame shown at that time (so variable frame rates are sampled by
  time, not by index); without --fps every source frame is taken. Clips are
  `frames` sampled frames long and start every `stride` sampled frames (stride <
  frames overlaps them). A trailing partial clip is dropped, except that a video
  shorter than one clip gives one short clip: every video that has a frame
  yields a row.
- Readers behind one small interface (`VideoReader`): decord, the default, and
  PyAV, which stands in where decord is missing or fails to open or decode a
  file. decord is unmaintained and known to leak: its reader is reopened every
  `recycle_clips` clips and asked for one clip's frames at a time.
- `iter_clips`: open, plan, decode clip by clip under a per-file deadline. Each
  decoder call runs in a helper thread that is abandoned (not joined) when the
  deadline passes, so a decoder that hangs costs one stuck thread, not the job.
Peak memory is one clip (plus the decoder's own buffers), whatever the video length.
"""
from __future__ import annotations

import abc
import collections
import concurrent.futures
import contextlib
import dataclasses
import math
import time
import os
import queue
import shutil
import tempfile
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows
from apache_beam.utils.windowed_value import WindowedValue

from tokenmill.transforms.coders import BlockCoder  # noqa: F401  (registers the block coder)
from tokenmill.transforms.decoders.images import SizePolicy
from tokenmill.transforms.records import VideoBlock

if TYPE_CHECKING:
    from tokenmill.transforms.records import VideoTask

DECODERS = ("decord", "pyav")
DEFAULT_CLIP_FRAMES = 16
DEFAULT_DECODE_TIMEOUT = 600.0
DEFAULT_RECYCLE_CLIPS = 64
# Decoded frames per output block: a block is one Parquet shard, and its clips sit
# in memory until it is written.
DEFAULT_BLOCK_BYTES = 64 << 20
# A frame is taken at time t when it starts at most this much after t: container
# timestamps are rounded to their time base, and 1/fps is rarely exact.
_EPS = 1e-4


class VideoDecodeError(RuntimeError):
    """A video (or one of its clips) that cannot be decoded."""


class DecodeTimeout(VideoDecodeError):
    """Decoding a file took longer than --decode-timeout."""


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    """How clips are sampled. fps None keeps the source frames; times are seconds."""

    frames: int = DEFAULT_CLIP_FRAMES
    fps: float | None = None
    stride: int | None = None  # sampled frames between clip starts; None: `frames` (no overlap)
    max_clips: int | None = None
    start: float = 0.0
    end: float | None = None

    def __post_init__(self):
        if self.frames < 1:
            raise ValueError(f"--clip-frames must be at least 1, got {self.frames}")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"--fps must be positive, got {self.fps}")
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"--clip-stride must be at least 1, got {self.stride}")
        if self.max_clips is not None and self.max_clips < 1:
            raise ValueError(f"--max-clips must be at least 1, got {self.max_clips}")
        if self.start < 0 or (self.end is not None and self.end <= self.start):
            raise ValueError(f"need 0 <= --start < --end, got start={self.start} end={self.end}")

    def record(self) -> dict[str, Any]:
        return {"clip_frames": self.frames, "fps": self.fps, "clip_stride": self.stride or self.frames,
                "max_clips": self.max_clips, "start": self.start, "end": self.end}


@dataclasses.dataclass(frozen=True)
class ClipPlan:
    """One clip: its number in the video, source frame indices and time span [start, end) in seconds."""

    index: int
    frame_indices: tuple[int, ...]
    start: float
    end: float
    fps: float


def clip_rate(frames: int, start: float, end: float, nominal: float | None) -> float:
    """A clip's frame rate without --fps: the container's rational rate (24, or 30000/1001) when the clip's own
    frames run at it, as they do unless the video has a variable rate; else the measured rate, to 6 decimals.

    Frame times are rounded to their time base, so frames / (end - start) alone gives 24.000024000024002.
    A clip of no duration (repeated frame times in a damaged stream) has no measured rate: the container's,
    else 0.
    """
    if not end > start:
        return float(nominal or 0.0)
    measured = frames / (end - start)
    if nominal and abs(measured - nominal) <= RATE_TOLERANCE * nominal:
        return float(nominal)
    return round(measured, 6)


RATE_TOLERANCE = 1e-3  # a clip within 0.1% of the container's rate runs at it (time-base rounding is far less)


def plan_clips(timestamps: Sequence[float], duration: float, spec: ClipSpec,
               nominal_rate: float | None = None) -> list[ClipPlan]:
    """The clips of a video whose frame i starts at timestamps[i] (seconds, increasing) and that ends at `duration`.

    A clip's start is its first frame's timestamp; its end is the time its last
    sampled frame stops being the sample (the next sample time at target fps, or
    the next source frame's start without --fps), capped by the video's end.
    `nominal_rate` is the container's frame rate (see clip_rate).
    """
    ts = np.asarray(timestamps, np.float64)
    if len(ts) == 0:
        return []
    gap = float(np.median(np.diff(ts))) if len(ts) > 1 else 1e-3
    video_end = float(duration) if duration > ts[-1] else float(ts[-1]) + gap
    stop = video_end if spec.end is None else min(video_end, spec.end)
    if spec.fps is None:
        picked = np.flatnonzero((ts >= spec.start - _EPS) & (ts < stop - _EPS))
        times = ts[picked]
        ends = np.append(ts, video_end)[picked + 1]
    else:
        n = max(0, math.ceil((stop - spec.start) * spec.fps - _EPS))
        times = spec.start + np.arange(n) / spec.fps
        picked = np.searchsorted(ts, times + _EPS, side="right") - 1
        times, picked = times[picked >= 0], picked[picked >= 0]  # sample times before the first frame
        ends = np.minimum(times + 1 / spec.fps, video_end)
    total, frames, stride = len(picked), spec.frames, spec.stride or spec.frames
    if total == 0:
        return []
    starts = list(range(0, total - frames + 1, stride)) if total >= frames else [0]
    if spec.max_clips is not None:
        starts = starts[:spec.max_clips]
    clips = []
    for n, s in enumerate(starts):
        e = min(s + frames, total)
        start, end = float(times[s]), float(ends[e - 1])
        rate = spec.fps if spec.fps is not None else clip_rate(e - s, start, end, nominal_rate)
        clips.append(ClipPlan(n, tuple(int(i) for i in picked[s:e]), start, end, float(rate)))
    return clips


def target_size(policy: SizePolicy, width: int, height: int) -> tuple[int, int, tuple[int, int, int, int] | None]:
    """(decode width, decode height, crop box or None) for frames of width x height under a size policy.

    crop:S decodes with the shorter side at S, then cuts the centre square.
    """
    if policy.kind == "crop":
        scale = policy.size / min(width, height)
        w, h = max(policy.size, round(width * scale)), max(policy.size, round(height * scale))
        left, top = (w - policy.size) // 2, (h - policy.size) // 2
        return w, h, (left, top, left + policy.size, top + policy.size)
    _, (w, h) = policy.target(width, height)
    return w, h, None


class VideoReader(abc.ABC):
    """One open video. Frames are RGB uint8, already at the size policy's size."""

    name: str
    num_frames: int
    width: int  # source size, as stored
    height: int
    nominal_rate: float | None = None  # the container's average frame rate (a rational, as a float), if any

    @abc.abstractmethod
    def timestamps(self) -> np.ndarray:
        """Start time of every frame, seconds, in presentation order."""

    @abc.abstractmethod
    def duration(self) -> float:
        """End time of the video stream, seconds."""

    @abc.abstractmethod
    def get_batch(self, indices: Sequence[int]) -> np.ndarray:
        """Frames (n, H, W, 3) at these increasing source indices."""

    def close(self) -> None:
        pass


class _NativeStderr:
    """FFmpeg's and decord's own C-level lines ("[mov,mp4,... @ 0x...] moov atom not found", "video_reader.cc:83:
    ERROR opening ...") off the terminal while decord opens or decodes, unless --verbose (TOKENMILL_VERBOSE or
    TOKENMILL_DEBUG). The same reason reaches the video's error row; on the terminal it only buries the build's
    one line. Worker processes' stderr is closed already (pipelines/local); this covers a build that decodes in
    the launcher's own process (the in-memory runner, small builds). fd 2 is the process's, so the redirect is
    counted across threads: the first user points it at /dev/null, the last one puts it back."""

    def __init__(self) -> None:
        self._lock, self._users, self._saved = threading.Lock(), 0, -1

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        if os.environ.get("TOKENMILL_VERBOSE") or os.environ.get("TOKENMILL_DEBUG"):
            yield
            return
        with self._lock:
            if self._users == 0:
                try:
                    self._saved = os.dup(2)
                    null = os.open(os.devnull, os.O_WRONLY)
                    os.dup2(null, 2)
                    os.close(null)
                except OSError:
                    self._saved = -1
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0 and self._saved >= 0:
                    os.dup2(self._saved, 2)
                    os.close(self._saved)
                    self._saved = -1


NATIVE_STDERR = _NativeStderr()


class DecordReader(VideoReader):
    """decord.VideoReader, reopened every `recycle_clips` clips to bound what it holds."""

    name = "decord"

    def __init__(self, path: str, policy: SizePolicy, recycle_clips: int = DEFAULT_RECYCLE_CLIPS):
        import decord

        self._decord, self._path, self._recycle, self._served = decord, path, recycle_clips, 0
        with NATIVE_STDERR.quiet():
            probe = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        self.num_frames = len(probe)
        if self.num_frames == 0:
            raise VideoDecodeError("no video frames")
        self.height, self.width = probe[0].shape[:2]
        self.nominal_rate = float(probe.get_avg_fps()) or None
        self._w, self._h, self._box = target_size(policy, self.width, self.height)
        ts = np.asarray(probe.get_frame_timestamp(range(self.num_frames)), np.float64)
        if not (np.isfinite(ts).all() and ts.max() < 1e9 and (np.diff(ts[:, 0]) >= 0).all()):
            # decord reports FFmpeg's "no timestamp" (2^63 us) for some short Matroska files: go by the rate
            rate = float(probe.get_avg_fps()) or 25.0
            ts = np.stack([np.arange(self.num_frames), np.arange(1, self.num_frames + 1)], 1) / rate
        self._ts = ts
        # The probe serves the first clips when frames keep their size; else one opened to decode resized.
        self._reader = probe if (self._w, self._h) == (self.width, self.height) else None

    def _open(self):
        same = (self._w, self._h) == (self.width, self.height)
        with NATIVE_STDERR.quiet():
            return self._decord.VideoReader(self._path, ctx=self._decord.cpu(0), num_threads=1,
                                            width=-1 if same else self._w, height=-1 if same else self._h)

    def timestamps(self) -> np.ndarray:
        return np.round(np.asarray(self._ts[:, 0], np.float64), 6)  # decord keeps float32 seconds

    def duration(self) -> float:
        return round(float(self._ts[-1, 1]), 6)

    def get_batch(self, indices: Sequence[int]) -> np.ndarray:
        if self._reader is None or self._served >= self._recycle:
            self._reader, self._served = None, 0
            self._reader = self._open()
        self._served += 1
        with NATIVE_STDERR.quiet():
            frames = self._reader.get_batch(list(indices))
        return crop(as_numpy(frames), self._box)

    def close(self) -> None:
        self._reader = None


class _DLPackExport:
    """decord 0.6's NDArray in the DLPack protocol numpy reads (it has to_dlpack, not __dlpack__)."""

    def __init__(self, array: Any):
        self._array = array

    def __dlpack__(self, stream: Any = None, **_: Any) -> Any:
        return self._array.to_dlpack()

    def __dlpack_device__(self) -> tuple[int, int]:
        return 1, 0  # kDLCPU, device 0


def as_numpy(array: Any) -> np.ndarray:
    """A decord NDArray as a read-only numpy array over the same memory.

    decord's own asnumpy copies every clip into fresh memory: one more pass
    over the frames, and page faults on new pages that were 5% of a video
    build's CPU (measured with perf). decord allocates a new NDArray for each
    get_batch, so sharing it is safe; numpy keeps it alive.
    """
    try:
        return np.from_dlpack(_DLPackExport(array))
    except (AttributeError, TypeError, BufferError, RuntimeError):  # not DLPack-capable: copy
        return array.asnumpy()


class PyAVReader(VideoReader):
    """FFmpeg through PyAV: demuxes packets for the timestamps (no decoding), then
    decodes forward once, keeping only the frames of the clip being asked for."""

    name = "pyav"

    def __init__(self, path: str, policy: SizePolicy):
        import av

        self._av, self._path = av, path
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoDecodeError("no video stream (audio-only or not a video)")
            stream = container.streams.video[0]
            base = float(stream.time_base)
            pts = sorted(p.pts for p in container.demux(stream) if p.pts is not None and p.size > 0)
            self.width, self.height = stream.codec_context.width, stream.codec_context.height
            rate = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
            self.nominal_rate = float(stream.average_rate) if stream.average_rate else None
        if not pts:
            raise VideoDecodeError("no video frames")
        self._pts = np.asarray(pts, np.int64)
        first = self._pts[0]
        self._ts = np.round((self._pts - first) * base, 6)  # microseconds, as DecordReader gives them
        self._duration = round(float(self._ts[-1] + 1 / rate), 6)
        self.num_frames = len(pts)
        self._w, self._h, self._box = target_size(policy, self.width, self.height)
        self._frames: Iterator[Any] | None = None
        self._next = 0  # index of the next frame the decoder will give
        self._held: dict[int, np.ndarray] = {}  # the last clip's frames, for overlapping clips
        self._container = None

    def timestamps(self) -> np.ndarray:
        return self._ts

    def duration(self) -> float:
        return self._duration

    def _restart(self) -> None:
        self.close()
        self._container = self._av.open(self._path)
        self._frames = self._decoded(self._container)
        self._next = 0

    def _decoded(self, container) -> Iterator[Any]:
        """Frames in order. A damaged packet is skipped (a cut file's last one is), so the frames
        before the damage still come out, flushed at the end."""
        demuxed = container.demux(container.streams.video[0])
        while True:
            try:
                packet = next(demuxed)
            except StopIteration:
                return
            except self._av.error.FFmpegError:
                packet = None  # the container breaks off: flush what the decoder holds
            try:
                yield from (packet.decode() if packet is not None else
                            container.streams.video[0].codec_context.decode(None))
            except self._av.error.FFmpegError:
                pass
            if packet is None:
                return

    def get_batch(self, indices: Sequence[int]) -> np.ndarray:
        if self._frames is None or any(i < self._next and i not in self._held for i in indices):
            self._restart()
        wanted, out = set(indices), {}
        for i in indices:
            if i in self._held:
                out[i] = self._held[i]
        while self._next <= max(indices):
            try:
                frame = next(self._frames)
            except StopIteration:
                raise VideoDecodeError(f"the stream ends at frame {self._next}; frame {max(indices)} was asked "
                                       f"for (the container reports {self.num_frames})") from None
            if self._next in wanted:
                out[self._next] = frame.to_ndarray(format="rgb24", width=self._w, height=self._h)
            self._next += 1
        self._held = out
        return crop(np.stack([out[i] for i in indices]), self._box)

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
        self._container, self._frames = None, None


def crop(frames: np.ndarray, box: tuple[int, int, int, int] | None) -> np.ndarray:
    if box is None:
        return frames
    left, top, right, bottom = box
    return np.ascontiguousarray(frames[:, top:bottom, left:right])


def open_reader(path: str, decoder: str, policy: SizePolicy, recycle_clips: int = DEFAULT_RECYCLE_CLIPS
                ) -> VideoReader:
    """The asked-for decoder, or PyAV when decord is missing or cannot open the file."""
    if decoder == "decord":
        try:
            return DecordReader(path, policy, recycle_clips)
        except Exception as decord_error:  # missing, or refuses the file: PyAV stands in
            try:
                return PyAVReader(path, policy)
            except ImportError:
                raise decord_error from None
    return PyAVReader(path, policy)


class Deadline:
    """Runs calls in a helper thread, each bounded by what is left of a per-file time budget."""

    def __init__(self, seconds: float):
        self._end = time.monotonic() + seconds
        self._seconds = seconds
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenmill-decode")

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.wait(self.submit(fn, *args))

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        """Start a call in the helper thread (calls run one at a time, in order); `wait` for its result."""
        if self._end - time.monotonic() <= 0:
            raise DecodeTimeout(f"decoding took longer than --decode-timeout={self._seconds:g} s")
        return self._pool.submit(fn, *args)

    def wait(self, future: concurrent.futures.Future) -> Any:
        try:
            return future.result(timeout=max(0.0, self._end - time.monotonic()))
        except concurrent.futures.TimeoutError:
            raise DecodeTimeout(f"decoding took longer than --decode-timeout={self._seconds:g} s") from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)  # a hung call is left behind, not waited for


@dataclasses.dataclass
class Clip:
    """A decoded clip: frames (T, H, W, 3) uint8 and where they came from."""

    plan: ClipPlan
    frames: np.ndarray
    orig_width: int
    orig_height: int
    decoder: str


def iter_clips(path: str, spec: ClipSpec, policy: SizePolicy, *, decoder: str = "decord",
               timeout: float = DEFAULT_DECODE_TIMEOUT, recycle_clips: int = DEFAULT_RECYCLE_CLIPS,
               ahead_bytes: int = 0, decoded: Callable[[], None] | None = None
               ) -> Iterator[Clip | tuple[int, Exception]]:
    """Clips of one video file, in order; a clip that cannot be decoded is (its number, the error).

    Raises VideoDecodeError (or the decoder's error) when the file yields no clip
    plan at all. When decord fails on a clip, PyAV takes over the file from that
    clip (its own count of frames, from the packets, replaces a container's
    over-reported one); when the stand-in fails too, decoding stops at that clip.

    Later clips decode in the helper thread while the caller tokenizes and
    writes this one (decord and PyAV release the GIL): as many as fit in
    `ahead_bytes`, and at least one. Memory stays bounded by clips, never by
    the length of the video. `decoded()` is called when the decoder has no
    more work for this file: as soon as the last clip is decoded, before it
    is yielded, or when decoding stops early; it may be called again at the
    end, so it must not mind a second call.
    """
    deadline, reader, pending = Deadline(timeout), None, collections.deque()
    try:
        reader = deadline.call(open_reader, path, decoder, policy, recycle_clips)
        plans = plan_clips(reader.timestamps(), reader.duration(), spec, reader.nominal_rate)
        if not plans:
            raise VideoDecodeError(f"no frames between --start {spec.start:g} s and --end "
                                   f"{spec.end if spec.end is not None else 'the end'} (the video is "
                                   f"{reader.duration():.3f} s, {reader.num_frames} frames)")
        n, ahead = 0, 1
        while n < len(plans):
            while len(pending) < ahead and n + len(pending) < len(plans):
                pending.append(deadline.submit(reader.get_batch, plans[n + len(pending)].frame_indices))
            plan = plans[n]
            try:
                frames = deadline.wait(pending.popleft())
                if len(frames) != len(plan.frame_indices):
                    raise VideoDecodeError(f"{len(frames)} frames decoded, {len(plan.frame_indices)} asked for")
            except DecodeTimeout as e:
                reader = None  # its decoder may still be running in the abandoned thread: leave it alone
                yield plan.index, e
                return
            except Exception as e:
                _settle(deadline, pending)  # the old reader's later clips, before it is closed
                if reader.name != "decord":
                    yield plan.index, e if isinstance(e, VideoDecodeError) else VideoDecodeError(
                        f"{type(e).__name__}: {e}")
                    return
                reader.close()
                try:  # PyAV stands in from this clip on, with its own plan
                    reader = deadline.call(PyAVReader, path, policy)
                    plans = plan_clips(reader.timestamps(), reader.duration(), spec, reader.nominal_rate)
                except Exception as e2:
                    yield plan.index, VideoDecodeError(f"decord: {e}; pyav: {e2}")
                    return
                if n >= len(plans):
                    yield plan.index, VideoDecodeError(
                        f"decord: {e}; pyav finds only {len(plans)} clips in the stream")
                    return
                continue
            ahead = max(1, ahead_bytes // max(frames.nbytes, 1))
            if n == len(plans) - 1 and decoded is not None:
                decoded()
            yield Clip(plan, frames, reader.width, reader.height, reader.name)
            n += 1
    finally:
        if reader is not None and not _settle(deadline, pending):
            reader = None  # still decoding in the abandoned thread: leave it alone
        if reader is not None:
            reader.close()
        deadline.close()
        if decoded is not None:
            decoded()


def _settle(deadline: "Deadline", pending: "collections.deque") -> bool:
    """Wait for clips decoded ahead that nobody will take; False if the time budget ran out first."""
    while pending:
        try:
            deadline.wait(pending.popleft())
        except DecodeTimeout:
            pending.clear()
            return False
        except Exception:  # noqa: BLE001 - a clip nobody asked for any more
            pass
    return True


class local_copy:
    """A local path to a task's video: the file itself, or a temporary copy of a remote file or tar member.

    decord and FFmpeg want a path they can seek in; the copy streams in 1 MiB
    chunks, so memory does not grow with the video.
    """

    def __init__(self, task: "VideoTask"):
        self._task, self._tmp = task, None

    def __enter__(self) -> str:
        from tokenmill.transforms import fs

        task = self._task
        if not task.member and fs.is_local(task.source):
            return fs.canonical(task.source)
        suffix = os.path.splitext(task.member or task.source)[1]
        self._tmp = tempfile.NamedTemporaryFile(prefix="tokenmill-video-", suffix=suffix, delete=False)
        with fs.open_binary(task.source) as f, self._tmp as out:
            if task.member:
                f.seek(task.offset)
                left = task.size
                while left > 0:
                    chunk = f.read(min(left, 1 << 20))
                    if not chunk:
                        raise VideoDecodeError(f"tar ends {left} bytes before the end of member {task.member}")
                    out.write(chunk)
                    left -= len(chunk)
            else:
                shutil.copyfileobj(f, out, 1 << 20)
        return self._tmp.name

    def __exit__(self, *exc) -> None:
        if self._tmp is not None:
            os.unlink(self._tmp.name)


def decode_video_task(task: "VideoTask", spec: ClipSpec, policy: SizePolicy, *, decoder: str = "decord",
                      timeout: float = DEFAULT_DECODE_TIMEOUT, block_bytes: int = DEFAULT_BLOCK_BYTES,
                      recycle_clips: int = DEFAULT_RECYCLE_CLIPS, decoded: Callable[[], None] | None = None
                      ) -> Iterator["VideoBlock"]:
    """VideoBlocks of one video's clips, about `block_bytes` of frames each, as they are decoded.

    Every clip ends as a clip in a block or as an error record, and a video that
    gives no clip at all gives one error record (locator 'file' or 'member:NAME').
    `decoded()` is called (at least once) when the decoder has no more work for
    this video (see iter_clips).
    """
    from tokenmill.transforms.records import ErrorRecord, VideoBlock

    block = task.block

    def empty() -> VideoBlock:
        return VideoBlock(task.source, block, [], [], [], [], [], [])

    out, produced = empty(), 0
    try:
        with local_copy(task) as path:
            if os.path.getsize(path) == 0:
                raise VideoDecodeError("zero-byte file")
            for item in iter_clips(path, spec, policy, decoder=decoder, timeout=timeout,
                                   recycle_clips=recycle_clips, ahead_bytes=block_bytes, decoded=decoded):
                produced += 1
                if isinstance(item, tuple):
                    n, e = item
                    out.errors.append(ErrorRecord(task.source, task.locator(n), "decode", type(e).__name__,
                                                  f"clip {n} cannot be decoded; later clips are not read: {e}"))
                    continue
                plan = item.plan
                out.locators.append(task.locator(plan.index))
                out.sources.append(task.source)
                out.clips.append(item.frames)
                out.infos.append({"clip_start": plan.start, "clip_end": plan.end, "fps": plan.fps,
                                  "frame_indices": list(plan.frame_indices), "orig_width": item.orig_width,
                                  "orig_height": item.orig_height, "decoder": item.decoder})
                out.metas.append(task.meta)
                out.nbytes += item.frames.nbytes
                if out.nbytes >= block_bytes:
                    yield out
                    block += 1
                    out = empty()
    except Exception as e:  # cannot open, no video stream, nothing in range, timeout
        if not produced:
            reason = str(e) or type(e).__name__
            out.errors.append(ErrorRecord(task.source, task.locator(), "decode", type(e).__name__,
                                          f"no clip could be decoded: {reason}"))
        else:
            out.errors.append(ErrorRecord(task.source, task.locator(produced), "decode", type(e).__name__,
                                          f"decoding stopped after {produced} clips: {e}"))
    if decoded is not None:
        decoded()
    if out.locators or out.errors or block == task.block:
        yield out


class _Done:
    """A video's last item on the ready queue; carries the error that stopped its thread, if any."""

    def __init__(self, error: BaseException | None = None):
        self.error = error


class ConcurrentVideos:
    """Decodes up to `decoders` videos at once and hands out their blocks as they are ready.

    Each video runs in its own thread. It holds at most one finished block
    that has not been taken and dealt with, so memory stays bounded by videos
    in flight times (a block + the clips decoded ahead), never by video length.
    A video frees its decoder slot the moment its decoder has no more work
    (not when its last block has been tokenized and written), so the next
    video starts decoding while the last blocks of this one are dealt with.
    Blocks of different videos come out interleaved; every block names its
    own source and number, so nothing downstream depends on their order.
    """

    def __init__(self, decoders: int, blocks: Callable[["VideoTask", Callable[[], None]], Iterator[VideoBlock]]):
        self._blocks, self._count = blocks, decoders
        self._decoders = threading.Semaphore(decoders)
        self._ready: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = threading.Event()
        self._slots: set[threading.Semaphore] = set()
        self.running = 0  # videos added whose last block has not been taken (consumer thread only)

    def add(self, task: "VideoTask") -> None:
        """Start a thread for the video; it decodes once one of the `decoders` slots is free."""
        self.running += 1
        # A daemon thread, not a pool's: a thread left waiting by a bundle that
        # failed must not hold up the interpreter's exit.
        threading.Thread(target=self._decode, args=(task,), name="tokenmill-video", daemon=True).start()

    def _decode(self, task: "VideoTask") -> None:
        slot, released = threading.Semaphore(1), threading.Lock()  # slot: one handed-over block at a time
        self._slots.add(slot)

        def decoded() -> None:
            if released.acquire(blocking=False):
                self._decoders.release()

        error = None
        try:
            self._decoders.acquire()
            if self._closed.is_set():
                return
            with contextlib.closing(self._blocks(task, decoded)) as blocks:
                for block in blocks:
                    slot.acquire()
                    if self._closed.is_set():
                        return
                    self._ready.put((block, slot))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            error = e
        finally:
            decoded()
            self._slots.discard(slot)
            self._ready.put((_Done(error), None))

    def take(self, until_running: int) -> Iterator[VideoBlock]:
        """Blocks as they are ready, until no more than `until_running` videos are still running."""
        while self.running > until_running:
            item, slot = self._ready.get()
            if isinstance(item, _Done):
                self.running -= 1
                if item.error is not None:
                    raise item.error
                continue
            try:
                yield item
            finally:
                slot.release()  # its video may hand over the next block

    def close(self) -> None:
        """Stops every video thread at its next block (a blocked one is let go)."""
        self._closed.set()
        for slot in list(self._slots):
            slot.release()
        self._decoders.release(self.running + self._count)


@beam.typehints.with_output_types(VideoBlock)
class _DecodeVideoTasks(beam.DoFn):
    """Videos → blocks of decoded clips, `decoders` videos decoding at once (ConcurrentVideos).

    process() hands its video to the decoders and emits whatever blocks are
    ready until no more than `decoders` videos are in flight; finish_bundle
    emits the rest. So a block may be emitted while a later element is
    processed; outputs are in the global window and carry their own source,
    so this changes no row. With one decoder the next video is still opened
    and decoded while this one's last blocks are tokenized and written:
    before, the decoder idled at every file boundary (measured: 0.9 s of a
    7.6 s build of 8 videos).
    """

    def __init__(self, spec: ClipSpec, policy: str, decoder: str, timeout: float, block_bytes: int,
                 decoders: int = 1):
        self._spec, self._policy, self._decoder = spec, SizePolicy.parse(policy), decoder
        self._timeout, self._block_bytes, self._decoders = timeout, block_bytes, decoders
        self._clips = Metrics.counter("tokenmill", "clips")
        self._frames = Metrics.counter("tokenmill", "frames")
        self._rejected = Metrics.counter("tokenmill", "decode_errors")

    def setup(self) -> None:
        self._videos = ConcurrentVideos(self._decoders, lambda task, decoded: decode_video_task(
            task, self._spec, self._policy, decoder=self._decoder, timeout=self._timeout,
            block_bytes=self._block_bytes, decoded=decoded))

    def process(self, task: "VideoTask") -> Iterator["VideoBlock"]:
        self._videos.add(task)
        yield from self._counted(self._videos.take(until_running=self._decoders))

    def finish_bundle(self) -> Iterator[WindowedValue]:
        for block in self._counted(self._videos.take(until_running=0)):
            yield GlobalWindows.windowed_value(block)

    def teardown(self) -> None:
        self._videos.close()

    def _counted(self, blocks: Iterator[VideoBlock]) -> Iterator[VideoBlock]:
        for block in blocks:  # counted here, in the bundle's thread: Beam's metrics are per thread
            self._clips.inc(len(block.clips))
            self._frames.inc(sum(len(c) for c in block.clips))
            self._rejected.inc(len(block.errors))
            yield block


class DecodeVideos(beam.PTransform):
    """VideoTasks → VideoBlocks of decoded clips, streamed, `decoders` videos at once per worker.

    Returns (blocks, failed).
    """

    def __init__(self, spec: ClipSpec, policy: str = "native:1024", *, decoder: str = "decord",
                 timeout: float = DEFAULT_DECODE_TIMEOUT, block_bytes: int = DEFAULT_BLOCK_BYTES, decoders: int = 1):
        super().__init__()
        SizePolicy.parse(policy)  # fail at construction on a bad policy
        if decoder not in DECODERS:
            raise ValueError(f"unknown decoder {decoder!r}: use one of {', '.join(DECODERS)}")
        if decoders < 1:
            raise ValueError(f"decoders must be 1 or more, got {decoders}")
        self._args = (spec, policy, decoder, timeout, block_bytes, decoders)

    def expand(self, tasks):
        # partial=True: clips go downstream as they are decoded, not held until the video is done.
        return tasks | "DecodeVideoClips" >> beam.ParDo(_DecodeVideoTasks(*self._args)).with_exception_handling(
            partial=True)
