"""A finished dataset, read through its manifest: schema, rows, errors, its tokenizer, and originals."""
from __future__ import annotations

import functools
import io
import json
import os
import re
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tokenmill.schemas.manifest import MANIFEST_NAME, dataset_path, read_manifest
from tokenmill.schemas.storage import join, read_bytes
from tokenmill.schemas.tables import ERROR_SCHEMA, LATENT_NUMPY, read_metadata, schema_for_manifest
from tokenmill.transforms.fs import canonical, open_binary

_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


class NotLocalError(ValueError):
    """What a report would have to fetch. Reports read the dataset and local files, never the network:
    a row's source or a tokenizer file is data, and a URL in it must not make `inspect` or `report` connect."""


def local_file(uri: str, what: str) -> str:
    """The path of `uri` if it is a regular local file (FIFOs and devices could block a read); else NotLocalError."""
    schemes = {m.group(1).lower() for m in _URL.finditer(uri)}
    if schemes - {"file"}:
        raise NotLocalError(f"{what} {uri} is not a local file, and reports fetch nothing from the network")
    path = canonical(uri)
    if os.path.exists(path) and not os.path.isfile(path):
        raise NotLocalError(f"{what} {uri} is not a regular file")
    return path


class DatasetView:
    """Read-only access to the dataset at `root`. Raises FileNotFoundError without a manifest."""

    def __init__(self, root: str):
        self.root = root
        self.manifest = read_manifest(root)
        self.raw_manifest: dict[str, Any] = json.loads(read_bytes(join(root, MANIFEST_NAME)))

    @property
    def modality(self) -> str:
        return self.manifest.modality

    @property
    def kind(self) -> str:
        return self.manifest.tokenizer.get("kind", "hard")

    def _open(self, relative: str):
        return open_binary(dataset_path(self.root, relative))

    def schema(self) -> pa.Schema:
        """The schema of the first data shard (with its metadata), else the one the manifest implies."""
        if self.manifest.files:
            with self._open(self.manifest.files[0]) as f:
                return pq.read_schema(f)
        return schema_for_manifest(self.manifest)

    def metadata(self) -> dict[str, Any]:
        return read_metadata(self.schema()) or dict(self.manifest.tokenizer)

    def versions(self) -> list[dict[str, Any]]:
        """The manifest's version history where it keeps one, else the current build as the only entry."""
        if isinstance(self.raw_manifest.get("versions"), list) and self.raw_manifest["versions"]:
            return list(self.raw_manifest["versions"])
        m = self.manifest
        return [{"version": self.raw_manifest.get("version", "current"), "created_at": m.created_at,
                 "tokenmill_version": m.tokenmill_version, "fingerprint": m.tokenizer.get("fingerprint"),
                 "rows": m.rows, "tokens": m.tokens, "errors": m.errors}]

    def tables(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """Each data shard in manifest order (only `columns`, if given)."""
        for shard in self.manifest.files:
            with self._open(shard) as f:
                yield pq.read_table(f, columns=columns)

    def column(self, name: str) -> np.ndarray:
        """One numeric column of every row, as a numpy array."""
        parts = [t.column(name).to_numpy() for t in self.tables([name])]
        return np.concatenate(parts) if parts else np.zeros(0)

    def rows(self, n: int) -> list[dict[str, Any]]:
        """The first n rows, in manifest order."""
        out: list[dict[str, Any]] = []
        for shard in self.manifest.files:
            if len(out) >= n:
                break
            with self._open(shard) as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=n - len(out)):
                    out += batch.to_pylist()
                    break
        return out

    def row(self, row_id: str) -> dict[str, Any] | None:
        for shard in self.manifest.files:
            with self._open(shard) as f:
                table = pq.read_table(f, filters=pc.field("id") == row_id)
            if table.num_rows:
                return table.to_pylist()[0]
        return None

    def errors(self) -> pa.Table:
        tables = []
        for shard in self.manifest.error_files:
            with self._open(shard) as f:
                tables.append(pq.read_table(f))
        return pa.concat_tables(tables) if tables else ERROR_SCHEMA.empty_table()

    def latents(self, row: dict[str, Any]) -> np.ndarray:
        """A soft row's latents as (num_tokens, dim)."""
        dtype = LATENT_NUMPY[self.manifest.tokenizer["latent_dtype"]]
        return np.frombuffer(row["latents"], dtype).reshape(row["num_tokens"], -1)

    def payload(self, row: dict[str, Any]) -> np.ndarray:
        """Token IDs (hard) or latents (soft) of a row."""
        return np.asarray(row["tokens"]) if "tokens" in row else self.latents(row)

    @functools.cached_property
    def tokenizer(self):
        """The tokenizer the dataset records, loaded from its spec; ValueError if it cannot be, or
        if it no longer has the dataset's fingerprint (a vq file refitted in place, say)."""
        tok_meta = self.manifest.tokenizer
        spec = tok_meta["spec"]
        if _URL.search(str(spec)) and {m.group(1).lower() for m in _URL.finditer(spec)} - {"file"}:
            raise NotLocalError(f"tokenizer {spec} names a file that is not local, and reports fetch nothing "
                                "from the network")
        if self.modality == "text":
            from tokenmill.transforms.tokenizers.spec import load_text_tokenizer

            policy = tok_meta.get("special_token_policy") or {}
            tok = load_text_tokenizer(spec, bos=policy.get("bos") is not None, eos=policy.get("eos") is not None)
        else:  # loaded as `tokenmill decode` loads it
            from tokenmill.transforms.tokenizers.spec import (load_image_tokenizer, load_video_tokenizer,
                                                              recorded_options)

            load = load_image_tokenizer if self.modality == "image" else load_video_tokenizer
            tok = load(spec, **recorded_options(self.manifest))
        if tok.fingerprint() != tok_meta.get("fingerprint"):
            raise ValueError(f"{spec} no longer matches the dataset's tokenizer fingerprint")
        return tok

    def reconstruction(self, row: dict[str, Any], tokenizer: Any = None) -> np.ndarray:
        """What an image or video row's tokens decode to (render.reconstruct): the image at the row's height and
        width, or the clip's frames (F, H, W, 3). ValueError where the tokenizer cannot be loaded (see
        `tokenizer`), NotImplementedError where it has no decoder. `tokenizer`: one loaded otherwise (`tokenmill
        decode` may load a codebook from object storage, which a report never fetches)."""
        from tokenmill.reports.render import reconstruct

        shape = ((len(row["frame_indices"]), row["height"], row["width"]) if self.modality == "video"
                 else (row["height"], row["width"]))
        return reconstruct(tokenizer or self.tokenizer, self.payload(row), row["grid"], shape)

    def original_image(self, row: dict[str, Any]) -> np.ndarray:
        """The source image of a row, decoded with the build's size policy (what was tokenized).

        Reads image files ('file'), tar members ('member:NAME') and Parquet rows ('row:N'), only where
        the source is a local file (NotLocalError otherwise).
        """
        from tokenmill.transforms.decoders.images import DEFAULT_MAX_PIXELS, SizePolicy, decode_image

        options = self.manifest.options
        locator = row["locator"]
        source = local_file(row["source"], "source")
        if locator == "file":
            with open(source, "rb") as f:
                data = f.read()
        elif locator.startswith("member:"):
            import tarfile

            with open(source, "rb") as f, tarfile.open(fileobj=f, mode="r:*") as tar:
                member = tar.extractfile(locator.removeprefix("member:"))
                if member is None:
                    raise ValueError(f"{source}: {locator} is not a file")
                data = member.read()
        elif locator.startswith("row:"):
            field = options.get("image_field", "image")
            with open(source, "rb") as f:
                table = pq.read_table(f, columns=[field])
            value = table.column(field)[int(locator.removeprefix("row:"))].as_py()
            data = value.get("bytes") if isinstance(value, dict) else value
        else:
            raise ValueError(f"cannot locate {locator!r} in {source}")
        policy = SizePolicy.parse(options.get("size_policy", "native:1024"))
        return decode_image(data, policy, options.get("max_pixels", DEFAULT_MAX_PIXELS))[0]


    def original_clip(self, row: dict[str, Any]) -> np.ndarray:
        """A video row's frames (F, H, W, 3) decoded again from its source with the build's size policy and
        decoder, by the row's frame indices; only from a local video file (NotLocalError otherwise, and
        ValueError for a member of a tar, which this does not unpack)."""
        from tokenmill.transforms.decoders.images import SizePolicy
        from tokenmill.transforms.decoders.video import open_reader

        if "member:" in row["locator"]:
            raise ValueError("a clip of a video inside a tar is not decoded again for the report")
        source = local_file(row["source"], "source")
        options = self.manifest.options
        reader = open_reader(source, options.get("decoder", "decord"),
                             SizePolicy.parse(options.get("size_policy", "native:1024")))
        try:
            return np.asarray(reader.get_batch(list(row["frame_indices"])))
        finally:
            reader.close()


def png_bytes(image: np.ndarray) -> bytes:
    """An RGB uint8 array as PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, "PNG")
    return buf.getvalue()
