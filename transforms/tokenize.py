"""TokenizeBlocks: decoded blocks of any modality → TokenBlocks (Arrow tables in the dataset schema).

The tokenizer is loaded once per worker in setup(); each block of documents is
encoded in one call, straight into an Arrow list column.
"""
from __future__ import annotations

from typing import Any, Iterator

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.metrics import Metrics

from tokenmill.schemas.tables import dataset_schema, kept_fields_field, table_from_columns, text_hard_schema
from tokenmill.transforms.records import ErrorRecord, ImageBlock, TextBlock, TokenBlock, VideoBlock, row_id, row_ids
from tokenmill.transforms.coders import BlockCoder  # noqa: F401  (registers the block coder)
from tokenmill.transforms.tokenizers.base import ImageTokenizer, TextTokenizer, VideoTokenizer
from tokenmill.transforms.registry import shared_tokenizer


def tokenize_block(tokenizer: TextTokenizer, block: TextBlock, schema: pa.Schema) -> TokenBlock:
    """Encode one block; documents the tokenizer rejects become error records."""
    column, failures = tokenizer.encode_batch(block.texts)
    errors = list(block.errors)
    locators = block.locators
    if failures:
        failed = {i for i, _ in failures}
        errors += [ErrorRecord(block.source, locators[i], "tokenize", type(e).__name__, str(e))
                   for i, e in failures]
        locators = [loc for i, loc in enumerate(locators) if i not in failed]
    meta = block.meta
    if meta is not None and failures:
        meta = meta.filter(pa.array([i not in failed for i in range(len(block.texts))]))
    lengths = column.value_lengths().to_numpy(zero_copy_only=False).astype(np.int32)
    table = pa.Table.from_arrays(
        [pa.array(row_ids(block.source, locators), pa.string()),
         pa.array([block.source] * len(locators), pa.string()),
         pa.array(locators, pa.string()),
         pa.array(["text"] * len(locators), pa.string()),
         column,
         pa.array(lengths, pa.int32())],
        schema=schema)
    if meta is not None:  # --keep-fields
        table = table.append_column(kept_fields_field(meta.type), meta)
    return TokenBlock(block.source, block.block, table, errors, block.nbytes)


class _CountingTokenizeDoFn(beam.DoFn):
    """Counts what a tokenize step produced: rows, tokens and newly rejected records."""

    def __init__(self):
        self._documents = Metrics.counter("tokenmill", "documents")
        self._tokens = Metrics.counter("tokenmill", "tokens")
        self._rejected = Metrics.counter("tokenmill", "tokenize_errors")

    def _counted(self, out: TokenBlock, errors_before: int) -> TokenBlock:
        self._documents.inc(out.table.num_rows)
        self._tokens.inc(int(pc.sum(out.table.column("num_tokens")).as_py() or 0))
        self._rejected.inc(len(out.errors) - errors_before)
        return out


def _array_rows(tokenizer: ImageTokenizer | VideoTokenizer, block: ImageBlock | VideoBlock, items: list[Any],
                schema: pa.Schema, extra: Any = None) -> TokenBlock:
    """Encode a block's images or clips into rows; items the tokenizer rejects become error records.

    `extra(keep, shapes)` gives modality-specific columns for the kept items.
    """
    column, grids, failures = tokenizer.encode_batch(items)
    failed = {i for i, _ in failures}
    errors = list(block.errors) + [ErrorRecord(block.sources[i], block.locators[i], "tokenize", type(e).__name__,
                                               str(e)) for i, e in failures]
    keep = [i for i in range(len(items)) if i not in failed]
    sources = [block.sources[i] for i in keep]
    locators = [block.locators[i] for i in keep]
    infos = [block.infos[i] for i in keep]
    shapes = [items[i].shape[:-1] for i in keep]  # (H, W) or (T, H, W)
    payload = "tokens" if tokenizer.kind == "hard" else "latents"
    table = table_from_columns(schema, {
        "id": [row_id(s, l) for s, l in zip(sources, locators)],
        "source": sources, "locator": locators, "modality": [tokenizer.modality] * len(keep),
        payload: column, "num_tokens": [int(np.prod(g)) for g in grids], "grid": [list(g) for g in grids],
        "orig_height": [i["orig_height"] for i in infos], "orig_width": [i["orig_width"] for i in infos],
        "height": [s[-2] for s in shapes], "width": [s[-1] for s in shapes],
        "meta": [block.metas[i] for i in keep],
        **(extra(infos, shapes) if extra else {}),
    }, len(keep))
    return TokenBlock(block.source, block.block, table, errors, block.nbytes)


