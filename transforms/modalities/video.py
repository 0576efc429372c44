"""Video: video files and WebDataset tars of videos → sampled clips → tokens on a (t, h, w) grid."""
from __future__ import annotations

from typing import Any, Mapping

from tokenmill.transforms.decoders.video import DECODERS, DEFAULT_DECODE_TIMEOUT
from tokenmill.transforms.modalities.image import SIZE
from tokenmill.transforms.registry import Modality, Option


class VideoModality(Modality):
    name = "video"
    rows_function, schema_function = "tokenize_video_block", "image_schema"  # in transforms/tokenize.py
    allocator_tuning = True  # clips of 10-100 MB are freed and allocated again all the time
    options = (
        SIZE,
        Option("fps", "sample clips at F frames per second (default: the source frames as they are)", type=float,
               metavar="F"),
        Option("clip_frames", "frames per clip (default: 16)", type=int, default=16, metavar="N"),
        Option("clip_stride", "sampled frames between clip starts; less than --clip-frames overlaps clips "
               "(default: --clip-frames)", type=int, metavar="N"),
        Option("max_clips", "clips per video at most (default: all)", type=int, metavar="N"),
        Option("start", "skip the video before this time", type=float, default=0.0, metavar="SECONDS"),
        Option("end", "stop at this time (default: the end)", type=float, metavar="SECONDS"),
        Option("decode_timeout", "per-video decode time limit; a video over it ends as an error row "
               f"(default: {DEFAULT_DECODE_TIMEOUT:g})", type=float, default=DEFAULT_DECODE_TIMEOUT,
               metavar="SECONDS"),
        Option("decoder", "video decoder; PyAV stands in where decord is missing or fails (default: decord)",
               default="decord", choices=DECODERS),
    )

    def detect(self, uri: str) -> bool | None:
        from tokenmill.transforms.sources.videos import video_kind

        kind = video_kind(uri)
        return True if kind == "video-file" else None if kind is not None else False

    @staticmethod
    def clip_spec(reader: Mapping[str, Any]):
        """How --fps, --clip-frames, --clip-stride, --max-clips, --start and --end sample clips."""
        from tokenmill.transforms.decoders.video import ClipSpec

        return ClipSpec(frames=reader["clip_frames"], fps=reader["fps"], stride=reader["clip_stride"],
                        max_clips=reader["max_clips"], start=reader["start"], end=reader["end"])

    def record(self, reader: Mapping[str, Any]) -> dict[str, Any]:
        return {"size_policy": reader["size"], "decoder": reader["decoder"], "decode_timeout": reader["decode_timeout"],
                **self.clip_spec(reader).record()}

    def check(self, reader: Mapping[str, Any]) -> None:
        from tokenmill.transforms.decoders.images import SizePolicy

        SizePolicy.parse(reader["size"])
        self.clip_spec(reader)
        if not reader["decode_timeout"] > 0:  # every video would time out
            raise ValueError(f"--decode-timeout must be a positive number of seconds, not {reader['decode_timeout']}")

    def read_and_decode(self, pbegin, spec, incremental, threads: int):
        from tokenmill.transforms.decoders.video import DecodeVideos
        from tokenmill.transforms.sources.videos import ReadVideoShards

        r = spec.reader_options
        read = pbegin | "ReadVideoShards" >> ReadVideoShards(list(spec.inputs), incremental=incremental)
        decoded, failed = read["blocks"] | "DecodeVideos" >> DecodeVideos(
            self.clip_spec(r), r["size"], decoder=r["decoder"], timeout=r["decode_timeout"], decoders=threads)
        return read, decoded, failed

    def tokenize(self, decoded, spec, cores: int):
        from tokenmill.transforms.tokenize import TokenizeBlocks

        return decoded | "TokenizeVideos" >> TokenizeBlocks("video", spec.tokenizer.spec, spec.tokenizer.options,
                                                            threads=cores, label="EncodeVideoBlocks")



MODALITY = VideoModality()
