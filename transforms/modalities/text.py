"""Text: .jsonl, .txt and .parquet shards (plain, .gz or .zst) → documents → token IDs."""
from __future__ import annotations

from typing import Any, Mapping

from tokenmill.transforms.registry import Modality, Option, byte_size
from tokenmill.transforms.sources.text import DEFAULT_MAX_DOC_BYTES


class TextModality(Modality):
    name = "text"
    rows_function, schema_function = "tokenize_block", "text_schema"  # in transforms/tokenize.py
    options = (
        Option("text_field", "JSON field or Parquet column holding the text; dots address nested JSON fields "
               "(default: text)", default="text", metavar="NAME"),
        Option("txt_per_line", ".txt files hold one document per line (default: one document per file)",
               type=None, default=False),
        Option("max_doc_bytes", "whole-file .txt documents larger than this become error rows (default: 64MiB)",
               type=byte_size, default=DEFAULT_MAX_DOC_BYTES, metavar="BYTES"),
    )

    def detect(self, uri: str) -> bool | None:
        from tokenmill.transforms.sources.text import detect_format

        found = detect_format(uri)
        return None if found is not None and found[0] == "parquet" else found is not None

    def record(self, reader: Mapping[str, Any]) -> dict[str, Any]:
        return {"text_field": reader["text_field"], "txt_per_line": reader["txt_per_line"],
                "max_doc_bytes": reader["max_doc_bytes"]}

    def read_and_decode(self, pbegin, spec, incremental, threads: int):
        from tokenmill.transforms.decoders.text import DecodeText
        from tokenmill.transforms.sources.text import ReadTextShards

        r = spec.reader_options
        read = pbegin | "ReadTextShards" >> ReadTextShards(
            list(spec.inputs), text_field=r["text_field"], txt_per_line=r["txt_per_line"],
            block_bytes=spec.layout.block_size, max_doc_bytes=r["max_doc_bytes"], incremental=incremental)
        decoded, failed = read["blocks"] | "DecodeText" >> DecodeText(r["text_field"])
        return read, decoded, failed

    def tokenize(self, decoded, spec, cores: int):
        from tokenmill.transforms.tokenize import TokenizeBlocks

        return decoded | "TokenizeText" >> TokenizeBlocks("text", spec.tokenizer.spec, spec.tokenizer.options,
                                                          label="EncodeBlocks")



MODALITY = TextModality()
