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
        Option("max_doc_bytes", "records (a JSON line, a Parquet text value, a whole .txt file) larger than this become "
               "error rows, skipped as they stream past (default: 64MiB)",
               type=byte_size, default=DEFAULT_MAX_DOC_BYTES, metavar="BYTES"),
        Option("keep_fields", "source fields each row keeps in its `meta` column, for the trainer: JSON fields or "
               "Parquet columns, comma-separated, dots for nested ones, each optionally :TYPE (an Arrow type: "
               "string (default; other values as JSON text), int64, float64, bool, ...), e.g. "
               "lang,url,meta.score:float64", metavar="A,B.C[:TYPE]"),
    )

    def detect(self, uri: str) -> bool | None:
        from tokenmill.transforms.sources.text import detect_format

        found = detect_format(uri)
        return None if found is not None and found[0] == "parquet" else found is not None

    def record(self, reader: Mapping[str, Any]) -> dict[str, Any]:
        out = {"text_field": reader["text_field"], "txt_per_line": reader["txt_per_line"],
               "max_doc_bytes": reader["max_doc_bytes"]}
        keep = _keep(reader)
        if keep:  # only when set: the version ids of datasets built without it stay as they were
            out["keep_fields"] = ",".join(f"{path}:{alias}" for path, alias in keep)
        return out

    def check(self, reader: Mapping[str, Any]) -> None:
        _keep(reader)

    def read_and_decode(self, pbegin, spec, incremental, threads: int):
        from tokenmill.transforms.decoders.text import DecodeText
        from tokenmill.transforms.sources.text import ReadTextShards

        r = spec.reader_options
        keep = _keep(r)
        read = pbegin | "ReadTextShards" >> ReadTextShards(
            list(spec.inputs), text_field=r["text_field"], txt_per_line=r["txt_per_line"],
            block_bytes=spec.layout.block_size, max_doc_bytes=r["max_doc_bytes"], incremental=incremental,
            keep_columns=tuple(path.split(".")[0] for path, _ in keep))
        decoded, failed = read["blocks"] | "DecodeText" >> DecodeText(r["text_field"], keep)
        return read, decoded, failed

    def tokenize(self, decoded, spec, cores: int):
        from tokenmill.transforms.tokenize import TokenizeBlocks

        return decoded | "TokenizeText" >> TokenizeBlocks("text", spec.tokenizer.spec, spec.tokenizer.options,
                                                          label="EncodeBlocks")



def _keep(reader: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    from tokenmill.schemas.tables import parse_keep_fields

    return parse_keep_fields(reader.get("keep_fields"))


MODALITY = TextModality()