def tokenize_image_block(tokenizer: ImageTokenizer, block: ImageBlock, schema: pa.Schema) -> TokenBlock:
    """Encode one block of images; images the tokenizer rejects become error records."""
    return _array_rows(tokenizer, block, block.images, schema)


def tokenize_video_block(tokenizer: VideoTokenizer, block: VideoBlock, schema: pa.Schema) -> TokenBlock:
    """Encode one block of clips; each row carries its grid, clip timing, frame indices and padding."""
    def timing(infos: list[dict[str, Any]], shapes: list[tuple[int, ...]]) -> dict[str, Any]:
        return {**{k: [i[k] for i in infos] for k in ("clip_start", "clip_end", "fps", "frame_indices")},
                "padding": [list(tokenizer.padding(*s)) for s in shapes]}

    return _array_rows(tokenizer, block, block.clips, schema, timing)


def image_schema(tokenizer: ImageTokenizer | VideoTokenizer) -> pa.Schema:
    return dataset_schema(tokenizer.modality, tokenizer.kind, token_dtype=str(tokenizer.token_type)
                          if tokenizer.kind == "hard" else None, latent_dtype=tokenizer.latent_dtype,
                          dim=tokenizer.dim or None, metadata=tokenizer.metadata())


def text_schema(tokenizer: TextTokenizer) -> pa.Schema:
    return text_hard_schema(tokenizer.token_type, tokenizer.metadata())


@beam.typehints.with_output_types(TokenBlock)
class _TokenizeBlocks(_CountingTokenizeDoFn):
    """Blocks through their tokenizer, loaded once per worker (shared by the workers of a process)."""

    def __init__(self, modality: str, spec: str, options: tuple[tuple[str, Any], ...], threads: int = 1):
        super().__init__()
        self._modality, self._spec, self._options, self._threads = modality, spec, options, threads

    def setup(self) -> None:
        from tokenmill.transforms import registry

        self._tokenizer = shared_tokenizer(self._spec, self._modality, self._options)
        plugin = registry.modality(self._modality)  # how its blocks become rows, and their schema
        self._encode, self._schema = plugin.rows_and_schema(self._tokenizer)
        if self._threads > 1 and getattr(self._tokenizer, "parallel_items", False) \
                and self._tokenizer.item_pool is None:
            # One BLAS thread per item and items on `threads` threads: a 1024 x 768
            # by 768 x 256 code search scales across images, not inside one
            # (measured: vq K=256 on 1,000 images, docs/benchmarks.md).
            from concurrent.futures import ThreadPoolExecutor

            from threadpoolctl import threadpool_limits

            threadpool_limits(limits=1, user_api="blas")
            self._tokenizer.item_pool = ThreadPoolExecutor(self._threads, thread_name_prefix="tokenmill-encode")

    def process(self, block: TextBlock | ImageBlock | VideoBlock) -> Iterator[TokenBlock]:
        yield self._counted(self._encode(self._tokenizer, block, self._schema), len(block.errors))


class TokenizeBlocks(beam.PTransform):
    """Decoded blocks of one modality → TokenBlocks, through any tokenizer of the registry.

    Returns (blocks, failed), where failed holds the blocks that raised.
    """

    def __init__(self, modality: str, spec: str, options: tuple[tuple[str, Any], ...] = (), threads: int = 1,
                 label: str = "EncodeBlocks"):
        super().__init__()
        self._modality, self._spec, self._options, self._threads, self._label = \
            modality, spec, tuple(options), threads, label

    def expand(self, blocks):
        return blocks | self._label >> beam.ParDo(
            _TokenizeBlocks(self._modality, self._spec, self._options, self._threads)).with_exception_handling()
