"""Images: image files, WebDataset tars and Parquet with image bytes → RGB arrays → tokens on a (h, w) grid."""
from __future__ import annotations

from typing import Any, Mapping

from tokenmill.transforms.decoders.images import DEFAULT_MAX_PIXELS
from tokenmill.transforms.registry import Modality, Option

SIZE = Option("size", "image size policy: native[:MAX] keeps the size, downscaling so the longer side is at most "
              "MAX; crop:S center-crops a square and resizes to S; shorter:S resizes the shorter side to S "
              "(default: native:1024)", default="native:1024", metavar="POLICY")


class ImageModality(Modality):
    name = "image"
    rows_function, schema_function = "tokenize_image_block", "image_schema"  # in transforms/tokenize.py
    options = (
        SIZE,
        Option("max_pixels", "images whose header declares more pixels are refused before decoding "
               f"(decompression bombs; default {DEFAULT_MAX_PIXELS})", type=int, default=DEFAULT_MAX_PIXELS,
               metavar="N"),
        Option("image_field", "Parquet column with the image bytes (default: image)", default="image",
               metavar="NAME"),
    )

    def detect(self, uri: str) -> bool | None:
        from tokenmill.transforms.sources.images import image_kind

        kind = image_kind(uri)
        return True if kind == "image-files" else None if kind in ("tar", "parquet") else False

    def record(self, reader: Mapping[str, Any]) -> dict[str, Any]:
        return {"image_field": reader["image_field"], "size_policy": reader["size"],
                "max_pixels": reader["max_pixels"]}

    def check(self, reader: Mapping[str, Any]) -> None:
        from tokenmill.transforms.decoders.images import SizePolicy

        SizePolicy.parse(reader["size"])
        if reader["max_pixels"] < 1:  # every image would be refused
            raise ValueError(f"--max-pixels must be 1 or more, not {reader['max_pixels']}")

    def read_and_decode(self, pbegin, spec, incremental, threads: int):
        from tokenmill.transforms.decoders.images import DecodeImages
        from tokenmill.transforms.sources.images import ReadImageShards

        r = spec.reader_options
        read = pbegin | "ReadImageShards" >> ReadImageShards(list(spec.inputs), image_field=r["image_field"],
                                                             incremental=incremental)
        decoded, failed = read["blocks"] | "DecodeImages" >> DecodeImages(r["size"], r["max_pixels"], threads)
        return read, decoded, failed

    def tokenize(self, decoded, spec, cores: int):
        from tokenmill.transforms.tokenize import TokenizeBlocks

        return decoded | "TokenizeImages" >> TokenizeBlocks("image", spec.tokenizer.spec, spec.tokenizer.options,
                                                            threads=cores, label="EncodeImageBlocks")



MODALITY = ImageModality()
